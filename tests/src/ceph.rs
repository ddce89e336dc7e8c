//! A real one-host Ceph cluster for tests: one mon, one mgr and memstore OSDs on 127.0.0.1,
//! with cephx, everything (config, keyrings, data, logs, admin sockets) in one temp directory.
//! [`CephCluster::start_in`] runs the same cluster inside a network namespace, bound to an
//! address there (e.g. the multi-node harness's switch, so every node namespace reaches it);
//! the harness's own `ceph`/`rbd` calls then run in that namespace too.
//!
//! The daemons run in the foreground as our children; dropping [`CephCluster`] SIGKILLs each
//! by PID and removes the directory, also when a test panics. [`sweep_stale`] removes what a
//! killed test run left behind.

mod sweep;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{file_tail, HarnessError, IoContext, Result};
use crate::ports::free_port;

pub use sweep::sweep_stale;

/// Prefix of the cluster temp directories: `debvisor-ceph-<test pid>-…` (the sweep reads the
/// owner PID from it).
pub(crate) const DIR_PREFIX: &str = "debvisor-ceph-";
/// The mon's and mgr's id.
const MON_ID: &str = "a";
const MGR_ID: &str = "x";
/// Size of one memstore OSD (memory is only used for what is written).
const OSD_BYTES: u64 = 1 << 30;
/// How long the cluster may take to become healthy (a generous deadline, not a speed claim).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Timeout of one helper command (`ceph`/`rbd`) run by the harness itself.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Log lines included in errors.
const LOG_TAIL: usize = 25;

/// Whether the Ceph binaries the harness needs are installed (`scripts/deps.sh` installs them).
pub fn ceph_installed() -> bool {
    [
        "ceph-mon",
        "ceph-mgr",
        "ceph-osd",
        "ceph",
        "rbd",
        "monmaptool",
        "ceph-authtool",
    ]
    .iter()
    .all(|b| Path::new("/usr/bin").join(b).exists())
}

/// Write `<dir>/<name>`: `len` pseudo-random bytes (xorshift; no two seeds alike), data to
/// import into an image whose export must then match byte for byte.
pub fn data_file(dir: &Path, name: &str, len: usize, seed: u64) -> Result<PathBuf> {
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, bytes).ctx(|| format!("writing test data {}", path.display()))?;
    Ok(path)
}

/// One daemon we spawned.
#[derive(Debug)]
struct Daemon {
    /// `mon.a`, `mgr.x`, `osd.0`, …
    name: String,
    child: Child,
}

/// A running one-host Ceph cluster (see the module docs).
#[derive(Debug)]
pub struct CephCluster {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    fsid: String,
    /// The address every daemon binds to (`public_addr`, the mon's address).
    addr: IpAddr,
    /// The network namespace the daemons and the harness's tools run in (`None`: this one).
    netns: Option<String>,
    mon_port: u16,
    osds: usize,
    daemons: Vec<Daemon>,
    started_in: Duration,
}

impl CephCluster {
    /// Start a cluster with two memstore OSDs and wait until it reports HEALTH_OK.
    pub fn start() -> Result<Self> {
        Self::start_with_osds(2)
    }

    /// Start a cluster with `osds` memstore OSDs (1–3) and wait until every OSD is up, the
    /// mgr is available and health is HEALTH_OK. On failure every daemon is killed and the
    /// error carries the tail of the log concerned.
    pub fn start_with_osds(osds: usize) -> Result<Self> {
        Self::launch(osds, IpAddr::V4(Ipv4Addr::LOCALHOST), None)
    }

    /// Start a cluster with `osds` memstore OSDs inside network namespace `netns` (by name,
    /// `/run/netns/<netns>`), every daemon bound to `addr`, which must be configured on an
    /// interface there; clients in other namespaces that route to `addr` reach it. The
    /// daemons, and every `ceph`/`rbd` call of the harness, run through `ip netns exec`
    /// (which execs: the PIDs held are the daemons'). Otherwise as
    /// [`CephCluster::start_with_osds`].
    pub fn start_in(netns: &str, addr: IpAddr, osds: usize) -> Result<Self> {
        Self::launch(osds, addr, Some(netns.to_owned()))
    }

    fn launch(osds: usize, addr: IpAddr, netns: Option<String>) -> Result<Self> {
        if !(1..=3).contains(&osds) {
            return Err(HarnessError::State(format!("{osds} OSDs: expected 1 to 3")));
        }
        sweep_stale();
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .ctx(|| "creating the Ceph temp dir".to_owned())?;
        let mut cluster = CephCluster {
            root: dir.path().to_path_buf(),
            dir: Some(dir),
            fsid: new_uuid()?,
            addr,
            netns,
            mon_port: free_port(),
            osds,
            daemons: Vec::new(),
            started_in: Duration::ZERO,
        };
        cluster.bootstrap()?;
        cluster.started_in = t0.elapsed();
        eprintln!(
            "debvisor-tests: ceph cluster up in {:.1?} (fsid={} mon={}:{} netns={} osds={osds} dir={})",
            cluster.started_in,
            cluster.fsid,
            cluster.addr,
            cluster.mon_port,
            cluster.netns.as_deref().unwrap_or("-"),
            cluster.root.display()
        );
        Ok(cluster)
    }

    /// Path of `ceph.conf` (pass as `--conf`/`-c`).
    pub fn conf_path(&self) -> PathBuf {
        self.root.join("ceph.conf")
    }

    /// Path of the `client.admin` keyring (kept outside the mon data dir).
    pub fn keyring_path(&self) -> PathBuf {
        self.root.join("admin.keyring")
    }

    /// The cephx key of the client (`client.admin`), read from its keyring: what a libvirt
    /// `ceph` secret holds.
    pub fn client_key(&self) -> Result<String> {
        let path = self.keyring_path();
        let text = std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "key").then(|| v.trim().to_owned())
            })
            .ok_or_else(|| HarnessError::State(format!("no `key` in {}", path.display())))
    }

    /// The client name without `client.` (`admin`).
    pub fn client(&self) -> &'static str {
        "admin"
    }

    /// The daemon's driver for this cluster as `client.admin`, with `timeout` per call.
    pub fn cli(&self, timeout: Duration) -> debvisor_daemon::ceph::CephCli {
        debvisor_daemon::ceph::CephCli::new(
            self.conf_path(),
            self.client(),
            Some(self.keyring_path()),
            timeout,
        )
    }

    /// The mon's (msgr2) port on [`CephCluster::addr`], for clients given the mon address
    /// directly.
    pub fn mon_port(&self) -> u16 {
        self.mon_port
    }

    /// The address the daemons are bound to (127.0.0.1 unless started with
    /// [`CephCluster::start_in`]): what a client's `mon_host` names.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The namespace the cluster runs in ([`CephCluster::start_in`]), `None` for this one.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// PIDs of the daemons it spawned (mon, mgr, OSDs), e.g. for a test checking that a
    /// teardown left none.
    pub fn pids(&self) -> Vec<u32> {
        self.daemons.iter().map(|d| d.child.id()).collect()
    }

    /// The cluster fsid.
    pub fn fsid(&self) -> &str {
        &self.fsid
    }

    /// How long [`CephCluster::start`] took (for the report; never asserted).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Resident memory of all daemons in bytes (for the report; never asserted).
    pub fn rss_bytes(&self) -> u64 {
        self.daemons
            .iter()
            .filter_map(|d| std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb * 1024)
            .sum()
    }

    /// The temp directory holding everything of this cluster.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// PID of the mon (e.g. to SIGSTOP it in a timeout test; see [`CephCluster::pause_mon`]).
    pub fn mon_pid(&self) -> Option<u32> {
        self.daemons
            .iter()
            .find(|d| d.name == format!("mon.{MON_ID}"))
            .map(|d| d.child.id())
    }

    /// Freeze the mon with SIGSTOP until the returned guard is dropped (SIGCONT), so clients
    /// hang as against an unreachable mon.
    pub fn pause_mon(&self) -> Result<MonPause> {
        let pid = self
            .mon_pid()
            .ok_or_else(|| HarnessError::State("the mon is not running".into()))?;
        // SAFETY: kill(2) of the mon process this cluster spawned.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) } != 0 {
            return Err(HarnessError::Io {
                context: format!("SIGSTOP mon pid {pid}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(MonPause { pid })
    }

    /// Run `ceph <args>` as `client.admin` and return its stdout; a non-zero exit becomes
    /// [`HarnessError::Command`] with stderr.
    pub fn ceph(&self, args: &[&str]) -> Result<String> {
        self.tool("ceph", args)
    }

    /// Create the RBD pool `pool` (8 placement groups, the `rbd` application enabled): the
    /// first step of every test that needs images.
    pub fn rbd_pool(&self, pool: &str) -> Result<()> {
        self.ceph(&["osd", "pool", "create", pool, "8"])?;
        self.ceph(&["osd", "pool", "application", "enable", pool, "rbd"])?;
        Ok(())
    }

    /// Run `rbd <args>` as `client.admin` and return its stdout (see [`CephCluster::ceph`]).
    pub fn rbd(&self, args: &[&str]) -> Result<String> {
        self.tool("rbd", args)
    }

    /// Run `rados <args>` as `client.admin` and return its stdout (see [`CephCluster::ceph`]):
    /// object-level access, e.g. to damage an image's header on purpose.
    pub fn rados(&self, args: &[&str]) -> Result<String> {
        self.tool("rados", args)
    }

    /// Make the header of image `image_id` in `pool` undecodable (its `size` omap value
    /// replaced; librbd then fails to open the image with EIO), keeping the value in
    /// `<cluster dir>/<image_id>.size`: a volume the collection cannot read. Repaired by
    /// [`HeaderDamage::repair`], or when the guard drops (a failing test leaves no broken image).
    pub fn damage_header(&self, pool: &str, image_id: &str) -> Result<HeaderDamage<'_>> {
        let header = format!("rbd_header.{image_id}");
        let saved = self.dir().join(format!("{image_id}.size"));
        let path = saved.to_string_lossy().into_owned();
        self.rados(&["--pool", pool, "getomapval", &header, "size", &path])?;
        self.rados(&["--pool", pool, "setomapval", &header, "size", "x"])?;
        Ok(HeaderDamage {
            cluster: self,
            pool: pool.to_string(),
            header,
            saved: path,
            repaired: false,
        })
    }

    /// The whole content of image `spec` (`<pool>/<image>[@snap]`), exported with
    /// `rbd export` to `<cluster dir>/<name>` (replaced if present): what tests compare to
    /// see data written, rolled back or cloned.
    pub fn export(&self, spec: &str, name: &str) -> Result<Vec<u8>> {
        let path = self.root.join(name);
        let _ = std::fs::remove_file(&path);
        self.rbd(&["export", "--no-progress", spec, &path.to_string_lossy()])?;
        std::fs::read(&path).ctx(|| format!("reading the export {}", path.display()))
    }

    /// Overwrite the first `total` (`rbd` size syntax, e.g. `4M`) of image `spec` with
    /// sequential 64 KiB writes (`rbd bench`): other data than the image held, to see a
    /// rollback or a clone by its export.
    pub fn overwrite(&self, spec: &str, total: &str) -> Result<()> {
        self.rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "65536",
            "--io-total",
            total,
            "--io-pattern",
            "seq",
            spec,
        ])?;
        Ok(())
    }

    /// `ceph <args> --format json`, parsed.
    pub fn ceph_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        let out = self.ceph(&a)?;
        serde_json::from_str(&out).map_err(|e| HarnessError::State(format!("ceph {args:?}: {e}")))
    }

    fn tool(&self, tool: &str, args: &[&str]) -> Result<String> {
        let conf = self.conf_path();
        let keyring = self.keyring_path();
        let mut cmd = self.command(tool);
        cmd.arg("--conf")
            .arg(&conf)
            .arg("--id")
            .arg(self.client())
            .arg("--keyring")
            .arg(&keyring)
            .args(args);
        run(cmd, CMD_TIMEOUT)
    }

    /// A command running `program` where the cluster lives: in its namespace through
    /// `ip netns exec` (arguments as a vector, no shell), or directly.
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn bootstrap(&mut self) -> Result<()> {
        for d in ["run", "log", "crash", "mon", "mgr", "osd", "tmp"] {
            std::fs::create_dir_all(self.path(d)).ctx(|| format!("creating {d}/"))?;
        }
        std::fs::write(self.conf_path(), self.conf_text()).ctx(|| "writing ceph.conf".into())?;
        let conf = self.conf_path();
        let authtool = |args: &[&str]| -> Result<()> {
            let mut c = Command::new("ceph-authtool");
            c.args(args);
            run(c, CMD_TIMEOUT).map(drop)
        };
        let mon_seed = self.path("tmp/mon.keyring");
        let admin = self.keyring_path();
        let mgr_dir = self.path(&format!("mgr/ceph-{MGR_ID}"));
        std::fs::create_dir_all(&mgr_dir).ctx(|| "creating the mgr data dir".into())?;
        let mgr_keyring = mgr_dir.join("keyring");
        let s = |p: &Path| p.to_string_lossy().into_owned();
        authtool(&[
            "--create-keyring",
            &s(&mon_seed),
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        ])?;
        authtool(&[
            "--create-keyring",
            &s(&admin),
            "--gen-key",
            "-n",
            "client.admin",
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
            "--cap",
            "mds",
            "allow *",
        ])?;
        authtool(&[
            "--create-keyring",
            &s(&mgr_keyring),
            "--gen-key",
            "-n",
            &format!("mgr.{MGR_ID}"),
            "--cap",
            "mon",
            "allow profile mgr",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mds",
            "allow *",
        ])?;
        authtool(&[&s(&mon_seed), "--import-keyring", &s(&admin)])?;
        authtool(&[&s(&mon_seed), "--import-keyring", &s(&mgr_keyring)])?;
        let monmap = self.path("tmp/monmap");
        let mut c = Command::new("monmaptool");
        c.args(["--create", "--addv", MON_ID])
            .arg(format!("[v2:{}]", self.mon_addr()))
            .args(["--fsid", &self.fsid])
            .arg(&monmap);
        run(c, CMD_TIMEOUT)?;
        let mut c = self.command("ceph-mon");
        c.arg("-c")
            .arg(&conf)
            .args(["--mkfs", "-i", MON_ID, "--monmap"])
            .arg(&monmap)
            .arg("--keyring")
            .arg(&mon_seed);
        run(c, CMD_TIMEOUT)?;

        self.spawn("ceph-mon", MON_ID)?;
        self.spawn("ceph-mgr", MGR_ID)?;
        self.wait_for("the mon to answer", |c| {
            c.ceph(&["mon", "stat"]).ok().map(drop)
        })?;

        // OSDs: ids and keys from the mon, then mkfs in parallel, then start.
        let mut mkfs = Vec::new();
        for _ in 0..self.osds {
            let uuid = new_uuid()?;
            let key = {
                let mut c = Command::new("ceph-authtool");
                c.arg("--gen-print-key");
                run(c, CMD_TIMEOUT)?.trim().to_owned()
            };
            let secret = self.path(&format!("tmp/osd-{uuid}.json"));
            std::fs::write(&secret, format!("{{\"cephx_secret\": \"{key}\"}}"))
                .ctx(|| "writing an OSD secret".into())?;
            let id = self
                .ceph(&["osd", "new", &uuid, "-i", &s(&secret)])?
                .trim()
                .to_owned();
            id.parse::<u32>()
                .map_err(|_| HarnessError::State(format!("`ceph osd new` printed {id:?}")))?;
            let data = self.path(&format!("osd/ceph-{id}"));
            std::fs::create_dir_all(&data).ctx(|| format!("creating osd/ceph-{id}"))?;
            authtool(&[
                "--create-keyring",
                &s(&data.join("keyring")),
                "--name",
                &format!("osd.{id}"),
                "--add-key",
                &key,
            ])?;
            let mut c = self.command("ceph-osd");
            c.arg("-c")
                .arg(&conf)
                .args(["-i", &id, "--mkfs", "--osd-uuid", &uuid]);
            mkfs.push((
                id,
                spawn_quiet(c, &self.path(&format!("log/osd.{uuid}.mkfs")))?,
            ));
        }
        let mut ids = Vec::new();
        for (id, child) in mkfs {
            wait_child(child, &format!("ceph-osd --mkfs osd.{id}"), CMD_TIMEOUT)?;
            ids.push(id);
        }
        for id in &ids {
            self.spawn("ceph-osd", id)?;
        }
        let want = self.osds as u64;
        self.wait_for("every OSD up and in, the mgr available", |c| {
            let s = c.ceph_json(&["status"]).ok()?;
            let osd = &s["osdmap"];
            let up = osd["num_up_osds"].as_u64()? == want && osd["num_in_osds"].as_u64()? == want;
            (up && s["mgrmap"]["available"].as_bool()?).then_some(())
        })?;
        self.wait_for("HEALTH_OK", |c| {
            let h = c.ceph_json(&["health"]).ok()?;
            (h["status"].as_str()? == "HEALTH_OK").then_some(())
        })
    }

    /// `ip:port` of the mon (IPv6 in brackets).
    fn mon_addr(&self) -> String {
        std::net::SocketAddr::new(self.addr, self.mon_port).to_string()
    }

    fn conf_text(&self) -> String {
        let d = self.root.display();
        format!(
            "[global]
fsid = {fsid}
mon_host = v2:{mon}
ms_bind_msgr1 = false
public_addr = {addr}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {d}/admin.keyring
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
crash_dir = {d}/crash
mon_data = {d}/mon/$cluster-$id
mgr_data = {d}/mgr/$cluster-$id
osd_data = {d}/osd/$cluster-$id
osd_objectstore = memstore
memstore_device_bytes = {osd_bytes}
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_delete = true
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
auth_allow_insecure_global_id_reclaim = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
[mon]
keyring = {d}/mon/$cluster-$id/keyring
[mgr]
keyring = {d}/mgr/$cluster-$id/keyring
[osd]
keyring = {d}/osd/$cluster-$id/keyring
[client]
# One socket per client process (Ceph's own default is per process too): concurrent rbd
# calls of one client sharing $name.asok abort (`rbd du` beside `rbd ls -l` did).
admin_socket = {d}/run/$name.$pid.$cctid.asok
",
            fsid = self.fsid,
            mon = self.mon_addr(),
            addr = self.addr,
            osd_bytes = OSD_BYTES,
        )
    }

    /// Spawn `<bin> -c ceph.conf -i <id> -f` with its stdout/stderr in `log/<name>.out`.
    fn spawn(&mut self, bin: &str, id: &str) -> Result<()> {
        let kind = bin.trim_start_matches("ceph-");
        let name = format!("{kind}.{id}");
        let mut c = self.command(bin);
        c.arg("-c").arg(self.conf_path()).args(["-i", id, "-f"]);
        let child = spawn_quiet(c, &self.path(&format!("log/{name}.out")))?;
        self.daemons.push(Daemon { name, child });
        Ok(())
    }

    /// Poll `probe` every 100 ms until it answers; fail if a daemon exits or on timeout.
    fn wait_for(&mut self, what: &str, mut probe: impl FnMut(&Self) -> Option<()>) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if probe(self).is_some() {
                return Ok(());
            }
            for d in &mut self.daemons {
                if let Ok(Some(status)) = d.child.try_wait() {
                    return Err(HarnessError::Exited {
                        what: format!("{what} ({} died)", d.name),
                        status: status.to_string(),
                        tail: file_tail(&self.root.join(format!("log/{}.log", d.name)), LOG_TAIL),
                    });
                }
            }
            if Instant::now() >= deadline {
                let detail = self
                    .ceph(&["health", "detail"])
                    .unwrap_or_else(|e| e.to_string());
                return Err(HarnessError::Timeout {
                    what: what.to_owned(),
                    timeout: READY_TIMEOUT,
                    tail: format!(
                        "{detail}\n--- mon log ---\n{}",
                        file_tail(&self.root.join(format!("log/mon.{MON_ID}.log")), LOG_TAIL)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill_all(&mut self) {
        for d in self.daemons.iter_mut().rev() {
            // SIGCONT first: a paused mon would otherwise linger as a stopped zombie-to-be.
            // SAFETY: kill(2) of a daemon this cluster spawned (still our unreaped child).
            unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGCONT) };
            let _ = d.child.kill();
        }
        for d in &mut self.daemons {
            let _ = d.child.wait();
        }
        self.daemons.clear();
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        self.kill_all();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("debvisor-tests: removing {}: {e}", path.display());
            }
        }
    }
}

/// The mon frozen by [`CephCluster::pause_mon`]; dropping it resumes the mon.
#[derive(Debug)]
pub struct MonPause {
    pid: u32,
}

impl Drop for MonPause {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the mon this guard paused.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGCONT) };
    }
}

/// A random UUID from the kernel.
fn new_uuid() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .ctx(|| "reading a random UUID".into())?
        .trim()
        .to_owned())
}

/// Spawn `cmd` with stdin closed and stdout+stderr appended to `log`.
fn spawn_quiet(mut cmd: Command, log: &Path) -> Result<Child> {
    let out = File::create(log).ctx(|| format!("creating {}", log.display()))?;
    let err = out
        .try_clone()
        .ctx(|| format!("duplicating {}", log.display()))?;
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .ctx(|| format!("spawning {what}"))
}

/// Wait for `child` to exit successfully within `timeout` (killing it otherwise).
fn wait_child(mut child: Child, what: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().ctx(|| format!("waiting for {what}"))? {
            if status.success() {
                return Ok(());
            }
            return Err(HarnessError::Command {
                command: what.to_owned(),
                status: status.to_string(),
                stderr: String::new(),
            });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::Timeout {
                what: what.to_owned(),
                timeout,
                tail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `cmd` to completion within `timeout`; stdout on success, [`HarnessError::Command`]
/// with stderr otherwise.
fn run(mut cmd: Command, timeout: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("spawning {what}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(r) => r.ctx(|| format!("running {what}"))?,
        Err(_) => {
            // SAFETY: kill(2) of the child spawned above (not yet reaped: its waiter is stuck).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return Err(HarnessError::Timeout {
                what,
                timeout,
                tail: String::new(),
            });
        }
    };
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An image header damaged on purpose by [`CephCluster::damage_header`]; put back as it was
/// by [`HeaderDamage::repair`] or on drop.
pub struct HeaderDamage<'a> {
    cluster: &'a CephCluster,
    pool: String,
    header: String,
    saved: String,
    repaired: bool,
}

impl HeaderDamage<'_> {
    /// Write the saved `size` back: the image is readable again.
    pub fn repair(&mut self) -> Result<()> {
        self.cluster.rados(&[
            "--pool",
            &self.pool,
            "setomapval",
            &self.header,
            "size",
            "--input-file",
            &self.saved,
        ])?;
        self.repaired = true;
        Ok(())
    }
}

impl Drop for HeaderDamage<'_> {
    fn drop(&mut self) {
        if !self.repaired {
            if let Err(e) = self.repair() {
                eprintln!("[ceph] header {} not repaired: {e}", self.header);
            }
        }
    }
}
