//! One module a subcommand; each parses nothing and decides nothing a
//! library user would need, it only wires settings to the crates.

pub mod config;
pub mod keys;
