//! The values the [`Hypervisor`](super::Hypervisor) trait speaks: domain snapshots, states with
//! libvirt's reasons, counters, lifecycle events and migration options.
//!
//! They are plain data (serde-able) so the Domain object can write them to etcd as they are
//! and its planner can be unit-tested without libvirt.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The operation a hypervisor call performs; named in every error so a log line says what
/// was attempted, not only what libvirt answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Connection check of the keepalive.
    Probe,
    /// List every domain.
    List,
    /// Look one domain up.
    Get,
    /// Define (or redefine) a persistent domain from XML.
    Define,
    /// Remove a persistent definition.
    Undefine,
    /// Boot a defined domain.
    Start,
    /// Ask the guest to power off (ACPI).
    Shutdown,
    /// Power a domain off at once.
    Destroy,
    /// Pause a running domain (vCPUs and I/O stop; memory kept).
    Suspend,
    /// Read a domain's XML.
    Xml,
    /// Read counters.
    Stats,
    /// Live or paused peer-to-peer migration.
    Migrate,
    /// Subscribe to lifecycle events.
    Events,
}

impl Op {
    /// The lower-case name used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Probe => "probe",
            Op::List => "list",
            Op::Get => "get",
            Op::Define => "define",
            Op::Undefine => "undefine",
            Op::Start => "start",
            Op::Shutdown => "shutdown",
            Op::Destroy => "destroy",
            Op::Suspend => "suspend",
            Op::Xml => "xml",
            Op::Stats => "stats",
            Op::Migrate => "migrate",
            Op::Events => "events",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an idempotent operation did, so callers can report "started" apart from "was
/// already running" while treating both as success (level-triggered reconcile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The domain already was as asked; nothing was done.
    Unchanged,
    /// Something was done.
    Changed,
}

impl Outcome {
    /// Was anything done?
    pub fn changed(self) -> bool {
        self == Outcome::Changed
    }
}

/// libvirt's domain state (`virDomainState`), closed so planners can match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// `VIR_DOMAIN_NOSTATE` (also used for values this build does not know).
    NoState,
    /// Running.
    Running,
    /// Blocked on a resource (a running domain, for our purposes).
    Blocked,
    /// Paused (by a user, a migration, an I/O error…; see the reason).
    Paused,
    /// Being shut down.
    ShuttingDown,
    /// Not running (defined persistent domains only: transient ones vanish when stopped).
    Shutoff,
    /// The guest crashed and its process was kept (`on_crash=preserve`).
    Crashed,
    /// Suspended by guest power management.
    PmSuspended,
}

impl DomainState {
    /// From `virDomainState`.
    pub fn from_raw(v: i32) -> DomainState {
        match v {
            1 => DomainState::Running,
            2 => DomainState::Blocked,
            3 => DomainState::Paused,
            4 => DomainState::ShuttingDown,
            5 => DomainState::Shutoff,
            6 => DomainState::Crashed,
            7 => DomainState::PmSuspended,
            _ => DomainState::NoState,
        }
    }

    /// Does a process exist for the domain (anything but shut off)?
    pub fn is_active(self) -> bool {
        self != DomainState::Shutoff
    }

    /// The name used in messages and JSON (`running`, `shutoff`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::NoState => "nostate",
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "shutting_down",
            DomainState::Shutoff => "shutoff",
            DomainState::Crashed => "crashed",
            DomainState::PmSuspended => "pmsuspended",
        }
    }

    /// libvirt's reason code for this state (`virDomain<State>Reason`) as a stable name,
    /// e.g. `booted`, `destroyed`, `crashed`, `migration`; `unknown(N)` for codes this build
    /// does not know.
    pub fn reason_name(self, reason: i32) -> String {
        let table: &[&str] = match self {
            DomainState::Running => &[
                "unknown",
                "booted",
                "migrated",
                "restored",
                "from_snapshot",
                "unpaused",
                "migration_canceled",
                "save_canceled",
                "wakeup",
                "crashed",
                "postcopy",
                "postcopy_failed",
            ],
            DomainState::Paused => &[
                "unknown",
                "user",
                "migration",
                "save",
                "dump",
                "ioerror",
                "watchdog",
                "from_snapshot",
                "shutting_down",
                "snapshot",
                "crashed",
                "starting_up",
                "postcopy",
                "postcopy_failed",
                "api_error",
            ],
            DomainState::ShuttingDown => &["unknown", "user"],
            DomainState::Shutoff => &[
                "unknown",
                "shutdown",
                "destroyed",
                "crashed",
                "migrated",
                "saved",
                "failed",
                "from_snapshot",
                "daemon",
            ],
            DomainState::Crashed => &["unknown", "panicked"],
            DomainState::NoState | DomainState::Blocked | DomainState::PmSuspended => &["unknown"],
        };
        usize::try_from(reason)
            .ok()
            .and_then(|i| table.get(i))
            .map(|s| (*s).to_string())
            .unwrap_or_else(|| format!("unknown({reason})"))
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One domain as the host has it: what the Domain object compares with the desired state,
/// and what adoption after a daemon restart checks (same qemu PID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Canonical lower-case UUID.
    pub uuid: String,
    /// libvirt name.
    pub name: String,
    /// Current state.
    pub state: DomainState,
    /// libvirt's reason for that state (see [`DomainState::reason_name`]).
    pub reason: String,
    /// Defined persistently (survives a stop); `false` for a transient domain.
    pub persistent: bool,
    /// libvirt starts it when libvirtd starts.
    pub autostart: bool,
    /// Current vCPUs.
    pub vcpus: u32,
    /// Current memory (balloon) in KiB.
    pub memory_kib: u64,
    /// Maximum memory in KiB.
    pub max_memory_kib: u64,
    /// CPU time used, nanoseconds (0 when shut off).
    pub cpu_time_ns: u64,
    /// PID of the qemu process while active, when it can be established reliably: the
    /// driver's pid file (`/run/libvirt/qemu/<name>.pid`) whose process command line carries
    /// `-uuid <uuid>`. `None` for other drivers, other hosts' run dirs, or a stale file.
    pub pid: Option<u32>,
}

/// Counters of one domain, for the keepalive's per-VM stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStats {
    /// Canonical lower-case UUID.
    pub uuid: String,
    /// libvirt name.
    pub name: String,
    /// Whether the domain is active (counters of a shut-off domain are zero).
    pub active: bool,
    /// CPU time used, nanoseconds.
    pub cpu_time_ns: u64,
    /// Current memory (balloon) in KiB.
    pub memory_kib: u64,
    /// Maximum memory in KiB.
    pub max_memory_kib: u64,
    /// Current vCPUs.
    pub vcpus: u32,
    /// Bytes read from all disks.
    pub block_rd_bytes: u64,
    /// Bytes written to all disks.
    pub block_wr_bytes: u64,
    /// Bytes received on all interfaces.
    pub net_rx_bytes: u64,
    /// Bytes sent on all interfaces.
    pub net_tx_bytes: u64,
}

/// Why a domain stopped (`virDomainEventStoppedDetailType`): what crash detection needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The guest shut itself down (ACPI obeyed, or `poweroff` inside).
    Shutdown,
    /// `destroy` was called.
    Destroyed,
    /// The guest crashed.
    Crashed,
    /// Migrated to another host.
    Migrated,
    /// Saved to a file.
    Saved,
    /// The host process failed or was killed (e.g. qemu SIGKILLed).
    Failed,
    /// Reverted to a snapshot.
    FromSnapshot,
    /// A detail code this build does not know.
    Unknown,
}

impl StopReason {
    fn from_detail(d: i32) -> StopReason {
        match d {
            0 => StopReason::Shutdown,
            1 => StopReason::Destroyed,
            2 => StopReason::Crashed,
            3 => StopReason::Migrated,
            4 => StopReason::Saved,
            5 => StopReason::Failed,
            6 => StopReason::FromSnapshot,
            _ => StopReason::Unknown,
        }
    }
}

/// A lifecycle change of one domain (`VIR_DOMAIN_EVENT_ID_LIFECYCLE`), with libvirt's
/// detail as a closed enum where planners branch on it and as a name elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Lifecycle {
    /// Defined; `updated` when an existing definition was replaced.
    Defined {
        /// An existing definition was replaced (not a new domain).
        updated: bool,
    },
    /// The persistent definition was removed.
    Undefined,
    /// Started (`booted`, `migrated`, `restored`, `from_snapshot`, `wakeup`).
    Started {
        /// libvirt's detail.
        reason: String,
    },
    /// Paused (`paused`, `migrated`, `ioerror`, `watchdog`, …).
    Suspended {
        /// libvirt's detail.
        reason: String,
    },
    /// Resumed after a pause.
    Resumed {
        /// libvirt's detail.
        reason: String,
    },
    /// Stopped; the process is gone.
    Stopped {
        /// Why.
        reason: StopReason,
    },
    /// The guest finished a shutdown (comes before `Stopped { Shutdown }`).
    ShuttingDown {
        /// `finished`, `guest` or `host`.
        reason: String,
    },
    /// Suspended by guest power management.
    PmSuspended,
    /// The guest panicked (process kept or restarted per `on_crash`).
    Crashed {
        /// `panicked` or `crashloaded`.
        reason: String,
    },
    /// An event code this build does not know.
    Other {
        /// `virDomainEventType`.
        event: i32,
        /// Its detail.
        detail: i32,
    },
}

fn detail_name(table: &[&str], d: i32) -> String {
    usize::try_from(d)
        .ok()
        .and_then(|i| table.get(i))
        .map(|s| (*s).to_string())
        .unwrap_or_else(|| format!("unknown({d})"))
}

impl Lifecycle {
    /// From `virDomainEventType` and its detail code.
    pub fn from_raw(event: i32, detail: i32) -> Lifecycle {
        match event {
            0 => Lifecycle::Defined {
                updated: detail == 1,
            },
            1 => Lifecycle::Undefined,
            2 => Lifecycle::Started {
                reason: detail_name(
                    &["booted", "migrated", "restored", "from_snapshot", "wakeup"],
                    detail,
                ),
            },
            3 => Lifecycle::Suspended {
                reason: detail_name(
                    &[
                        "paused",
                        "migrated",
                        "ioerror",
                        "watchdog",
                        "restored",
                        "from_snapshot",
                        "api_error",
                        "postcopy",
                        "postcopy_failed",
                    ],
                    detail,
                ),
            },
            4 => Lifecycle::Resumed {
                reason: detail_name(
                    &[
                        "unpaused",
                        "migrated",
                        "from_snapshot",
                        "postcopy",
                        "postcopy_failed",
                    ],
                    detail,
                ),
            },
            5 => Lifecycle::Stopped {
                reason: StopReason::from_detail(detail),
            },
            6 => Lifecycle::ShuttingDown {
                reason: detail_name(&["finished", "guest", "host"], detail),
            },
            7 => Lifecycle::PmSuspended,
            8 => Lifecycle::Crashed {
                reason: detail_name(&["panicked", "crashloaded"], detail),
            },
            _ => Lifecycle::Other { event, detail },
        }
    }
}

/// What [`Hypervisor::events`](super::Hypervisor::events) delivers.
///
/// Events are hints that make the Domain object react at once; the periodic resync against
/// [`list`](super::Hypervisor::list) stays the source of truth, and `Resync` says when hints
/// may have been missed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DomainEvent {
    /// A lifecycle change of one domain.
    Lifecycle {
        /// Canonical lower-case UUID.
        uuid: String,
        /// libvirt name.
        name: String,
        /// What happened.
        event: Lifecycle,
    },
    /// Events may have been lost (the event connection was re-opened after libvirtd went
    /// away, or the queue overflowed): relist now.
    Resync {
        /// Why.
        reason: String,
    },
}

impl DomainEvent {
    /// The UUID of a lifecycle event (`None` for `Resync`).
    pub fn uuid(&self) -> Option<&str> {
        match self {
            DomainEvent::Lifecycle { uuid, .. } => Some(uuid),
            DomainEvent::Resync { .. } => None,
        }
    }
}

/// How to migrate (see [`Hypervisor::migrate`](super::Hypervisor::migrate)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOptions {
    /// Live (`VIR_MIGRATE_LIVE`): the guest keeps running while memory is copied. Without
    /// it the guest is paused for the copy.
    pub live: bool,
    /// Longest pause at switch-over, milliseconds (`virDomainMigrateSetMaxDowntime`).
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap, MiB/s (`VIR_MIGRATE_PARAM_BANDWIDTH`).
    pub bandwidth_mib_s: Option<u64>,
    /// Give up (and abort the libvirt job) after this long.
    pub timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            live: true,
            max_downtime_ms: None,
            bandwidth_mib_s: None,
            timeout: Duration::from_secs(600),
        }
    }
}
