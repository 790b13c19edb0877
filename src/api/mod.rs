//! Handlers, one module per area of API.md.

pub mod admin;
pub mod ops;
pub mod v1;
