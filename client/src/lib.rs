//! `cardgate-client`: buys a CSV file of orders through the cardgate reseller API
//! (`POST /v1/orders/batch`), signed, paced, retried idempotently, and recorded to a
//! JSON Lines file that doubles as the journal a re-run resumes from.
//!
//! Built on the contract (docs/api.md) alone, without the gateway's crate, so a reseller can build it.

#![forbid(unsafe_code)]

pub mod api;
pub mod bulk;
pub mod input;
pub mod journal;
pub mod pacing;
pub mod progress;
pub mod signing;
