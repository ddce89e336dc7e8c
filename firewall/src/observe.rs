//! What nft says our table holds ([`Observed`]), and how it differs from the model
//! ([`Ruleset::diff`], which reports a [`Drift`]).
//!
//! Rules are compared by the content id in their comment (see [`RuleSpec`]), chains by
//! name, type, hook, priority and policy; handles are ignored. nft normalises expressions when
//! it lists them, so comparing expressions would report drift that is not there.

use std::collections::HashMap;

use serde_json::Value;

use crate::drift::{Drift, RuleRef};
use crate::model::{parse_comment, RuleSpec, Ruleset};
use crate::table::TABLE;

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
            let mut unmatched: HashMap<&str, Vec<&RuleSpec>> = HashMap::new();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::small_ruleset;
    use serde_json::json;

    /// An `Observed` that is exactly what nft would list for `r`.
    fn observed_of(r: &Ruleset) -> Observed {
        let mut handle = 0;
        Observed {
            table_present: true,
            chains: r
                .chains()
                .iter()
                .map(|c| ObservedChain {
                    name: c.name().to_owned(),
                    chain_type: c.base_chain().map(|_| "filter".into()),
                    hook: c.base_chain().map(|b| b.hook.name().into()),
                    priority: c.base_chain().map(|b| b.priority.into()),
                    policy: c.base_chain().map(|b| b.policy.name().into()),
                    rules: c
                        .rules()
                        .iter()
                        .map(|x| {
                            handle += 1;
                            ObservedRule {
                                handle,
                                comment: Some(x.comment()),
                            }
                        })
                        .collect(),
                })
                .collect(),
            other_objects: vec![],
        }
    }

    #[test]
    fn diff_detects_each_kind_of_drift() {
        let r = small_ruleset();
        assert_eq!(r.diff(&observed_of(&r)), None);
        assert!(r.diff(&Observed::absent()).unwrap().table_missing);

        let mut o = observed_of(&r);
        let removed = o.chains[0].rules.remove(4);
        o.chains[0].rules.push(ObservedRule {
            handle: 999,
            comment: None,
        });
        o.chains[1].policy = Some("accept".into());
        o.chains.retain(|c| c.name != "net100-out");
        o.chains.push(ObservedChain {
            name: "stale".into(),
            ..Default::default()
        });
        o.other_objects.push("set blocked".into());
        let d = r.diff(&o).unwrap();
        assert_eq!(d.missing_rules.len(), 1);
        assert_eq!(d.missing_rules[0].description.as_deref(), Some("ssh"));
        assert_eq!(d.missing_rules[0].id.as_deref(), removed.id());
        assert_eq!(d.extra_rules.len(), 1);
        assert_eq!(d.extra_rules[0].handle, Some(999));
        assert_eq!(d.changed_chains.len(), 1);
        assert!(d.changed_chains[0].starts_with("forward: policy"), "{d:?}");
        assert_eq!(d.missing_chains, ["net100-out"]);
        assert_eq!(d.extra_chains, ["stale"]);
        assert_eq!(d.extra_objects, ["set blocked"]);
        assert!(d.reordered_chains.is_empty());
        let text = d.to_string();
        assert!(text.contains("missing rules: input \"ssh\""), "{text}");

        let mut o = observed_of(&r);
        o.chains[0].rules.swap(0, 1);
        let d = r.diff(&o).unwrap();
        assert_eq!(d.reordered_chains, ["input"]);
        assert!(d.missing_rules.is_empty() && d.extra_rules.is_empty());
    }

    #[test]
    fn observed_parses_nft_listing() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "debvisor", "handle": 7}},
            {"chain": {"family": "inet", "table": "debvisor", "name": "input", "handle": 1,
                       "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "inet", "table": "debvisor", "name": "net1-in", "handle": 2}},
            {"rule": {"family": "inet", "table": "debvisor", "chain": "input", "handle": 5,
                      "comment": "ssh #0123456789abcdef",
                      "expr": [{"somethingnew": {"x": 1}}, {"accept": null}]}},
            {"rule": {"family": "inet", "table": "debvisor", "chain": "net1-in", "handle": 6,
                      "expr": [{"drop": null}]}},
            {"set": {"family": "inet", "table": "debvisor", "name": "s", "type": "ipv4_addr", "handle": 3}},
            {"table": {"family": "inet", "name": "other", "handle": 9}},
            {"chain": {"family": "inet", "table": "other", "name": "input", "handle": 1}},
        ]});
        let o = Observed::from_nft_json(&listing.to_string()).unwrap();
        assert!(o.table_present);
        assert_eq!(o.chains.len(), 2);
        assert_eq!(o.chains[0].policy.as_deref(), Some("drop"));
        assert_eq!(o.chains[0].rules[0].id(), Some("0123456789abcdef"));
        assert_eq!(o.chains[0].rules[0].description(), Some("ssh"));
        assert_eq!(o.chains[1].rules[0].comment, None);
        assert_eq!(o.other_objects, ["set s"]);
        assert_eq!(o.rule_count(), 2);

        let none =
            json!({"nftables": [{"metainfo": {}}, {"table": {"family": "inet", "name": "other"}}]});
        assert!(
            !Observed::from_nft_json(&none.to_string())
                .unwrap()
                .table_present
        );
        assert!(Observed::from_nft_json("{}").is_err());
        assert!(Observed::from_nft_json("not json").is_err());
    }
}
