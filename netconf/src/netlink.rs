//! [`HostNet`] over rtnetlink, optionally inside a named network namespace.
//!
//! A network namespace is a property of a thread (and of each socket, fixed when the socket
//! is created). So [`Netlink`] owns one dedicated thread that `setns`es into
//! `/run/netns/<name>` (or stays where it is), runs a current-thread tokio runtime with the
//! rtnetlink connection, and executes requests one at a time as they arrive over a channel.
//! Every socket used for an operation (the netlink socket, the packet sockets announcing
//! floating addresses) is created on that thread, hence in that namespace; the caller's
//! threads and runtime never change namespace. Requests run in order, each with a timeout.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
};
use rtnetlink::packet_route::link::{
    InfoData, InfoVlan, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVlan, LinkVxlan, RouteMessageBuilder,
};
use tokio::sync::{mpsc, oneshot};

use crate::error::{check_name, nl_err, nl_errno};
use crate::host::{HostNet, Outcome};
use crate::model::{
    default_metric, AddrOwner, AddrState, DefaultRoute, LinkState, Observed, VlanInfo, VxlanSpec,
};
use crate::{announce, NetconfError};

/// How long one request may take before it fails with [`NetconfError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce(Handle) -> LocalBoxFuture<'static, ()> + Send>;

/// rtnetlink-backed [`HostNet`], bound to one network namespace for its whole life.
///
/// Dropping it stops its thread (after the requests already queued).
#[derive(Debug)]
pub struct Netlink {
    tx: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    netns: String,
    timeout: Duration,
}

impl Netlink {
    /// Operate on the network namespace the process is in now.
    pub fn current() -> Result<Netlink, NetconfError> {
        Netlink::start(None)
    }

    /// Operate inside the named namespace `/run/netns/<name>` (as created by `ip netns add`).
    /// Fails at once if it cannot be entered.
    pub fn in_netns(name: &str) -> Result<Netlink, NetconfError> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(NetconfError::Namespace {
                netns: name.to_owned(),
                reason: "not a valid namespace name".into(),
            });
        }
        Netlink::start(Some(name.to_owned()))
    }

    /// Change the per-request timeout (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Netlink {
        self.timeout = timeout;
        self
    }

    /// The namespace operated on (`(current)` for the process's own).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    fn start(netns: Option<String>) -> Result<Netlink, NetconfError> {
        let label = netns.clone().unwrap_or_else(|| "(current)".into());
        let ns_err = |reason: String| NetconfError::Namespace {
            netns: label.clone(),
            reason,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("netlink {label}"))
            .spawn(move || worker(netns, rx, ready_tx))
            .map_err(|e| ns_err(format!("cannot start the netlink thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Netlink {
                tx: Some(tx),
                thread: Some(thread),
                netns: label,
                timeout: DEFAULT_TIMEOUT,
            }),
            Ok(Err(reason)) => {
                let _ = thread.join();
                Err(ns_err(reason))
            }
            Err(_) => {
                let _ = thread.join();
                Err(ns_err("the netlink thread died while starting".into()))
            }
        }
    }

    /// Run `f` on the namespace thread and wait for its result.
    async fn call<T, F, Fut>(&self, op: &'static str, link: &str, f: F) -> Result<T, NetconfError>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, NetconfError>> + 'static,
    {
        let gone = || NetconfError::WorkerGone {
            op,
            link: link.to_owned(),
            netns: self.netns.clone(),
        };
        let (rtx, rrx) = oneshot::channel();
        let timeout = self.timeout;
        let owned = link.to_owned();
        let job: Job = Box::new(move |h| {
            Box::pin(async move {
                let r = match tokio::time::timeout(timeout, f(h)).await {
                    Ok(r) => r,
                    Err(_) => Err(NetconfError::Timeout {
                        op,
                        link: owned,
                        secs: timeout.as_secs(),
                    }),
                };
                let _ = rtx.send(r);
            })
        });
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        rrx.await.map_err(|_| gone())?
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The namespace thread: enter, serve requests until the sender is dropped, restore.
fn worker(
    netns: Option<String>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let saved = match netns.as_deref().map(enter_netns).transpose() {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot build a tokio runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        // The socket is created here, after setns: it belongs to the namespace.
        let (conn, handle, _) = match rtnetlink::new_connection() {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot open a netlink socket: {e}")));
                return;
            }
        };
        tokio::spawn(conn);
        let _ = ready.send(Ok(()));
        while let Some(job) = rx.recv().await {
            job(handle.clone()).await;
        }
    });
    drop(rt);
    if let Some(saved) = saved {
        // SAFETY: setns(2) on a valid namespace fd; affects only this thread.
        let r = unsafe { libc::setns(saved.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot restore the network namespace of the netlink thread");
        }
    }
}

/// Enter `/run/netns/<name>` on this thread; returns the namespace to go back to.
fn enter_netns(name: &str) -> Result<File, String> {
    let saved = File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("cannot open /proc/thread-self/ns/net: {e}"))?;
    let path = format!("/run/netns/{name}");
    let target = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    // SAFETY: setns(2) on a valid fd; a network namespace change affects only this thread.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "setns({path}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(saved)
}

// ---- helpers running on the namespace thread ----

async fn dump_links(h: &Handle, op: &'static str) -> Result<Vec<LinkMessage>, NetconfError> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_err(op, "*", e))
}

async fn get_link(
    h: &Handle,
    op: &'static str,
    name: &str,
) -> Result<Option<LinkMessage>, NetconfError> {
    let r: Result<Vec<LinkMessage>, _> = h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_collect()
        .await;
    match r {
        Ok(v) => Ok(v.into_iter().next()),
        Err(e) if nl_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err(op, name, e)),
    }
}

async fn need_link(h: &Handle, op: &'static str, name: &str) -> Result<LinkMessage, NetconfError> {
    get_link(h, op, name)
        .await?
        .ok_or_else(|| NetconfError::NoSuchLink {
            op,
            link: name.to_owned(),
        })
}

async fn link_name(
    h: &Handle,
    op: &'static str,
    index: u32,
) -> Result<Option<String>, NetconfError> {
    let r: Result<Vec<LinkMessage>, _> = h
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_collect()
        .await;
    match r {
        Ok(v) => Ok(v.first().and_then(name_of)),
        Err(e) if nl_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err(op, &format!("#{index}"), e)),
    }
}

fn name_of(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn link_infos(m: &LinkMessage) -> &[LinkInfo] {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i.as_slice()),
            _ => None,
        })
        .unwrap_or(&[])
}

fn kind_of(m: &LinkMessage) -> Option<String> {
    link_infos(m).iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k.to_string()),
        _ => None,
    })
}

fn u32_attr(m: &LinkMessage, f: impl Fn(&LinkAttribute) -> Option<u32>) -> Option<u32> {
    m.attributes.iter().find_map(f)
}

/// Turn a link message into a [`LinkState`]; `names` maps indexes to names for master/parent.
fn parse_link(m: &LinkMessage, names: &HashMap<u32, String>) -> Option<LinkState> {
    let name = name_of(m)?;
    let kind = kind_of(m);
    let mtu = u32_attr(m, |a| match a {
        LinkAttribute::Mtu(v) => Some(*v),
        _ => None,
    })
    .unwrap_or(0);
    let master = u32_attr(m, |a| match a {
        LinkAttribute::Controller(v) => Some(*v),
        _ => None,
    })
    .and_then(|i| names.get(&i).cloned());
    let other_ns = m
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
    let parent = u32_attr(m, |a| match a {
        LinkAttribute::Link(v) => Some(*v),
        _ => None,
    })
    .filter(|_| !other_ns)
    .and_then(|i| names.get(&i).cloned());
    let mac = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(v) => Some(v.clone()),
        _ => None,
    });
    let data = link_infos(m).iter().find_map(|i| match i {
        LinkInfo::Data(d) => Some(d),
        _ => None,
    });
    let vlan = match data {
        Some(InfoData::Vlan(v)) => v
            .iter()
            .find_map(|x| match x {
                InfoVlan::Id(id) => Some(*id),
                _ => None,
            })
            .map(|id| VlanInfo {
                id,
                parent: parent.clone(),
            }),
        _ => None,
    };
    let vxlan = match data {
        Some(InfoData::Vxlan(v)) => Some(parse_vxlan(&name, v, names)),
        _ => None,
    };
    Some(LinkState {
        index: m.header.index,
        name,
        kind,
        mtu,
        up: m.header.flags.contains(LinkFlags::Up),
        master,
        mac,
        vlan,
        vxlan,
        addresses: Vec::new(),
    })
}

fn parse_vxlan(name: &str, v: &[InfoVxlan], names: &HashMap<u32, String>) -> VxlanSpec {
    let mut s = VxlanSpec {
        name: name.to_owned(),
        vni: 0,
        dev: None,
        dstport: 0,
        local: None,
        ttl: None,
        group: None,
    };
    for x in v {
        match x {
            InfoVxlan::Id(id) => s.vni = *id,
            InfoVxlan::Link(i) if *i != 0 => s.dev = names.get(i).cloned(),
            InfoVxlan::Port(p) => s.dstport = *p,
            InfoVxlan::Local(a) => s.local = Some(IpAddr::V4(*a)),
            InfoVxlan::Local6(a) => s.local = Some(IpAddr::V6(*a)),
            InfoVxlan::Ttl(t) if *t != 0 => s.ttl = Some(*t),
            InfoVxlan::Group(a) if !a.is_unspecified() => s.group = Some(IpAddr::V4(*a)),
            InfoVxlan::Group6(a) if !a.is_unspecified() => s.group = Some(IpAddr::V6(*a)),
            _ => {}
        }
    }
    s
}

fn parse_addr(m: &AddressMessage) -> Option<AddrState> {
    let find = |want_local: bool| {
        m.attributes.iter().find_map(|a| match (a, want_local) {
            (AddressAttribute::Local(ip), true) | (AddressAttribute::Address(ip), false) => {
                Some(*ip)
            }
            _ => None,
        })
    };
    let addr = find(true).or_else(|| find(false))?;
    let proto = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Protocol(p) => Some(u8::from(*p)),
        _ => None,
    });
    Some(AddrState {
        // A prefix length the family cannot have is not an address we could manage.
        cidr: IpNet::new(addr, m.header.prefix_len).ok()?,
        owner: AddrOwner::from_proto(proto),
    })
}

async fn dump_addrs(
    h: &Handle,
    op: &'static str,
    link: &str,
    index: Option<u32>,
) -> Result<Vec<AddressMessage>, NetconfError> {
    let mut req = h.address().get();
    if let Some(i) = index {
        req = req.set_link_index_filter(i);
    }
    req.execute()
        .try_collect()
        .await
        .map_err(|e| nl_err(op, link, e))
}

async fn dump_routes(
    h: &Handle,
    op: &'static str,
    ipv6: bool,
) -> Result<Vec<RouteMessage>, NetconfError> {
    let msg = if ipv6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    h.route()
        .get(msg)
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_err(op, "*", e))
}

fn parse_default_route(m: &RouteMessage, names: &HashMap<u32, String>) -> Option<DefaultRoute> {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if m.header.destination_prefix_length != 0
        || table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || m.header.kind != RouteType::Unicast
    {
        return None;
    }
    let mut r = DefaultRoute {
        ipv6: m.header.address_family == AddressFamily::Inet6,
        gateway: None,
        link: None,
        metric: 0,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some(IpAddr::V6(*g)),
            RouteAttribute::Oif(i) => r.link = names.get(i).cloned(),
            RouteAttribute::Priority(p) => r.metric = *p,
            _ => {}
        }
    }
    Some(r)
}

async fn observe_on(h: Handle) -> Result<Observed, NetconfError> {
    const OP: &str = "observe";
    let msgs = dump_links(&h, OP).await?;
    let names: HashMap<u32, String> = msgs
        .iter()
        .filter_map(|m| Some((m.header.index, name_of(m)?)))
        .collect();
    let mut by_index: HashMap<u32, LinkState> = msgs
        .iter()
        .filter_map(|m| parse_link(m, &names))
        .map(|l| (l.index, l))
        .collect();
    for m in dump_addrs(&h, OP, "*", None).await? {
        if let (Some(l), Some(a)) = (by_index.get_mut(&m.header.index), parse_addr(&m)) {
            l.addresses.push(a);
        }
    }
    let mut default_routes = Vec::new();
    for ipv6 in [false, true] {
        default_routes.extend(
            dump_routes(&h, OP, ipv6)
                .await?
                .iter()
                .filter_map(|m| parse_default_route(m, &names)),
        );
    }
    Ok(Observed {
        links: by_index
            .into_values()
            .map(|l| (l.name.clone(), l))
            .collect(),
        default_routes,
    })
}

/// Create a link unless one with that name exists; `same` decides whether an existing one is
/// what was asked for.
async fn create_link(
    h: &Handle,
    op: &'static str,
    name: &str,
    msg: LinkMessage,
    same: impl Fn(&LinkState) -> Result<(), String>,
) -> Result<Outcome<()>, NetconfError> {
    let check_existing = |m: &LinkMessage, names: &HashMap<u32, String>| {
        let l = parse_link(m, names).ok_or_else(|| NetconfError::Protocol {
            op,
            link: name.to_owned(),
            message: "link message without a name".into(),
        })?;
        same(&l).map_err(|reason| NetconfError::Conflict {
            op,
            link: name.to_owned(),
            reason,
        })
    };
    if get_link(h, op, name).await?.is_none() {
        match h.link().add(msg).execute().await {
            Ok(()) => return Ok(Outcome::Changed(())),
            // Someone else created it meanwhile: compare below.
            Err(e) if nl_errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(nl_err(op, name, e)),
        }
    }
    let names = index_names(h, op).await?;
    let m = need_link(h, op, name).await?;
    check_existing(&m, &names)?;
    Ok(Outcome::Unchanged)
}

async fn index_names(h: &Handle, op: &'static str) -> Result<HashMap<u32, String>, NetconfError> {
    Ok(dump_links(h, op)
        .await?
        .iter()
        .filter_map(|m| Some((m.header.index, name_of(m)?)))
        .collect())
}

fn want_kind(l: &LinkState, kind: &str) -> Result<(), String> {
    if l.kind.as_deref() == Some(kind) {
        Ok(())
    } else {
        Err(format!(
            "exists as a {} link, not a {kind}",
            l.kind.as_deref().unwrap_or("physical")
        ))
    }
}

async fn change_link(
    h: &Handle,
    op: &'static str,
    name: &str,
    msg: LinkMessage,
) -> Result<(), NetconfError> {
    h.link()
        .change(msg)
        .execute()
        .await
        .map_err(|e| nl_err(op, name, e))
}

fn mac6(op: &'static str, link: &str, m: &LinkMessage) -> Result<[u8; 6], NetconfError> {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(v) => <[u8; 6]>::try_from(v.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| NetconfError::Conflict {
            op,
            link: link.to_owned(),
            reason: "has no Ethernet address to announce from".into(),
        })
}

/// When an announcement is repeated, counted from the first one. A link that has just come
/// up drops the first frames: carrier negotiation, or (seen with veths) a new bridge port
/// that is not forwarding until the kernel's link watcher has processed its carrier, up to a
/// second later. RFC 4861 allows up to three unsolicited NAs; gratuitous ARP tools send a few.
pub const ANNOUNCE_REPEATS: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(3)];

/// Send one gratuitous ARP (IPv4) or unsolicited NA (IPv6) for `addr` on `link`.
fn send_announcement(link: &str, index: u32, mac: [u8; 6], addr: IpNet) -> std::io::Result<()> {
    match addr.addr() {
        IpAddr::V4(ip) => announce::send_garp(index, mac, ip),
        IpAddr::V6(ip) => {
            // Per namespace: read on the namespace thread. Set the Router flag like the
            // kernel does for its own NAs, so neighbours keep us as a router.
            let router =
                std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{link}/forwarding"))
                    .is_ok_and(|s| s.trim() == "1");
            announce::send_unsolicited_na(index, mac, ip, router)
        }
    }
}

/// The repeats of [`ANNOUNCE_REPEATS`]; each only while `addr` is still on `link` (after a
/// release another node may hold it, and announcing it then would steal it back).
async fn repeat_announcement(h: Handle, link: String, addr: IpNet) {
    const OP: &str = "announce";
    let mut waited = Duration::ZERO;
    for at in ANNOUNCE_REPEATS {
        tokio::time::sleep(at.saturating_sub(waited)).await;
        waited = at;
        let here = async {
            let m = need_link(&h, OP, &link).await?;
            let held = dump_addrs(&h, OP, &link, Some(m.header.index))
                .await?
                .iter()
                .filter_map(parse_addr)
                .any(|a| a.cidr == addr);
            Ok::<_, NetconfError>(held.then_some(m))
        };
        match here.await {
            Ok(Some(m)) => {
                let sent = mac6(OP, &link, &m).and_then(|mac| {
                    send_announcement(&link, m.header.index, mac, addr).map_err(|source| {
                        NetconfError::Os {
                            op: OP,
                            link: link.clone(),
                            source,
                        }
                    })
                });
                if let Err(e) = sent {
                    tracing::warn!(%link, %addr, error = %e, "repeating an address announcement failed");
                }
            }
            Ok(None) => return,
            // The link went away (network deleted): nothing left to announce.
            Err(NetconfError::NoSuchLink { .. }) => return,
            Err(e) => {
                tracing::warn!(%link, %addr, error = %e, "repeating an address announcement failed");
                return;
            }
        }
    }
}

impl HostNet for Netlink {
    async fn observe(&self) -> Result<Observed, NetconfError> {
        // A dump that races with link changes is aborted by the kernel (EBUSY/EINTR): it is
        // not a failure, just try again at once (bounded).
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.call("observe", "*", observe_on).await {
                Err(e)
                    if attempt < 5
                        && matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EINTR)) =>
                {
                    continue
                }
                r => return r,
            }
        }
    }

    async fn ensure_bridge(&self, name: &str) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "create bridge";
        check_name(OP, name)?;
        let name = name.to_owned();
        self.call(OP, &name.clone(), move |h| async move {
            let msg = LinkMessageBuilder::<LinkBridge>::new(&name).build();
            create_link(&h, OP, &name, msg, |l| want_kind(l, "bridge")).await
        })
        .await
    }

    async fn ensure_vlan(
        &self,
        name: &str,
        parent: &str,
        id: u16,
    ) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "create vlan";
        check_name(OP, name)?;
        check_name(OP, parent)?;
        let (name, parent) = (name.to_owned(), parent.to_owned());
        self.call(OP, &name.clone(), move |h| async move {
            let p = need_link(&h, OP, &parent).await?;
            let msg = LinkVlan::new(&name, p.header.index, id).build();
            create_link(&h, OP, &name, msg, |l| {
                want_kind(l, "vlan")?;
                let want = VlanInfo {
                    id,
                    parent: Some(parent.clone()),
                };
                if l.vlan.as_ref() == Some(&want) {
                    Ok(())
                } else {
                    Err(format!("exists as {:?}, wanted {want:?}", l.vlan))
                }
            })
            .await
        })
        .await
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "create vxlan";
        check_name(OP, &spec.name)?;
        if let Some(d) = &spec.dev {
            check_name(OP, d)?;
        }
        if spec.vni >= 1 << 24 {
            return Err(NetconfError::Conflict {
                op: OP,
                link: spec.name.clone(),
                reason: format!("VNI {} does not fit in 24 bits", spec.vni),
            });
        }
        let spec = spec.clone();
        self.call(OP, &spec.name.clone(), move |h| async move {
            let mut b = LinkVxlan::new(&spec.name, spec.vni).port(spec.dstport);
            if let Some(d) = &spec.dev {
                b = b.dev(need_link(&h, OP, d).await?.header.index);
            }
            match spec.local {
                Some(IpAddr::V4(a)) => b = b.local(a),
                Some(IpAddr::V6(a)) => b = b.local6(a),
                None => {}
            }
            if let Some(t) = spec.ttl {
                b = b.ttl(t);
            }
            match spec.group {
                Some(IpAddr::V4(a)) => b = b.group(a),
                Some(IpAddr::V6(a)) => b = b.group6(a),
                None => {}
            }
            create_link(&h, OP, &spec.name, b.build(), |l| {
                want_kind(l, "vxlan")?;
                match &l.vxlan {
                    Some(have) if *have == spec => Ok(()),
                    have => Err(format!("exists as {have:?}, wanted {spec:?}")),
                }
            })
            .await
        })
        .await
    }

    async fn ensure_up(&self, link: &str) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "set up";
        check_name(OP, link)?;
        let link = link.to_owned();
        self.call(OP, &link.clone(), move |h| async move {
            let m = need_link(&h, OP, &link).await?;
            if m.header.flags.contains(LinkFlags::Up) {
                return Ok(Outcome::Unchanged);
            }
            let msg = LinkUnspec::new_with_index(m.header.index).up().build();
            change_link(&h, OP, &link, msg).await?;
            Ok(Outcome::Changed(()))
        })
        .await
    }

    async fn ensure_mtu(&self, link: &str, mtu: u32) -> Result<Outcome<u32>, NetconfError> {
        const OP: &str = "set mtu";
        check_name(OP, link)?;
        let link = link.to_owned();
        self.call(OP, &link.clone(), move |h| async move {
            let m = need_link(&h, OP, &link).await?;
            let old = u32_attr(&m, |a| match a {
                LinkAttribute::Mtu(v) => Some(*v),
                _ => None,
            })
            .unwrap_or(0);
            if old == mtu {
                return Ok(Outcome::Unchanged);
            }
            let msg = LinkUnspec::new_with_index(m.header.index).mtu(mtu).build();
            change_link(&h, OP, &link, msg).await?;
            Ok(Outcome::Changed(old))
        })
        .await
    }

    async fn ensure_master(
        &self,
        link: &str,
        master: &str,
    ) -> Result<Outcome<Option<String>>, NetconfError> {
        const OP: &str = "set master";
        check_name(OP, link)?;
        check_name(OP, master)?;
        let (link, master) = (link.to_owned(), master.to_owned());
        self.call(OP, &link.clone(), move |h| async move {
            let m = need_link(&h, OP, &link).await?;
            let b = need_link(&h, OP, &master).await?;
            let cur = u32_attr(&m, |a| match a {
                LinkAttribute::Controller(v) => Some(*v),
                _ => None,
            });
            if cur == Some(b.header.index) {
                return Ok(Outcome::Unchanged);
            }
            let old = match cur {
                Some(i) => link_name(&h, OP, i).await?,
                None => None,
            };
            let msg = LinkUnspec::new_with_index(m.header.index)
                .controller(b.header.index)
                .build();
            change_link(&h, OP, &link, msg).await?;
            Ok(Outcome::Changed(old))
        })
        .await
    }

    async fn ensure_address(
        &self,
        link: &str,
        addr: IpNet,
        owner: AddrOwner,
    ) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "add address";
        check_name(OP, link)?;
        let link = link.to_owned();
        self.call(OP, &link.clone(), move |h| async move {
            let index = need_link(&h, OP, &link).await?.header.index;
            let have = dump_addrs(&h, OP, &link, Some(index)).await?;
            if have.iter().filter_map(parse_addr).any(|a| a.cidr == addr) {
                return Ok(Outcome::Unchanged);
            }
            let mut req = h.address().add(index, addr.addr(), addr.prefix_len());
            let m = req.message_mut();
            if addr.addr().is_ipv6() {
                m.header.flags |= AddressHeaderFlags::Nodad;
                m.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            if let Some(p) = owner.proto() {
                m.attributes
                    .push(AddressAttribute::Protocol(AddressProtocol::from(p)));
            }
            match req.execute().await {
                Ok(()) => Ok(Outcome::Changed(())),
                Err(e) if nl_errno(&e) == Some(libc::EEXIST) => Err(NetconfError::Conflict {
                    op: OP,
                    link: link.clone(),
                    reason: format!(
                        "{} is already there with another prefix length",
                        addr.addr()
                    ),
                }),
                Err(e) => Err(nl_err(OP, &link, e)),
            }
        })
        .await
    }

    async fn remove_address(&self, link: &str, addr: IpNet) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "remove address";
        check_name(OP, link)?;
        let link = link.to_owned();
        self.call(OP, &link.clone(), move |h| async move {
            let Some(m) = get_link(&h, OP, &link).await? else {
                return Ok(Outcome::Unchanged);
            };
            let found = dump_addrs(&h, OP, &link, Some(m.header.index))
                .await?
                .into_iter()
                .find(|m| parse_addr(m).is_some_and(|a| a.cidr == addr));
            let Some(msg) = found else {
                return Ok(Outcome::Unchanged);
            };
            match h.address().del(msg).execute().await {
                Ok(()) => Ok(Outcome::Changed(())),
                Err(e) if nl_errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(Outcome::Unchanged),
                Err(e) => Err(nl_err(OP, &link, e)),
            }
        })
        .await
    }

    async fn ensure_default_route(
        &self,
        link: &str,
        gateway: IpAddr,
    ) -> Result<Outcome<Option<DefaultRoute>>, NetconfError> {
        const OP: &str = "replace default route";
        check_name(OP, link)?;
        let link = link.to_owned();
        self.call(OP, &link.clone(), move |h| async move {
            let index = need_link(&h, OP, &link).await?.header.index;
            let names = index_names(&h, OP).await?;
            let ipv6 = gateway.is_ipv6();
            let defaults: Vec<DefaultRoute> = dump_routes(&h, OP, ipv6)
                .await?
                .iter()
                .filter_map(|m| parse_default_route(m, &names))
                .collect();
            if defaults
                .iter()
                .any(|r| r.gateway == Some(gateway) && r.link.as_deref() == Some(&link))
            {
                return Ok(Outcome::Unchanged);
            }
            let metric = default_metric(ipv6);
            let old = defaults.into_iter().find(|r| r.metric == metric);
            let msg = match gateway {
                IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(g)
                    .output_interface(index)
                    .build(),
                IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(g)
                    .output_interface(index)
                    .build(),
            };
            h.route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| nl_err(OP, &link, e))?;
            Ok(Outcome::Changed(old))
        })
        .await
    }

    async fn delete_link(&self, link: &str) -> Result<Outcome<()>, NetconfError> {
        const OP: &str = "delete link";
        check_name(OP, link)?;
        let link = link.to_owned();
        self.call(OP, &link.clone(), move |h| async move {
            let Some(m) = get_link(&h, OP, &link).await? else {
                return Ok(Outcome::Unchanged);
            };
            match h.link().del(m.header.index).execute().await {
                Ok(()) => Ok(Outcome::Changed(())),
                Err(e) if nl_errno(&e) == Some(libc::ENODEV) => Ok(Outcome::Unchanged),
                Err(e) => Err(nl_err(OP, &link, e)),
            }
        })
        .await
    }

    async fn announce(&self, link: &str, addr: IpNet) -> Result<(), NetconfError> {
        const OP: &str = "announce";
        check_name(OP, link)?;
        let link = link.to_owned();
        self.call(OP, &link.clone(), move |h| async move {
            let m = need_link(&h, OP, &link).await?;
            let mac = mac6(OP, &link, &m)?;
            send_announcement(&link, m.header.index, mac, addr).map_err(|source| {
                NetconfError::Os {
                    op: OP,
                    link: link.clone(),
                    source,
                }
            })?;
            // Repeat in the background on this thread while the address stays ours.
            tokio::spawn(repeat_announcement(h, link, addr));
            Ok(())
        })
        .await
    }
}
