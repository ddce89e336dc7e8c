//! A private etcd 3.4 process on loopback ports in a temp directory.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use debvisor_objects::{Store, StoreOptions};
use etcd_client::{Client, CompactionOptions, ConnectOptions};

use crate::error::{file_tail, EtcdContext, HarnessError, IoContext, Result};
use crate::ports::free_port;
use crate::tls::CertSet;

/// Path of the etcd binary.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long [`EtcdProcess::launch`] waits for etcd to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval of the readiness probe.
const READY_POLL: Duration = Duration::from_millis(50);
/// Log lines included in start errors.
const LOG_TAIL: usize = 30;
/// Client port of a cluster member ([`EtcdProcess::member`]), in its own namespace.
pub const MEMBER_CLIENT_PORT: u16 = 2379;
/// Peer port of a cluster member ([`EtcdProcess::member`]), in its own namespace.
pub const MEMBER_PEER_PORT: u16 = 2380;

/// A private etcd on `127.0.0.1`, with its data in a temp directory: a single-member
/// cluster, or one member of a multi-member cluster ([`EtcdProcess::member`]).
///
/// Dropping it SIGKILLs the process (by PID), reaps it and removes the temp directory.
#[derive(Debug)]
pub struct EtcdProcess {
    dir: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    log_path: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<CertSet>,
    child: Option<Child>,
    /// Network namespace etcd runs in (`None`: the test's own).
    netns: Option<String>,
    /// Address etcd listens on inside its namespace.
    host: std::net::IpAddr,
    /// Member name (`--name`); `t` for a single-member etcd.
    name: String,
    /// `--initial-cluster` and `--initial-cluster-token` of a member of a multi-member
    /// cluster; `None`: a cluster of this member alone.
    cluster: Option<(String, String)>,
}

/// Run a future to completion on a fresh current-thread runtime in a scoped thread, so this
/// works from plain and async callers alike (never nests runtimes); with `netns`, the thread
/// first moves into that network namespace (`/run/netns/<netns>`), so every socket the
/// future opens lives there.
pub fn block_on_in<T, F, Fut>(netns: Option<&str>, make: F) -> T
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = T>,
{
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            if let Some(ns) = netns {
                crate::netns::enter_thread(ns).expect("entering the network namespace");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a current-thread tokio runtime");
            rt.block_on(make())
        });
        match handle.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Options of a daemon-side store on the plain etcd at `endpoint` (no TLS, no auth, prefix
/// `/debvisor`), with `timeout` to connect and per request: tests and the bench read and
/// write through the same code as the daemon and `debvisorctl`.
pub fn store_options(endpoint: impl Into<String>, timeout: Duration) -> StoreOptions {
    StoreOptions {
        endpoints: vec![endpoint.into()],
        prefix: "/debvisor".into(),
        ca: None,
        cert: None,
        key: None,
        server_name: None,
        user: None,
        password_file: None,
        connect_timeout: timeout,
        request_timeout: timeout,
    }
}

/// A daemon-side store on the plain etcd at `endpoint` (see [`store_options`]).
pub async fn store_for(endpoint: impl Into<String>, timeout: Duration) -> Result<Store> {
    let opts = store_options(endpoint, timeout);
    Store::connect(&opts)
        .await
        .map_err(|source| HarnessError::Store {
            context: format!("connecting a store to {:?}", opts.endpoints),
            source,
        })
}

impl EtcdProcess {
    /// Start a plain-HTTP etcd and wait until it answers a request.
    ///
    /// Retries with new ports (up to 3 attempts) if etcd reports "address already in use".
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// Start an etcd whose client URL is HTTPS with client-certificate authentication
    /// (`--client-cert-auth`, trusting `certs.ca`, serving `certs.server_cert`); the peer URL
    /// stays plain HTTP on loopback. [`EtcdProcess::client`] then uses `certs.client_tls()`.
    pub fn start_tls(certs: &CertSet) -> Result<Self> {
        Self::start_with(Some(certs.clone()))
    }

    fn start_with(tls: Option<CertSet>) -> Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut etcd = Self::prepare_with(tls.clone())?;
            match etcd.launch() {
                Ok(()) => return Ok(etcd),
                Err(HarnessError::EtcdStart { ref tail, .. })
                    if attempt < 3 && tail.contains("address already in use") =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Allocate the temp directory and ports of a plain-HTTP etcd without starting it; start
    /// it later with [`EtcdProcess::launch`]. [`EtcdProcess::endpoint`] is valid already.
    pub fn prepare() -> Result<Self> {
        Self::prepare_with(None)
    }

    /// Like [`EtcdProcess::prepare`] for a TLS etcd (see [`EtcdProcess::start_tls`]).
    pub fn prepare_tls(certs: &CertSet) -> Result<Self> {
        Self::prepare_with(Some(certs.clone()))
    }

    /// Start a plain-HTTP etcd inside network namespace `netns`, listening on `host` there
    /// (an address of that namespace, e.g. one on its bridge, so other namespaces can reach
    /// it). Use [`EtcdProcess::with_client`] to talk to it from the test.
    pub fn start_in(netns: &str, host: std::net::IpAddr) -> Result<Self> {
        let mut etcd = Self::prepare_with(None)?;
        etcd.netns = Some(netns.to_owned());
        etcd.host = host;
        etcd.launch()?;
        Ok(etcd)
    }

    /// Prepare (not start) member `name` of a multi-member cluster inside network namespace
    /// `netns`, listening on `host` with the standard ports (client 2379, peer 2380: each
    /// member has a namespace of its own, so they never collide). `initial_cluster` is the
    /// `--initial-cluster` list of every member (`e1=http://192.0.2.201:2380,…`) and `token`
    /// the `--initial-cluster-token` they share.
    ///
    /// Start the members with [`EtcdProcess::spawn`] (a member cannot answer before a quorum
    /// of its peers runs, so [`EtcdProcess::launch`] on the first one would wait in vain),
    /// then wait with [`EtcdProcess::wait_ready`]. Later [`EtcdProcess::launch`] and
    /// [`EtcdProcess::restart`] rejoin the cluster with the member's data dir.
    pub fn member(
        netns: &str,
        host: std::net::IpAddr,
        name: &str,
        initial_cluster: &str,
        token: &str,
    ) -> Result<Self> {
        let mut etcd = Self::prepare_with(None)?;
        etcd.netns = Some(netns.to_owned());
        etcd.host = host;
        etcd.client_port = MEMBER_CLIENT_PORT;
        etcd.peer_port = MEMBER_PEER_PORT;
        etcd.name = name.to_owned();
        etcd.cluster = Some((initial_cluster.to_owned(), token.to_owned()));
        Ok(etcd)
    }

    /// Start a `count`-member etcd cluster whose members all listen on `127.0.0.1` (each with
    /// its own free client and peer port, temp dir and log) and wait until every member
    /// answers: a real multi-member etcd (raft, replication to every member) for processes of
    /// this host's network, without namespaces — what the scale bench puts its daemons on.
    /// `token` is the `--initial-cluster-token`. Dropping the members kills them by PID.
    pub fn loopback_cluster(count: usize, token: &str) -> Result<Vec<EtcdProcess>> {
        let mut members: Vec<EtcdProcess> = (1..=count)
            .map(|i| {
                let mut m = Self::prepare_with(None)?;
                m.name = format!("e{i}");
                Ok(m)
            })
            .collect::<Result<_>>()?;
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.cluster = Some((initial.clone(), token.to_owned()));
        }
        for m in &mut members {
            m.spawn()?;
        }
        for m in &mut members {
            m.wait_ready()?;
        }
        Ok(members)
    }

    /// The member name (`--name`; `t` unless made by [`EtcdProcess::member`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The peer URL (`http://<host>:<peer port>`).
    pub fn peer_url(&self) -> String {
        format!("http://{}:{}", self.host, self.peer_port)
    }

    /// The network namespace etcd runs in, `None` for the test's own.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Run `f` with a client connected to this etcd, on a thread inside etcd's namespace.
    pub fn with_client<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(Client) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let endpoint = self.endpoint();
        let options = self.connect_options()?;
        block_on_in(self.netns.as_deref(), || async move {
            let c = Client::connect([endpoint.as_str()], options)
                .await
                .etcd_ctx(|| format!("connecting to {endpoint}"))?;
            f(c).await
        })
    }

    /// Put `value` at `/debvisor/<rel>` (playing an operator in tests).
    pub fn put_key(&self, rel: &str, value: &str) -> Result<()> {
        let (k, v) = (format!("/debvisor/{rel}"), value.to_owned());
        self.with_client(|mut c| async move {
            c.put(k.clone(), v, None)
                .await
                .etcd_ctx(|| format!("put {k}"))?;
            Ok(())
        })
    }

    /// Put several `/debvisor/<rel>` keys in one transaction (as `debvisorctl` writes a
    /// request: a daemon never sees half of it).
    pub fn put_keys(&self, pairs: &[(&str, &str)]) -> Result<()> {
        let ops: Vec<etcd_client::TxnOp> = pairs
            .iter()
            .map(|(k, v)| etcd_client::TxnOp::put(format!("/debvisor/{k}"), *v, None))
            .collect();
        self.with_client(|mut c| async move {
            c.txn(etcd_client::Txn::new().and_then(ops))
                .await
                .etcd_ctx(|| "put_keys transaction".to_owned())?;
            Ok(())
        })
    }

    /// The value at `/debvisor/<rel>`, if present.
    pub fn get_key(&self, rel: &str) -> Result<Option<String>> {
        self.get_kv(rel, |kv| String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// `mod_revision` of `/debvisor/<rel>`, if present (whether a key was rewritten).
    pub fn mod_revision(&self, rel: &str) -> Result<Option<i64>> {
        self.get_kv(rel, etcd_client::KeyValue::mod_revision)
    }

    /// `what` of the key-value at `/debvisor/<rel>`, if present.
    fn get_kv<T: Send>(
        &self,
        rel: &str,
        what: impl FnOnce(&etcd_client::KeyValue) -> T + Send,
    ) -> Result<Option<T>> {
        let k = format!("/debvisor/{rel}");
        self.with_client(|mut c| async move {
            let r = c
                .get(k.clone(), None)
                .await
                .etcd_ctx(|| format!("get {k}"))?;
            Ok(r.kvs().first().map(what))
        })
    }

    /// The full names of the keys under `/debvisor/<rel_prefix>` (keys only, sorted).
    pub fn keys_under(&self, rel_prefix: &str) -> Result<Vec<String>> {
        let p = format!("/debvisor/{rel_prefix}");
        self.with_client(|mut c| async move {
            let opts = etcd_client::GetOptions::new()
                .with_prefix()
                .with_keys_only();
            let r = c
                .get(p.clone(), Some(opts))
                .await
                .etcd_ctx(|| format!("get prefix {p}"))?;
            Ok(r.kvs()
                .iter()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .collect())
        })
    }

    /// Wait until `n` more keepalive ticks of `node` are in etcd (its `last_seen` key changed
    /// `n` times), each within `within`: the positive signal that a daemon went on working —
    /// ticked, resynced its objects — before a test asserts that something did not happen.
    ///
    /// # Panics
    /// When a tick does not come in time.
    pub fn wait_ticks(&self, node: &str, n: usize, within: Duration) {
        let key = format!("nodes/{node}/last_seen");
        for i in 0..n {
            let before = self.mod_revision(&key).ok().flatten();
            crate::eventually(&format!("keepalive tick {i} of {node}"), within, || {
                let now = self.mod_revision(&key).ok().flatten();
                (now.is_some() && now != before).then_some(())
            });
        }
    }

    /// Delete every key under `/debvisor/<rel_prefix>`.
    pub fn delete_prefix(&self, rel_prefix: &str) -> Result<()> {
        let p = format!("/debvisor/{rel_prefix}");
        self.with_client(|mut c| async move {
            c.delete(
                p.clone(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .etcd_ctx(|| format!("delete {p}"))?;
            Ok(())
        })
    }

    fn prepare_with(tls: Option<CertSet>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("debvisor-etcd-")
            .tempdir()
            .ctx(|| "creating the etcd temp dir".to_owned())?;
        Ok(EtcdProcess {
            data_dir: dir.path().join("data"),
            log_path: dir.path().join("etcd.log"),
            dir: Some(dir),
            client_port: free_port(),
            peer_port: free_port(),
            tls,
            child: None,
            netns: None,
            host: std::net::IpAddr::from([127, 0, 0, 1]),
            name: "t".to_owned(),
            cluster: None,
        })
    }

    /// Start the prepared (or stopped) etcd with its data dir and ports, and wait (polling a
    /// real request every 50 ms, up to 20 s) until it answers. On failure the process is
    /// killed and the error carries the tail of the etcd log.
    pub fn launch(&mut self) -> Result<()> {
        self.spawn()?;
        if let Err(e) = self.wait_ready() {
            self.kill_quietly();
            return Err(e);
        }
        Ok(())
    }

    /// Start the prepared (or stopped) etcd without waiting for it to answer (the members of
    /// a new multi-member cluster start together, then wait with
    /// [`EtcdProcess::wait_ready`]).
    pub fn spawn(&mut self) -> Result<()> {
        if self.is_running() {
            return Err(HarnessError::State("etcd is already running".into()));
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .ctx(|| format!("opening {}", self.log_path.display()))?;
        let log2 = log
            .try_clone()
            .ctx(|| format!("duplicating {}", self.log_path.display()))?;
        let client_url = self.endpoint();
        let peer_url = self.peer_url();
        let (initial_cluster, token) = match &self.cluster {
            Some((c, t)) => (c.clone(), Some(t.clone())),
            None => (format!("{}={peer_url}", self.name), None),
        };
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCD_BIN]);
                c
            }
            None => Command::new(ETCD_BIN),
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&initial_cluster)
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        if let Some(certs) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&certs.ca)
                .arg("--cert-file")
                .arg(&certs.server_cert)
                .arg("--key-file")
                .arg(&certs.server_key);
        }
        if let Some(token) = token {
            cmd.arg("--initial-cluster-token").arg(token);
        }
        let child = cmd.spawn().ctx(|| format!("spawning {ETCD_BIN}"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Poll until etcd answers a `get` (for a cluster member: until the cluster has a leader
    /// and this member reaches it), it exits, or 20 s pass. The error carries the tail of the
    /// etcd log; the process is left as it is.
    pub fn wait_ready(&mut self) -> Result<()> {
        let endpoint = self.endpoint();
        let options = self.connect_options()?;
        let log = self.log_path.clone();
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| HarnessError::State("etcd not spawned".into()))?;
        let start_err = |reason: String| HarnessError::EtcdStart {
            tail: file_tail(&log, LOG_TAIL),
            log: log.clone(),
            reason,
        };
        let netns = self.netns.clone();
        block_on_in(netns.as_deref(), || async move {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        return Err(start_err(format!("etcd exited early with {status}")))
                    }
                    Ok(None) => {}
                    Err(e) => return Err(start_err(format!("try_wait failed: {e}"))),
                }
                let opts = options
                    .clone()
                    .unwrap_or_default()
                    .with_connect_timeout(Duration::from_secs(1))
                    .with_timeout(Duration::from_secs(1));
                let probe = async {
                    let mut c = Client::connect([endpoint.as_str()], Some(opts)).await?;
                    c.get("health-probe", None).await
                };
                let last_err = match tokio::time::timeout(Duration::from_secs(2), probe).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => String::from("probe timed out"),
                };
                if Instant::now() >= deadline {
                    return Err(start_err(format!(
                        "no answer within {READY_TIMEOUT:?} (last probe error: {last_err})"
                    )));
                }
                tokio::time::sleep(READY_POLL).await;
            }
        })
    }

    /// Client endpoint URL: `http://127.0.0.1:PORT`, or `https://…` in TLS mode.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.client_port)
    }

    /// Client listen address (e.g. a [`crate::TcpProxy`] target).
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.client_port)
    }

    /// Peer port.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// PID of the running (or exited but unreaped) etcd, `None` before launch / after kill.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The etcd `--data-dir`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The log file receiving etcd's stdout and stderr (appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `n` lines of the etcd log.
    pub fn log_tail(&self, n: usize) -> String {
        file_tail(&self.log_path, n)
    }

    /// The certificates in TLS mode.
    pub fn certs(&self) -> Option<&CertSet> {
        self.tls.as_ref()
    }

    /// Connect options matching this etcd: `Some` with the client TLS config in TLS mode,
    /// `None` otherwise. Use with other endpoints leading to this etcd (e.g. a proxy).
    pub fn connect_options(&self) -> Result<Option<ConnectOptions>> {
        match &self.tls {
            Some(certs) => Ok(Some(ConnectOptions::new().with_tls(certs.client_tls()?))),
            None => Ok(None),
        }
    }

    /// A new client connected to [`EtcdProcess::endpoint`] (with the client certificate in TLS
    /// mode). Note that connecting is lazy: the first request is what fails on a dead etcd.
    pub async fn client(&self) -> Result<Client> {
        let endpoint = self.endpoint();
        Client::connect([endpoint.as_str()], self.connect_options()?)
            .await
            .etcd_ctx(|| format!("connecting to {endpoint}"))
    }

    /// The current store revision.
    pub async fn current_revision(&self) -> Result<i64> {
        let mut c = self.client().await?;
        let resp = c
            .get("health-probe", None)
            .await
            .etcd_ctx(|| "reading the current revision".to_owned())?;
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| HarnessError::State("get response without header".into()))
    }

    /// Compact the key-value history up to `revision` (physically, i.e. waiting until it is
    /// applied).
    pub async fn compact(&self, revision: i64) -> Result<()> {
        let mut c = self.client().await?;
        c.compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
            .etcd_ctx(|| format!("compacting to revision {revision}"))?;
        Ok(())
    }

    /// Freeze etcd with SIGSTOP until the returned guard is dropped (SIGCONT): its clients'
    /// connections stay open and their requests go unanswered, so whatever waits on the
    /// store is held there (rather than failing fast as with a killed etcd).
    pub fn pause(&self) -> Result<EtcdPause> {
        let pid = self
            .pid()
            .ok_or_else(|| HarnessError::State("etcd is not running: nothing to pause".into()))?;
        send_signal(pid, libc::SIGSTOP)?;
        Ok(EtcdPause { pid })
    }

    /// Whether the etcd process is alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL etcd by PID and reap it. A no-op if it is not running.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                send_signal(child.id(), libc::SIGKILL)?;
            }
            child.wait().ctx(|| "reaping etcd".to_owned())?;
        }
        Ok(())
    }

    /// SIGTERM etcd, wait up to 10 s for it to exit, then SIGKILL; reaps it. A no-op if it is
    /// not running.
    pub fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if matches!(child.try_wait(), Ok(None)) {
            send_signal(child.id(), libc::SIGTERM)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill()
    }

    /// Stop etcd, delete its data and start it again empty on the same ports, name and peer
    /// URL: the same cluster id, revisions from 1 (a wiped data dir).
    ///
    /// Single-member etcd only (a wiped member cannot rejoin its cluster this way).
    pub fn wipe(&mut self) -> Result<()> {
        self.single_member("wipe")?;
        self.stop()?;
        remove_dir(&self.data_dir)?;
        self.launch()
    }

    /// `etcdctl snapshot save` of the running etcd into `path`.
    pub fn snapshot_save(&self, path: &Path) -> Result<()> {
        let mut cmd = Command::new(ETCDCTL_BIN);
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .arg("snapshot")
            .arg("save")
            .arg(path);
        run_quiet(cmd, "etcdctl snapshot save")
    }

    /// Stop etcd and start it again from snapshot `path` (`etcdctl snapshot restore` into a
    /// fresh data dir with the same member name and peer URL): the store goes back to the
    /// snapshot, leases included.
    ///
    /// Single-member etcd only.
    pub fn restore(&mut self, path: &Path) -> Result<()> {
        self.single_member("restore")?;
        self.stop()?;
        remove_dir(&self.data_dir)?;
        let peer_url = self.peer_url();
        let mut cmd = Command::new(ETCDCTL_BIN);
        cmd.env("ETCDCTL_API", "3")
            .arg("snapshot")
            .arg("restore")
            .arg(path)
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", self.name))
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url);
        run_quiet(cmd, "etcdctl snapshot restore")?;
        self.launch()
    }

    /// Start etcd again with the same data dir and ports (stopping it first if it runs).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    /// Refuse `what` on a member of a multi-member cluster.
    fn single_member(&self, what: &str) -> Result<()> {
        match self.cluster {
            Some(_) => Err(HarnessError::State(format!(
                "{what} works on a single-member etcd only, not on member {}",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// Kill and reap without reporting errors (used on failure and drop paths).
    fn kill_quietly(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on the PID of our own unreaped child.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
            }
            if let Err(e) = child.wait() {
                eprintln!("debvisor-tests: reaping etcd {}: {e}", child.id());
            }
        }
    }
}

/// Path of the etcdctl binary.
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// Remove a directory tree if it exists.
fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HarnessError::Io {
            context: format!("removing {}", dir.display()),
            source: e,
        }),
    }
}

/// Run `cmd` to completion; an error carries its stderr.
fn run_quiet(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("running {what}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(HarnessError::State(format!(
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Send `sig` to `pid`.
pub(crate) fn send_signal(pid: u32, sig: i32) -> Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    if rc != 0 {
        return Err(HarnessError::Io {
            context: format!("kill({pid}, {sig})"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// An etcd frozen by [`EtcdProcess::pause`]; dropping it resumes etcd (SIGCONT).
#[derive(Debug)]
pub struct EtcdPause {
    pid: u32,
}

impl Drop for EtcdPause {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the etcd this guard froze (SIGCONT of a process already gone or
        // already running is harmless).
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGCONT) };
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill_quietly();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("debvisor-tests: removing {}: {e}", path.display());
            }
        }
    }
}
