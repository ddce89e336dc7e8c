//! `debvisor-firewall`: the node's nftables table `inet debvisor` — a ruleset model built from
//! the `firewall:` config and the client networks, rendered to nft JSON with the `nftables`
//! crate and applied as one atomic `nft -j -f -` transaction.
//!
//! - [`Ruleset`] (pure): base chains `input`/`forward`/`output` and per-network ACL chains
//!   `net<vni>-in`/`net<vni>-out`; validated before anything is rendered.
//! - [`Firewall`] (effectful): `apply`, `read_back`, `remove`, and `ensure` (apply only when the
//!   table drifted); [`Nft`] implements it, optionally inside a network namespace.
//!
//! We own one table and nothing else: never `flush ruleset`, never another table's objects.

#![warn(missing_docs)]

pub mod cidr;
pub mod config;
pub mod drift;
pub mod error;
pub mod model;
pub mod nft;
pub mod observe;
pub mod table;

pub use cidr::Cidr;
pub use config::*;
pub use drift::{Drift, RuleRef};
pub use error::{FirewallError, Location, Problem};
pub use model::{
    check_ifname, removal_batch, Acl, AclAction, AclProto, BaseChain, ChainSpec, Hook,
    NetworkRules, Policy, RuleSpec, Ruleset, LIBVIRT_TLS_PORT,
};
pub use nft::{Firewall, Nft, Outcome, DEFAULT_TIMEOUT};
pub use observe::{Observed, ObservedChain, ObservedRule};
pub use table::TABLE;

/// Re-export of the `nftables` crate, for [`Ruleset::add_custom_rule`] statements.
pub use nftables;
