//! Daemon configuration: `/etc/debvisor/debvisord.yaml`, overridden by `DEBVISOR_<SECTION>_<KEY>`
//! environment variables, validated into typed values with errors that name the field path.
//!
//! Loading is two-phase so that environment overrides and YAML share one validation path:
//! YAML → generic JSON value tree → env overrides applied by field path → typed structs
//! (`deny_unknown_fields`, path-tracked) → range/consistency checks.
//!
//! Rules worth knowing:
//! - an empty file, and a key with an empty value (`key:` or `key: ~`), mean "the default";
//! - booleans are strictly `true`/`false` (no YAML 1.1 `yes`/`on`), duplicate keys are errors;
//! - relative paths in the file (and in `DEBVISOR_*` overrides) are resolved against the
//!   directory of the configuration file, so a repository-local file can say
//!   `state_dir: ../../.dev-state/state`;
//! - `DEBVISOR_<SECTION>_<KEY>` sets `<section>.<key>`; nested keys are joined with `_`
//!   (`DEBVISOR_STORE_TLS_CA` → `store.tls.ca`, `DEBVISOR_NETWORKING_HOST_NETWORKS_CLUSTER_DEVICE`
//!   → `networking.host_networks.cluster.device`);
//!   lists are comma-separated; an empty value unsets an optional setting; the entries of
//!   `networking.sysctl.extra` and `firewall.extra_allow` can only be set in the file.
//!   An unknown `DEBVISOR_*` variable is an error. The environment wins over the file.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use debvisor_firewall::FirewallConfig;
pub use debvisor_netconf::NetworkingConfig;
pub use debvisor_objects::xml_policy::XmlPolicy;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/debvisor/debvisord.yaml";

/// The systemd watchdog should last at least this many keepalive intervals (the daemon pings
/// it once per tick); see [`Config::watchdog_warning`].
pub const WATCHDOG_TICKS: u32 = 3;

/// `WatchdogSec=` of the shipped unit (`etc/systemd/debvisord.service`), what `check-config`
/// compares with when it cannot ask systemd.
pub const SHIPPED_WATCHDOG: Duration = Duration::from_secs(30);

/// The whole daemon configuration; one field per YAML section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `node:`
    pub node: NodeConfig,
    /// `paths:`
    pub paths: PathsConfig,
    /// `logging:`
    pub logging: LoggingConfig,
    /// `store:`
    pub store: StoreConfig,
    /// `keepalive:`
    pub keepalive: KeepaliveConfig,
    /// `hypervisor:`
    pub hypervisor: HypervisorConfig,
    /// `domains:`
    pub domains: DomainsConfig,
    /// `networking:` (see [`debvisor_netconf::NetworkingConfig`]).
    pub networking: NetworkingConfig,
    /// `firewall:` (see [`debvisor_firewall::FirewallConfig`]).
    pub firewall: FirewallConfig,
    /// `fencing:`
    pub fencing: FencingConfig,
    /// `ceph:`
    pub ceph: CephConfig,
    /// `services:`
    pub services: ServicesConfig,
    /// `node_status:`
    pub node_status: NodeStatusConfig,
    /// `metrics:`
    pub metrics: MetricsConfig,
}

/// `metrics:` — the Prometheus endpoint (`GET /metrics`, text format); see
/// docs/metrics.md for the series and their cardinality.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` at all.
    pub enabled: bool,
    /// Address to listen on (`host:port`); loopback by default, so scrapers elsewhere need
    /// an address here and a `firewall.extra_allow` entry for the port.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// `node_status:` — when the primary calls a node `DEGRADED` in `nodes/<node>/status`
/// (`DOWN` is a node without a lease).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeStatusConfig {
    /// Memory in use above this percentage of the total.
    pub memory_percent: u32,
    /// 1-minute load above this percentage per CPU (200 = 2.0 per CPU).
    pub load_percent_per_cpu: u32,
    /// `last_seen` older than this many keepalive intervals.
    pub stale_ticks: u32,
    /// Round-trip time to a peer's cluster address above this (or no answer).
    #[serde(with = "duration_str")]
    pub rtt: Duration,
    /// Peers whose round-trip time a node measures per keepalive tick (round robin).
    pub rtt_peers_per_tick: u32,
}

impl Default for NodeStatusConfig {
    fn default() -> Self {
        NodeStatusConfig {
            memory_percent: 95,
            load_percent_per_cpu: 400,
            stale_ticks: 3,
            rtt: Duration::from_millis(200),
            rtt_peers_per_tick: 8,
        }
    }
}

/// How this node participates in the cluster.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeMode {
    /// A one-node cluster: always primary, may run its own private etcd.
    #[default]
    Standalone,
    /// A member of a multi-node cluster.
    Clustered,
}

impl NodeMode {
    /// The value written to `nodes/<node>/mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeMode::Standalone => "standalone",
            NodeMode::Clustered => "clustered",
        }
    }
}

/// `node:` — identity of this node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name, the `<node>` in `nodes/<node>/…`. Empty means "the short hostname".
    pub name: String,
    /// `standalone` or `clustered`.
    pub mode: NodeMode,
    /// Names of the coordinator nodes (they take part in the primary election).
    pub coordinators: Vec<String>,
    /// Cluster-assigned FQDN written to `nodes/<node>/info/fqdn` when set.
    pub fqdn: Option<String>,
    /// Free-form rack/location label reported in `info`.
    pub rack: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: String::new(),
            mode: NodeMode::Standalone,
            coordinators: Vec::new(),
            fqdn: None,
            rack: None,
        }
    }
}

/// `paths:` — where the daemon keeps local state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PathsConfig {
    /// Persistent state: node id file, lease file, embedded etcd data.
    pub state_dir: PathBuf,
    /// Runtime files (pid files, sockets); recreated at every start.
    pub run_dir: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        PathsConfig {
            state_dir: PathBuf::from("/var/lib/debvisor"),
            run_dir: PathBuf::from("/run/debvisor"),
        }
    }
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    /// journald when `JOURNAL_STREAM` is set (started by systemd), stderr otherwise.
    #[default]
    Auto,
    /// The systemd journal.
    Journald,
    /// Standard error.
    Stderr,
}

/// Line format on stderr.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `logging:`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// A tracing filter directive: `info`, `debug`, `debvisor_objects=debug,info`, …
    /// `RUST_LOG`, when set, wins over this.
    pub level: String,
    /// `auto`, `journald` or `stderr`.
    pub target: LogTarget,
    /// `text` or `json` (stderr only).
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            target: LogTarget::Auto,
            format: LogFormat::Text,
        }
    }
}

/// `store.tls:` — client TLS towards etcd. All paths are files on this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreTlsConfig {
    /// CA bundle that signed the etcd server certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for client-certificate auth; needs `key`.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of `cert`.
    pub key: Option<PathBuf>,
    /// Server name to verify instead of the endpoint host.
    pub server_name: Option<String>,
}

/// `store.embedded:` — a private etcd this daemon starts itself (standalone/dev only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedEtcdConfig {
    /// Start the embedded etcd (standalone mode only).
    pub enabled: bool,
    /// The etcd executable.
    pub binary: PathBuf,
    /// Loopback client port; the store endpoint must point at it.
    pub client_port: u16,
    /// Loopback peer port.
    pub peer_port: u16,
    /// Data directory; unset means `<state_dir>/etcd`.
    pub data_dir: Option<PathBuf>,
}

impl Default for EmbeddedEtcdConfig {
    fn default() -> Self {
        EmbeddedEtcdConfig {
            enabled: false,
            binary: PathBuf::from("/usr/bin/etcd"),
            client_port: 2379,
            peer_port: 2380,
            data_dir: None,
        }
    }
}

/// `store:` — the etcd coordination store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// etcd client URLs (`http://host:port` or `https://host:port`).
    pub endpoints: Vec<String>,
    /// Key prefix of the cluster; every key lives under it.
    pub prefix: String,
    /// Client TLS towards etcd.
    pub tls: StoreTlsConfig,
    /// Optional etcd user (role-based auth).
    pub user: Option<String>,
    /// File holding the password of `user` (never the password itself).
    pub password_file: Option<PathBuf>,
    /// Timeout of one TCP/TLS connection attempt.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// Timeout of one request.
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
    /// How long the startup stage keeps retrying before giving up.
    #[serde(with = "duration_str")]
    pub startup_deadline: Duration,
    /// A private etcd started by the daemon.
    pub embedded: EmbeddedEtcdConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/debvisor".into(),
            tls: StoreTlsConfig::default(),
            user: None,
            password_file: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            startup_deadline: Duration::from_secs(120),
            embedded: EmbeddedEtcdConfig::default(),
        }
    }
}

/// `keepalive:` — liveness and health reporting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Tick of health reports, resync and watchdog.
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// TTL of the node lease: the node is dead this long after its last refresh.
    #[serde(with = "duration_str")]
    pub lease_ttl: Duration,
    /// A primary that cannot renew its lease demotes itself this long before the lease could
    /// expire on the server. Unset: a fifth of `lease_ttl`.
    #[serde(with = "opt_duration_str")]
    pub demote_margin: Option<Duration>,
}

impl KeepaliveConfig {
    /// `demote_margin`, or its default (a fifth of the lease TTL).
    pub fn demote_margin(&self) -> Duration {
        self.demote_margin.unwrap_or(self.lease_ttl / 5)
    }
}

impl Config {
    /// The self-fence margin (`fencing.self_fence_margin`, else the demote margin).
    pub fn self_fence_margin(&self) -> Duration {
        self.fencing
            .self_fence_margin
            .unwrap_or_else(|| self.keepalive.demote_margin())
    }

    /// Does this node self-fence its guests when its lease runs out? Only a clustered node
    /// with fencing on: there another node may recover its VMs. A standalone node, or a
    /// cluster without fencing, keeps its guests running through a store outage (nobody
    /// moves them).
    pub fn self_fence_active(&self) -> bool {
        self.node.mode == NodeMode::Clustered && self.fencing.enabled && self.fencing.self_fence
    }

    /// The primary's grace after `alive` vanished (`fencing.grace`, else margin + 3s).
    pub fn fence_grace(&self) -> Duration {
        self.fencing
            .grace
            .unwrap_or_else(|| self.self_fence_margin() + Duration::from_secs(3))
    }
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            interval: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(6),
            demote_margin: None,
        }
    }
}

/// `hypervisor:` — libvirt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    /// libvirt connection URI (`qemu:///system`, `test:///default`).
    pub uri: String,
    /// Timeout of one libvirt call.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// URI other nodes' libvirtd use to reach this one for peer-to-peer migration
    /// (`qemu+tcp://10.0.0.11/system`); published in `info.libvirt_uri`. Unset: `uri`.
    pub peer_uri: Option<String>,
    /// libvirt validates each VM definition against its schema (unknown elements refused
    /// instead of ignored; costs libvirt a schema load per define).
    pub validate_xml: bool,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            uri: "qemu:///system".into(),
            timeout: Duration::from_secs(10),
            peer_uri: None,
            validate_xml: false,
        }
    }
}

impl HypervisorConfig {
    /// The URI peers migrate to.
    pub fn published_uri(&self) -> &str {
        self.peer_uri.as_deref().unwrap_or(&self.uri)
    }
}

/// What the daemon does with its guests when it stops.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// Leave them running (a restarted daemon adopts them).
    #[default]
    Keep,
    /// Drain the node (like `node flush`) before stopping, bounded by `flush_timeout`.
    Flush,
}

/// `domains:` — the Domain object (VMs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DomainsConfig {
    /// How long a guest gets to obey an ACPI shutdown before it is destroyed.
    #[serde(with = "duration_str")]
    pub shutdown_timeout: Duration,
    /// Failed starts or crashes within `failure_window` after which a VM goes to `fail`.
    pub max_failed_starts: u32,
    /// Window in which failures count towards `max_failed_starts`.
    #[serde(with = "duration_str")]
    pub failure_window: Duration,
    /// First delay before restarting a crashed VM; doubles per failure up to 1 minute.
    #[serde(with = "duration_str")]
    pub restart_backoff: Duration,
    /// `keep` or `flush` the guests when the daemon stops.
    pub on_shutdown: OnShutdown,
    /// Longest a flush at daemon shutdown may take before the daemon stops anyway.
    #[serde(with = "duration_str")]
    pub flush_timeout: Duration,
    /// Live migrations running at once from this node.
    pub migration_max_concurrent: u32,
    /// Default maximum downtime of a live migration (a VM's metadata can override it).
    #[serde(with = "duration_str")]
    pub migration_max_downtime: Duration,
    /// Give up a migration (and abort the libvirt job) after this long.
    #[serde(with = "duration_str")]
    pub migration_timeout: Duration,
    /// Most per-VM stats records (`vmstats/<uuid>`) written per stats sample (new and
    /// changed VMs first, then the stalest); the rest wait for the next sample. (The name
    /// is from when the keepalive tick wrote them.)
    pub stats_writes_per_tick: u32,
    /// How often libvirt's per-domain counters are sampled, in their own task, never in the
    /// keepalive: the node's `health.alloc`, the `/metrics` per-VM counters and the
    /// `vmstats/` records are this fresh (a libvirt domain event samples sooner, at most
    /// once a second).
    #[serde(with = "duration_str")]
    pub stats_sample_interval: Duration,
    /// Least time between two writes of a VM's `vmstats/<uuid>` for CPU or memory that
    /// moved beyond the deadband; running state, vCPUs and maximum memory are written at
    /// the next sample. An idle VM is written once.
    #[serde(with = "duration_str")]
    pub stats_write_interval: Duration,
    /// How often the full VM resync lists every domain on this host (one libvirt list and
    /// a describe per domain): the safety net for a libvirt event that never came, foreign
    /// domains and shut-off orphans. Changes are followed by libvirt events and the VM
    /// watch, and the fence by every keepalive tick, so this is slow by default; while the
    /// libvirt event subscription is down the full resync runs on every keepalive tick.
    #[serde(with = "duration_str")]
    pub resync_interval: Duration,
    /// Mass-removal guard: when more than this percentage of this node's VMs vanish from
    /// etcd within `removal_window` (and at least `removal_hold_min` of them), nothing is
    /// destroyed until an operator confirms (`debvisorctl node confirm-removals`).
    pub removal_hold_percent: u32,
    /// Fewest vanished VMs that can trip the mass-removal guard.
    pub removal_hold_min: u32,
    /// Window in which vanished VMs count together.
    #[serde(with = "duration_str")]
    pub removal_window: Duration,
    /// How long a removal waits before it is carried out, so that a burst of deletions is
    /// seen whole before anything is destroyed.
    #[serde(with = "duration_str")]
    pub removal_settle: Duration,
    /// What a VM's XML may ask of this host (qemu passthrough, disk sources, host devices …):
    /// a VM it refuses is `invalid` and nothing is done for it here.
    pub xml_policy: XmlPolicy,
}

impl Default for DomainsConfig {
    fn default() -> Self {
        DomainsConfig {
            shutdown_timeout: Duration::from_secs(180),
            max_failed_starts: 3,
            failure_window: Duration::from_secs(600),
            restart_backoff: Duration::from_secs(2),
            on_shutdown: OnShutdown::Keep,
            flush_timeout: Duration::from_secs(600),
            migration_max_concurrent: 2,
            migration_max_downtime: Duration::from_millis(300),
            migration_timeout: Duration::from_secs(600),
            stats_writes_per_tick: 64,
            stats_sample_interval: Duration::from_secs(10),
            stats_write_interval: Duration::from_secs(300),
            resync_interval: Duration::from_secs(30),
            removal_hold_percent: 50,
            removal_hold_min: 3,
            removal_window: Duration::from_secs(10),
            removal_settle: Duration::from_secs(2),
            xml_policy: XmlPolicy::default(),
        }
    }
}

/// Does `uri` look like a libvirt URI (`scheme://…` with a sane scheme, no whitespace)?
fn libvirt_uri_ok(uri: &str) -> bool {
    !uri.contains(char::is_whitespace)
        && uri.split_once("://").is_some_and(|(s, _)| {
            s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
}

/// What the primary does after a fence attempt.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FenceAction {
    /// Recover the dead node's VMs on healthy nodes.
    #[default]
    Migrate,
    /// Leave the VMs alone; an operator decides.
    None,
}

/// `fencing.ipmi:` — this node's own BMC, published so the primary can fence it. The
/// password file is this node's copy of the one the primary uses for every BMC (the same
/// file on every node that may fence, distributed by Ansible).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IpmiConfig {
    /// BMC address.
    pub host: Option<String>,
    /// BMC port (RMCP+, UDP).
    pub port: u16,
    /// BMC user; needs `password_file`.
    pub user: Option<String>,
    /// File with the BMC password (never in etcd or on a command line).
    pub password_file: Option<PathBuf>,
}

impl Default for IpmiConfig {
    fn default() -> Self {
        IpmiConfig {
            host: None,
            port: 623,
            user: None,
            password_file: None,
        }
    }
}

/// What a node does with its guests when it self-fences.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SelfFenceAction {
    /// Power them off (`virDomainDestroy`).
    #[default]
    Destroy,
    /// Pause them (`virDomainSuspend`): no I/O; never resumed by the daemon on its own.
    Pause,
}

/// `fencing:` — dead nodes, IPMI fencing, self-fence and VM recovery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FencingConfig {
    /// Fence dead nodes (primary only).
    pub enabled: bool,
    /// This node's BMC.
    pub ipmi: IpmiConfig,
    /// What to do with a dead node's VMs after a successful fence.
    pub successful_fence: FenceAction,
    /// What to do with a dead node's VMs after a failed fence (`migrate` needs
    /// `self_fence`).
    pub failed_fence: FenceAction,
    /// Most nodes fenced at once.
    pub max_concurrent: u32,
    /// Most fences started per `window` (a cap against fencing storms).
    pub max_per_window: u32,
    /// Window of `max_per_window`.
    #[serde(with = "duration_str")]
    pub window: Duration,
    /// Timeout of one fence: power off, then power status until Off.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// Power a fenced node on again once its VMs run elsewhere (it comes back fenced: no
    /// guests until readmitted).
    pub power_on_after: bool,
    /// How long the primary waits after a node's `alive` vanished before declaring it dead.
    /// Unset: the self-fence margin + 3s (time to destroy its guests).
    #[serde(with = "opt_duration_str")]
    pub grace: Option<Duration>,
    /// Every node stops its guests a margin before its lease could expire on the server.
    pub self_fence: bool,
    /// `destroy` or `pause` the guests when self-fencing.
    pub self_fence_action: SelfFenceAction,
    /// The margin before the lease deadline. Unset: `keepalive.demote_margin`'s value.
    #[serde(with = "opt_duration_str")]
    pub self_fence_margin: Option<Duration>,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            enabled: false,
            ipmi: IpmiConfig::default(),
            successful_fence: FenceAction::Migrate,
            failed_fence: FenceAction::None,
            max_concurrent: 1,
            max_per_window: 3,
            window: Duration::from_secs(600),
            timeout: Duration::from_secs(60),
            power_on_after: false,
            grace: None,
            self_fence: true,
            self_fence_action: SelfFenceAction::Destroy,
            self_fence_margin: None,
        }
    }
}

/// `ceph:` — storage cluster access (used by the Ceph issue).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CephConfig {
    /// Manage/observe Ceph at all.
    pub enabled: bool,
    /// `ceph.conf` path.
    pub conf: PathBuf,
    /// Ceph client name without the `client.` prefix.
    pub client: String,
    /// Keyring of `client`; Ceph's default search path when unset.
    pub keyring: Option<PathBuf>,
    /// Health/state collection interval.
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// Timeout of one `ceph`/`rbd` command.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// Ceph systemd units started on coordinators (mon, mgr) by the coordinator-services
    /// stage; `{node}` is replaced by the node name (see [`Config::ceph_coordinator_units`]).
    pub coordinator_units: Vec<String>,
    /// Addresses this node's Ceph clients (qemu, `rbd`) may appear as besides the node's own
    /// interface addresses, e.g. `127.0.0.1` when this node reaches a local mon over
    /// loopback: RBD locks held from them are this node's (stale before a VM start).
    pub client_addresses: Vec<std::net::IpAddr>,
}

/// Placeholder for the node name in `ceph.coordinator_units`.
pub const NODE_PLACEHOLDER: &str = "{node}";

impl Default for CephConfig {
    fn default() -> Self {
        CephConfig {
            enabled: false,
            conf: PathBuf::from("/etc/ceph/ceph.conf"),
            client: "admin".into(),
            keyring: None,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            coordinator_units: vec![
                "ceph-mon@{node}.service".into(),
                "ceph-mgr@{node}.service".into(),
            ],
            client_addresses: Vec::new(),
        }
    }
}

/// Which service manager starts coordinator services.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServiceBackend {
    /// `systemd` when PID 1 is systemd, `process` otherwise.
    #[default]
    Auto,
    /// systemd units.
    Systemd,
    /// Child processes of the daemon.
    Process,
}

/// `services:` — coordinator services (etcd, later FRR/Ceph units).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServicesConfig {
    /// `auto`, `systemd` or `process`.
    pub backend: ServiceBackend,
    /// systemd units started on coordinators (e.g. `etcd.service`).
    pub coordinator_units: Vec<String>,
}

/// Durations as human strings: `500ms`, `5s`, `2m`, `1h`; a bare integer means seconds.
pub mod duration_str {
    use serde::{de, Deserializer, Serializer};
    use std::fmt;
    use std::time::Duration;

    /// Write a duration as its largest exact unit (`5s`, `500ms`).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    /// Read `500ms`/`5s`/`2m`/`1h` or a bare integer number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 500ms, 5s, 2m or 1h")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
                Ok(Duration::from_secs(n))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
                super::parse_duration(s).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Optional durations (`~` or absent: unset) in the form of [`duration_str`].
pub mod opt_duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Write `Some(d)` as [`super::duration_str`] does, `None` as null.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Read a duration, or null for unset.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::duration_str")] Duration);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

/// Parse `500ms`, `5s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 5s, 2m, 1h"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {s:?}: expected ms, s, m or h"
            ))
        }
    };
    Ok(d)
}

/// Inverse of [`parse_duration`], choosing the largest exact unit.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// One problem found in the configuration: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted field path (`keepalive.lease_ttl`, `store.endpoints[1]`) or a variable name.
    pub path: String,
    /// What is wrong, including the offending value.
    pub reason: String,
}

impl Issue {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Issue {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Why the configuration could not be loaded. `Display` prints one problem per line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not UTF-8).
    #[error("{}: cannot read configuration: {source}", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML (syntax error, duplicate key, …).
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The configuration file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Bad values: wrong types, unknown fields or variables, out-of-range or inconsistent values.
    #[error("{}", .0.iter().map(Issue::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Issue>),
}

impl ConfigError {
    /// The field-level problems (empty for read and syntax errors).
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Invalid(v) => v,
            _ => &[],
        }
    }
}

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "DEBVISOR_";

/// Read `path`, apply `DEBVISOR_*` overrides from `env`, fill defaults and validate.
pub fn load(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let cfg = from_yaml(&text, path, env)?;
    match cfg.check_files() {
        issues if issues.is_empty() => Ok(cfg),
        issues => Err(ConfigError::Invalid(issues)),
    }
}

/// Like [`load`], with the file's text already read; `path` names it in messages and is the
/// base of relative paths.
pub fn from_yaml(text: &str, path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let options = serde_saphyr::options! {
        strict_booleans: true,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
    };
    let name = path.display().to_string();
    let mut tree: Value =
        serde_saphyr::from_str_with_options(text, options).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.render_with_options(serde_saphyr::render_options! {
                formatter: &serde_saphyr::UserMessageFormatter,
                source_name: Some(&name),
            }),
        })?;
    if tree.is_null() {
        tree = Value::Object(Map::new());
    }
    strip_nulls(&mut tree);
    let schema = schema();
    let mut shape = Vec::new();
    check_shape(&schema, &tree, "", &mut shape);
    if !shape.is_empty() {
        return Err(ConfigError::Invalid(shape));
    }
    let from_env = apply_env(&schema, &mut tree, env).map_err(ConfigError::Invalid)?;
    let mut cfg: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
        let p = e.path().to_string();
        let path = if p == "." {
            "(top level)".to_string()
        } else {
            p
        };
        let issue = Issue::new(path, tidy_serde_message(&e.inner().to_string()));
        ConfigError::Invalid(attribute(vec![issue], &from_env))
    })?;
    cfg.resolve_paths(&base_dir(path));
    if cfg.node.name.is_empty() {
        cfg.node.name = short_hostname().unwrap_or_default();
    }
    match attribute(cfg.validate(), &from_env) {
        issues if issues.is_empty() => Ok(cfg),
        issues => Err(ConfigError::Invalid(issues)),
    }
}

/// The default configuration as a value tree, with one sample entry for optional sections and
/// lists of structs: it gives field names and value kinds to [`apply_env`] and [`check_shape`].
fn schema() -> Value {
    let mut cfg = Config::default();
    let net = debvisor_netconf::HostNetwork {
        vlan: Some(1),
        mtu: Some(1500),
        ..Default::default()
    };
    let hn = &mut cfg.networking.host_networks;
    (hn.cluster, hn.storage, hn.upstream) = (Some(net.clone()), Some(net.clone()), Some(net));
    cfg.firewall.extra_allow = vec![Default::default()];
    serde_json::to_value(cfg).unwrap_or(Value::Null)
}

/// Serde lets a struct be read from a sequence (positionally); require mappings where the
/// schema has them, so `keepalive: [5s, 15s]` is an error rather than a surprise.
fn check_shape(schema: &Value, v: &Value, path: &str, out: &mut Vec<Issue>) {
    let kind = |v: &Value| match v {
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
    };
    let at = |p: &str| {
        if p.is_empty() {
            "(top level)".to_string()
        } else {
            p.to_string()
        }
    };
    match (schema, v) {
        (Value::Object(s), Value::Object(m)) => {
            for (k, child) in m {
                if let Some(sc) = s.get(k) {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    check_shape(sc, child, &p, out);
                }
            }
        }
        (Value::Object(_), other) => out.push(Issue::new(
            at(path),
            format!("expected a mapping, got {}", kind(other)),
        )),
        (Value::Array(s), Value::Array(a)) => {
            if let Some(sc) = s.first() {
                for (i, child) in a.iter().enumerate() {
                    check_shape(sc, child, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// `key:` and `key: ~` mean "the default": drop them before typed deserialization.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Make serde's messages read like ours (`unknown variant "x", expected a or b`).
fn tidy_serde_message(msg: &str) -> String {
    let (head, rest) = match msg.strip_prefix("unknown field `") {
        Some(r) => (
            "unknown field".to_string(),
            r.split_once('`').map_or("", |x| x.1),
        ),
        None => match msg
            .strip_prefix("unknown variant `")
            .and_then(|r| r.split_once('`'))
        {
            Some((v, r)) => (format!("unknown variant {v:?}"), r),
            None => (String::new(), msg),
        },
    };
    let mut out = head + &rest.replace('`', "");
    if out.contains("expected a boolean") {
        out.push_str(" (write true or false)");
    }
    out
}

/// Append "(set by DEBVISOR_…)" to issues about values that came from the environment.
fn attribute(mut issues: Vec<Issue>, from_env: &[(String, String)]) -> Vec<Issue> {
    for issue in &mut issues {
        for (var, p) in from_env {
            let hit = issue.path == *p
                || issue.path.starts_with(&format!("{p}."))
                || issue.path.starts_with(&format!("{p}["))
                || issue.reason.contains(p.as_str());
            if hit {
                issue.reason.push_str(&format!(" (set by {var})"));
            }
        }
    }
    issues
}

/// Apply `DEBVISOR_*` variables to the value tree; returns `(variable, field path)` pairs.
///
/// The field names and value kinds come from [`schema`]: a list takes
/// a comma-separated list, a number an integer, a boolean `true`/`false`, anything else a
/// string (an empty value for an optional field means "unset").
fn apply_env(
    schema: &Value,
    tree: &mut Value,
    env: &[(String, String)],
) -> Result<Vec<(String, String)>, Vec<Issue>> {
    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    let (mut applied, mut issues) = (Vec::new(), Vec::new());
    for (var, raw) in vars {
        let tokens: Vec<String> = var[ENV_PREFIX.len()..]
            .split('_')
            .map(str::to_ascii_lowercase)
            .collect();
        let Some((keys, kind)) = find_setting(schema, &tokens) else {
            let reason = match schema.get(&tokens[0]) {
                Some(_) => format!(
                    "unknown variable: no setting under `{}` matches it",
                    tokens[0]
                ),
                None => format!(
                    "unknown variable: `{}` is not a configuration section",
                    tokens[0]
                ),
            };
            issues.push(Issue::new(var, reason));
            continue;
        };
        let path = keys.join(".");
        let value = match kind {
            Value::Array(_) => Ok(Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.into()))
                    .collect(),
            )),
            Value::Number(_) => raw
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .or_else(|_| raw.trim().parse::<u64>().map(Value::from))
                .map_err(|_| format!("expected an integer for {path}, got {raw:?}")),
            Value::Bool(_) => match raw.trim() {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                _ => Err(format!("expected true or false for {path}, got {raw:?}")),
            },
            Value::Null if raw.is_empty() => Ok(Value::Null),
            _ => Ok(Value::String(raw.clone())),
        };
        match value {
            Ok(v) => {
                set_path(tree, &keys, v);
                applied.push((var.clone(), path));
            }
            Err(e) => issues.push(Issue::new(var, e)),
        }
    }
    if issues.is_empty() {
        Ok(applied)
    } else {
        Err(issues)
    }
}

/// Match `tokens` against the object keys of `node`, longest underscore-joined prefix first.
fn find_setting<'a>(node: &'a Value, tokens: &[String]) -> Option<(Vec<String>, &'a Value)> {
    let map = node.as_object()?;
    (1..=tokens.len()).rev().find_map(|k| {
        let key = tokens[..k].join("_");
        let child = map.get(&key)?;
        let (mut keys, leaf) = match &tokens[k..] {
            [] if child.is_object() => return None,
            [] => (Vec::new(), child),
            rest => find_setting(child, rest)?,
        };
        keys.insert(0, key);
        Some((keys, leaf))
    })
}

/// Set `tree[keys...] = value`, creating objects on the way (`Null` removes the key).
fn set_path(tree: &mut Value, keys: &[String], value: Value) {
    let mut node = tree;
    for key in &keys[..keys.len() - 1] {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let Value::Object(m) = node else { return };
        node = m.entry(key.clone()).or_insert(Value::Null);
    }
    if !node.is_object() {
        *node = Value::Object(Map::new());
    }
    if let (Value::Object(m), Some(last)) = (node, keys.last()) {
        match value {
            Value::Null => m.remove(last),
            v => m.insert(last.clone(), v),
        };
    }
}

/// The absolute directory of the configuration file (base of relative paths).
fn base_dir(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new(""));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    normalize(&std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()))
}

/// Lexically remove `.` and `..` components.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// The short hostname (up to the first dot, lowercased), if it can be read.
pub fn short_hostname() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| {
            let mut buf = [0u8; 256];
            // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname NUL-terminates
            // on success (we also stop at the buffer end).
            let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            (rc == 0).then(|| String::from_utf8_lossy(&buf[..end]).into_owned())
        })?;
    Some(short_name(&raw)).filter(|s| !s.is_empty())
}

/// `Node1.example.com\n` → `node1`.
fn short_name(raw: &str) -> String {
    raw.trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Check a node name: a DNS label (1..=63 of `[a-z0-9-]`, not starting or ending with `-`).
pub fn check_node_name(s: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{s:?} is not a valid node name (1-63 characters a-z, 0-9, '-', \
             not starting or ending with '-')"
        )),
    }
}

/// A parsed etcd endpoint URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://` rather than `http://`.
    pub https: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    /// Parse `http://host:port` or `https://host:port` (optionally with a trailing `/`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (https, rest) = match (s.strip_prefix("http://"), s.strip_prefix("https://")) {
            (Some(r), _) => (false, r),
            (_, Some(r)) => (true, r),
            _ => return Err(format!("{s:?} is not an http:// or https:// URL")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(format!("{s:?}: only scheme://host:port is allowed"));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port (e.g. http://10.0.0.1:2379)"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?} has an invalid port"))?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            Some(_) => return Err(format!("{s:?} has an invalid IPv6 address")),
            None if !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') =>
            {
                host
            }
            None => return Err(format!("{s:?} has an invalid host")),
        };
        Ok(Endpoint {
            https,
            host: host.to_string(),
            port,
        })
    }
}

/// Check a tracing filter: it must parse, and a directive without `=` must be a level.
fn check_log_level(s: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map_err(|e| format!("{s:?} is not a valid filter: {e}"))?;
    match s.split(',').map(str::trim).find(|d| {
        !d.is_empty() && !d.contains(['=', '[']) && !LEVELS.contains(&&*d.to_ascii_lowercase())
    }) {
        Some(d) => Err(format!(
            "{d:?} is neither a level (trace, debug, info, warn, error, off) nor target=level"
        )),
        None => Ok(()),
    }
}

/// Check a systemd unit name (`etcd.service`, `ceph.target`).
fn check_unit_name(s: &str) -> Result<(), String> {
    const SUFFIXES: [&str; 8] = [
        ".service", ".target", ".socket", ".mount", ".timer", ".path", ".slice", ".scope",
    ];
    let stem = SUFFIXES.iter().find_map(|x| s.strip_suffix(x));
    let ok = stem.is_some_and(|st| {
        !st.is_empty()
            && st
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
    });
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{s:?} is not a systemd unit name ending in one of {}",
            SUFFIXES.join(", ")
        )),
    }
}

impl Config {
    /// Store options from the `store:` section (the daemon and `debvisorctl` connect alike).
    pub fn store_options(&self) -> debvisor_objects::StoreOptions {
        let s = &self.store;
        debvisor_objects::StoreOptions {
            endpoints: s.endpoints.clone(),
            prefix: s.prefix.clone(),
            ca: s.tls.ca.clone(),
            cert: s.tls.cert.clone(),
            key: s.tls.key.clone(),
            server_name: s.tls.server_name.clone(),
            user: s.user.clone(),
            password_file: s.password_file.clone(),
            connect_timeout: s.connect_timeout,
            request_timeout: s.request_timeout,
        }
    }

    /// The node name in effect: the configured one, else (after [`load`]) the short hostname.
    pub fn node_name(&self) -> &str {
        &self.node.name
    }

    /// `ceph.coordinator_units` with `{node}` replaced by this node's name (validated by
    /// [`load`]: each is a systemd unit name).
    pub fn ceph_coordinator_units(&self) -> Vec<String> {
        self.ceph
            .coordinator_units
            .iter()
            .map(|u| u.replace(NODE_PLACEHOLDER, self.node_name()))
            .collect()
    }

    /// Is this node a coordinator (listed in `node.coordinators`, or standalone)?
    pub fn is_coordinator(&self) -> bool {
        self.node.mode == NodeMode::Standalone
            || self.node.coordinators.iter().any(|c| c == &self.node.name)
    }

    /// The warning for a systemd watchdog of `watchdog` (`WatchdogSec=`) that is shorter than
    /// [`WATCHDOG_TICKS`] keepalive intervals: the daemon pings it once per tick, so one slow
    /// tick (a store or libvirt call at its timeout) would get a healthy daemon killed.
    /// `None` when it leaves enough slack.
    pub fn watchdog_warning(&self, watchdog: Duration) -> Option<String> {
        let need = self.keepalive.interval * WATCHDOG_TICKS;
        (watchdog < need).then(|| {
            format!(
                "the systemd watchdog ({}) is shorter than {WATCHDOG_TICKS} × keepalive.interval ({}): \
                 a slow tick gets the daemon killed; raise WatchdogSec= to {} or more \
                 (systemctl edit debvisord) or shorten keepalive.interval",
                format_duration(watchdog),
                format_duration(self.keepalive.interval),
                format_duration(need)
            )
        })
    }

    /// Data directory of the embedded etcd.
    pub fn embedded_data_dir(&self) -> PathBuf {
        self.store
            .embedded
            .data_dir
            .clone()
            .unwrap_or_else(|| self.paths.state_dir.join("etcd"))
    }

    /// Every filesystem path in the configuration, by field path.
    fn path_fields_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
        let (s, f, c) = (&mut self.store, &mut self.fencing, &mut self.ceph);
        let mut v = vec![
            ("paths.state_dir", &mut self.paths.state_dir),
            ("paths.run_dir", &mut self.paths.run_dir),
            ("store.embedded.binary", &mut s.embedded.binary),
            ("ceph.conf", &mut c.conf),
        ];
        let optional = [
            ("store.tls.ca", s.tls.ca.as_mut()),
            ("store.tls.cert", s.tls.cert.as_mut()),
            ("store.tls.key", s.tls.key.as_mut()),
            ("store.password_file", s.password_file.as_mut()),
            ("store.embedded.data_dir", s.embedded.data_dir.as_mut()),
            ("fencing.ipmi.password_file", f.ipmi.password_file.as_mut()),
            ("ceph.keyring", c.keyring.as_mut()),
        ];
        v.extend(optional.into_iter().filter_map(|(n, p)| p.map(|p| (n, p))));
        v
    }

    /// Resolve relative (non-empty) paths against `base` and normalize them.
    fn resolve_paths(&mut self, base: &Path) {
        for (_, p) in self.path_fields_mut() {
            if !p.as_os_str().is_empty() {
                *p = normalize(&base.join(&*p));
            }
        }
    }

    /// The files the configuration names must be usable before the daemon relies on them:
    /// the TLS material and the password files exist and are regular files, and a password
    /// file is private to its owner (like ssh refuses a private key others can read). Kept
    /// apart from [`Config::validate`] because it looks at this host's files.
    pub fn check_files(&self) -> Vec<Issue> {
        use std::os::unix::fs::PermissionsExt;
        let s = &self.store;
        let files: [(&str, Option<&PathBuf>, bool); 5] = [
            ("store.tls.ca", s.tls.ca.as_ref(), false),
            ("store.tls.cert", s.tls.cert.as_ref(), false),
            ("store.tls.key", s.tls.key.as_ref(), false),
            ("store.password_file", s.password_file.as_ref(), true),
            (
                "fencing.ipmi.password_file",
                self.fencing.ipmi.password_file.as_ref(),
                true,
            ),
        ];
        let mut out = Vec::new();
        for (field, path, secret) in files {
            let Some(path) = path else { continue };
            let shown = path.display();
            match std::fs::metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    out.push(Issue::new(field, format!("{shown} does not exist")));
                }
                Err(e) => out.push(Issue::new(field, format!("{shown}: cannot read it: {e}"))),
                Ok(m) if !m.is_file() => {
                    out.push(Issue::new(field, format!("{shown} is not a regular file")));
                }
                Ok(m) if secret && m.permissions().mode() & 0o077 != 0 => {
                    out.push(Issue::new(
                        field,
                        format!(
                            "{shown} is readable by group or others (mode {:04o}); \
                             make it private to its owner (chmod 600)",
                            m.permissions().mode() & 0o7777
                        ),
                    ));
                }
                Ok(_) => {}
            }
        }
        out
    }

    /// Range and consistency checks; every problem found, in field order.
    pub fn validate(&self) -> Vec<Issue> {
        let mut out = Vec::new();
        let mut bad = |p: &str, r: String| out.push(Issue::new(p, r));
        let (node, store, ka) = (&self.node, &self.store, &self.keepalive);

        // node
        if node.name.is_empty() {
            bad(
                "node.name",
                "must be set (the hostname could not be read)".into(),
            );
        } else if let Err(e) = check_node_name(&node.name) {
            bad("node.name", e);
        }
        for (i, c) in node.coordinators.iter().enumerate() {
            if let Err(e) = check_node_name(c) {
                bad(&format!("node.coordinators[{i}]"), e);
            } else if node.coordinators[..i].contains(c) {
                bad(
                    &format!("node.coordinators[{i}]"),
                    format!("{c:?} is listed twice"),
                );
            }
        }
        if node.mode == NodeMode::Clustered && node.coordinators.is_empty() {
            bad(
                "node.coordinators",
                "must name at least one node in clustered mode".into(),
            );
        }
        if let Some(fqdn) = &node.fqdn {
            let labels_ok = fqdn.len() <= 253
                && fqdn
                    .split('.')
                    .all(|l| check_node_name(&l.to_ascii_lowercase()).is_ok());
            if !labels_ok {
                bad("node.fqdn", format!("{fqdn:?} is not a valid DNS name"));
            }
        }

        // paths (relative ones were resolved against the config directory)
        for (name, p) in self.clone().path_fields_mut() {
            if p.as_os_str().is_empty() {
                bad(name, "must not be empty".into());
            } else if !p.is_absolute() {
                bad(name, format!("{} is not an absolute path", p.display()));
            }
        }

        // logging
        if let Err(e) = check_log_level(&self.logging.level) {
            bad("logging.level", e);
        }

        // store
        let endpoints: Vec<Option<Endpoint>> = store
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.parse::<Endpoint>()
                    .map_err(|r| bad(&format!("store.endpoints[{i}]"), r))
                    .ok()
            })
            .collect();
        let any_https = endpoints.iter().flatten().any(|e| e.https);
        if store.endpoints.is_empty() {
            bad(
                "store.endpoints",
                "must list at least one etcd endpoint".into(),
            );
        } else if any_https && endpoints.iter().flatten().any(|e| !e.https) {
            bad(
                "store.endpoints",
                "mixes http:// and https:// endpoints".into(),
            );
        }
        let tls = &store.tls;
        if tls.ca.is_none() {
            if any_https {
                bad("store.tls.ca", "required with https:// endpoints".into());
            } else if tls.cert.is_some() || tls.key.is_some() || tls.server_name.is_some() {
                bad(
                    "store.tls.ca",
                    "required when any other store.tls field is set".into(),
                );
            }
        }
        if tls.ca.is_some() && !any_https && endpoints.iter().flatten().next().is_some() {
            bad(
                "store.tls.ca",
                "is set but store.endpoints are http:// (TLS is only used with https:// \
                 endpoints): use https:// endpoints or remove store.tls"
                    .into(),
            );
        }
        match (&tls.cert, &tls.key) {
            (Some(_), None) => bad(
                "store.tls.key",
                "required when store.tls.cert is set".into(),
            ),
            (None, Some(_)) => bad(
                "store.tls.cert",
                "required when store.tls.key is set".into(),
            ),
            _ => {}
        }
        match (&store.user, &store.password_file) {
            (Some(_), None) => bad(
                "store.password_file",
                "required when store.user is set".into(),
            ),
            (None, Some(_)) => bad(
                "store.user",
                "required when store.password_file is set".into(),
            ),
            (Some(u), _) if u.is_empty() => bad("store.user", "must not be empty".into()),
            _ => {}
        }
        let p = &store.prefix;
        if !p.starts_with('/') || p.ends_with('/') || p.chars().any(char::is_whitespace) {
            bad(
                "store.prefix",
                format!("{p:?} must start with '/', not end with '/' and contain no whitespace"),
            );
        }
        let emb = &store.embedded;
        if emb.client_port == 0 {
            bad("store.embedded.client_port", "must not be 0".into());
        }
        if emb.peer_port == 0 {
            bad("store.embedded.peer_port", "must not be 0".into());
        } else if emb.peer_port == emb.client_port {
            bad(
                "store.embedded.peer_port",
                format!(
                    "must differ from store.embedded.client_port ({})",
                    emb.client_port
                ),
            );
        }
        if emb.enabled {
            if node.mode != NodeMode::Standalone {
                bad(
                    "store.embedded.enabled",
                    "only allowed with node.mode: standalone".into(),
                );
            }
            let first_ok = endpoints.first().and_then(Option::as_ref).is_some_and(|e| {
                !e.https
                    && ["127.0.0.1", "localhost"].contains(&&*e.host)
                    && e.port == emb.client_port
            });
            if !first_ok {
                bad(
                    "store.endpoints[0]",
                    format!(
                        "must be http://127.0.0.1:{0} or http://localhost:{0} when \
                         store.embedded.enabled is true (store.embedded.client_port)",
                        emb.client_port
                    ),
                );
            }
        }

        // durations
        for (name, d) in [
            ("store.connect_timeout", store.connect_timeout),
            ("store.request_timeout", store.request_timeout),
            ("store.startup_deadline", store.startup_deadline),
            ("hypervisor.timeout", self.hypervisor.timeout),
            ("domains.shutdown_timeout", self.domains.shutdown_timeout),
            ("domains.failure_window", self.domains.failure_window),
            ("domains.restart_backoff", self.domains.restart_backoff),
            ("domains.flush_timeout", self.domains.flush_timeout),
            (
                "domains.migration_max_downtime",
                self.domains.migration_max_downtime,
            ),
            ("domains.migration_timeout", self.domains.migration_timeout),
            ("fencing.timeout", self.fencing.timeout),
            ("fencing.window", self.fencing.window),
            ("ceph.interval", self.ceph.interval),
            ("ceph.timeout", self.ceph.timeout),
        ] {
            if d.is_zero() {
                bad(name, "must be greater than 0".into());
            }
        }

        // keepalive
        let (iv, ttl) = (ka.interval, ka.lease_ttl);
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&iv) {
            let got = format_duration(iv);
            bad(
                "keepalive.interval",
                format!("must be between 100ms and 60s, got {got}"),
            );
        }
        let (ttl_s, iv_s) = (format_duration(ttl), format_duration(iv));
        if ttl < Duration::from_secs(2) || ttl > Duration::from_secs(300) {
            bad(
                "keepalive.lease_ttl",
                format!("must be between 2s and 300s, got {ttl_s}"),
            );
        } else if ttl < iv * 2 {
            bad(
                "keepalive.lease_ttl",
                format!("must be at least 2 × keepalive.interval ({iv_s}), got {ttl_s}"),
            );
        } else if ttl.subsec_nanos() != 0 {
            bad(
                "keepalive.lease_ttl",
                format!("must be whole seconds, got {ttl_s}"),
            );
        }

        if let Some(m) = ka.demote_margin {
            if m < Duration::from_millis(100) || m * 2 >= ttl {
                bad(
                    "keepalive.demote_margin",
                    format!(
                        "must be at least 100ms and less than half of keepalive.lease_ttl ({ttl_s}), got {}",
                        format_duration(m)
                    ),
                );
            }
        }

        // hypervisor
        let uri = &self.hypervisor.uri;
        let scheme_ok = libvirt_uri_ok(uri);
        if !scheme_ok {
            bad(
                "hypervisor.uri",
                format!("{uri:?} is not a libvirt URI (e.g. qemu:///system)"),
            );
        }
        if let Some(p) = &self.hypervisor.peer_uri {
            if !libvirt_uri_ok(p) {
                bad(
                    "hypervisor.peer_uri",
                    format!("{p:?} is not a libvirt URI (e.g. qemu+tcp://10.0.0.11/system)"),
                );
            }
        }

        // domains
        let d = &self.domains;
        if d.max_failed_starts == 0 {
            bad("domains.max_failed_starts", "must be at least 1".into());
        }
        if d.migration_max_concurrent == 0 {
            bad(
                "domains.migration_max_concurrent",
                "must be at least 1".into(),
            );
        }
        if d.migration_max_downtime > Duration::from_secs(60) {
            bad(
                "domains.migration_max_downtime",
                format!(
                    "must be at most 60s, got {}",
                    format_duration(d.migration_max_downtime)
                ),
            );
        }
        if !(1..=100).contains(&d.removal_hold_percent) {
            bad(
                "domains.removal_hold_percent",
                format!("must be between 1 and 100, got {}", d.removal_hold_percent),
            );
        }
        if d.removal_hold_min == 0 {
            bad("domains.removal_hold_min", "must be at least 1".into());
        }
        if d.removal_settle > Duration::from_secs(60) {
            bad(
                "domains.removal_settle",
                format!(
                    "must be at most 60s, got {}",
                    format_duration(d.removal_settle)
                ),
            );
        }
        if d.removal_window < d.removal_settle {
            bad(
                "domains.removal_window",
                format!(
                    "must be at least domains.removal_settle ({}), got {}",
                    format_duration(d.removal_settle),
                    format_duration(d.removal_window)
                ),
            );
        }
        for (key, value) in [
            ("domains.stats_sample_interval", d.stats_sample_interval),
            ("domains.resync_interval", d.resync_interval),
        ] {
            if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&value) {
                bad(
                    key,
                    format!("must be between 1s and 10m, got {}", format_duration(value)),
                );
            }
        }
        if d.stats_write_interval < d.stats_sample_interval
            || d.stats_write_interval > Duration::from_secs(86_400)
        {
            bad(
                "domains.stats_write_interval",
                format!(
                    "must be between domains.stats_sample_interval ({}) and 24h, got {}",
                    format_duration(d.stats_sample_interval),
                    format_duration(d.stats_write_interval)
                ),
            );
        }
        if !(1..=1000).contains(&d.stats_writes_per_tick) {
            bad(
                "domains.stats_writes_per_tick",
                format!(
                    "must be between 1 and 1000, got {}",
                    d.stats_writes_per_tick
                ),
            );
        }

        // metrics
        if self.metrics.enabled && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            bad(
                "metrics.listen",
                format!(
                    "not an address:port (e.g. 127.0.0.1:9464 or [::]:9464), got {:?}",
                    self.metrics.listen
                ),
            );
        }

        // node_status
        let ns = &self.node_status;
        if !(1..=100).contains(&ns.memory_percent) {
            bad(
                "node_status.memory_percent",
                format!("must be between 1 and 100, got {}", ns.memory_percent),
            );
        }
        if ns.load_percent_per_cpu == 0 {
            bad(
                "node_status.load_percent_per_cpu",
                "must be at least 1".into(),
            );
        }
        if ns.stale_ticks < 2 {
            bad(
                "node_status.stale_ticks",
                format!("must be at least 2, got {}", ns.stale_ticks),
            );
        }
        if ns.rtt < Duration::from_millis(1) || ns.rtt > Duration::from_secs(10) {
            bad(
                "node_status.rtt",
                format!(
                    "must be between 1ms and 10s, got {}",
                    format_duration(ns.rtt)
                ),
            );
        }
        if ns.rtt_peers_per_tick > 1000 {
            bad(
                "node_status.rtt_peers_per_tick",
                format!("must be at most 1000, got {}", ns.rtt_peers_per_tick),
            );
        }

        // domains.xml_policy, networking, firewall
        let sub = d.xml_policy.validate("domains.xml_policy");
        out.extend(
            sub.into_iter()
                .chain(self.networking.validate("networking"))
                .chain(self.firewall.validate("firewall"))
                .map(|(p, r)| Issue::new(p, r)),
        );
        let mut bad = |p: &str, r: String| out.push(Issue::new(p, r));

        // fencing
        let f = &self.fencing;
        if f.max_concurrent == 0 {
            bad("fencing.max_concurrent", "must be at least 1".into());
        }
        if f.max_per_window == 0 {
            bad("fencing.max_per_window", "must be at least 1".into());
        }
        if f.failed_fence == FenceAction::Migrate && !f.self_fence {
            bad(
                "fencing.failed_fence",
                "migrate needs fencing.self_fence: true (without a confirmed fence, only the self-fence bound keeps a VM from running twice)".into(),
            );
        }
        if let Some(m) = f.self_fence_margin {
            if m < Duration::from_millis(100) || m * 2 >= self.keepalive.lease_ttl {
                bad(
                    "fencing.self_fence_margin",
                    format!(
                        "must be at least 100ms and less than half of keepalive.lease_ttl ({}), got {}",
                        format_duration(self.keepalive.lease_ttl),
                        format_duration(m)
                    ),
                );
            }
        }
        if let Some(g) = f.grace {
            if g < self.self_fence_margin() {
                bad(
                    "fencing.grace",
                    format!(
                        "must be at least the self-fence margin ({}), got {}",
                        format_duration(self.self_fence_margin()),
                        format_duration(g)
                    ),
                );
            }
        }
        if f.ipmi.port == 0 {
            bad("fencing.ipmi.port", "must be 1..65535".into());
        }
        match (&f.ipmi.user, &f.ipmi.password_file) {
            (Some(_), None) => bad(
                "fencing.ipmi.password_file",
                "required when fencing.ipmi.user is set".into(),
            ),
            (None, Some(_)) => bad(
                "fencing.ipmi.user",
                "required when fencing.ipmi.password_file is set".into(),
            ),
            _ => {}
        }
        if f.ipmi.host.as_ref().is_some_and(|h| h.trim().is_empty()) {
            bad("fencing.ipmi.host", "must not be empty".into());
        }

        // ceph
        let client = &self.ceph.client;
        if client.is_empty()
            || client.starts_with("client.")
            || client.contains(char::is_whitespace)
        {
            bad(
                "ceph.client",
                format!("{client:?} must be a non-empty client name without the client. prefix"),
            );
        }

        for (i, u) in self.ceph_coordinator_units().iter().enumerate() {
            if let Err(e) = check_unit_name(u) {
                bad(
                    &format!("ceph.coordinator_units[{i}]"),
                    format!("{} (from {:?})", e, self.ceph.coordinator_units[i]),
                );
            }
        }

        // services
        for (i, u) in self.services.coordinator_units.iter().enumerate() {
            if let Err(e) = check_unit_name(u) {
                bad(&format!("services.coordinator_units[{i}]"), e);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/debvisor/debvisord.yaml";

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Parse `yaml` as `/etc/debvisor/debvisord.yaml` with node name `t1` unless set.
    fn parse(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut e = env(&[("DEBVISOR_NODE_NAME", "t1")]);
        e.retain(|(k, _)| !vars.iter().any(|(v, _)| v == k));
        e.extend(env(vars));
        from_yaml(yaml, Path::new(FILE), &e)
    }

    fn err(yaml: &str, vars: &[(&str, &str)]) -> String {
        match parse(yaml, vars) {
            Ok(c) => panic!("expected an error for {yaml:?} {vars:?}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn repo_file(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
    }

    #[test]
    fn empty_file_means_defaults() {
        for yaml in ["", "# only a comment\n", "node:\n", "{}"] {
            let c = parse(yaml, &[]).unwrap();
            let mut want = Config::default();
            want.node.name = "t1".into();
            assert_eq!(c, want, "{yaml:?}");
        }
    }

    #[test]
    fn env_nested_keys_map_to_fields() {
        let c = parse(
            "",
            &[
                ("DEBVISOR_STORE_TLS_CA", "/pki/ca.pem"),
                ("DEBVISOR_STORE_ENDPOINTS", "https://10.0.0.1:2379"),
                ("DEBVISOR_KEEPALIVE_LEASE_TTL", "20s"),
                ("DEBVISOR_STORE_EMBEDDED_CLIENT_PORT", "23790"),
                ("DEBVISOR_NETWORKING_HOST_NETWORKS_CLUSTER_DEVICE", "eth1"),
                ("DEBVISOR_NETWORKING_HOST_NETWORKS_CLUSTER_VLAN", "100"),
                ("DEBVISOR_NODE_FQDN", "t1.example.com"),
            ],
        )
        .unwrap();
        assert_eq!(c.store.tls.ca.as_deref(), Some(Path::new("/pki/ca.pem")));
        assert_eq!(c.keepalive.lease_ttl, Duration::from_secs(20));
        assert_eq!(c.store.embedded.client_port, 23790);
        let cluster = c.networking.host_networks.cluster.unwrap();
        assert_eq!((cluster.device.as_str(), cluster.vlan), ("eth1", Some(100)));
        assert_eq!(c.node.fqdn.as_deref(), Some("t1.example.com"));
    }

    #[test]
    fn env_list_number_bool_and_precedence() {
        let yaml = "store:\n  endpoints: [http://a:1]\nfirewall:\n  enabled: false\n";
        let c = parse(
            yaml,
            &[
                (
                    "DEBVISOR_STORE_ENDPOINTS",
                    "http://10.0.0.1:2379, http://10.0.0.2:2379",
                ),
                ("DEBVISOR_FENCING_MAX_CONCURRENT", "3"),
                ("DEBVISOR_FIREWALL_ENABLED", "true"),
                ("DEBVISOR_NODE_COORDINATORS", ""),
                ("OTHER_VARIABLE", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.store.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(c.fencing.max_concurrent, 3);
        assert!(c.firewall.enabled);
        assert!(c.node.coordinators.is_empty());
    }

    #[test]
    fn env_empty_value_unsets_optional() {
        let c = parse("node:\n  rack: r1\n", &[("DEBVISOR_NODE_RACK", "")]).unwrap();
        assert_eq!(c.node.rack, None);
    }

    #[test]
    fn env_unknown_variables_are_errors() {
        let e = err("", &[("DEBVISOR_BOGUS", "1"), ("DEBVISOR_STORE_NOPE", "1")]);
        assert!(e.contains("DEBVISOR_BOGUS: unknown variable"), "{e}");
        assert!(e.contains("DEBVISOR_STORE_NOPE: unknown variable"), "{e}");
        // A section is not a value.
        let e = err("", &[("DEBVISOR_STORE_TLS", "x")]);
        assert!(e.contains("DEBVISOR_STORE_TLS: unknown variable"), "{e}");
    }

    #[test]
    fn env_bad_values_name_the_variable() {
        let e = err(
            "",
            &[
                ("DEBVISOR_KEEPALIVE_INTERVAL", "5s"),
                ("DEBVISOR_FENCING_MAX_CONCURRENT", "many"),
            ],
        );
        assert!(
            e.contains("DEBVISOR_FENCING_MAX_CONCURRENT: expected an integer"),
            "{e}"
        );
        let e = err("", &[("DEBVISOR_FIREWALL_ENABLED", "yes")]);
        assert!(
            e.contains("DEBVISOR_FIREWALL_ENABLED: expected true or false"),
            "{e}"
        );
        let e = err("", &[("DEBVISOR_KEEPALIVE_INTERVAL", "90s")]);
        assert!(
            e.contains("keepalive.interval: must be between 100ms and 60s, got 90s"),
            "{e}"
        );
        assert!(e.contains("(set by DEBVISOR_KEEPALIVE_INTERVAL)"), "{e}");
        let e = err("", &[("DEBVISOR_KEEPALIVE_INTERVAL", "10s")]);
        assert!(
            e.contains("keepalive.lease_ttl:") && e.contains("DEBVISOR_KEEPALIVE_INTERVAL"),
            "{e}"
        );
        let e = err("", &[("DEBVISOR_STORE_EMBEDDED_CLIENT_PORT", "70000")]);
        assert!(
            e.contains("store.embedded.client_port:")
                && e.contains("DEBVISOR_STORE_EMBEDDED_CLIENT_PORT"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        let ok = [
            ("500ms", 500),
            ("5s", 5000),
            ("5", 5000),
            ("2m", 120_000),
            ("1h", 3_600_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
            assert_eq!(
                parse_duration(&format_duration(Duration::from_millis(ms))),
                Ok(Duration::from_millis(ms))
            );
        }
        for bad in ["", "5x", "s", "-1s", "1.5s", "5 s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let c = parse("keepalive:\n  interval: 2\n  lease_ttl: 1m\n", &[]).unwrap();
        assert_eq!(
            (c.keepalive.interval, c.keepalive.lease_ttl),
            (Duration::from_secs(2), Duration::from_secs(60))
        );
        let e = err("keepalive:\n  interval: 5d\n", &[]);
        assert!(
            e.starts_with("keepalive.interval: invalid duration unit"),
            "{e}"
        );
        let e = err("keepalive:\n  interval: 1.5\n", &[]);
        assert!(e.starts_with("keepalive.interval: invalid type"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let yaml = "paths:\n  state_dir: ../../.dev-state/state\n  run_dir: ./run\nstore:\n  endpoints: [\"https://a:1\"]\n  tls:\n    ca: pki/ca.pem\n";
        let c = from_yaml(
            yaml,
            Path::new("/repo/etc/debvisor/x.yaml"),
            &env(&[("DEBVISOR_NODE_NAME", "t1")]),
        )
        .unwrap();
        assert_eq!(c.paths.state_dir, Path::new("/repo/.dev-state/state"));
        assert_eq!(c.paths.run_dir, Path::new("/repo/etc/debvisor/run"));
        assert_eq!(
            c.store.tls.ca.as_deref(),
            Some(Path::new("/repo/etc/debvisor/pki/ca.pem"))
        );
        assert_eq!(c.ceph.conf, Path::new("/etc/ceph/ceph.conf"));
        // A relative config path is made absolute first.
        let c = from_yaml(
            "paths:\n  state_dir: s\n",
            Path::new("x.yaml"),
            &env(&[("DEBVISOR_NODE_NAME", "t1")]),
        )
        .unwrap();
        assert_eq!(
            c.paths.state_dir,
            std::env::current_dir().unwrap().join("s")
        );
        let e = err("paths:\n  run_dir: ''\n", &[]);
        assert!(e.contains("paths.run_dir: must not be empty"), "{e}");
    }

    #[test]
    fn hostname_is_the_default_node_name() {
        assert_eq!(short_name("Node1.Example.com\n"), "node1");
        assert_eq!(short_name("hv3"), "hv3");
        let host = short_hostname().expect("hostname readable");
        assert!(!host.is_empty() && !host.contains('.'));
        match from_yaml("", Path::new(FILE), &[]) {
            Ok(c) => assert_eq!(c.node_name(), host),
            // A hostname that is not a DNS label is reported, not silently accepted.
            Err(e) => assert!(e.to_string().contains("node.name:"), "{e}"),
        }
    }

    #[test]
    fn strict_yaml() {
        let e = err("firewall:\n  enabled: yes\n", &[]);
        assert!(
            e.contains("firewall.enabled: invalid type: string \"yes\""),
            "{e}"
        );
        assert!(
            parse("firewall:\n  enabled: True\n", &[])
                .unwrap()
                .firewall
                .enabled
        );
        let e = parse("node:\n  name: a\n  name: b\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        assert!(
            e.to_string().contains("duplicate mapping key `name`"),
            "{e}"
        );
        let e = parse("node: [a\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
    }

    #[test]
    fn type_errors_name_the_field() {
        assert_eq!(err("store:\n  bogus: 1\n", &[]), "store.bogus: unknown field, expected one of endpoints, prefix, tls, user, password_file, connect_timeout, request_timeout, startup_deadline, embedded");
        assert_eq!(
            err("node:\n  mode: clusterd\n", &[]),
            "node.mode: unknown variant \"clusterd\", expected standalone or clustered"
        );
        assert_eq!(
            err("keepalive: [5s, 15s]\n", &[]),
            "keepalive: expected a mapping, got a list"
        );
        assert_eq!(
            err("- a\n", &[]),
            "(top level): expected a mapping, got a list"
        );
        assert!(err("store:\n  endpoints: [\"http://a:1\", [2]]\n", &[])
            .starts_with("store.endpoints[1]: invalid type"));
    }

    #[test]
    fn all_validation_problems_are_reported() {
        let yaml = "store:\n  endpoints: [\"http://a:1\", \"htp://x\"]\n  tls:\n    cert: /c.pem\nkeepalive:\n  lease_ttl: 3s\nlogging:\n  level: verbose\n";
        let e = parse(yaml, &[]).unwrap_err();
        let paths: Vec<&str> = e.issues().iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "logging.level",
                "store.endpoints[1]",
                "store.tls.ca",
                "store.tls.key",
                "keepalive.lease_ttl"
            ]
        );
        let text = e.to_string();
        assert!(
            text.contains("store.endpoints[1]: \"htp://x\" is not an http:// or https:// URL\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "keepalive.lease_ttl: must be at least 2 × keepalive.interval (2s), got 3s"
            ),
            "{text}"
        );
    }

    #[test]
    fn endpoints_and_helpers() {
        let e: Endpoint = "https://[fd00::1]:2379/".parse().unwrap();
        assert_eq!((e.https, e.host.as_str(), e.port), (true, "fd00::1", 2379));
        for bad in [
            "htp://x",
            "http://x",
            "http://:1",
            "http://x:0",
            "http://x:1/path",
            "http://u@x:1",
            "http://[zz]:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        assert!(check_log_level("info,debvisor_objects=debug").is_ok());
        for bad in ["", "verbose", "foo=bogus", "info,,x"] {
            assert!(check_log_level(bad).is_err(), "{bad}");
        }
        assert!(
            check_unit_name("etcd.service").is_ok()
                && check_unit_name("ceph-osd@1.service").is_ok()
        );
        assert!(check_unit_name("etcd").is_err() && check_unit_name("a/b.service").is_err());
        assert!(check_node_name("hv-01").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(64)] {
            assert!(check_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ceph_units_name_the_node() {
        let c = parse("", &[]).expect("defaults");
        assert_eq!(
            c.ceph_coordinator_units(),
            ["ceph-mon@t1.service", "ceph-mgr@t1.service"]
        );
        let c = parse(
            "ceph:\n  coordinator_units: [\"ceph-osd.target\", \"ceph-mds@{node}-a.service\"]\n",
            &[("DEBVISOR_NODE_NAME", "hv-02")],
        )
        .expect("valid units");
        assert_eq!(
            c.ceph_coordinator_units(),
            ["ceph-osd.target", "ceph-mds@hv-02-a.service"]
        );
        let c = parse("ceph:\n  coordinator_units: []\n", &[]).expect("none");
        assert!(c.ceph_coordinator_units().is_empty());
        let c = parse(
            "",
            &[("DEBVISOR_CEPH_COORDINATOR_UNITS", "ceph-mon@{node}.service")],
        )
        .expect("env list");
        assert_eq!(c.ceph_coordinator_units(), ["ceph-mon@t1.service"]);
    }

    #[test]
    fn consistency_rules() {
        let cases: &[(&str, &str)] = &[
            ("node:\n  mode: clustered\n", "node.coordinators: must name at least one node"),
            ("node:\n  coordinators: [a, a]\n", "node.coordinators[1]: \"a\" is listed twice"),
            ("store:\n  embedded:\n    enabled: true\n    client_port: 23790\n", "store.endpoints[0]: must be http://127.0.0.1:23790"),
            ("node:\n  mode: clustered\n  coordinators: [t1]\nstore:\n  embedded:\n    enabled: true\n", "store.embedded.enabled: only allowed"),
            ("store:\n  embedded:\n    peer_port: 2379\n", "store.embedded.peer_port: must differ"),
            ("store:\n  endpoints: [\"https://a:1\"]\n", "store.tls.ca: required with https://"),
            ("store:\n  endpoints: [\"https://a:1\", \"http://b:1\"]\n  tls:\n    ca: /ca\n", "store.endpoints: mixes"),
            ("store:\n  user: root\n", "store.password_file: required when store.user is set"),
            ("store:\n  tls:\n    ca: /ca\n", "store.tls.ca: is set but store.endpoints are http://"),
            ("store:\n  prefix: /debvisor/\n", "store.prefix:"),
            ("store:\n  request_timeout: 0s\n", "store.request_timeout: must be greater than 0"),
            ("keepalive:\n  interval: 50ms\n", "keepalive.interval: must be between 100ms and 60s, got 50ms"),
            ("keepalive:\n  lease_ttl: 1500ms\n  interval: 500ms\n", "keepalive.lease_ttl: must be between 2s and 300s"),
            ("keepalive:\n  lease_ttl: 2500ms\n  interval: 500ms\n", "keepalive.lease_ttl: must be whole seconds"),
            ("hypervisor:\n  uri: qemu\n", "hypervisor.uri:"),
            ("fencing:\n  max_concurrent: 0\n", "fencing.max_concurrent: must be at least 1"),
            ("ceph:\n  client: client.admin\n", "ceph.client:"),
            ("ceph:\n  client_addresses: [10.0.0.1, nope]\n", "ceph.client_addresses[1]"),
            ("services:\n  coordinator_units: [etcd]\n", "services.coordinator_units[0]:"),
            ("ceph:\n  coordinator_units: [\"ceph-mon@{node}\"]\n", "ceph.coordinator_units[0]: \"ceph-mon@t1\" is not a systemd unit name"),
            ("ceph:\n  coordinator_units: [\"ok.service\", \"ceph-mgr@{name}.service\"]\n", "ceph.coordinator_units[1]:"),
            ("networking:\n  host_networks:\n    storage:\n      device: eth0\n      vlan: 5000\n", "networking.host_networks.storage.vlan:"),
            ("firewall:\n  migration_ports: 2-1\n", "firewall.migration_ports:"),
            ("domains:\n  stats_sample_interval: 0s\n", "domains.stats_sample_interval: must be between 1s and 10m, got 0s"),
            ("domains:\n  resync_interval: 500ms\n", "domains.resync_interval: must be between 1s and 10m, got 500ms"),
            ("domains:\n  resync_interval: 11m\n", "domains.resync_interval: must be between 1s and 10m, got 11m"),
        ];
        for (yaml, want) in cases {
            let e = err(yaml, &[]);
            assert!(e.contains(want), "{yaml:?}: want {want:?} in:\n{e}");
        }
    }

    #[test]
    fn xml_policy_from_file_and_env() {
        let yaml = "domains:\n  xml_policy:\n    allow_host_devices: true\n    rbd_pools: [vms]\n";
        let c = parse(
            yaml,
            &[("DEBVISOR_DOMAINS_XML_POLICY_DISK_DIRS", "/srv/a, /srv/b")],
        )
        .unwrap();
        let p = &c.domains.xml_policy;
        assert!(p.allow_host_devices && !p.allow_qemu_passthrough);
        assert_eq!(p.rbd_pools, ["vms"]);
        assert_eq!(
            p.disk_dirs,
            [PathBuf::from("/srv/a"), PathBuf::from("/srv/b")]
        );
        assert_eq!(p.emulators, XmlPolicy::default().emulators);
        let e = err("domains:\n  xml_policy:\n    firmware_dirs: [fw]\n", &[]);
        assert!(
            e.contains("domains.xml_policy.firmware_dirs[0]: \"fw\" is not an absolute path"),
            "{e}"
        );
    }

    #[test]
    fn sample_loads_with_three_env_vars() {
        let vars = env(&[
            ("DEBVISOR_NODE_NAME", "hv1"),
            (
                "DEBVISOR_STORE_ENDPOINTS",
                "http://10.0.0.1:2379,http://10.0.0.2:2379",
            ),
            ("DEBVISOR_HYPERVISOR_URI", "test:///default"),
        ]);
        let c = load(&repo_file("etc/debvisor/debvisord.yaml"), &vars).unwrap();
        assert_eq!(c.node_name(), "hv1");
        assert_eq!(c.store.endpoints.len(), 2);
        assert_eq!(c.hypervisor.uri, "test:///default");
    }

    /// The sample documents the defaults: any drift between it and `Config::default()` fails.
    #[test]
    fn sample_matches_defaults() {
        let vars = env(&[("DEBVISOR_NODE_NAME", "hv1")]);
        let c = load(&repo_file("etc/debvisor/debvisord.yaml"), &vars).unwrap();
        let mut want = Config::default();
        want.node.name = "hv1".into(); // the sample leaves it empty (= hostname)
        assert_eq!(c, want);
    }

    /// Every option of `Config::default()` appears as a key in the sample.
    #[test]
    fn sample_lists_every_option() {
        fn walk(default: &Value, sample: &Value, path: &str, missing: &mut Vec<String>) {
            let Value::Object(d) = default else { return };
            for (k, dv) in d {
                let p = format!("{path}{k}");
                match sample.as_object().and_then(|s| s.get(k)) {
                    Some(sv) => walk(dv, sv, &format!("{p}."), missing),
                    None => missing.push(p),
                }
            }
        }
        let text = std::fs::read_to_string(repo_file("etc/debvisor/debvisord.yaml")).unwrap();
        let sample: Value = serde_saphyr::from_str(&text).unwrap();
        let mut missing = Vec::new();
        walk(
            &serde_json::to_value(Config::default()).unwrap(),
            &sample,
            "",
            &mut missing,
        );
        assert!(
            missing.is_empty(),
            "options missing from the sample: {missing:?}"
        );
    }

    #[test]
    fn dev_config_is_valid() {
        let path = repo_file("etc/debvisor/debvisord.dev.yaml");
        let c = load(&path, &[]).unwrap();
        let repo = normalize(&std::path::absolute(repo_file("")).unwrap());
        assert_eq!(c.node_name(), "devnode");
        assert_eq!(c.paths.state_dir, repo.join(".dev-state/state"));
        assert_eq!(c.embedded_data_dir(), repo.join(".dev-state/state/etcd"));
        assert!(c.store.embedded.enabled);
        // Host-neutral: networks, sysctl and firewall only inside its own namespace.
        assert_eq!(c.networking.require_netns.as_deref(), Some("debvisor-dev"));
        assert!(c.networking.sysctl.apply && c.firewall.enabled);
        assert_eq!(c.store.endpoints, ["http://127.0.0.1:23790"]);
    }

    #[test]
    fn a_watchdog_shorter_than_three_ticks_is_warned_about() {
        let c = parse("keepalive:\n  interval: 20s\n  lease_ttl: 60s\n", &[]).unwrap();
        let w = c.watchdog_warning(SHIPPED_WATCHDOG).expect("30s < 3 × 20s");
        assert!(
            w.contains("(30s) is shorter than 3 × keepalive.interval (20s)") && w.contains("1m"),
            "{w}"
        );
        assert_eq!(c.watchdog_warning(Duration::from_secs(60)), None);
        let c = parse("", &[]).unwrap();
        assert_eq!(
            c.watchdog_warning(SHIPPED_WATCHDOG),
            None,
            "the defaults fit"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = load(Path::new("/nonexistent/debvisord.yaml"), &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/debvisord.yaml: cannot read"),
            "{e}"
        );
    }
}
