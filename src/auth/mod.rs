//! Who is calling: operators by JWT (`admin`) against their accounts in Postgres
//! (`accounts`), resellers by HMAC signature (`signing`) with keys held in memory
//! (`keys`), each limited to its `scopes`, their last use noted cheaply (`last_used`).

pub mod accounts;
pub mod admin;
pub mod keys;
pub mod last_used;
pub mod reseller;
pub mod scopes;
pub mod signing;
