//! Integration tests: one binary, every test against a real gateway on its own port, with
//! its own Postgres database and Redis key prefix (see `helpers`).

#![allow(
    clippy::unwrap_used,
    reason = "helpers fail their test by panicking, as the tests do"
)]

mod helpers;

mod admin;
mod binary;
mod callbacks;
mod cells;
mod cluster;
mod config;
mod early_refusals;
mod faults;
mod global_limits;
mod hot_balance;
mod http_surface;
mod import;
mod isolation;
mod keys;
mod login;
mod money;
mod ops;
mod orders;
mod overload;
mod rebates;
mod recovery;
mod reports;
mod reseller_api;
mod risk;
mod schema;
mod signing;
mod statements;
mod supplier_health;
mod upstream;
mod upstream_reports;
mod vip;
