//! `debvisor-firewall`: the node's nftables ruleset (rendered to nft JSON) and its config.

pub mod config;
pub use config::*;
