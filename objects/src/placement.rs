//! Target node selection for a VM (define without `--node`, migrate without `--target`,
//! and later recovery and flush): which nodes may take it, and which of those is best by the
//! VM's `node_selector`. Pure: it sees only parsed node records, so it is tested exhaustively
//! without a cluster, and every caller (CLI, daemon) picks the same node from the same view.

use std::cmp::Ordering;
use std::fmt;

use thiserror::Error;

use crate::domain::{Metadata, NodeSelector};
use crate::node::{DaemonState, DomainState, NodeRecord};

/// Why a node cannot take a VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Exclusion {
    /// It is the node the VM is on (or leaving).
    Current,
    /// Its lease is gone (`alive` absent).
    NotAlive,
    /// Its daemon is not in `run`.
    DaemonState(Option<DaemonState>),
    /// It is draining or drained (`domain_state` not `ready`).
    DomainState(DomainState),
    /// The VM's `node_limit` does not list it.
    NotInNodeLimit,
    /// It has not reported health yet (nothing to rank it by).
    NoHealth,
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::Current => f.write_str("current node"),
            Exclusion::NotAlive => f.write_str("not alive"),
            Exclusion::DaemonState(None) => f.write_str("daemon_state unset, not run"),
            Exclusion::DaemonState(Some(s)) => write!(f, "daemon_state {s}, not run"),
            Exclusion::DomainState(s) => write!(f, "domain_state {s}, not ready"),
            Exclusion::NotInNodeLimit => f.write_str("not in node_limit"),
            Exclusion::NoHealth => f.write_str("no health report"),
        }
    }
}

/// No node qualified; carries every node's reason so the operator sees why.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PlacementError {
    /// There are no nodes at all.
    #[error("no nodes are registered")]
    NoNodes,
    /// Every node was excluded.
    #[error("{}", describe(.node_limit, .excluded))]
    NoneEligible {
        /// The VM's node_limit (for the message).
        node_limit: Vec<String>,
        /// Each node with its first reason, in name order.
        excluded: Vec<(String, Exclusion)>,
    },
}

fn describe(limit: &[String], excluded: &[(String, Exclusion)]) -> String {
    let mut s =
        String::from("no eligible node (needs alive, daemon_state run, domain_state ready, health");
    if !limit.is_empty() {
        s.push_str(&format!(", in node_limit [{}]", limit.join(", ")));
    }
    s.push_str("): ");
    let parts: Vec<String> = excluded.iter().map(|(n, e)| format!("{n}: {e}")).collect();
    s.push_str(&parts.join("; "));
    s
}

/// Can `node` take a VM with `metadata` that is now on `current`? The first reason it
/// cannot, in a fixed order (current, liveness, daemon state, drain state, limit, health).
/// `need_health` is false for an explicit operator choice (nothing to rank).
pub fn check(
    metadata: &Metadata,
    current: Option<&str>,
    node: &NodeRecord,
    need_health: bool,
) -> Result<(), Exclusion> {
    if current == Some(node.name.as_str()) {
        return Err(Exclusion::Current);
    }
    if !node.alive {
        return Err(Exclusion::NotAlive);
    }
    if node.daemon_state != Some(DaemonState::Run) {
        return Err(Exclusion::DaemonState(node.daemon_state));
    }
    if let Some(d) = node.domain_state {
        if d != DomainState::Ready {
            return Err(Exclusion::DomainState(d));
        }
    }
    if !metadata.node_limit.is_empty() && !metadata.node_limit.contains(&node.name) {
        return Err(Exclusion::NotInNodeLimit);
    }
    if need_health && node.health.is_none() {
        return Err(Exclusion::NoHealth);
    }
    Ok(())
}

/// Order two eligible nodes by the selector: `Less` means `a` is the better target.
fn better(selector: NodeSelector, a: &NodeRecord, b: &NodeRecord) -> Ordering {
    let (Some(ha), Some(hb)) = (&a.health, &b.health) else {
        return Ordering::Equal;
    };
    let by = match selector {
        NodeSelector::Mem => hb.memory.free_mib.cmp(&ha.memory.free_mib),
        NodeSelector::Memprov => ha
            .alloc
            .memory_provisioned_mib
            .cmp(&hb.alloc.memory_provisioned_mib),
        NodeSelector::Load => ha.load[0].total_cmp(&hb.load[0]),
        NodeSelector::Vcpus => ha.alloc.vcpus.cmp(&hb.alloc.vcpus),
        NodeSelector::Vms => ha.vms.total.cmp(&hb.vms.total),
    };
    by.then_with(|| a.name.cmp(&b.name))
}

/// The best node for a VM with `metadata`, not `current`, among `nodes`:
/// mem → most free memory; memprov → least memory provisioned to domains; load → lowest
/// 1-minute load; vcpus → fewest vCPUs of running domains; vms → fewest domains. Ties go to
/// the lower node name, so every caller with the same view picks the same node.
pub fn select_target(
    metadata: &Metadata,
    current: Option<&str>,
    nodes: &[NodeRecord],
) -> Result<String, PlacementError> {
    if nodes.is_empty() {
        return Err(PlacementError::NoNodes);
    }
    let mut eligible = Vec::new();
    let mut excluded = Vec::new();
    for n in nodes {
        match check(metadata, current, n, true) {
            Ok(()) => eligible.push(n),
            Err(e) => excluded.push((n.name.clone(), e)),
        }
    }
    eligible.sort_by(|a, b| better(metadata.node_selector, a, b));
    match eligible.first() {
        Some(n) => Ok(n.name.clone()),
        None => {
            excluded.sort_by(|a, b| a.0.cmp(&b.0));
            Err(PlacementError::NoneEligible {
                node_limit: metadata.node_limit.clone(),
                excluded,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Allocation, Health, MemoryStats, VmCounts};

    fn node(name: &str, free: u64, prov: u64, load: f64, vcpus: u32, vms: u32) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            alive: true,
            daemon_state: Some(DaemonState::Run),
            domain_state: Some(DomainState::Ready),
            health: Some(Health {
                load: [load, 0.0, 0.0],
                memory: MemoryStats {
                    total_mib: 65536,
                    used_mib: 65536 - free,
                    free_mib: free,
                },
                vms: VmCounts {
                    total: vms,
                    running: vms,
                },
                alloc: Allocation {
                    memory_mib: prov / 2,
                    memory_provisioned_mib: prov,
                    vcpus,
                    vcpus_provisioned: vcpus * 2,
                },
                ..Health::default()
            }),
            ..NodeRecord::default()
        }
    }

    fn meta(sel: NodeSelector, limit: &[&str]) -> Metadata {
        Metadata {
            node_selector: sel,
            node_limit: limit.iter().map(|s| s.to_string()).collect(),
            ..Metadata::default()
        }
    }

    /// Each node is best on exactly one selector.
    fn cluster() -> Vec<NodeRecord> {
        vec![
            // name, free MiB, provisioned MiB, load, vcpus, vms
            node("hv1", 9000, 8000, 3.0, 8, 6),
            node("hv2", 4000, 1000, 2.0, 6, 5),
            node("hv3", 5000, 7000, 0.5, 7, 4),
            node("hv4", 3000, 6000, 1.5, 2, 3),
            node("hv5", 2000, 5000, 2.5, 9, 1),
        ]
    }

    #[test]
    fn every_selector_picks_its_best_node() {
        let nodes = cluster();
        for (sel, want) in [
            (NodeSelector::Mem, "hv1"),
            (NodeSelector::Memprov, "hv2"),
            (NodeSelector::Load, "hv3"),
            (NodeSelector::Vcpus, "hv4"),
            (NodeSelector::Vms, "hv5"),
        ] {
            assert_eq!(
                select_target(&meta(sel, &[]), None, &nodes),
                Ok(want.to_string()),
                "{sel}"
            );
        }
    }

    #[test]
    fn the_current_node_is_never_chosen() {
        let nodes = cluster();
        assert_eq!(
            select_target(&meta(NodeSelector::Mem, &[]), Some("hv1"), &nodes),
            Ok("hv3".into()),
            "second most free memory"
        );
        assert_eq!(
            select_target(&meta(NodeSelector::Vms, &[]), Some("hv5"), &nodes),
            Ok("hv4".into())
        );
    }

    #[test]
    fn ties_go_to_the_lower_name_whatever_the_input_order() {
        let mut nodes = vec![
            node("hv9", 1000, 1000, 1.0, 1, 1),
            node("hv10", 1000, 1000, 1.0, 1, 1),
            node("hv2", 1000, 1000, 1.0, 1, 1),
        ];
        for sel in NodeSelector::ALL {
            assert_eq!(
                select_target(&meta(*sel, &[]), None, &nodes),
                Ok("hv10".into()),
                "{sel}: byte order of names"
            );
            nodes.reverse();
            assert_eq!(
                select_target(&meta(*sel, &[]), None, &nodes),
                Ok("hv10".into())
            );
        }
    }

    #[test]
    fn node_limit_restricts_the_candidates() {
        let nodes = cluster();
        assert_eq!(
            select_target(&meta(NodeSelector::Mem, &["hv4", "hv5"]), None, &nodes),
            Ok("hv4".into())
        );
        assert_eq!(
            select_target(&meta(NodeSelector::Mem, &["hv5", "hv-gone"]), None, &nodes),
            Ok("hv5".into())
        );
        let e = select_target(&meta(NodeSelector::Mem, &["hv5"]), Some("hv5"), &nodes)
            .expect_err("only the current node is allowed");
        let msg = e.to_string();
        assert!(msg.contains("in node_limit [hv5]"), "{msg}");
        assert!(msg.contains("hv5: current node"), "{msg}");
        assert!(msg.contains("hv1: not in node_limit"), "{msg}");
    }

    #[test]
    fn every_exclusion_is_reported() {
        let mut nodes = cluster();
        nodes[0].alive = false;
        nodes[1].daemon_state = Some(DaemonState::Init);
        nodes[2].domain_state = Some(DomainState::Flushed);
        nodes[3].health = None;
        nodes[4].daemon_state = None;
        let e = select_target(&meta(NodeSelector::Load, &[]), None, &nodes).expect_err("none");
        assert_eq!(
            e,
            PlacementError::NoneEligible {
                node_limit: vec![],
                excluded: vec![
                    ("hv1".into(), Exclusion::NotAlive),
                    (
                        "hv2".into(),
                        Exclusion::DaemonState(Some(DaemonState::Init))
                    ),
                    ("hv3".into(), Exclusion::DomainState(DomainState::Flushed)),
                    ("hv4".into(), Exclusion::NoHealth),
                    ("hv5".into(), Exclusion::DaemonState(None)),
                ],
            }
        );
        let msg = e.to_string();
        for needle in [
            "hv1: not alive",
            "hv2: daemon_state init, not run",
            "hv3: domain_state flushed, not ready",
            "hv4: no health report",
            "hv5: daemon_state unset, not run",
        ] {
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        }
        assert_eq!(
            select_target(&Metadata::default(), None, &[]),
            Err(PlacementError::NoNodes)
        );
    }

    #[test]
    fn domain_state_unset_counts_as_ready_and_every_other_state_excludes() {
        let mut n = node("hv1", 1, 1, 1.0, 1, 1);
        n.domain_state = None;
        assert_eq!(check(&Metadata::default(), None, &n, true), Ok(()));
        for s in DomainState::ALL {
            n.domain_state = Some(*s);
            let r = check(&Metadata::default(), None, &n, true);
            if *s == DomainState::Ready {
                assert_eq!(r, Ok(()));
            } else {
                assert_eq!(r, Err(Exclusion::DomainState(*s)));
            }
        }
        for s in DaemonState::ALL {
            n.domain_state = None;
            n.daemon_state = Some(*s);
            let r = check(&Metadata::default(), None, &n, true);
            assert_eq!(r.is_ok(), *s == DaemonState::Run, "{s}");
        }
    }

    #[test]
    fn an_explicit_choice_needs_no_health_but_everything_else() {
        let mut n = node("hv1", 1, 1, 1.0, 1, 1);
        n.health = None;
        assert_eq!(check(&Metadata::default(), None, &n, false), Ok(()));
        assert_eq!(
            check(&Metadata::default(), None, &n, true),
            Err(Exclusion::NoHealth)
        );
        assert_eq!(
            check(&Metadata::default(), Some("hv1"), &n, false),
            Err(Exclusion::Current)
        );
        assert_eq!(
            check(&meta(NodeSelector::Mem, &["hv2"]), None, &n, false),
            Err(Exclusion::NotInNodeLimit)
        );
    }

    #[test]
    fn load_ordering_handles_fractions() {
        let nodes = vec![
            node("a", 1, 1, 0.31, 1, 1),
            node("b", 1, 1, 0.3, 1, 1),
            node("c", 1, 1, 0.301, 1, 1),
        ];
        assert_eq!(
            select_target(&meta(NodeSelector::Load, &[]), None, &nodes),
            Ok("b".into())
        );
    }
}
