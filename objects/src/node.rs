//! The Node object: an in-memory view of every node of the cluster (info, states, health,
//! alive), parsed from `nodes/<node>/…` and kept current by the reactor.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::reactor::{
    Action, Entry, KeyEntry, Kind, ObjectError, Reactor, ReconcileError, Reconciler,
};
use crate::schema::{self, NodeField};

state_enum!(
    /// `nodes/<node>/daemon_state`.
    DaemonState { Stop = "stop", Init = "init", Run = "run", Shutdown = "shutdown", Dead = "dead", Fenced = "fenced" }
);
state_enum!(
    /// `nodes/<node>/coordinator_state`.
    CoordinatorState { Client = "client", Secondary = "secondary", Takeover = "takeover", Primary = "primary", Relinquish = "relinquish" }
);
state_enum!(
    /// `nodes/<node>/domain_state`.
    DomainState { Ready = "ready", Flush = "flush", Flushed = "flushed", Unflush = "unflush", FenceFlush = "fence-flush" }
);
state_enum!(
    /// `nodes/<node>/status` (written by the primary).
    NodeStatus { Ok = "OK", Degraded = "DEGRADED", Down = "DOWN" }
);
state_enum!(
    /// `nodes/<node>/mode`.
    Mode { Standalone = "standalone", Clustered = "clustered" }
);

/// `nodes/<node>/info`: static facts about a node. Unknown fields are ignored, so a newer
/// daemon can add facts without making its node unreadable to older ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Kernel hostname.
    pub hostname: String,
    /// FQDN as resolved locally (the cluster-assigned one is `info/fqdn`).
    #[serde(default)]
    pub fqdn: Option<String>,
    /// Non-loopback addresses of the node.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Daemon version.
    pub version: String,
    /// Online CPUs.
    pub cpus: u32,
    /// Total memory in MiB.
    pub memory_mib: u64,
    /// Kernel release.
    #[serde(default)]
    pub kernel: String,
    /// libvirt version (`9.0.0`), when libvirt answered.
    #[serde(default)]
    pub libvirt_version: Option<String>,
    /// libvirt URI peers use to reach this node (migration).
    #[serde(default)]
    pub libvirt_uri: Option<String>,
    /// Rack/location label.
    #[serde(default)]
    pub rack: Option<String>,
    /// Stable local node id (`<state_dir>/node_id`).
    #[serde(default)]
    pub node_id: String,
    /// The node's address on the cluster network (peers measure their round-trip time to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_address: Option<String>,
}

/// Memory figures in MiB.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub total_mib: u64,
    pub used_mib: u64,
    pub free_mib: u64,
}

/// Domain counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmCounts {
    pub total: u32,
    pub running: u32,
}

/// What the domains on a node take from it (placement: `memprov`, `vcpus`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// Memory of running domains, MiB.
    pub memory_mib: u64,
    /// Memory of every defined domain, running or not, MiB.
    pub memory_provisioned_mib: u64,
    /// vCPUs of running domains.
    pub vcpus: u32,
    /// vCPUs of every defined domain.
    pub vcpus_provisioned: u32,
}

/// `nodes/<node>/health`: the keepalive snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Did libvirt answer this tick?
    pub libvirt: bool,
    /// 1/5/15-minute load averages.
    pub load: [f64; 3],
    pub memory: MemoryStats,
    pub vms: VmCounts,
    /// Resources allocated to domains (absent from daemons that predate it).
    #[serde(default)]
    pub alloc: Allocation,
    /// Daemon version.
    pub version: String,
    /// Host uptime in seconds.
    pub uptime_s: u64,
    /// Daemon uptime in seconds.
    #[serde(default)]
    pub daemon_uptime_s: u64,
    /// Problems this node sees in itself (empty = healthy).
    #[serde(default)]
    pub problems: Vec<String>,
    /// Names of domains on this host that debvisor did not create (left alone).
    #[serde(default)]
    pub foreign: Vec<String>,
    /// Ceph as this node last saw it (only with `ceph.enabled`; absent otherwise and from
    /// daemons that predate it, so older readers ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph: Option<CephNodeHealth>,
    /// Removals this node holds until an operator confirms (`debvisorctl node
    /// confirm-removals`); absent when none are held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removals_held: Option<HeldRemovals>,
    /// Round-trip times to peers' cluster addresses, measured on the keepalive tick.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerRtt>,
}

/// The round-trip time from this node to one peer (`None`: no answer in time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerRtt {
    /// The peer's node name.
    pub node: String,
    /// Round-trip time of an ICMP echo in milliseconds.
    pub rtt_ms: Option<f64>,
}

/// When the primary calls a node DEGRADED (`node_status:` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatusThresholds {
    /// Memory in use above this percentage of the total.
    pub memory_percent: u32,
    /// 1-minute load above this percentage per CPU (200 = 2.0 per CPU).
    pub load_percent_per_cpu: u32,
    /// `last_seen` older than this.
    pub stale_after: std::time::Duration,
    /// Round-trip time to a peer above this (or no answer).
    pub rtt: std::time::Duration,
}

/// The primary's verdict on one node: `DOWN` without a lease, `DEGRADED` with every reason
/// the thresholds find, else `OK`. `age` is how long ago its `last_seen` was, if known.
pub fn derive_status(
    n: &NodeRecord,
    age: Option<std::time::Duration>,
    t: &StatusThresholds,
) -> (NodeStatus, Vec<String>) {
    if !n.alive {
        let why = match n.daemon_state {
            Some(DaemonState::Stop) => "daemon stopped",
            Some(DaemonState::Fenced) => "fenced",
            _ => "no lease (alive key gone)",
        };
        return (NodeStatus::Down, vec![why.to_string()]);
    }
    let mut why = Vec::new();
    let Some(h) = &n.health else {
        return (NodeStatus::Degraded, vec!["no health report".into()]);
    };
    if !h.libvirt {
        why.push("libvirt unreachable".to_string());
    }
    if let Some(pct) = (h.memory.used_mib * 100).checked_div(h.memory.total_mib) {
        if pct > u64::from(t.memory_percent) {
            why.push(format!("memory above {}% used", t.memory_percent));
        }
    }
    let cpus = n.info.as_ref().map_or(0, |i| i.cpus);
    if cpus > 0 {
        let pct = (h.load[0] * 100.0 / f64::from(cpus)) as u64;
        if pct > u64::from(t.load_percent_per_cpu) {
            why.push(format!(
                "load above {:.2} per CPU ({cpus} CPUs)",
                f64::from(t.load_percent_per_cpu) / 100.0
            ));
        }
    }
    if let Some(c) = &h.ceph {
        if c.status != "HEALTH_OK" {
            why.push(format!("ceph {}", c.status));
        }
    }
    // Stated against the thresholds, not with the live figures: the status (a key in etcd
    // and a log line on change) stays the same while a condition lasts; the figures are in
    // the node's health and in /metrics.
    if age.is_some_and(|a| a > t.stale_after) {
        why.push(format!(
            "no keepalive for over {}s",
            t.stale_after.as_secs()
        ));
    }
    for p in &h.peers {
        match p.rtt_ms {
            None => why.push(format!("peer {} does not answer", p.node)),
            Some(ms) if ms > t.rtt.as_secs_f64() * 1000.0 => {
                why.push(format!("rtt to {} above {} ms", p.node, t.rtt.as_millis()))
            }
            Some(_) => {}
        }
    }
    if let Some(r) = &h.removals_held {
        why.push(format!("{} removal(s) held", r.count));
    }
    if why.is_empty() {
        (NodeStatus::Ok, why)
    } else {
        (NodeStatus::Degraded, why)
    }
}

/// The node-level Ceph summary in `nodes/<node>/health`: cluster status as this node sees
/// it, the failing checks, and this node's OSDs. Lets an operator (and placement) see a
/// node whose storage is in trouble without reading `ceph/…`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CephNodeHealth {
    /// `HEALTH_OK`, `HEALTH_WARN`, `HEALTH_ERR`, or `unreachable` (no answer within
    /// `ceph.timeout`).
    pub status: String,
    /// Names of the failing health checks (`OSDMAP_FLAGS`, …).
    #[serde(default)]
    pub checks: Vec<String>,
    /// OSDs whose metadata names this host.
    #[serde(default)]
    pub osds: Vec<CephNodeOsd>,
    /// Why Ceph is unreachable (only with `status: unreachable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RFC3339 time since when `status` holds (the first pass that saw it).
    #[serde(default)]
    pub since: String,
}

impl CephNodeHealth {
    /// The `status` of a node that cannot reach Ceph.
    pub const UNREACHABLE: &'static str = "unreachable";

    /// Is the cluster fine from this node (`HEALTH_OK`)?
    pub fn is_ok(&self) -> bool {
        self.status == "HEALTH_OK"
    }

    /// The line for `problems` when Ceph is not fine, `None` when it is.
    pub fn problem(&self) -> Option<String> {
        if self.is_ok() {
            return None;
        }
        let mut line = format!("ceph {}", self.status);
        if let Some(e) = &self.error {
            line.push_str(&format!(": {e}"));
        } else if !self.checks.is_empty() {
            line.push_str(&format!(": {}", self.checks.join(", ")));
        }
        let down: Vec<String> = self
            .osds
            .iter()
            .filter(|o| !o.up || !o.r#in)
            .map(|o| format!("osd.{}", o.id))
            .collect();
        if !down.is_empty() {
            line.push_str(&format!(" (local down/out: {})", down.join(", ")));
        }
        Some(line)
    }
}

/// One of this node's OSDs in [`CephNodeHealth`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CephNodeOsd {
    /// OSD id.
    pub id: i64,
    /// Up (the daemon answers).
    pub up: bool,
    /// In (holds data).
    #[serde(rename = "in")]
    pub r#in: bool,
}

/// `nodes/<node>/alive`: who holds the node name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AliveRecord {
    /// Hostname of the process holding the name.
    pub hostname: String,
    /// Its PID.
    pub pid: u32,
    /// Local node id of the holder.
    #[serde(default)]
    pub node_id: String,
    /// RFC3339 start time of the holder.
    #[serde(default)]
    pub since: String,
    /// Boot id of the holder's host (`/proc/sys/kernel/random/boot_id`).
    #[serde(default)]
    pub boot_id: String,
    /// Start time of the holder process (clock ticks since boot, `/proc/<pid>/stat`): with
    /// the boot id and the PID it names one process, so a daemon recognises its own
    /// registration whatever lease it is bound to (a restored etcd brings old leases back).
    #[serde(default)]
    pub start_ticks: u64,
}

impl AliveRecord {
    /// Written by the very process `(boot_id, pid, start_ticks)`?
    pub fn is_process(&self, boot_id: &str, pid: u32, start_ticks: u64) -> bool {
        !self.boot_id.is_empty()
            && self.boot_id == boot_id
            && self.pid == pid
            && self.start_ticks == start_ticks
    }
}

/// Removals of guests or networks this node holds instead of carrying out (the store was
/// found replaced, or too many of its VMs vanished at once), until an operator confirms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldRemovals {
    /// How many objects' removals wait.
    pub count: u32,
    /// Why they are held.
    pub reason: String,
    /// RFC 3339 time the hold began.
    pub since: String,
    /// Names of some of them (at most 20).
    #[serde(default)]
    pub names: Vec<String>,
}

/// `nodes/<node>/bmc`: where the primary fences this node (the password is not here: every
/// node that may fence has it in its local password file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BmcInfo {
    /// BMC address.
    pub host: String,
    /// BMC port.
    #[serde(default = "default_ipmi_port")]
    pub port: u16,
    /// BMC user.
    pub user: String,
}

fn default_ipmi_port() -> u16 {
    623
}

/// `nodes/<node>/fence`: the primary's record of a dead node, for operators and
/// `debvisorctl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// `dead`, `fencing`, `fenced`, `failed`, `skipped`, `recovering`, `recovered`.
    pub state: String,
    /// How it was fenced (`ipmi`, `self-fence`), when fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Why (a skip's or a failure's reason, recovery notes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339 time of this state.
    pub since: String,
    /// Which primary wrote it.
    #[serde(default)]
    pub primary: String,
    /// The dead node's lease the primary saw expire (lowercase hex, as registration logs
    /// it): the evidence the node checks against its own lease history before it stops its
    /// guests for this record. Absent in records of older primaries, and when the primary
    /// never saw the node alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// One node as the cluster sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    pub info: Option<NodeInfo>,
    pub fqdn: Option<String>,
    pub mode: Option<Mode>,
    pub daemon_state: Option<DaemonState>,
    pub coordinator_state: Option<CoordinatorState>,
    pub domain_state: Option<DomainState>,
    pub health: Option<Health>,
    pub last_seen: Option<String>,
    pub status: Option<NodeStatus>,
    /// Why the primary gave that status (`DEGRADED: libvirt unreachable`).
    pub status_reason: Option<String>,
    /// True while `alive` exists (bound to the node's lease).
    pub alive: bool,
    /// The lease `alive` is bound to.
    pub alive_lease: i64,
    pub alive_record: Option<AliveRecord>,
    /// Its BMC, when it publishes one.
    pub bmc: Option<BmcInfo>,
    /// The primary's fence record, when it was found dead.
    pub fence: Option<FenceRecord>,
    /// Keys of other writers that did not parse (e.g. a garbage `status`): reported, and the
    /// node stays usable; the owning node repairs its own keys.
    pub problems: Vec<ObjectError>,
}

fn utf8<'a>(field: &str, v: &'a [u8]) -> Result<&'a str, ObjectError> {
    std::str::from_utf8(v).map_err(|_| ObjectError::new(field, "not UTF-8"))
}

fn parse_enum<T: FromStr<Err = String>>(field: &str, v: &[u8]) -> Result<T, ObjectError> {
    utf8(field, v)?
        .trim()
        .parse()
        .map_err(|e| ObjectError::new(field, e))
}

fn parse_json<T: for<'de> Deserialize<'de>>(field: &str, v: &[u8]) -> Result<T, ObjectError> {
    serde_json::from_slice(v).map_err(|e| ObjectError::new(field, format!("invalid JSON: {e}")))
}

/// `OK`, `DEGRADED: reason`, `DOWN: reason`.
fn parse_status(field: &str, v: &[u8]) -> Result<(NodeStatus, Option<String>), ObjectError> {
    let text = utf8(field, v)?.trim();
    let (word, reason) = match text.split_once(':') {
        Some((w, r)) => (
            w.trim(),
            Some(r.trim().to_string()).filter(|r| !r.is_empty()),
        ),
        None => (text, None),
    };
    let st = word.parse().map_err(|e| ObjectError::new(field, e))?;
    Ok((st, reason))
}

/// The `status` value the primary writes: the verdict and, unless OK, why.
pub fn status_value(status: NodeStatus, reasons: &[String]) -> String {
    if reasons.is_empty() {
        status.as_str().to_string()
    } else {
        format!("{}: {}", status.as_str(), reasons.join("; "))
    }
}

/// Parse one node from its keys (relative to `nodes/<node>/`). Unknown sub-keys are ignored
/// so newer daemons can add keys without breaking older ones.
pub fn parse_node(
    name: &str,
    keys: &BTreeMap<String, KeyEntry>,
) -> Result<NodeRecord, ObjectError> {
    if !schema::valid_node_name(name) {
        return Err(ObjectError::new(
            "name",
            format!("{name:?} is not a valid node name"),
        ));
    }
    let mut n = NodeRecord {
        name: name.to_string(),
        ..Default::default()
    };
    for (sub, e) in keys {
        let Some(field) = NodeField::from_suffix(sub) else {
            continue;
        };
        let f = field.suffix();
        let v = &e.value;
        match field {
            NodeField::Info => n.info = Some(parse_json(f, v)?),
            NodeField::Fqdn => n.fqdn = Some(utf8(f, v)?.to_string()),
            NodeField::Mode => n.mode = Some(parse_enum(f, v)?),
            NodeField::Alive => {
                n.alive = true;
                n.alive_lease = e.lease;
                n.alive_record = Some(parse_json(f, v)?);
            }
            NodeField::DaemonState => n.daemon_state = Some(parse_enum(f, v)?),
            NodeField::CoordinatorState => n.coordinator_state = Some(parse_enum(f, v)?),
            NodeField::DomainState => n.domain_state = Some(parse_enum(f, v)?),
            NodeField::Health => n.health = Some(parse_json(f, v)?),
            NodeField::LastSeen => {
                let s = utf8(f, v)?;
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| ObjectError::new(f, format!("{s:?} is not RFC3339: {e}")))?;
                n.last_seen = Some(s.to_string());
            }
            // The primary's verdict: a bad value must not make the whole node unusable.
            NodeField::Status => match parse_status(f, v) {
                Ok((st, reason)) => {
                    n.status = Some(st);
                    n.status_reason = reason;
                }
                Err(e) => n.problems.push(e),
            },
            NodeField::ConfirmRemovals | NodeField::Drain => {}
            NodeField::Bmc => match parse_json(f, v) {
                Ok(b) => n.bmc = Some(b),
                Err(e) => n.problems.push(e),
            },
            NodeField::Fence => match parse_json(f, v) {
                Ok(r) => n.fence = Some(r),
                Err(e) => n.problems.push(e),
            },
            NodeField::ConfigVersion | NodeField::ConfigLastAppliedAt | NodeField::ConfigStatus => {
                utf8(f, v)?;
            }
        }
    }
    Ok(n)
}

/// The Node kind for the reactor.
pub struct NodeKind;

impl Kind for NodeKind {
    type Object = NodeRecord;
    const NAME: &'static str = "node";
    fn prefix(&self) -> &str {
        schema::NODES_PREFIX
    }
    fn parse(
        &self,
        id: &str,
        keys: &BTreeMap<String, KeyEntry>,
    ) -> Result<NodeRecord, ObjectError> {
        parse_node(id, keys)
    }
}

/// The cluster's nodes as this daemon sees them.
pub type NodeView = Reactor<NodeKind>;

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Valid {
        daemon: Option<DaemonState>,
        coord: Option<CoordinatorState>,
        domain: Option<DomainState>,
        alive: bool,
    },
    Invalid(ObjectError),
}

/// Reconciler of the Node view. Nodes have no host side yet (fencing and recovery come with
/// the election issue); it logs every state transition of every node, once, with the node
/// as a field, and reports invalid nodes.
#[derive(Default)]
pub struct NodeReconciler {
    seen: Mutex<HashMap<String, Seen>>,
}

impl NodeReconciler {
    fn observe(&self, id: &str, entry: Option<&Entry<NodeRecord>>) {
        let now = entry.map(|e| match &e.parsed {
            Ok(n) => Seen::Valid {
                daemon: n.daemon_state,
                coord: n.coordinator_state,
                domain: n.domain_state,
                alive: n.alive,
            },
            Err(err) => Seen::Invalid(err.clone()),
        });
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let before = seen.get(id).cloned();
        if before == now {
            return;
        }
        match (&before, &now) {
            (_, None) => info!(node = %id, "node removed from the cluster view"),
            (_, Some(Seen::Invalid(e))) => warn!(node = %id, field = %e.field, reason = %e.reason,
                "node has an invalid value; marked invalid in the view, other nodes unaffected"),
            (
                Some(Seen::Valid {
                    daemon: d0,
                    coord: c0,
                    domain: m0,
                    alive: a0,
                }),
                Some(Seen::Valid {
                    daemon: d1,
                    coord: c1,
                    domain: m1,
                    alive: a1,
                }),
            ) => {
                if d0 != d1 {
                    info!(node = %id, from = %opt(d0), to = %opt(d1), "node daemon_state changed");
                }
                if c0 != c1 {
                    info!(node = %id, from = %opt(c0), to = %opt(c1), "node coordinator_state changed");
                }
                if m0 != m1 {
                    info!(node = %id, from = %opt(m0), to = %opt(m1), "node domain_state changed");
                }
                if a0 != a1 {
                    if *a1 {
                        info!(node = %id, "node alive (lease present)");
                    } else {
                        warn!(node = %id, "node lease gone: node is not alive");
                    }
                }
            }
            (_, Some(Seen::Valid { daemon, alive, .. })) => {
                info!(node = %id, daemon_state = %opt(daemon), alive, "node appeared in the cluster view")
            }
        }
        match now {
            Some(s) => {
                seen.insert(id.to_string(), s);
            }
            None => {
                seen.remove(id);
            }
        }
    }
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

impl Reconciler<NodeKind> for NodeReconciler {
    async fn reconcile(
        &self,
        id: &str,
        entry: Option<Arc<Entry<NodeRecord>>>,
    ) -> Result<Action, ReconcileError> {
        self.observe(id, entry.as_deref());
        Ok(Action::AwaitChange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, KeyEntry> {
        KeyEntry::object(pairs)
    }

    #[test]
    fn parses_a_full_node() {
        let info = serde_json::to_string(&NodeInfo {
            hostname: "h".into(),
            version: "0.1".into(),
            cpus: 2,
            memory_mib: 1024,
            ..Default::default()
        })
        .unwrap_or_default();
        let alive = serde_json::to_string(&AliveRecord {
            hostname: "h".into(),
            pid: 1,
            ..Default::default()
        })
        .unwrap_or_default();
        let n = parse_node(
            "n1",
            &keys(&[
                ("info", &info),
                ("info/fqdn", "n1.example"),
                ("mode", "clustered"),
                ("alive", &alive),
                ("daemon_state", "run"),
                ("coordinator_state", "secondary"),
                ("domain_state", "ready"),
                ("last_seen", "2026-11-23T10:00:00Z"),
                ("status", "OK"),
                ("future/key", "whatever"),
            ]),
        );
        let n = n.expect("valid node");
        assert_eq!(n.daemon_state, Some(DaemonState::Run));
        assert_eq!(n.coordinator_state, Some(CoordinatorState::Secondary));
        assert_eq!(n.domain_state, Some(DomainState::Ready));
        assert_eq!(n.status, Some(NodeStatus::Ok));
        assert_eq!(n.mode, Some(Mode::Clustered));
        assert_eq!(n.fqdn.as_deref(), Some("n1.example"));
        assert!(n.alive);
        assert_eq!(n.info.map(|i| i.cpus), Some(2));
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("daemon_state", "running", "daemon_state"),
            ("coordinator_state", "boss", "coordinator_state"),
            ("domain_state", "flushing", "domain_state"),
            ("mode", "solo", "mode"),
            ("info", "not json", "info"),
            ("info", "{\"hostname\":1}", "info"),
            ("health", "[]", "health"),
            ("last_seen", "yesterday", "last_seen"),
            ("alive", "\u{0}garbage", "alive"),
        ];
        for (k, v, field) in cases {
            let err = parse_node("n1", &keys(&[(k, v)])).expect_err(k);
            assert_eq!(&err.field, field, "{k}={v:?}: {err}");
        }
        assert_eq!(
            parse_node("Bad_Name", &keys(&[])).map_err(|e| e.field),
            Err("name".to_string())
        );
        // The primary's `status` is another writer's key: a bad value is a problem of the
        // record, named, and the node stays usable.
        let n = parse_node("n1", &keys(&[("status", "ok"), ("daemon_state", "run")]))
            .expect("a bad status does not invalidate the node");
        assert_eq!(n.status, None);
        assert_eq!(n.daemon_state, Some(DaemonState::Run));
        assert_eq!(n.problems.first().map(|e| e.field.as_str()), Some("status"));
    }

    #[test]
    fn health_ceph_is_optional_both_ways() {
        // Without Ceph the field is not written: an older reader sees the same JSON as before.
        let plain = serde_json::to_value(Health::default()).expect("serialize");
        assert!(plain.get("ceph").is_none(), "{plain}");
        // A health written before the field existed still parses.
        let old = r#"{"libvirt":true,"load":[0,0,0],"memory":{"total_mib":1,"used_mib":0,"free_mib":1},
            "vms":{"total":0,"running":0},"version":"0.1","uptime_s":5}"#;
        let h: Health = serde_json::from_str(old).expect("old health parses");
        assert_eq!(h.ceph, None);
        // With Ceph it round-trips, and an unknown extra field is ignored.
        let warn = CephNodeHealth {
            status: "HEALTH_WARN".into(),
            checks: vec!["OSDMAP_FLAGS".into()],
            osds: vec![CephNodeOsd {
                id: 0,
                up: true,
                r#in: false,
            }],
            error: None,
            since: "2026-12-05T10:00:00Z".into(),
        };
        let h = Health {
            ceph: Some(warn.clone()),
            ..Health::default()
        };
        let mut v = serde_json::to_value(&h).expect("serialize");
        assert_eq!(v["ceph"]["osds"][0]["in"], false);
        v["future_field"] = serde_json::json!(1);
        let back: Health = serde_json::from_value(v).expect("parse");
        assert_eq!(back.ceph.as_ref(), Some(&warn));
        assert_eq!(
            warn.problem().as_deref(),
            Some("ceph HEALTH_WARN: OSDMAP_FLAGS (local down/out: osd.0)")
        );
        let ok = CephNodeHealth {
            status: "HEALTH_OK".into(),
            ..CephNodeHealth::default()
        };
        assert_eq!(ok.problem(), None);
    }

    #[test]
    fn enums_round_trip() {
        for s in DaemonState::ALL {
            assert_eq!(s.as_str().parse::<DaemonState>(), Ok(*s));
        }
        for s in DomainState::ALL {
            assert_eq!(s.as_str().parse::<DomainState>(), Ok(*s));
        }
        for s in CoordinatorState::ALL {
            assert_eq!(s.as_str().parse::<CoordinatorState>(), Ok(*s));
        }
    }

    fn thresholds() -> StatusThresholds {
        StatusThresholds {
            memory_percent: 90,
            load_percent_per_cpu: 200,
            stale_after: std::time::Duration::from_secs(15),
            rtt: std::time::Duration::from_millis(100),
        }
    }

    fn healthy() -> NodeRecord {
        NodeRecord {
            name: "n1".into(),
            alive: true,
            daemon_state: Some(DaemonState::Run),
            info: Some(NodeInfo {
                cpus: 4,
                ..Default::default()
            }),
            health: Some(Health {
                libvirt: true,
                load: [1.0, 1.0, 1.0],
                memory: MemoryStats {
                    total_mib: 1000,
                    used_mib: 500,
                    free_mib: 500,
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn status_is_derived_with_every_reason() {
        let t = thresholds();
        let ok = std::time::Duration::from_secs(1);
        assert_eq!(
            derive_status(&healthy(), Some(ok), &t),
            (NodeStatus::Ok, vec![])
        );
        let mut n = healthy();
        n.alive = false;
        assert_eq!(derive_status(&n, Some(ok), &t).0, NodeStatus::Down);
        n.daemon_state = Some(DaemonState::Stop);
        assert_eq!(
            derive_status(&n, None, &t).1,
            vec!["daemon stopped".to_string()]
        );
        let mut n = healthy();
        if let Some(h) = n.health.as_mut() {
            h.libvirt = false;
            h.memory.used_mib = 950;
            h.load[0] = 9.0;
            h.peers = vec![
                PeerRtt {
                    node: "n2".into(),
                    rtt_ms: Some(250.0),
                },
                PeerRtt {
                    node: "n3".into(),
                    rtt_ms: None,
                },
                PeerRtt {
                    node: "n4".into(),
                    rtt_ms: Some(0.4),
                },
            ];
        }
        let (st, why) = derive_status(&n, Some(std::time::Duration::from_secs(60)), &t);
        assert_eq!(st, NodeStatus::Degraded);
        assert_eq!(
            why,
            vec![
                "libvirt unreachable".to_string(),
                "memory above 90% used".into(),
                "load above 2.00 per CPU (4 CPUs)".into(),
                "no keepalive for over 15s".into(),
                "rtt to n2 above 100 ms".into(),
                "peer n3 does not answer".into(),
            ]
        );
        // The figures move, the conditions hold: the same status (no rewrite, no log line).
        let mut m = n.clone();
        if let Some(h) = m.health.as_mut() {
            h.load[0] += 3.5;
            h.memory.used_mib -= 10;
            if let Some(p) = h.peers.first_mut() {
                p.rtt_ms = p.rtt_ms.map(|r| r + 40.0);
            }
        }
        assert_eq!(
            derive_status(&m, Some(std::time::Duration::from_secs(61)), &t),
            (st, why)
        );
        n.health = None;
        assert_eq!(derive_status(&n, None, &t).0, NodeStatus::Degraded);
    }

    #[test]
    fn status_values_carry_their_reason_and_parse_back() {
        let v = status_value(
            NodeStatus::Degraded,
            &["libvirt unreachable".into(), "memory 95% used".into()],
        );
        assert_eq!(v, "DEGRADED: libvirt unreachable; memory 95% used");
        let n = parse_node("n1", &keys(&[("status", &v)])).expect("parses");
        assert_eq!(n.status, Some(NodeStatus::Degraded));
        assert_eq!(
            n.status_reason.as_deref(),
            Some("libvirt unreachable; memory 95% used")
        );
        let n = parse_node("n1", &keys(&[("status", "OK")])).expect("parses");
        assert_eq!((n.status, n.status_reason), (Some(NodeStatus::Ok), None));
    }
}
