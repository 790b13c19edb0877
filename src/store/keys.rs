//! Every Redis key is named here, so that moving to Redis Cluster is a local change.
//!
//! All keys one reservation touches must share a hash slot. Until resellers get home
//! shards (DESIGN.md "Scale-out"), everything lives under the one tag `{s0}`.

#[derive(Debug, Clone)]
pub struct Keys {
    /// `<prefix>{s0}:`
    base: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            base: format!("{prefix}:{{s0}}:"),
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.base.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }

    /// Written when the Redis state was last rebuilt from Postgres; its absence means
    /// Redis lost its data.
    pub fn epoch(&self) -> String {
        self.key(&["epoch"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_shard_tag() {
        let k = Keys::new("cg");
        assert_eq!(k.epoch(), "cg:{s0}:epoch");
    }
}
