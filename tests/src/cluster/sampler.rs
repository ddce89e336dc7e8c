//! The checker's sampling thread. It lives in the switch namespace (its ARP socket and etcd
//! connections are there) and keeps one rtnetlink handle per node namespace, so a sample
//! spawns no process: per node one address dump (the data of `ip -j addr`), one ARP round
//! on the switch, one etcd range read, one pass over `/proc` for dnsmasq.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use debvisor_netconf::{HostNet, Netlink, Observed};
use etcd_client::{Client, ConnectOptions, GetOptions};

use super::arp::{mac_string, ArpProber, Mac};
use super::checker::{Checker, Inner, Sample};
use super::procs::scan_dnsmasq;
use super::switch::BRIDGE;
use super::{lock, KEY_PREFIX};
use crate::error::{HarnessError, IoContext, Result};

/// How long one etcd attempt (connect or read) may take in a sample.
const ETCD_ATTEMPT: Duration = Duration::from_secs(1);
/// How long one namespace dump may take.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the sampler watches and where.
#[derive(Debug, Clone)]
pub(super) struct SamplerConfig {
    /// `(node name, namespace name)` of every node.
    pub nodes: Vec<(String, String)>,
    /// The switch namespace.
    pub switch_ns: String,
    /// MAC and address of the switch bridge (the ARP requests' sender).
    pub switch_mac: Mac,
    pub switch_addr: Ipv4Addr,
    /// The configured floating addresses (always watched).
    pub floating: Vec<IpAddr>,
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// Time between the starts of two samples.
    pub period: Duration,
    /// How long ARP replies are collected in each sample.
    pub arp_window: Duration,
}

/// Start the sampler of `checker` and return once it has taken its first sample.
pub(super) fn start(cfg: SamplerConfig, checker: &Checker) -> Result<()> {
    let mut inodes = Vec::new();
    for (node, ns) in &cfg.nodes {
        let path = format!("/run/netns/{ns}");
        let ino = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(&path).ctx(|| format!("stat {path}"))?,
        );
        inodes.push((ino, node.clone()));
    }
    let inner = checker.inner.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("cluster checker".into())
        .spawn(move || run(cfg, inodes, inner, ready_tx))
        .ctx(|| "spawning the checker thread".to_owned())?;
    *lock(&checker.inner.thread) = Some(handle);
    match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            checker.stop();
            Err(HarnessError::State(format!(
                "the checker could not start: {e}"
            )))
        }
        Err(_) => {
            checker.stop();
            Err(HarnessError::State(
                "the checker took no first sample within 30 s".into(),
            ))
        }
    }
}

/// The thread: set up in the switch namespace, then sample until told to stop.
fn run(
    cfg: SamplerConfig,
    inodes: Vec<(u64, String)>,
    inner: Arc<Inner>,
    ready: std::sync::mpsc::Sender<std::result::Result<(), String>>,
) {
    let fail = |e: String| {
        let _ = ready.send(Err(e));
    };
    if let Err(e) = crate::netns::enter_thread(&cfg.switch_ns) {
        return fail(e.to_string());
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("building a tokio runtime: {e}")),
    };
    let mut netlinks = Vec::new();
    for (node, ns) in &cfg.nodes {
        match Netlink::in_netns(ns) {
            Ok(nl) => netlinks.push((node.clone(), nl.with_timeout(DUMP_TIMEOUT))),
            Err(e) => return fail(format!("netlink in {ns}: {e}")),
        }
    }
    let prober = match ArpProber::open(BRIDGE, cfg.switch_mac, cfg.switch_addr) {
        Ok(p) => p,
        Err(e) => return fail(format!("ARP socket on {BRIDGE}: {e}")),
    };
    let mut etcd = EtcdReader::new(&cfg.endpoints);
    let mut first = true;
    while !inner.stop.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        let watched: BTreeSet<IpAddr> = cfg
            .floating
            .iter()
            .copied()
            .chain(lock(&inner.watch).iter().copied())
            .collect();
        let mut sample = Sample::default();
        let mut macs: BTreeMap<Mac, String> = BTreeMap::new();
        let dumps = rt.block_on(futures::future::join_all(
            netlinks.iter().map(|(_, nl)| nl.observe()),
        ));
        for ((node, _), dump) in netlinks.iter().zip(dumps) {
            match dump {
                Ok(obs) => holdings(node, &obs, &watched, &mut sample, &mut macs),
                Err(e) => sample.errors.push(format!("{node}: address dump: {e}")),
            }
        }
        let subnet = |a: &Ipv4Addr| a.octets()[..3] == cfg.switch_addr.octets()[..3];
        let targets: Vec<Ipv4Addr> = watched
            .iter()
            .chain(sample.in_namespaces.keys())
            .filter_map(|a| match a {
                IpAddr::V4(v4) if subnet(v4) && *v4 != cfg.switch_addr => Some(*v4),
                _ => None,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !targets.is_empty() {
            match prober.probe(&targets, cfg.arp_window) {
                Ok(answers) => {
                    for (addr, set) in answers {
                        let who = set
                            .iter()
                            .map(|m| macs.get(m).cloned().unwrap_or_else(|| mac_string(m)))
                            .collect();
                        sample.on_wire.insert(IpAddr::V4(addr), who);
                    }
                }
                Err(e) => sample.errors.push(format!("ARP probe: {e}")),
            }
        }
        sample.primaries = rt.block_on(etcd.primaries());
        sample.dnsmasq = scan_dnsmasq(&inodes);
        let took = t0.elapsed();
        lock(&inner.state).apply(sample, t0, took);
        if first {
            first = false;
            let _ = ready.send(Ok(()));
        }
        let next = t0 + cfg.period;
        while !inner.stop.load(Ordering::SeqCst) {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

/// Fold one node's address dump into the sample: watched or floating-marked addresses it
/// holds, and its MACs (to name who answers ARP).
fn holdings(
    node: &str,
    obs: &Observed,
    watched: &BTreeSet<IpAddr>,
    sample: &mut Sample,
    macs: &mut BTreeMap<Mac, String>,
) {
    for link in obs.links.values() {
        if let Some(mac) = link.mac.as_deref().and_then(|m| <Mac>::try_from(m).ok()) {
            if mac != [0; 6] {
                macs.insert(mac, node.to_owned());
            }
        }
        for a in &link.addresses {
            let ip = a.cidr.addr();
            if watched.contains(&ip) || a.owner.primary_only() {
                sample
                    .in_namespaces
                    .entry(ip)
                    .or_default()
                    .insert(node.to_owned());
            }
        }
    }
}

/// Reads `coordinator_state` of every node from the first etcd member that answers, starting
/// with the one that answered last time.
struct EtcdReader {
    members: Vec<(String, Option<Client>)>,
    first: usize,
}

impl EtcdReader {
    fn new(endpoints: &[String]) -> EtcdReader {
        EtcdReader {
            members: endpoints.iter().map(|e| (e.clone(), None)).collect(),
            first: 0,
        }
    }

    /// Nodes holding a lease whose `coordinator_state` is `primary`; `None` if no member
    /// answered.
    async fn primaries(&mut self) -> Option<BTreeSet<String>> {
        let n = self.members.len();
        let prefix = format!("{KEY_PREFIX}nodes/");
        for k in 0..n {
            let i = (self.first + k) % n;
            let (endpoint, slot) = &mut self.members[i];
            if slot.is_none() {
                let opts = ConnectOptions::new()
                    .with_connect_timeout(ETCD_ATTEMPT)
                    .with_timeout(ETCD_ATTEMPT);
                let connect = Client::connect([endpoint.as_str()], Some(opts));
                match tokio::time::timeout(ETCD_ATTEMPT, connect).await {
                    Ok(Ok(c)) => *slot = Some(c),
                    _ => continue,
                }
            }
            let Some(client) = slot.as_mut() else {
                continue;
            };
            let read = client.get(prefix.as_str(), Some(GetOptions::new().with_prefix()));
            let Ok(Ok(resp)) = tokio::time::timeout(ETCD_ATTEMPT, read).await else {
                continue;
            };
            self.first = i;
            // A node counts while it holds a lease (`alive`): a node whose lease expired is
            // dead to the cluster, its election key gone with the lease, and its last
            // `coordinator_state` stays behind only until it can write again.
            let node_of = |key: &[u8], suffix: &str| -> Option<String> {
                let key = String::from_utf8_lossy(key);
                let node = key.strip_prefix(&prefix)?.strip_suffix(suffix)?;
                (!node.contains('/')).then(|| node.to_owned())
            };
            let alive: BTreeSet<String> = resp
                .kvs()
                .iter()
                .filter_map(|kv| node_of(kv.key(), "/alive"))
                .collect();
            return Some(
                resp.kvs()
                    .iter()
                    .filter(|kv| kv.value() == b"primary")
                    .filter_map(|kv| node_of(kv.key(), "/coordinator_state"))
                    .filter(|n| alive.contains(n))
                    .collect(),
            );
        }
        None
    }
}
