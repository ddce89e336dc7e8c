//! Self-registration: claim the node name with a lease-bound `alive` key, write the node's
//! static keys, and refuse to start when another live daemon holds the name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use debvisor_objects::node::{
    parse_node, AliveRecord, BmcInfo, CoordinatorState, DaemonState, DomainState, Mode, NodeInfo,
};
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::witness::StoreMark;
use debvisor_objects::{Store, StoreError, TxnBuilder};
use thiserror::Error;
use tracing::{info, warn};

use crate::config::Config;

/// Why registration failed.
#[derive(Debug, Error)]
pub enum RegisterError {
    /// Another live daemon holds this node name.
    #[error("node name {node:?} is already held by a live daemon (host {hostname}, pid {pid}, lease {lease:x}); refusing to start a second one — stop it first or pick another node.name")]
    Duplicate {
        node: String,
        hostname: String,
        pid: u32,
        lease: i64,
    },
    /// A standalone node must be alone under its prefix.
    #[error("node.mode is standalone but node {other:?} is also registered and alive under this store prefix (host {hostname}, pid {pid}); a standalone node must be alone — stop it, use mode clustered on both, or give this node its own store.prefix")]
    NotAlone {
        other: String,
        hostname: String,
        pid: u32,
    },
    /// A standalone node is alive under this prefix and this node would join it.
    #[error("node {other:?} (host {hostname}, pid {pid}) runs in mode standalone under this store prefix; a clustered node cannot join it — give this node its own store.prefix or switch that node to clustered")]
    StandaloneHere {
        other: String,
        hostname: String,
        pid: u32,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
}

/// How many of its own past leases a node remembers (`lease_history`): enough to recognise
/// the lease a fence record names across a few restarts and re-registrations.
pub const LEASE_HISTORY_LEN: usize = 16;

/// Parse the `lease_history` file: one lowercase hex lease id a line, oldest first. Any
/// line that is not one is an error naming it (the whole file is then not trusted).
pub fn parse_lease_history(text: &str) -> Result<Vec<i64>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        match crate::reactors::fence_evidence::parse_lease(l) {
            Some(id) => out.push(id),
            None => {
                return Err(format!(
                    "line {}: {l:?} is not a lease id (lowercase hex)",
                    n + 1
                ))
            }
        }
    }
    Ok(out)
}

/// Local identity files under the state dir.
pub struct LocalState {
    dir: PathBuf,
}

impl LocalState {
    /// The state files of `state_dir`.
    pub fn new(state_dir: &Path) -> LocalState {
        LocalState {
            dir: state_dir.to_path_buf(),
        }
    }

    fn err(path: &Path, e: impl std::fmt::Display) -> RegisterError {
        RegisterError::State {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    /// The stable node id (`node_id`), created on first start.
    pub fn node_id(&self) -> Result<String, RegisterError> {
        let path = self.dir.join("node_id");
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            _ => {
                let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
                    .map_err(|e| Self::err(&path, e))?
                    .trim()
                    .to_string();
                crate::securefs::write_file(&path, format!("{id}\n").as_bytes(), 0o640)
                    .map_err(|e| Self::err(&path, e))?;
                Ok(id)
            }
        }
    }

    /// The lease id this node held last (to recognise its own `alive` after a crash).
    pub fn last_lease(&self) -> Option<i64> {
        std::fs::read_to_string(self.dir.join("lease"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Remember the current lease id (also in the lease history).
    pub fn save_lease(&self, id: i64) -> Result<(), RegisterError> {
        let path = self.dir.join("lease");
        crate::securefs::write_file(&path, format!("{id}\n").as_bytes(), 0o640)
            .map_err(|e| Self::err(&path, e))?;
        self.remember_lease(id);
        Ok(())
    }

    /// The leases this node registered with lately, oldest first (at most
    /// [`LEASE_HISTORY_LEN`]): a fence record naming one of them is about this node. A
    /// missing file is an empty history; an unreadable or garbage one an error naming it.
    pub fn lease_history(&self) -> Result<Vec<i64>, String> {
        let path = self.dir.join("lease_history");
        match crate::securefs::read_trusted(&path) {
            Ok(None) => Ok(Vec::new()),
            Ok(Some(text)) => {
                parse_lease_history(&text).map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Add `id` to the lease history (a fresh file renamed into place). A garbage history is
    /// started afresh and a failed write only logged: the history is evidence for stopping
    /// guests, and without it the node stops none — it never blocks a registration.
    fn remember_lease(&self, id: i64) {
        let path = self.dir.join("lease_history");
        let mut ids = self.lease_history().unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "lease history not readable; starting it afresh");
            Vec::new()
        });
        ids.retain(|l| *l != id);
        ids.push(id);
        let skip = ids.len().saturating_sub(LEASE_HISTORY_LEN);
        let text: String = ids[skip..].iter().map(|l| format!("{l:x}\n")).collect();
        if let Err(e) = crate::securefs::write_file(&path, text.as_bytes(), 0o640) {
            warn!(path = %path.display(), lease = format!("{id:x}"), error = %e, "lease history not written");
        }
    }

    /// Forget the lease (clean shutdown revoked it).
    pub fn clear_lease(&self) {
        let _ = std::fs::remove_file(self.dir.join("lease"));
    }

    /// The store's identity as an earlier run last saw it (`store_mark`), if readable and
    /// ours (a planted file is not trusted).
    pub fn store_mark(&self) -> Option<StoreMark> {
        let text = crate::securefs::read_trusted(&self.dir.join("store_mark")).ok()??;
        serde_json::from_str(&text).ok()
    }

    /// Remember the store's identity (a fresh file renamed into place, mode 0640).
    pub fn save_store_mark(&self, mark: &StoreMark) -> Result<(), RegisterError> {
        let path = self.dir.join("store_mark");
        let text = serde_json::to_vec(mark).unwrap_or_default();
        crate::securefs::write_file(&path, &text, 0o640).map_err(|e| Self::err(&path, e))
    }
}

/// This process as its `alive` record names it: boot id, PID and start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessToken {
    pub boot_id: String,
    pub pid: u32,
    pub start_ticks: u64,
}

impl ProcessToken {
    /// The running daemon's own token.
    pub fn current() -> ProcessToken {
        let pid = std::process::id();
        ProcessToken {
            boot_id: crate::hostinfo::boot_id(),
            pid,
            start_ticks: crate::hostinfo::process_start_ticks(pid).unwrap_or(0),
        }
    }

    /// Does `holder` name this process?
    pub fn wrote(&self, holder: &AliveRecord) -> bool {
        holder.is_process(&self.boot_id, self.pid, self.start_ticks)
    }
}

/// Who holds the node name, as far as this daemon can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// This very process (e.g. its registration came back with a restored etcd).
    ThisProcess,
    /// An earlier run of this daemon (same state dir): crashed, or this host rebooted.
    EarlierRun,
    /// Someone else.
    Other,
}

/// Tell who wrote `holder`, with `lease` the lease `alive` is bound to. The token decides
/// when the record has one; records of daemons that predate it fall back to the lease file.
fn holder_of(
    holder: &AliveRecord,
    lease: i64,
    me: &ProcessToken,
    node_id: &str,
    local: &LocalState,
) -> Holder {
    if me.wrote(holder) {
        return Holder::ThisProcess;
    }
    if holder.node_id != node_id {
        return Holder::Other;
    }
    if holder.boot_id.is_empty() {
        return if local.last_lease() == Some(lease) || lease == 0 {
            Holder::EarlierRun
        } else {
            Holder::Other
        };
    }
    // Our state dir's id: an earlier run unless that process is alive right now.
    let live = holder.boot_id == me.boot_id
        && crate::hostinfo::process_start_ticks(holder.pid) == Some(holder.start_ticks);
    if live {
        Holder::Other
    } else {
        Holder::EarlierRun
    }
}

/// What registration writes besides `alive`.
pub struct RegistrationData {
    pub node: String,
    pub info: NodeInfo,
    pub fqdn: Option<String>,
    pub mode: &'static str,
    pub coordinator: CoordinatorState,
    pub daemon_state: DaemonState,
    pub alive: AliveRecord,
    pub ttl: Duration,
    /// This node's BMC (`fencing.ipmi`), published for the primary to fence it.
    pub bmc: Option<BmcInfo>,
}

/// The BMC this node publishes (`fencing.ipmi.host` and `user` set).
pub fn bmc_of(cfg: &Config) -> Option<BmcInfo> {
    let i = &cfg.fencing.ipmi;
    Some(BmcInfo {
        host: i.host.clone()?,
        port: i.port,
        user: i.user.clone()?,
    })
}

/// The `coordinator_state` this node holds outside an election: a standalone node counts as
/// a coordinator (`Config::is_coordinator`); the election makes one coordinator primary.
pub fn coordinator_state(cfg: &Config) -> CoordinatorState {
    if cfg.is_coordinator() {
        CoordinatorState::Secondary
    } else {
        CoordinatorState::Client
    }
}

/// Build the registration data from config and host facts.
pub fn data(
    cfg: &Config,
    info: NodeInfo,
    state: DaemonState,
    node_id: &str,
    since: &str,
) -> RegistrationData {
    RegistrationData {
        node: cfg.node_name().to_string(),
        fqdn: cfg.node.fqdn.clone(),
        mode: cfg.node.mode.as_str(),
        coordinator: coordinator_state(cfg),
        daemon_state: state,
        alive: {
            let me = ProcessToken::current();
            AliveRecord {
                hostname: info.hostname.clone(),
                pid: me.pid,
                node_id: node_id.to_string(),
                since: since.to_string(),
                boot_id: me.boot_id,
                start_ticks: me.start_ticks,
            }
        },
        info,
        ttl: cfg.keepalive.lease_ttl,
        bmc: bmc_of(cfg),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Claim the node name and write the node's keys; returns the new lease id. `current` is
/// the lease this process holds now (re-registration): a registration bound to it is
/// already ours and is kept, never revoked.
pub async fn register(
    store: &Store,
    local: &LocalState,
    d: &RegistrationData,
    current: Option<i64>,
) -> Result<i64, RegisterError> {
    let alive_key = schema::node_key(&d.node, NodeField::Alive);
    check_alone(store, d).await?;
    if let Some(kv) = store.get(&alive_key).await? {
        let holder: AliveRecord = serde_json::from_slice(&kv.value).unwrap_or_default();
        if current.is_some_and(|c| c == kv.lease && kv.lease != 0) {
            info!(node = %d.node, lease = format!("{:x}", kv.lease), "already registered with the current lease; nothing to take over");
            return Ok(kv.lease);
        }
        let me = ProcessToken::current();
        match holder_of(&holder, kv.lease, &me, &d.alive.node_id, local) {
            who @ (Holder::ThisProcess | Holder::EarlierRun) => {
                let whose = if who == Holder::ThisProcess {
                    "this daemon's own registration (the store went back to an older state)"
                } else {
                    "a previous run of this daemon"
                };
                info!(node = %d.node, lease = format!("{:x}", kv.lease), holder_pid = holder.pid, "node name held by {whose}; taking it over");
                if kv.lease != 0 {
                    store.lease_revoke(kv.lease).await?;
                } else {
                    store.delete(&alive_key).await?;
                }
            }
            Holder::Other => {
                if kv.lease == 0 || store.lease_ttl(kv.lease).await? > 0 {
                    return Err(RegisterError::Duplicate {
                        node: d.node.clone(),
                        hostname: holder.hostname,
                        pid: holder.pid,
                        lease: kv.lease,
                    });
                }
            }
        }
    }
    let lease = store.lease_grant(d.ttl).await?;
    local.save_lease(lease)?;
    // A fenced node stays fenced until an operator readmits it: registering again (after a
    // power cycle, a restart, a lost lease) must not write it back to init or run.
    let state_key = schema::node_key(&d.node, NodeField::DaemonState);
    let fenced = store
        .get(&state_key)
        .await?
        .is_some_and(|kv| kv.value == DaemonState::Fenced.as_str().as_bytes());
    let domain_key = schema::node_key(&d.node, NodeField::DomainState);
    let domain_ok = match store.get(&domain_key).await? {
        Some(kv) => std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|s| s.parse::<DomainState>().ok())
            .is_some(),
        None => false,
    };
    let mut t = TxnBuilder::new()
        .absent(&alive_key)
        .put_leased(&alive_key, json(&d.alive), lease)
        .put(&schema::node_key(&d.node, NodeField::Info), json(&d.info))
        .put(&schema::node_key(&d.node, NodeField::Mode), d.mode)
        .put(
            &schema::node_key(&d.node, NodeField::CoordinatorState),
            d.coordinator.as_str(),
        )
        .or_get(&alive_key);
    t = match &d.fqdn {
        Some(f) => t.put(&schema::node_key(&d.node, NodeField::Fqdn), f.as_str()),
        None => t.delete(&schema::node_key(&d.node, NodeField::Fqdn)),
    };
    if !domain_ok {
        t = t.put(&domain_key, DomainState::Ready.as_str());
    }
    if fenced {
        info!(node = %d.node, "this node is fenced: registered, but it stays out (no guests) until `debvisorctl node readmit {}`", d.node);
    } else {
        t = t.put(&state_key, d.daemon_state.as_str());
    }
    let bmc_key = schema::node_key(&d.node, NodeField::Bmc);
    t = match &d.bmc {
        Some(b) => t.put(&bmc_key, json(b)),
        None => t.delete(&bmc_key),
    };
    let resp = store.txn(t).await?;
    if !resp.succeeded() {
        let _ = store.lease_revoke(lease).await;
        local.clear_lease();
        let holder = store.get(&alive_key).await?.map(|kv| {
            (
                serde_json::from_slice::<AliveRecord>(&kv.value).unwrap_or_default(),
                kv.lease,
            )
        });
        let (h, l) = holder.unwrap_or_default();
        return Err(RegisterError::Duplicate {
            node: d.node.clone(),
            hostname: h.hostname,
            pid: h.pid,
            lease: l,
        });
    }
    // Created once by the first node of the cluster.
    let sv = schema::schema_version();
    let _ = store
        .txn(
            TxnBuilder::new()
                .absent(&sv)
                .put(&sv, schema::SCHEMA_VERSION.to_string()),
        )
        .await?;
    Ok(lease)
}

/// A standalone node must be alone under its prefix, and a clustered node cannot join a
/// standalone one: both would act as primary (gateways, dnsmasq, Ceph) for the same objects.
async fn check_alone(store: &Store, d: &RegistrationData) -> Result<(), RegisterError> {
    let (kvs, _) = store.list(schema::NODES_PREFIX).await?;
    let grouped = debvisor_objects::reactor::group_keys(schema::NODES_PREFIX, kvs, |_| true);
    for (name, keys) in grouped {
        if name == d.node {
            continue;
        }
        let Ok(n) = parse_node(&name, &keys) else {
            continue;
        };
        if !n.alive {
            continue;
        }
        let holder = n.alive_record.unwrap_or_default();
        if d.mode == Mode::Standalone.as_str() {
            return Err(RegisterError::NotAlone {
                other: name,
                hostname: holder.hostname,
                pid: holder.pid,
            });
        }
        if n.mode == Some(Mode::Standalone) {
            return Err(RegisterError::StandaloneHere {
                other: name,
                hostname: holder.hostname,
                pid: holder.pid,
            });
        }
    }
    Ok(())
}

/// Write `daemon_state`, logging the transition.
pub async fn set_daemon_state(
    store: &Store,
    node: &str,
    from: DaemonState,
    to: DaemonState,
    reason: &str,
) -> Result<(), StoreError> {
    // Never over `fenced`: only an operator's readmission lifts it (etcd fails a value
    // compare on an absent key, so a deleted key is written by a second transaction).
    let key = schema::node_key(node, NodeField::DaemonState);
    let write = |t: TxnBuilder| t.put(&key, to.as_str());
    let r: Result<bool, StoreError> = async {
        let not_fenced = TxnBuilder::new().value_is_not(&key, DaemonState::Fenced.as_str());
        if store.txn(write(not_fenced)).await?.succeeded() {
            return Ok(true);
        }
        Ok(store
            .txn(write(TxnBuilder::new().absent(&key)))
            .await?
            .succeeded())
    }
    .await;
    match &r {
        Ok(true) => info!(node = %node, from = %from, to = %to, reason, "daemon_state changed"),
        Ok(false) => {
            warn!(node = %node, from = %from, to = %to, "this node is fenced; daemon_state left as it is until `debvisorctl node readmit`")
        }
        Err(e) => {
            warn!(node = %node, from = %from, to = %to, error = %e, "cannot write daemon_state")
        }
    }
    r.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_history_parses_hex_lines_and_refuses_garbage() {
        assert_eq!(parse_lease_history(""), Ok(vec![]));
        assert_eq!(parse_lease_history("a\n1f\n\n"), Ok(vec![10, 31]));
        for bad in [
            "zz\n",
            "1F\n",
            "-1\n",
            "0\n",
            "12345678901234567\n",
            "a\n\u{0}\n",
        ] {
            let e = parse_lease_history(bad).expect_err(bad);
            assert!(e.contains("line"), "{e}");
        }
    }

    #[test]
    fn the_lease_history_keeps_the_last_leases_and_survives_garbage() {
        let t = tempfile::tempdir().expect("tempdir");
        let local = LocalState::new(t.path());
        assert_eq!(local.lease_history(), Ok(vec![]));
        for id in 1..=20 {
            local.save_lease(id).expect("save");
        }
        // Saving the same lease again (re-registration kept it) does not duplicate it.
        local.save_lease(20).expect("save");
        let want: Vec<i64> = (5..=20).collect();
        assert_eq!(local.lease_history(), Ok(want));
        assert_eq!(local.last_lease(), Some(20));

        std::fs::write(t.path().join("lease_history"), "not a lease\n").expect("write");
        let e = local.lease_history().expect_err("garbage");
        assert!(e.contains("lease_history"), "{e}");
        // A garbage history is started afresh, never a failed registration.
        local.save_lease(0x7f).expect("save over garbage");
        assert_eq!(local.lease_history(), Ok(vec![0x7f]));
    }
}
