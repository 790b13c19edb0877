//! Who is calling: operators by JWT (`admin`), resellers by HMAC signature (`signing`).

pub mod admin;
pub mod keys;
pub mod reseller;
pub mod signing;
