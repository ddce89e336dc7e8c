//! `debvisor-netconf`: host networking of a DebVisor node (rtnetlink, sysctl) and its config.

pub mod config;
pub use config::*;
pub mod sysctl;
