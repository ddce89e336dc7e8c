//! The cluster's etcd: 1 to 3 members, each in a namespace of its own plugged into the switch,
//! so one member can be killed, restarted or cut off the wire alone.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, DeleteOptions, GetOptions};

use super::switch::Switch;
use super::{lock, wait_until, ETCD_HOST_BASE, KEY_PREFIX};
use crate::error::{EtcdContext, HarnessError, Result};
use crate::etcd::{block_on_in, send_signal, EtcdProcess, MEMBER_CLIENT_PORT};
use crate::netns::NetNs;

/// Most members (addresses `.201` to `.203`).
pub const MAX_MEMBERS: usize = 3;
/// How long one attempt of a request on one member may take before the next member is tried.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`EtcdCluster::start`] and [`EtcdCluster::restart_member`] wait for a leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// One member: its process and its namespace (dropped after the process: field order).
#[derive(Debug)]
struct Member {
    name: String,
    addr: Ipv4Addr,
    proc: Mutex<EtcdProcess>,
    /// Its switch port is down ([`EtcdCluster::cut_member`]).
    cut: AtomicBool,
    ns: NetNs,
}

/// An etcd cluster of 1 to [`MAX_MEMBERS`] members `e1`, `e2`, … at `.201`, `.202`, … of the
/// cluster subnet, each in its own namespace with `eth0` on the switch (switch port named
/// after the member). Requests from the test run in the switch namespace and go to the first
/// member that answers. Dropping it kills every member by PID and deletes the namespaces.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    switch_ns: String,
}

/// Connect options of the harness's clients: short timeouts, so a dead member is skipped fast.
fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(ATTEMPT_TIMEOUT)
}

/// The full etcd key of `rel` (under the daemon's `/debvisor/` prefix).
fn full_key(rel: &str) -> String {
    format!("{KEY_PREFIX}{rel}")
}

impl EtcdCluster {
    /// Create `count` members plugged into `switch`, start them together and wait until the
    /// cluster has a leader that every member sees. `token` is the `--initial-cluster-token`.
    pub fn start(switch: &Switch, count: usize, token: &str) -> Result<EtcdCluster> {
        if !(1..=MAX_MEMBERS).contains(&count) {
            return Err(HarnessError::State(format!(
                "an etcd cluster has 1 to {MAX_MEMBERS} members, not {count}"
            )));
        }
        let names: Vec<String> = (1..=count).map(|i| format!("e{i}")).collect();
        let addrs: Vec<Ipv4Addr> = (0..count).map(member_addr).collect();
        let initial = names
            .iter()
            .zip(&addrs)
            .map(|(n, a)| format!("{n}=http://{a}:{}", crate::etcd::MEMBER_PEER_PORT))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (name, addr) in names.iter().zip(&addrs) {
            let ns = NetNs::create(&format!("dvcl-{name}"))?;
            switch.attach(&ns, name, *addr)?;
            let proc = EtcdProcess::member(ns.name(), (*addr).into(), name, &initial, token)?;
            members.push(Member {
                name: name.clone(),
                addr: *addr,
                proc: Mutex::new(proc),
                cut: AtomicBool::new(false),
                ns,
            });
        }
        let cluster = EtcdCluster {
            members,
            switch_ns: switch.netns().name().to_owned(),
        };
        for m in &cluster.members {
            lock(&m.proc).spawn()?;
        }
        for m in &cluster.members {
            lock(&m.proc).wait_ready()?;
        }
        cluster.wait_leader(LEADER_TIMEOUT)?;
        Ok(cluster)
    }

    fn member(&self, i: usize) -> Result<&Member> {
        self.members.get(i).ok_or_else(|| {
            HarnessError::State(format!(
                "no etcd member {i} (the cluster has {})",
                self.members.len()
            ))
        })
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member (never: [`EtcdCluster::start`] refuses it).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Client URLs of every member (`http://192.0.2.201:2379`, …): the daemons' endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| endpoint_of(m.addr)).collect()
    }

    /// Name of member `i` (`e1` for 0).
    pub fn name(&self, i: usize) -> Result<&str> {
        Ok(&self.member(i)?.name)
    }

    /// Address of member `i`.
    pub fn addr(&self, i: usize) -> Result<Ipv4Addr> {
        Ok(self.member(i)?.addr)
    }

    /// The namespace of member `i`.
    pub fn netns(&self, i: usize) -> Result<&NetNs> {
        Ok(&self.member(i)?.ns)
    }

    /// PID of member `i`, `None` while it is killed.
    pub fn pid(&self, i: usize) -> Result<Option<u32>> {
        Ok(lock(&self.member(i)?.proc).pid())
    }

    /// PIDs of the running members.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| lock(&m.proc).pid())
            .collect()
    }

    /// Whether member `i` runs.
    pub fn is_running(&self, i: usize) -> Result<bool> {
        Ok(lock(&self.member(i)?.proc).is_running())
    }

    /// The last `n` lines of member `i`'s log.
    pub fn log_tail(&self, i: usize, n: usize) -> Result<String> {
        Ok(lock(&self.member(i)?.proc).log_tail(n))
    }

    /// SIGKILL member `i` (by PID) and reap it; returns the instant the signal was sent.
    pub fn kill_member(&self, i: usize) -> Result<Instant> {
        let m = self.member(i)?;
        let mut p = lock(&m.proc);
        let pid = p
            .pid()
            .ok_or_else(|| HarnessError::State(format!("etcd member {} is not running", m.name)))?;
        send_signal(pid, libc::SIGKILL)?;
        let at = Instant::now();
        p.kill()?;
        Ok(at)
    }

    /// Start member `i` again with its data dir (stopping it first if it runs), wait until it
    /// answers and the cluster has a leader every member sees. Returns the instant it was
    /// spawned.
    pub fn restart_member(&self, i: usize) -> Result<Instant> {
        let m = self.member(i)?;
        let at = {
            let mut p = lock(&m.proc);
            p.stop()?;
            p.spawn()?;
            let at = Instant::now();
            p.wait_ready()?;
            at
        };
        self.wait_leader(LEADER_TIMEOUT)?;
        Ok(at)
    }

    /// Take member `i`'s switch port down: it runs on, cut off from clients and peers.
    /// Returns the instant the port went down.
    pub fn cut_member(&self, i: usize) -> Result<Instant> {
        let m = self.member(i)?;
        super::switch::set_port_in(&self.switch_ns, &m.name, false)?;
        m.cut.store(true, Ordering::SeqCst);
        Ok(Instant::now())
    }

    /// Bring member `i`'s switch port up again; returns the instant.
    pub fn heal_member(&self, i: usize) -> Result<Instant> {
        let m = self.member(i)?;
        super::switch::set_port_in(&self.switch_ns, &m.name, true)?;
        m.cut.store(false, Ordering::SeqCst);
        Ok(Instant::now())
    }

    /// Endpoints worth asking: running members not cut off, in order.
    fn reachable(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| !m.cut.load(Ordering::SeqCst) && lock(&m.proc).is_running())
            .map(|m| endpoint_of(m.addr))
            .collect()
    }

    /// Run `f` with a client connected to one member, from the switch namespace: the members
    /// that run and are not cut are tried in order (each attempt bounded to 2 s) until one
    /// succeeds. The error of the last attempt is returned if none does.
    pub fn with_client<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: Fn(Client) -> Fut + Send + Sync,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let endpoints = self.reachable();
        let f = &f;
        block_on_in(Some(&self.switch_ns), || async move {
            let mut last = HarnessError::State("no etcd member is running".into());
            for ep in &endpoints {
                let attempt = async {
                    let c = Client::connect([ep.as_str()], Some(connect_options()))
                        .await
                        .etcd_ctx(|| format!("connecting to {ep}"))?;
                    f(c).await
                };
                match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(e)) => last = e,
                    Err(_) => {
                        last = HarnessError::State(format!(
                            "etcd {ep} did not answer within {ATTEMPT_TIMEOUT:?}"
                        ))
                    }
                }
            }
            Err(last)
        })
    }

    /// The value at `/debvisor/<rel>` read from member `i` alone (a linearizable read: the
    /// member must reach the leader), e.g. to check that a restarted member caught up.
    pub fn get_from(&self, i: usize, rel: &str) -> Result<Option<String>> {
        let ep = endpoint_of(self.member(i)?.addr);
        let k = full_key(rel);
        block_on_in(Some(&self.switch_ns), || async move {
            let read = async {
                let mut c = Client::connect([ep.as_str()], Some(connect_options()))
                    .await
                    .etcd_ctx(|| format!("connecting to {ep}"))?;
                let r = c
                    .get(k.clone(), None)
                    .await
                    .etcd_ctx(|| format!("get {k} from {ep}"))?;
                Ok(r.kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
            };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, read).await {
                Ok(r) => r,
                Err(_) => Err(HarnessError::State(format!(
                    "etcd {ep} did not answer within {ATTEMPT_TIMEOUT:?}"
                ))),
            }
        })
    }

    /// The value at `/debvisor/<rel>`, if present.
    pub fn get(&self, rel: &str) -> Result<Option<String>> {
        let k = full_key(rel);
        self.with_client(|mut c| {
            let k = k.clone();
            async move {
                let r = c
                    .get(k.clone(), None)
                    .await
                    .etcd_ctx(|| format!("get {k}"))?;
                Ok(r.kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
            }
        })
    }

    /// Keys and values under `/debvisor/<rel_prefix>`, keyed by the name relative to
    /// `/debvisor/`.
    pub fn get_prefix(&self, rel_prefix: &str) -> Result<BTreeMap<String, String>> {
        let p = full_key(rel_prefix);
        self.with_client(|mut c| {
            let p = p.clone();
            async move {
                let r = c
                    .get(p.clone(), Some(GetOptions::new().with_prefix()))
                    .await
                    .etcd_ctx(|| format!("get prefix {p}"))?;
                Ok(r.kvs()
                    .iter()
                    .map(|kv| {
                        let k = String::from_utf8_lossy(kv.key());
                        (
                            k.strip_prefix(KEY_PREFIX).unwrap_or(&k).to_owned(),
                            String::from_utf8_lossy(kv.value()).into_owned(),
                        )
                    })
                    .collect())
            }
        })
    }

    /// Put `value` at `/debvisor/<rel>`.
    pub fn put(&self, rel: &str, value: &str) -> Result<()> {
        let (k, v) = (full_key(rel), value.to_owned());
        self.with_client(|mut c| {
            let (k, v) = (k.clone(), v.clone());
            async move {
                c.put(k.clone(), v, None)
                    .await
                    .etcd_ctx(|| format!("put {k}"))?;
                Ok(())
            }
        })
    }

    /// Put every `(rel, value)` at `/debvisor/<rel>` in one transaction (as `debvisorctl`
    /// writes a request: a daemon never sees half of it).
    pub fn put_all(&self, pairs: &[(&str, &str)]) -> Result<()> {
        let ops: Vec<etcd_client::TxnOp> = pairs
            .iter()
            .map(|(k, v)| etcd_client::TxnOp::put(full_key(k), *v, None))
            .collect();
        self.with_client(|mut c| {
            let ops = ops.clone();
            async move {
                c.txn(etcd_client::Txn::new().and_then(ops))
                    .await
                    .etcd_ctx(|| "put transaction".to_owned())?;
                Ok(())
            }
        })
    }

    /// Delete every key under `/debvisor/<rel_prefix>`; returns how many were deleted.
    pub fn delete_prefix(&self, rel_prefix: &str) -> Result<i64> {
        let p = full_key(rel_prefix);
        self.with_client(|mut c| {
            let p = p.clone();
            async move {
                let r = c
                    .delete(p.clone(), Some(DeleteOptions::new().with_prefix()))
                    .await
                    .etcd_ctx(|| format!("delete prefix {p}"))?;
                Ok(r.deleted())
            }
        })
    }

    /// The name of the current leader as the first answering member sees it (`None`: that
    /// member knows no leader).
    pub fn leader(&self) -> Result<Option<String>> {
        self.with_client(|mut c| async move {
            let status = c.status().await.etcd_ctx(|| "status".to_owned())?;
            let leader = status.leader();
            if leader == 0 {
                return Ok(None);
            }
            let list = c
                .member_list()
                .await
                .etcd_ctx(|| "member list".to_owned())?;
            Ok(list
                .members()
                .iter()
                .find(|m| m.id() == leader)
                .map(|m| m.name().to_owned()))
        })
    }

    /// Index of the current leader (see [`EtcdCluster::leader`]).
    pub fn leader_index(&self) -> Result<Option<usize>> {
        Ok(self
            .leader()?
            .and_then(|name| self.members.iter().position(|m| m.name == name)))
    }

    /// Wait until every running member not cut off reports the same, non-zero leader; returns
    /// the leader's member id.
    pub fn wait_leader(&self, timeout: Duration) -> Result<u64> {
        wait_until("the etcd members to agree on a leader", timeout, || {
            let endpoints = self.reachable();
            let seen: Vec<Option<u64>> = block_on_in(Some(&self.switch_ns), || async {
                let mut seen = Vec::new();
                for ep in &endpoints {
                    let probe = async {
                        let mut c = Client::connect([ep.as_str()], Some(connect_options())).await?;
                        c.status().await
                    };
                    let leader = match tokio::time::timeout(ATTEMPT_TIMEOUT, probe).await {
                        Ok(Ok(s)) if s.leader() != 0 => Some(s.leader()),
                        _ => None,
                    };
                    seen.push(leader);
                }
                seen
            });
            match seen.first() {
                Some(Some(l)) if seen.iter().all(|s| *s == Some(*l)) => Some(*l),
                _ => None,
            }
        })
    }
}

/// Address of member `i` (0-based): `.201`, `.202`, ….
pub(crate) fn member_addr(i: usize) -> Ipv4Addr {
    let [a, b, c, d] = ETCD_HOST_BASE.octets();
    Ipv4Addr::new(a, b, c, d + i as u8)
}

/// Client URL of the member at `addr`.
fn endpoint_of(addr: Ipv4Addr) -> String {
    format!("http://{addr}:{MEMBER_CLIENT_PORT}")
}
