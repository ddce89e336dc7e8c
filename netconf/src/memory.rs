//! An in-memory [`HostNet`] for unit tests of planners, executors and state machines (ours
//! and those of crates that drive host networking). It mimics the kernel's answers that
//! matter here (new links are down, a VLAN inherits its parent's MTU, deleting a bridge frees
//! its ports); it is not a substitute for the real-netlink tests.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use ipnet::IpNet;

use crate::error::check_name;
use crate::host::{HostNet, Outcome};
use crate::model::{
    default_metric, AddrOwner, AddrState, DefaultRoute, LinkState, Observed, VlanInfo, VxlanSpec,
};
use crate::NetconfError;

/// In-memory host: a mutable [`Observed`] plus a record of announcements.
#[derive(Debug, Default)]
pub struct MemoryHost {
    state: Mutex<Observed>,
    announced: Mutex<Vec<(String, IpNet)>>,
    unsupported: Vec<String>,
}

impl MemoryHost {
    /// A host in the given state.
    pub fn new(state: Observed) -> MemoryHost {
        MemoryHost {
            state: Mutex::new(state),
            ..MemoryHost::default()
        }
    }

    /// Make creating links of `kind` fail with `EOPNOTSUPP`, as on a kernel without 8021q.
    pub fn without_kind(mut self, kind: &str) -> MemoryHost {
        self.unsupported.push(kind.to_owned());
        self
    }

    /// The current state.
    pub fn snapshot(&self) -> Observed {
        self.lock().clone()
    }

    /// Change the state by hand (simulate drift).
    pub fn modify(&self, f: impl FnOnce(&mut Observed)) {
        f(&mut self.lock());
    }

    /// `(link, address)` of every announcement sent so far.
    pub fn announced(&self) -> Vec<(String, IpNet)> {
        self.announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, Observed> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn create(
        &self,
        op: &'static str,
        name: &str,
        kind: &str,
        parent: Option<&str>,
    ) -> Result<Option<LinkState>, NetconfError> {
        check_name(op, name)?;
        let st = self.lock();
        if let Some(l) = st.link(name) {
            return Ok(Some(l.clone()));
        }
        if self.unsupported.iter().any(|k| k == kind) {
            return Err(NetconfError::Os {
                op,
                link: name.to_owned(),
                source: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            });
        }
        if let Some(p) = parent {
            check_name(op, p)?;
            if st.link(p).is_none() {
                return Err(NetconfError::NoSuchLink {
                    op,
                    link: p.to_owned(),
                });
            }
        }
        Ok(None)
    }

    fn insert(&self, mut link: LinkState) {
        let mut st = self.lock();
        link.index = st.links.values().map(|l| l.index).max().unwrap_or(0) + 1;
        st.links.insert(link.name.clone(), link);
    }

    fn with_link<T>(
        &self,
        op: &'static str,
        name: &str,
        f: impl FnOnce(&mut LinkState) -> Result<T, NetconfError>,
    ) -> Result<T, NetconfError> {
        check_name(op, name)?;
        let mut st = self.lock();
        let l = st
            .links
            .get_mut(name)
            .ok_or_else(|| NetconfError::NoSuchLink {
                op,
                link: name.to_owned(),
            })?;
        f(l)
    }
}

fn conflict(op: &'static str, link: &str, reason: String) -> NetconfError {
    NetconfError::Conflict {
        op,
        link: link.to_owned(),
        reason,
    }
}

impl HostNet for MemoryHost {
    async fn observe(&self) -> Result<Observed, NetconfError> {
        Ok(self.snapshot())
    }

    async fn ensure_bridge(&self, name: &str) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "create bridge";
        match self.create(OP, name, "bridge", None)? {
            Some(l) if l.kind.as_deref() == Some("bridge") => Ok(Outcome::Unchanged),
            Some(l) => Err(conflict(OP, name, format!("exists as {:?}", l.kind))),
            None => {
                self.insert(LinkState::new(0, name, Some("bridge"), 1500));
                Ok(Outcome::Changed(()))
            }
        }
    }

    async fn ensure_vlan(
        &self,
        name: &str,
        parent: &str,
        id: u16,
    ) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "create vlan";
        let want = VlanInfo {
            id,
            parent: Some(parent.to_owned()),
        };
        match self.create(OP, name, "vlan", Some(parent))? {
            Some(l) if l.vlan.as_ref() == Some(&want) => Ok(Outcome::Unchanged),
            Some(l) => Err(conflict(OP, name, format!("exists as {:?}", l.vlan))),
            None => {
                let mtu = self.lock().link(parent).map_or(1500, |p| p.mtu);
                let mut l = LinkState::new(0, name, Some("vlan"), mtu);
                l.vlan = Some(want);
                self.insert(l);
                Ok(Outcome::Changed(()))
            }
        }
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "create vxlan";
        match self.create(OP, &spec.name, "vxlan", spec.dev.as_deref())? {
            Some(l) if l.vxlan.as_ref() == Some(spec) => Ok(Outcome::Unchanged),
            Some(l) => Err(conflict(OP, &spec.name, format!("exists as {:?}", l.vxlan))),
            None => {
                let mut l = LinkState::new(0, &spec.name, Some("vxlan"), 1450);
                l.vxlan = Some(spec.clone());
                self.insert(l);
                Ok(Outcome::Changed(()))
            }
        }
    }

    async fn ensure_up(&self, link: &str) -> Result<Outcome<()>, NetconfError> {
        self.with_link("set up", link, |l| {
            Ok(if l.up {
                Outcome::Unchanged
            } else {
                l.up = true;
                Outcome::Changed(())
            })
        })
    }

    async fn ensure_mtu(&self, link: &str, mtu: u32) -> Result<Outcome<u32>, NetconfError> {
        self.with_link("set mtu", link, |l| {
            Ok(if l.mtu == mtu {
                Outcome::Unchanged
            } else {
                Outcome::Changed(std::mem::replace(&mut l.mtu, mtu))
            })
        })
    }

    async fn ensure_master(
        &self,
        link: &str,
        master: &str,
    ) -> Result<Outcome<Option<String>>, NetconfError> {
        const OP: &str = "set master";
        check_name(OP, master)?;
        if self.lock().link(master).is_none() {
            return Err(NetconfError::NoSuchLink {
                op: OP,
                link: master.to_owned(),
            });
        }
        self.with_link(OP, link, |l| {
            Ok(if l.master.as_deref() == Some(master) {
                Outcome::Unchanged
            } else {
                Outcome::Changed(l.master.replace(master.to_owned()))
            })
        })
    }

    async fn ensure_address(
        &self,
        link: &str,
        addr: IpNet,
        owner: AddrOwner,
    ) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "add address";
        self.with_link(OP, link, |l| {
            if l.has_address(&addr) {
                return Ok(Outcome::Unchanged);
            }
            if addr.addr().is_ipv6() && l.addresses.iter().any(|a| a.cidr.addr() == addr.addr()) {
                return Err(conflict(
                    OP,
                    link,
                    format!("{} is there with another prefix length", addr.addr()),
                ));
            }
            l.addresses.push(AddrState { cidr: addr, owner });
            Ok(Outcome::Changed(()))
        })
    }

    async fn remove_address(&self, link: &str, addr: IpNet) -> Result<Outcome<()>, NetconfError> {
        self.with_link("remove address", link, |l| {
            let before = l.addresses.len();
            l.addresses.retain(|a| a.cidr != addr);
            Ok(if l.addresses.len() == before {
                Outcome::Unchanged
            } else {
                Outcome::Changed(())
            })
        })
    }

    async fn ensure_default_route(
        &self,
        link: &str,
        gateway: IpAddr,
    ) -> Result<Outcome<Option<DefaultRoute>>, NetconfError> {
        const OP: &str = "replace default route";
        check_name(OP, link)?;
        let mut st = self.lock();
        if st.link(link).is_none() {
            return Err(NetconfError::NoSuchLink {
                op: OP,
                link: link.to_owned(),
            });
        }
        let ipv6 = gateway.is_ipv6();
        if st.default_routes.iter().any(|r| {
            r.ipv6 == ipv6 && r.gateway == Some(gateway) && r.link.as_deref() == Some(link)
        }) {
            return Ok(Outcome::Unchanged);
        }
        let metric = default_metric(ipv6);
        let old = st
            .default_routes
            .iter()
            .position(|r| r.ipv6 == ipv6 && r.metric == metric)
            .map(|i| st.default_routes.remove(i));
        st.default_routes.push(DefaultRoute {
            ipv6,
            gateway: Some(gateway),
            link: Some(link.to_owned()),
            metric,
        });
        Ok(Outcome::Changed(old))
    }

    async fn delete_link(&self, link: &str) -> Result<Outcome<()>, NetconfError> {
        check_name("delete link", link)?;
        let mut st = self.lock();
        if st.links.remove(link).is_none() {
            return Ok(Outcome::Unchanged);
        }
        st.links.retain(|_, l| {
            l.vlan
                .as_ref()
                .is_none_or(|v| v.parent.as_deref() != Some(link))
        });
        for l in st.links.values_mut() {
            if l.master.as_deref() == Some(link) {
                l.master = None;
            }
        }
        let names: Vec<String> = st.links.keys().cloned().collect();
        st.default_routes
            .retain(|r| r.link.as_ref().is_some_and(|l| names.contains(l)));
        Ok(Outcome::Changed(()))
    }

    async fn announce(&self, link: &str, addr: IpNet) -> Result<(), NetconfError> {
        self.with_link("announce", link, |_| Ok(()))?;
        self.announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((link.to_owned(), addr));
        Ok(())
    }
}
