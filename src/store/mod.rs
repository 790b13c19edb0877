//! Connections to the two stores: Postgres (the record) and Redis (the hot path).

pub mod coalesce;
pub mod keys;
pub mod pg;
pub mod redis;
