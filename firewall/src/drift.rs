//! [`Drift`]: how the table nft holds differs from the model.
//!
//! Kept apart from `observe.rs`, which computes it (`Ruleset::diff`): the error type carries a
//! drift (`FirewallError::NotApplied`) and the model depends on the error type, so the drift
//! report must depend on neither. It imports nothing of the crate but the table name.

use std::fmt;

use crate::table::TABLE;

/// A rule named in a [`Drift`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// Its chain.
    pub chain: String,
    /// Its description (model) or comment (table), if any.
    pub description: Option<String>,
    /// Its content id, when it has one.
    pub id: Option<String>,
    /// nft's handle, for rules found in the table.
    pub handle: Option<u64>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.chain)?;
        if let Some(d) = &self.description {
            write!(f, " {d:?}")?;
        }
        if let Some(h) = self.handle {
            write!(f, " (handle {h})")?;
        }
        Ok(())
    }
}

/// How the table differs from the model. Empty fields mean "no difference of that kind".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drift {
    /// The whole table is gone.
    pub table_missing: bool,
    /// Chains of the model that the table lacks.
    pub missing_chains: Vec<String>,
    /// Chains in the table that the model lacks.
    pub extra_chains: Vec<String>,
    /// Chains whose type, hook, priority or policy differ (`"input: policy accept, want drop"`).
    pub changed_chains: Vec<String>,
    /// Rules of the model that the table lacks.
    pub missing_rules: Vec<RuleRef>,
    /// Rules in the table that the model lacks (foreign or stale).
    pub extra_rules: Vec<RuleRef>,
    /// Chains holding the right rules in the wrong order.
    pub reordered_chains: Vec<String>,
    /// Sets, maps and other objects in the table that the model lacks.
    pub extra_objects: Vec<String>,
}

impl Drift {
    /// No difference at all.
    pub fn is_empty(&self) -> bool {
        *self == Drift::default()
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.table_missing {
            return write!(f, "table inet {TABLE} is missing");
        }
        let mut parts = Vec::new();
        let list = |items: Vec<String>| items.join(", ");
        let rules = |r: &[RuleRef]| r.iter().map(ToString::to_string).collect::<Vec<_>>();
        for (what, items) in [
            ("missing chains", self.missing_chains.clone()),
            ("extra chains", self.extra_chains.clone()),
            ("changed chains", self.changed_chains.clone()),
            ("missing rules", rules(&self.missing_rules)),
            ("extra rules", rules(&self.extra_rules)),
            ("reordered chains", self.reordered_chains.clone()),
            ("extra objects", self.extra_objects.clone()),
        ] {
            if !items.is_empty() {
                parts.push(format!("{what}: {}", list(items)));
            }
        }
        if parts.is_empty() {
            write!(f, "no drift")
        } else {
            write!(f, "{}", parts.join("; "))
        }
    }
}
