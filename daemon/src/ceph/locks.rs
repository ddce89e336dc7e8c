//! RBD lock hygiene before a VM with RBD disks starts on this node: locks this node holds are
//! stale (the VM is not running here) and released — unless a client on this node still has
//! the image open (another guest using the volume, or a just-killed one whose watch lingers
//! ≈30 s), which refuses the start like a lock or an open handle of another live node does
//! (the holder named); a holder that is no known live node also refuses (fencing, not a
//! start, breaks a dead node's locks).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{Ceph, CephError, ImageLock, ImageRef, Watcher};

/// Addresses of this node and of the other live nodes (from their `nodes/<node>/info`).
#[derive(Debug, Clone, Default)]
pub struct NodeAddrs {
    /// This node's addresses.
    pub local: Vec<IpAddr>,
    /// Other live nodes' addresses, by node name.
    pub others: BTreeMap<String, Vec<IpAddr>>,
}

impl NodeAddrs {
    fn owner(&self, ip: IpAddr) -> Option<&str> {
        self.others
            .iter()
            .find(|(_, ips)| ips.contains(&ip))
            .map(|(n, _)| n.as_str())
    }
}

/// What the hygiene check decided for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockVerdict {
    /// Free to start after releasing these locks (held by this node, stale).
    Release(Vec<ImageLock>),
    /// Another live node holds a lock or has the image open.
    HeldBy {
        /// The holder node.
        node: String,
        /// The lock id or `watcher`.
        what: String,
    },
    /// A client on this node has the image open (a watcher from a local address): releasing
    /// its lock would let a second writer in.
    OpenHere {
        /// The watcher's address as Ceph reports it.
        address: String,
    },
    /// A lock or watcher from an address of no known live node.
    UnknownHolder {
        /// The holder's address as Ceph reports it.
        address: String,
    },
}

/// Decide from an image's locks and watchers (pure).
pub fn plan_lock_hygiene(
    locks: &[ImageLock],
    watchers: &[Watcher],
    nodes: &NodeAddrs,
) -> LockVerdict {
    let mut release = Vec::new();
    let holders = locks
        .iter()
        .map(|l| (l.ip(), l.address.as_str(), l.id.as_str(), Some(l)))
        .chain(
            watchers
                .iter()
                .map(|w| (w.ip(), w.address.as_str(), "watcher", None)),
        );
    for (ip, address, what, lock) in holders {
        let Some(ip) = ip else {
            return LockVerdict::UnknownHolder {
                address: address.to_owned(),
            };
        };
        if nodes.local.contains(&ip) {
            match lock {
                Some(l) => release.push(l.clone()),
                None => {
                    return LockVerdict::OpenHere {
                        address: address.to_owned(),
                    }
                }
            }
            continue;
        }
        return match nodes.owner(ip) {
            Some(node) => LockVerdict::HeldBy {
                node: node.to_owned(),
                what: what.to_owned(),
            },
            None => LockVerdict::UnknownHolder {
                address: address.to_owned(),
            },
        };
    }
    LockVerdict::Release(release)
}

/// Check `image` and release this node's stale locks; the verdict says whether the start may
/// go ahead ([`LockVerdict::Release`], locks already released) or who holds the image.
pub async fn release_stale_locks<C: Ceph>(
    ceph: &C,
    image: &ImageRef,
    nodes: &NodeAddrs,
) -> Result<LockVerdict, CephError> {
    let locks = ceph.rbd_lock_list(image).await?;
    let watchers = ceph.rbd_watchers(image).await?;
    let verdict = plan_lock_hygiene(&locks, &watchers, nodes);
    if let LockVerdict::Release(stale) = &verdict {
        for l in stale {
            ceph.rbd_lock_remove(image, l).await?;
            tracing::info!(image = %image, lock = %l.id, locker = %l.locker, "released a stale RBD lock of this node");
        }
    }
    Ok(verdict)
}

/// A fenced node's hold on `image` ends: every client of it (by address, from `fenced`) that
/// holds a lock or watches the image is blocklisted, then its locks are broken — before the
/// VM starts elsewhere. `node` and `vm` name the fenced node and the VM being recovered in
/// the log lines. Returns the locks broken.
pub async fn break_fenced_locks<C: Ceph>(
    ceph: &C,
    image: &ImageRef,
    fenced: &[IpAddr],
    node: &str,
    vm: &str,
) -> Result<usize, CephError> {
    let locks = ceph.rbd_lock_list(image).await?;
    let watchers = ceph.rbd_watchers(image).await?;
    let theirs = |ip: Option<IpAddr>| ip.is_some_and(|ip| fenced.contains(&ip));
    let mut blocked: Vec<&str> = Vec::new();
    for address in locks
        .iter()
        .filter(|l| theirs(l.ip()))
        .map(|l| l.address.as_str())
        .chain(
            watchers
                .iter()
                .filter(|w| theirs(w.ip()))
                .map(|w| w.address.as_str()),
        )
    {
        if !blocked.contains(&address) {
            ceph.blocklist_add(address).await?;
            tracing::warn!(node = %node, vm = %vm, image = %image, client = address, "fenced node's Ceph client blocklisted");
            blocked.push(address);
        }
    }
    let mut broken = 0;
    for l in locks.iter().filter(|l| theirs(l.ip())) {
        ceph.rbd_lock_remove(image, l).await?;
        tracing::warn!(node = %node, vm = %vm, image = %image, lock = %l.id, locker = %l.locker, "fenced node's RBD lock broken");
        broken += 1;
    }
    Ok(broken)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(id: &str, addr: &str) -> ImageLock {
        ImageLock {
            id: id.into(),
            locker: "client.4173".into(),
            address: addr.into(),
        }
    }

    fn nodes() -> NodeAddrs {
        NodeAddrs {
            local: vec!["10.0.0.1".parse().unwrap()],
            others: BTreeMap::from([("n2".to_string(), vec!["10.0.0.2".parse().unwrap()])]),
        }
    }

    #[test]
    fn own_locks_are_released() {
        let l = lock("auto 1", "10.0.0.1:0/99");
        assert_eq!(
            plan_lock_hygiene(std::slice::from_ref(&l), &[], &nodes()),
            LockVerdict::Release(vec![l])
        );
        assert_eq!(
            plan_lock_hygiene(&[], &[], &nodes()),
            LockVerdict::Release(vec![])
        );
    }

    #[test]
    fn an_open_handle_here_keeps_our_lock() {
        let l = lock("auto 1", "10.0.0.1:0/99");
        let w = Watcher {
            address: "10.0.0.1:0/99".into(),
            client: Some(4173),
            cookie: None,
        };
        assert_eq!(
            plan_lock_hygiene(&[l], &[w], &nodes()),
            LockVerdict::OpenHere {
                address: "10.0.0.1:0/99".into()
            }
        );
    }

    #[test]
    fn another_live_node_refuses_naming_it() {
        let v = plan_lock_hygiene(
            &[
                lock("auto 1", "10.0.0.1:0/1"),
                lock("auto 2", "10.0.0.2:0/2"),
            ],
            &[],
            &nodes(),
        );
        assert_eq!(
            v,
            LockVerdict::HeldBy {
                node: "n2".into(),
                what: "auto 2".into()
            }
        );
        let w = Watcher {
            address: "10.0.0.2:0/7".into(),
            client: Some(1),
            cookie: Some(2),
        };
        assert!(matches!(
            plan_lock_hygiene(&[], &[w], &nodes()),
            LockVerdict::HeldBy { node, what } if node == "n2" && what == "watcher"
        ));
    }

    #[test]
    fn unknown_holders_refuse() {
        assert_eq!(
            plan_lock_hygiene(&[lock("x", "10.9.9.9:0/1")], &[], &nodes()),
            LockVerdict::UnknownHolder {
                address: "10.9.9.9:0/1".into()
            }
        );
        assert!(matches!(
            plan_lock_hygiene(&[lock("x", "junk")], &[], &nodes()),
            LockVerdict::UnknownHolder { .. }
        ));
    }
}
