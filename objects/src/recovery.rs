//! What to recover where, when a node is fenced: pure, from the VMs and the node records.
//!
//! A VM is recovered when its `node` or `owner` is the fenced node, it is meant to run
//! (`start`, `restart`, a migration in progress) or has `autostart`, and it is not
//! `disable`d or `protected`. Each gets a target by its `node_selector` among eligible nodes
//! (alive, `run`, `ready`, in its `node_limit`, not the fenced node), with a running tally:
//! every VM placed adds its memory and vCPUs to its target before the next one is placed,
//! so one pass never piles every VM onto the node that looked emptiest at the start.

use crate::domain::{DesiredState, Vm};
use crate::node::NodeRecord;
use crate::placement;

/// The plan for one VM of a fenced node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Move it to `target` (then `state = start`).
    Move { uuid: String, target: String },
    /// Leave it, for `reason` (protected, no eligible node, …).
    Leave { uuid: String, reason: String },
}

/// Memory (MiB) and vCPUs a domain XML asks for (0 where it does not say).
pub fn resources(xml: &str) -> (u64, u32) {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return (0, 0);
    };
    let root = doc.root_element();
    let child = |name: &str| root.children().find(|c| c.has_tag_name(name));
    let memory_mib = child("memory")
        .and_then(|m| {
            let n: u64 = m.text()?.trim().parse().ok()?;
            let unit = m.attribute("unit").unwrap_or("KiB");
            Some(match unit {
                "b" | "bytes" => n / (1024 * 1024),
                "KB" => n * 1000 / (1024 * 1024),
                "k" | "KiB" => n / 1024,
                "MB" => n * 1_000_000 / (1024 * 1024),
                "M" | "MiB" => n,
                "GB" => n * 1_000_000_000 / (1024 * 1024),
                "G" | "GiB" => n * 1024,
                _ => n / 1024,
            })
        })
        .unwrap_or(0);
    let vcpus = child("vcpu")
        .and_then(|v| v.text()?.trim().parse().ok())
        .unwrap_or(0);
    (memory_mib, vcpus)
}

/// Is `vm` one of `fenced`'s to recover at all (before placement)? `Err` says why not.
fn wanted(vm: &Vm, fenced: &str) -> Option<Result<(), String>> {
    let on = vm.node.as_deref() == Some(fenced) || vm.owner.as_deref() == Some(fenced);
    if !on {
        return None;
    }
    if vm.state == DesiredState::Disable {
        return Some(Err("disabled".into()));
    }
    let runs = vm.state.runs() || vm.state.is_migration();
    if !runs && !vm.metadata.autostart {
        return Some(Err(format!("state {} (not meant to run)", vm.state)));
    }
    if vm.metadata.protected {
        return Some(Err("protected (never recovered automatically)".into()));
    }
    Some(Ok(()))
}

/// Plan the recovery of `fenced`'s VMs over `nodes`, largest memory first (then by UUID),
/// with a running tally of what each target takes on.
pub fn plan(fenced: &str, vms: &[Vm], nodes: &[NodeRecord]) -> Vec<Recovery> {
    let mut nodes: Vec<NodeRecord> = nodes.iter().filter(|n| n.name != fenced).cloned().collect();
    let mut todo: Vec<(&Vm, (u64, u32))> = Vec::new();
    let mut out = Vec::new();
    for vm in vms {
        match wanted(vm, fenced) {
            None => {}
            Some(Err(reason)) => out.push(Recovery::Leave {
                uuid: vm.uuid.clone(),
                reason,
            }),
            Some(Ok(())) => todo.push((vm, resources(&vm.xml))),
        }
    }
    todo.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.uuid.cmp(&b.0.uuid)));
    for (vm, (mem, vcpus)) in todo {
        match placement::select_target(&vm.metadata, Some(fenced), &nodes) {
            Ok(target) => {
                if let Some(h) = nodes
                    .iter_mut()
                    .find(|n| n.name == target)
                    .and_then(|n| n.health.as_mut())
                {
                    h.memory.free_mib = h.memory.free_mib.saturating_sub(mem);
                    h.memory.used_mib += mem;
                    h.alloc.memory_mib += mem;
                    h.alloc.memory_provisioned_mib += mem;
                    h.alloc.vcpus += vcpus;
                    h.alloc.vcpus_provisioned += vcpus;
                    h.vms.total += 1;
                    h.vms.running += 1;
                }
                out.push(Recovery::Move {
                    uuid: vm.uuid.clone(),
                    target,
                });
            }
            Err(e) => out.push(Recovery::Leave {
                uuid: vm.uuid.clone(),
                reason: e.to_string(),
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Metadata, NodeSelector};
    use crate::node::{DaemonState, DomainState, Health, MemoryStats};

    fn node(name: &str, free: u64) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            alive: true,
            daemon_state: Some(DaemonState::Run),
            domain_state: Some(DomainState::Ready),
            health: Some(Health {
                memory: MemoryStats {
                    total_mib: 16384,
                    used_mib: 16384 - free,
                    free_mib: free,
                },
                ..Health::default()
            }),
            ..NodeRecord::default()
        }
    }

    fn vm(uuid: &str, node: &str, state: DesiredState, mem_mib: u64) -> Vm {
        Vm {
            uuid: uuid.into(),
            name: uuid.into(),
            xml: format!("<domain type='kvm'><name>{uuid}</name><memory unit='MiB'>{mem_mib}</memory><vcpu>2</vcpu></domain>"),
            state,
            node: Some(node.into()),
            metadata: Metadata {
                node_selector: NodeSelector::Mem,
                ..Metadata::default()
            },
            owner: Some(node.into()),
            lock: None,
            last_node: None,
            flushed_from: None,
        }
    }

    #[test]
    fn resources_read_memory_in_any_unit_and_vcpus() {
        assert_eq!(
            resources("<domain><memory unit='KiB'>65536</memory><vcpu>4</vcpu></domain>"),
            (64, 4)
        );
        assert_eq!(
            resources("<domain><memory unit='GiB'>2</memory></domain>"),
            (2048, 0)
        );
        assert_eq!(
            resources("<domain><memory>1048576</memory></domain>"),
            (1024, 0)
        );
        assert_eq!(resources("not xml"), (0, 0));
    }

    #[test]
    fn a_running_tally_spreads_the_vms_instead_of_piling_them_up() {
        // b looks emptiest at first, but not after it took two 4 GiB guests.
        let nodes = [
            node("a", 9000),
            node("b", 10000),
            node("c", 8500),
            node("dead", 16000),
        ];
        let vms: Vec<Vm> = (0..3)
            .map(|i| vm(&format!("0000000{i}"), "dead", DesiredState::Start, 4096))
            .collect();
        let plan = plan("dead", &vms, &nodes);
        let targets: Vec<&str> = plan
            .iter()
            .map(|r| match r {
                Recovery::Move { target, .. } => target.as_str(),
                Recovery::Leave { reason, .. } => panic!("{reason}"),
            })
            .collect();
        assert_eq!(targets, ["b", "a", "c"]);
    }

    #[test]
    fn protected_disabled_stopped_and_placeless_vms_are_left_with_the_reason() {
        let nodes = [node("a", 9000), node("dead", 16000)];
        let mut p = vm("p", "dead", DesiredState::Start, 1);
        p.metadata.protected = true;
        let d = vm("d", "dead", DesiredState::Disable, 1);
        let s = vm("s", "dead", DesiredState::Stop, 1);
        let mut auto = vm("auto", "dead", DesiredState::Stop, 1);
        auto.metadata.autostart = true;
        let mut limited = vm("lim", "dead", DesiredState::Start, 1);
        limited.metadata.node_limit = vec!["dead".into()];
        let elsewhere = vm("other", "a", DesiredState::Start, 1);
        let plan = plan("dead", &[p, d, s, auto, limited, elsewhere], &nodes);
        let leave = |u: &str| {
            plan.iter().find_map(|r| match r {
                Recovery::Leave { uuid, reason } if uuid == u => Some(reason.clone()),
                _ => None,
            })
        };
        assert!(leave("p").expect("p").contains("protected"));
        assert_eq!(leave("d").as_deref(), Some("disabled"));
        assert!(leave("s").expect("s").contains("not meant to run"));
        assert!(leave("lim").expect("lim").contains("node_limit"));
        assert!(plan.contains(&Recovery::Move {
            uuid: "auto".into(),
            target: "a".into()
        }));
        assert!(plan.iter().all(|r| !matches!(r, Recovery::Move { uuid, .. } | Recovery::Leave { uuid, .. } if uuid == "other")));
    }
}
