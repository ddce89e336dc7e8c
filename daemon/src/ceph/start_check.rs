//! The split-brain guard on RBD volumes before a VM starts on this node: every RBD disk of
//! the domain XML goes through [`release_stale_locks`]; this node's stale locks are released,
//! and a lock or open handle of another live node (or of an address no live node has)
//! refuses the start with the holder named. Breaking a fenced node's locks is not done here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use debvisor_objects::node::NodeRecord;

use super::{rbd_disks, release_stale_locks, Ceph, ImageRef, LockVerdict, NodeAddrs};

/// Why a start was refused: the volume concerned (`-` when the XML could not be read) and
/// the error for the VM's status, naming the holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `pool/image`, or `-`.
    pub volume: String,
    /// The message for the VM's status.
    pub error: String,
}

/// The IP of an `addr/prefix` (or bare address) string as nodes publish them (also the
/// fencing primary's lock breaker).
pub(crate) fn ip_of(s: &str) -> Option<IpAddr> {
    s.split('/').next()?.trim().parse().ok()
}

/// [`NodeAddrs`] for the check: `local` (this node's interface addresses plus configured
/// client addresses) and the published addresses of every other live node.
pub fn node_addrs<'a>(
    me: &str,
    local: impl IntoIterator<Item = IpAddr>,
    nodes: impl IntoIterator<Item = &'a NodeRecord>,
) -> NodeAddrs {
    let others: BTreeMap<String, Vec<IpAddr>> = nodes
        .into_iter()
        .filter(|n| n.alive && n.name != me)
        .filter_map(|n| {
            let ips: Vec<IpAddr> = n
                .info
                .as_ref()?
                .addresses
                .iter()
                .filter_map(|a| ip_of(a))
                .collect();
            Some((n.name.clone(), ips))
        })
        .collect();
    NodeAddrs {
        local: local.into_iter().collect(),
        others,
    }
}

/// This node's interface addresses (as keepalive publishes them) and `extra`.
pub fn local_addrs(extra: &[IpAddr]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = crate::hostinfo::addresses()
        .iter()
        .filter_map(|a| ip_of(a))
        .collect();
    v.extend(extra.iter().copied());
    v
}

/// Check the RBD disks of `xml` before a start here. `Ok` lists the volumes checked with the
/// number of stale locks of this node released on each; `Err` is the refusal (a holder
/// elsewhere, an unreadable disk source, or Ceph not answering: never start unchecked).
pub async fn check_rbd_start<C: Ceph>(
    ceph: &C,
    xml: &str,
    addrs: &NodeAddrs,
) -> Result<Vec<(ImageRef, usize)>, Refusal> {
    let disks = rbd_disks(xml).map_err(|e| Refusal {
        volume: "-".into(),
        error: e.to_string(),
    })?;
    let images: BTreeSet<ImageRef> = disks
        .into_iter()
        .filter(|d| !d.shared)
        .map(|d| d.image)
        .collect();
    let mut out = Vec::new();
    for image in images {
        let refuse = |error: String| Refusal {
            volume: image.spec(),
            error,
        };
        match release_stale_locks(ceph, &image, addrs).await {
            Ok(LockVerdict::Release(stale)) => out.push((image, stale.len())),
            Ok(LockVerdict::HeldBy { node, what }) => {
                let what = if what == "watcher" {
                    "open (watcher)".to_string()
                } else {
                    format!("locked ({what:?})")
                };
                return Err(refuse(format!(
                    "RBD volume {image} is {what} by live node {node}"
                )));
            }
            Ok(LockVerdict::OpenHere { address }) => {
                return Err(refuse(format!(
                    "RBD volume {image} is open on this node ({address}): another guest uses it, or a stopped one's watch has not expired yet"
                )));
            }
            Ok(LockVerdict::UnknownHolder { address }) => {
                return Err(refuse(format!(
                    "RBD volume {image} is locked or open by {address}, an address of no live node"
                )));
            }
            Err(e) => {
                return Err(refuse(format!(
                    "RBD volume {image}: lock check failed, not started unchecked: {e}"
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use debvisor_objects::node::NodeInfo;

    fn node(name: &str, alive: bool, addrs: &[&str]) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            alive,
            info: Some(NodeInfo {
                addresses: addrs.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn other_live_nodes_only() {
        let nodes = [
            node("me", true, &["10.0.0.1/24"]),
            node("n2", true, &["10.0.0.2/24", "fd00::2/64", "junk"]),
            node("dead", false, &["10.0.0.3/24"]),
        ];
        let a = node_addrs("me", ["127.0.0.1".parse().unwrap()], nodes.iter());
        assert_eq!(a.local, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            a.others,
            BTreeMap::from([(
                "n2".to_string(),
                vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()]
            )])
        );
    }
}
