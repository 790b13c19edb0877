//! Who is calling: operators by JWT (`admin`), resellers by HMAC signature (`signing`).

pub mod admin;
