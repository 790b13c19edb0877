//! Bounds on money, in minor units.
//!
//! Every price, balance, threshold and movement stays within `MONEY_MAX_MINOR` either
//! way. The reservation scripts compare money as Lua numbers (doubles), which are exact
//! only below 2^53 (about 9.007 * 10^15); 10^15 leaves room for a balance plus a
//! movement, and a price times a quantity (at most 10,000) stays far from i64 overflow.
//! Postgres holds the same bound as CHECK constraints (the `*_bounded` constraints in
//! migrations/V1__baseline.sql).

use crate::error::ApiError;

pub const MONEY_MAX_MINOR: i64 = 1_000_000_000_000_000;

/// A price, face value or threshold: 0 to `MONEY_MAX_MINOR`.
pub fn check_non_negative(field: &str, v: i64) -> Result<(), ApiError> {
    if !(0..=MONEY_MAX_MINOR).contains(&v) {
        return Err(ApiError::invalid(format!(
            "{field} must be 0 to {MONEY_MAX_MINOR} (minor units)"
        )));
    }
    Ok(())
}

/// Whether `v` is within the bound either way (`i64::MIN` included, which has no
/// positive counterpart).
pub fn within(v: i64) -> bool {
    v.unsigned_abs() <= MONEY_MAX_MINOR as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_exact_as_a_double_with_room_to_add() {
        // A balance at the bound plus a movement at the bound is still exact in Lua.
        let sum = 2 * MONEY_MAX_MINOR;
        assert!(sum < 1 << 53);
        assert_eq!(sum as f64 as i64, sum);
    }

    #[test]
    fn checks_refuse_one_past_the_bound_and_i64_min() {
        assert!(check_non_negative("base_price", MONEY_MAX_MINOR).is_ok());
        let e = check_non_negative("base_price", MONEY_MAX_MINOR + 1).unwrap_err();
        assert!(e.to_string().contains("base_price"));
        assert!(check_non_negative("base_price", -1).is_err());
        assert!(within(-MONEY_MAX_MINOR) && !within(MONEY_MAX_MINOR + 1));
        assert!(!within(i64::MIN));
    }
}
