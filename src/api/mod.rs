//! Handlers, one module per area of the contract (docs/api.md).

pub mod admin;
pub mod ops;
pub mod statements;
pub mod v1;
