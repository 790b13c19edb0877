//! What an API key may call (docs/api.md §7): four scopes, each a family of `/v1` routes.
//! A key holds a set of them; a route names the one it needs.

use serde::ser::SerializeSeq;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `GET /v1/products`, `GET /v1/products/{sku}`.
    CatalogueRead,
    /// `GET /v1/orders/{order_id}`, `GET /v1/orders?merchant_order_no=`.
    OrdersRead,
    /// `POST /v1/orders`, `POST /v1/orders/batch`.
    OrdersWrite,
    /// `GET /v1/balance` (and the statement, `GET /v1/ledger`).
    BalanceRead,
}

impl Scope {
    /// In the order the API lists them.
    pub const ALL: [Scope; 4] = [
        Scope::CatalogueRead,
        Scope::OrdersRead,
        Scope::OrdersWrite,
        Scope::BalanceRead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scope::CatalogueRead => "catalogue:read",
            Scope::OrdersRead => "orders:read",
            Scope::OrdersWrite => "orders:write",
            Scope::BalanceRead => "balance:read",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.name() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// What a key gets when its creator names none.
    pub const ALL: Scopes = Scopes(0b1111);

    pub fn covers(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Names as a client sends them; an unknown one is returned as the error. Repeats
    /// are one scope.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Scopes, String> {
        names.iter().try_fold(Scopes(0), |set, n| {
            Scope::parse(n.as_ref())
                .map(|s| Scopes(set.0 | s.bit()))
                .ok_or_else(|| n.as_ref().to_string())
        })
    }

    /// Names as Postgres stores them. One this build does not know grants nothing (the
    /// column's check allows none): a key's rights narrow, never widen.
    pub fn from_stored(names: &[String]) -> Scopes {
        names
            .iter()
            .filter_map(|n| Scope::parse(n))
            .fold(Scopes(0), |set, s| Scopes(set.0 | s.bit()))
    }

    /// The names, in the order of [`Scope::ALL`].
    pub fn names(self) -> Vec<&'static str> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.covers(*s))
            .map(Scope::name)
            .collect()
    }
}

impl serde::Serialize for Scopes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let names = self.names();
        let mut seq = serializer.serialize_seq(Some(names.len()))?;
        for n in names {
            seq.serialize_element(n)?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_named_or_grant_nothing() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.name()), Some(s));
        }
        assert_eq!(Scopes::parse(&Scope::ALL.map(Scope::name)), Ok(Scopes::ALL));
        let two = Scopes::parse(&["balance:read", "orders:read", "balance:read"]).unwrap();
        assert_eq!(
            two.names(),
            ["orders:read", "balance:read"],
            "repeats are one, listed in order"
        );
        assert!(two.covers(Scope::BalanceRead) && !two.covers(Scope::OrdersWrite));
        assert_eq!(
            Scopes::parse(&["orders:read", "orders:delete"]),
            Err("orders:delete".into())
        );
        assert_eq!(
            Scopes::parse(&["Orders:Read"]),
            Err("Orders:Read".into()),
            "names are exact"
        );
        assert!(Scopes::parse::<&str>(&[]).unwrap().is_empty());
        let stored = Scopes::from_stored(&["orders:write".into(), "admin:everything".into()]);
        assert_eq!(stored.names(), ["orders:write"]);
        assert_eq!(
            serde_json::to_value(two).unwrap(),
            serde_json::json!(["orders:read", "balance:read"])
        );
    }
}
