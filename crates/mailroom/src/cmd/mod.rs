//! One module a subcommand; each only wires settings to the crates and
//! decides nothing a library user would need.

pub mod api;
pub mod apikey;
pub mod bench;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod keys;
pub mod send;
pub mod status;
pub mod topology;
pub mod worker;
