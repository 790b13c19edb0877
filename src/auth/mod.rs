//! Who is calling: operators by JWT (`admin`) against their accounts in Postgres
//! (`accounts`), resellers by HMAC signature (`signing`).

pub mod accounts;
pub mod admin;
pub mod keys;
pub mod reseller;
pub mod signing;
