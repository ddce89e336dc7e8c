//! What nft says our table holds ([`Observed`]), and how it differs from the model ([`Drift`]).
//!
//! Rules are compared by the content id in their comment (see [`crate::RuleSpec`]), chains by
//! name, type, hook, priority and policy; handles are ignored. nft normalises expressions when
//! it lists them, so comparing expressions would report drift that is not there.

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;

use crate::model::{parse_comment, Ruleset, TABLE};

/// Table `inet debvisor` as listed by `nft -j list table inet debvisor`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// Whether the table exists at all.
    pub table_present: bool,
    /// Its chains, in listing order.
    pub chains: Vec<ObservedChain>,
    /// Other objects found in the table (sets, maps, counters…), as `"<kind> <name>"`.
    pub other_objects: Vec<String>,
}

/// A chain as listed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedChain {
    /// Name.
    pub name: String,
    /// `filter`, `nat`, `route` for base chains.
    pub chain_type: Option<String>,
    /// Hook name for base chains.
    pub hook: Option<String>,
    /// Priority for base chains.
    pub priority: Option<i64>,
    /// Policy for base chains.
    pub policy: Option<String>,
    /// Rules in evaluation order.
    pub rules: Vec<ObservedRule>,
}

/// A rule as listed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedRule {
    /// nft's handle (what `nft delete rule … handle N` takes).
    pub handle: u64,
    /// The comment, when there is one.
    pub comment: Option<String>,
}

impl ObservedRule {
    /// Our content id, when the comment carries one.
    pub fn id(&self) -> Option<&str> {
        self.comment
            .as_deref()
            .and_then(parse_comment)
            .map(|(_, id)| id)
    }

    /// The description part of our comment (or the whole foreign comment).
    pub fn description(&self) -> Option<&str> {
        let c = self.comment.as_deref()?;
        Some(parse_comment(c).map(|(d, _)| d).unwrap_or(c))
    }
}

impl Observed {
    /// The table is absent.
    pub fn absent() -> Observed {
        Observed::default()
    }

    /// Parse the JSON of `nft -j list table inet debvisor`.
    ///
    /// Parsed as plain JSON rather than with the `nftables` crate's types: a statement the crate
    /// does not know (someone else's edit of our table) must show up as drift, not as a parse
    /// error that blocks every later repair.
    pub fn from_nft_json(json: &str) -> Result<Observed, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let items = v
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or("no \"nftables\" array")?;
        let mut out = Observed::default();
        let mut index: HashMap<String, usize> = HashMap::new();
        for item in items {
            let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let ours = body.get("family").and_then(Value::as_str) == Some("inet")
                && (body.get("table").and_then(Value::as_str) == Some(TABLE)
                    || (kind == "table"
                        && body.get("name").and_then(Value::as_str) == Some(TABLE)));
            if kind == "metainfo" || !ours {
                continue;
            }
            let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
            let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
            match kind.as_str() {
                "table" => out.table_present = true,
                "chain" => {
                    index.insert(name.to_owned(), out.chains.len());
                    out.chains.push(ObservedChain {
                        name: name.to_owned(),
                        chain_type: text("type"),
                        hook: text("hook"),
                        priority: body.get("prio").and_then(Value::as_i64),
                        policy: text("policy"),
                        rules: Vec::new(),
                    });
                }
                "rule" => {
                    let chain = body
                        .get("chain")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let rule = ObservedRule {
                        handle: body.get("handle").and_then(Value::as_u64).unwrap_or(0),
                        comment: text("comment"),
                    };
                    match index.get(chain) {
                        Some(&i) => out.chains[i].rules.push(rule),
                        None => return Err(format!("rule of unlisted chain {chain:?}")),
                    }
                }
                other => out.other_objects.push(format!("{other} {name}")),
            }
        }
        Ok(out)
    }

    /// The chain named `name`.
    pub fn chain(&self, name: &str) -> Option<&ObservedChain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Total number of rules.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }
}

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

impl Ruleset {
    /// Compare the model with what the table holds; `None` when they match.
    pub fn diff(&self, observed: &Observed) -> Option<Drift> {
        let mut d = Drift::default();
        if !observed.table_present {
            d.table_missing = true;
            return Some(d);
        }
        for c in self.chains() {
            let Some(o) = observed.chain(c.name()) else {
                d.missing_chains.push(c.name().to_owned());
                continue;
            };
            let mut changes = Vec::new();
            let want = c.base_chain();
            let want_type = want.map(|_| "filter");
            let want_hook = want.map(|b| b.hook.name());
            let want_prio = want.map(|b| i64::from(b.priority));
            let want_policy = want.map(|b| b.policy.name());
            if o.chain_type.as_deref() != want_type {
                changes.push(format!("type {:?}, want {want_type:?}", o.chain_type));
            }
            if o.hook.as_deref() != want_hook {
                changes.push(format!("hook {:?}, want {want_hook:?}", o.hook));
            }
            if o.priority != want_prio {
                changes.push(format!("priority {:?}, want {want_prio:?}", o.priority));
            }
            if o.policy.as_deref() != want_policy {
                changes.push(format!("policy {:?}, want {want_policy:?}", o.policy));
            }
            if !changes.is_empty() {
                d.changed_chains
                    .push(format!("{}: {}", c.name(), changes.join(", ")));
            }

            // Multiset difference of ids, then order.
            let mut unmatched: HashMap<&str, Vec<&crate::RuleSpec>> = HashMap::new();
            for r in c.rules() {
                unmatched.entry(r.id()).or_default().push(r);
            }
            let before = d.extra_rules.len() + d.missing_rules.len();
            for r in &o.rules {
                let taken = r
                    .id()
                    .and_then(|id| unmatched.get_mut(id))
                    .and_then(|v| v.pop());
                if taken.is_none() {
                    d.extra_rules.push(RuleRef {
                        chain: o.name.clone(),
                        description: r.description().map(str::to_owned),
                        id: r.id().map(str::to_owned),
                        handle: Some(r.handle),
                    });
                }
            }
            for r in c.rules() {
                if unmatched
                    .get(r.id())
                    .is_some_and(|v| v.iter().any(|x| std::ptr::eq(*x, r)))
                {
                    d.missing_rules.push(RuleRef {
                        chain: c.name().to_owned(),
                        description: Some(r.description().to_owned()),
                        id: Some(r.id().to_owned()),
                        handle: None,
                    });
                }
            }
            if d.extra_rules.len() + d.missing_rules.len() == before {
                let want: Vec<&str> = c.rules().iter().map(|r| r.id()).collect();
                let have: Vec<&str> = o.rules.iter().filter_map(ObservedRule::id).collect();
                if want != have {
                    d.reordered_chains.push(c.name().to_owned());
                }
            }
        }
        for o in &observed.chains {
            if self.chain(&o.name).is_none() {
                d.extra_chains.push(o.name.clone());
            }
        }
        d.extra_objects = observed.other_objects.clone();
        (!d.is_empty()).then_some(d)
    }
}
