//! [`CephCli`]: the [`Ceph`] driver over the `ceph` and `rbd` tools — argument vectors,
//! `--format json`, one timeout per call (the child is killed when it runs out), stderr kept
//! in the error. The read-only cluster queries (`status`, `health detail`, `df`, `osd tree`,
//! `osd df`, `osd metadata`, `osd pool ls detail`) go in-process over librados when it
//! loads ([`Rados`]: the same JSON, without a Python process per call), else to the
//! `ceph` tool.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::json;

use super::error::CephError;
use super::rados::Rados;
use super::types::{
    ClusterStatus, Df, Health, ImageInfo, ImageListEntry, ImageLock, ImageState, ImageUsage, OsdDf,
    OsdMetadata, OsdTree, PoolImages, PoolInfo, RawDu, RawStatus, Snapshot, Watcher,
};
use super::{check_image, check_lock, check_pool, check_snap, Ceph, ImageRef};
use crate::config::CephConfig;

/// The two tools.
#[derive(Debug, Clone, Copy)]
enum Tool {
    Ceph,
    Rbd,
}

impl Tool {
    fn bin(self) -> &'static str {
        match self {
            Tool::Ceph => "ceph",
            Tool::Rbd => "rbd",
        }
    }
}

/// Runs `ceph`/`rbd` as one client (`--conf`, `--id`, `--keyring`) with a per-call timeout;
/// the cluster queries over librados as the same client when the library loads.
#[derive(Debug, Clone)]
pub struct CephCli {
    conf: PathBuf,
    client: String,
    keyring: Option<PathBuf>,
    timeout: Duration,
    /// Log timeouts at debug: the caller reports them (once per outage, not per call).
    quiet_timeouts: bool,
    /// In-process mon/mgr commands (`None`: librados missing, or switched off).
    rados: Option<Arc<Rados>>,
    /// The per-pool listing over librbd (when `rados` has it); off: the `rbd` tool.
    librbd: bool,
}

impl CephCli {
    /// A driver for client `client` (without `client.`) of the cluster described by `conf`.
    pub fn new(
        conf: impl Into<PathBuf>,
        client: impl Into<String>,
        keyring: Option<PathBuf>,
        timeout: Duration,
    ) -> Self {
        let mut cli = CephCli {
            conf: conf.into(),
            client: client.into(),
            keyring,
            timeout,
            quiet_timeouts: false,
            rados: None,
            librbd: true,
        };
        cli.rados = cli.load_rados();
        cli
    }

    fn load_rados(&self) -> Option<Arc<Rados>> {
        Rados::load(
            &self.conf,
            &self.client,
            self.keyring.as_deref(),
            self.timeout,
        )
        .map(Arc::new)
    }

    /// The driver the `ceph:` config section describes.
    pub fn from_config(c: &CephConfig) -> Self {
        Self::new(
            c.conf.clone(),
            c.client.clone(),
            c.keyring.clone(),
            c.timeout,
        )
    }

    /// The same driver with another per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        if self.rados.is_some() {
            self.rados = self.load_rados();
        }
        self
    }

    /// The same driver running every cluster query with the `ceph` tool, never librados
    /// (what the benchmark compares against).
    pub fn without_librados(mut self) -> Self {
        self.rados = None;
        self
    }

    /// The same driver reading images with the `rbd` tool (pool listings, image states),
    /// the cluster queries still over librados (what the benchmark compares against).
    pub fn without_librbd(mut self) -> Self {
        self.librbd = false;
        self
    }

    /// Whether the cluster queries go over librados.
    pub fn uses_librados(&self) -> bool {
        self.rados.is_some()
    }

    /// Whether the per-pool listing of the state collection goes over librbd.
    pub fn uses_librbd(&self) -> bool {
        self.librbd && self.rados.as_ref().is_some_and(|r| r.has_rbd())
    }

    /// The same driver logging timeouts at debug, for a caller that reports them itself
    /// (the Ceph monitor warns once when Ceph stops answering, not every interval).
    pub fn with_quiet_timeouts(mut self) -> Self {
        self.quiet_timeouts = true;
        self
    }

    /// Run `tool args…`; stdout on success. `object` names what the call is
    /// about, for the error.
    async fn run(&self, tool: Tool, args: &[&str], object: &str) -> Result<String, CephError> {
        let command = format!("{} {}", tool.bin(), args.join(" "));
        let mut cmd = tokio::process::Command::new(tool.bin());
        cmd.arg("--conf")
            .arg(&self.conf)
            .arg("--id")
            .arg(&self.client);
        if let Some(k) = &self.keyring {
            cmd.arg("--keyring").arg(k);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let child = cmd.spawn().map_err(|source| CephError::Spawn {
            command: command.clone(),
            object: object.to_owned(),
            source,
        })?;
        // Dropping the future on timeout drops the child, which kill_on_drop SIGKILLs.
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(|source| CephError::Spawn {
                command: command.clone(),
                object: object.to_owned(),
                source,
            })?,
            Err(_) => {
                if self.quiet_timeouts {
                    tracing::debug!(command = %command, object, timeout = ?self.timeout, "ceph call timed out; killed");
                } else {
                    tracing::warn!(command = %command, object, timeout = ?self.timeout, "ceph call timed out; killed");
                }
                return Err(CephError::Timeout {
                    command,
                    object: object.to_owned(),
                    timeout: self.timeout,
                });
            }
        };
        tracing::debug!(command = %command, object, ms = started.elapsed().as_millis() as u64, ok = out.status.success(), "ceph call");
        if !out.status.success() {
            return Err(CephError::Failed {
                command,
                object: object.to_owned(),
                code: out.status.code(),
                stderr: clean_stderr(&out.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn json<T: DeserializeOwned>(
        &self,
        tool: Tool,
        args: &[&str],
        object: &str,
    ) -> Result<T, CephError> {
        let mut with_format = args.to_vec();
        with_format.extend(["--format", "json"]);
        let out = self.run(tool, &with_format, object).await?;
        serde_json::from_str(out.trim()).map_err(|e| CephError::Parse {
            command: format!("{} {}", tool.bin(), args.join(" ")),
            object: object.to_owned(),
            reason: e.to_string(),
        })
    }
}

impl CephCli {
    /// A read-only cluster query: `cmd` (the JSON command, `format` json added) over
    /// librados, or `ceph <args> --format json` without it; parsed the same either way.
    async fn query<T: DeserializeOwned>(
        &self,
        mut cmd: serde_json::Value,
        args: &[&str],
    ) -> Result<T, CephError> {
        let Some(rados) = &self.rados else {
            return self.json(Tool::Ceph, args, CLUSTER).await;
        };
        cmd["format"] = "json".into();
        let command = format!("ceph {}", args.join(" "));
        let out = match rados.command(cmd.to_string(), &command, CLUSTER).await {
            Ok(out) => out,
            Err(e) => {
                if e.is_timeout() && !self.quiet_timeouts {
                    tracing::warn!(command = %command, object = CLUSTER, timeout = ?self.timeout, "ceph call timed out");
                }
                return Err(e);
            }
        };
        serde_json::from_slice(&out).map_err(|e| CephError::Parse {
            command,
            object: CLUSTER.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// stderr without rbd's progress lines (`Removing snap: 10% complete...`), trimmed.
fn clean_stderr(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("% complete"))
        .collect::<Vec<_>>()
        .join("; ")
}

const CLUSTER: &str = "cluster";

/// Pools listed at the same time over librbd (one blocking thread each). Opening an image
/// costs ≈3 ms of CPU but waits on OSD round trips too: 10 pools of 10 images with 3
/// snapshots each took 600 ms 3 at a time and 430 ms 10 at a time on the 2-core bench host.
pub const POOLS_AT_ONCE_IN_PROCESS: usize = 8;

impl Ceph for CephCli {
    async fn status(&self) -> Result<ClusterStatus, CephError> {
        self.query(json!({"prefix": "status"}), &["status"]).await
    }

    async fn health(&self) -> Result<Health, CephError> {
        self.query(
            json!({"prefix": "health", "detail": "detail"}),
            &["health", "detail"],
        )
        .await
    }

    async fn df(&self) -> Result<Df, CephError> {
        self.query(json!({"prefix": "df"}), &["df"]).await
    }

    async fn osd_tree(&self) -> Result<OsdTree, CephError> {
        self.query(json!({"prefix": "osd tree"}), &["osd", "tree"])
            .await
    }

    async fn osd_df(&self) -> Result<OsdDf, CephError> {
        self.query(json!({"prefix": "osd df"}), &["osd", "df"])
            .await
    }

    async fn osd_metadata(&self) -> Result<Vec<OsdMetadata>, CephError> {
        self.query(json!({"prefix": "osd metadata"}), &["osd", "metadata"])
            .await
    }

    async fn osd_flag(&self, flag: &str, set: bool) -> Result<(), CephError> {
        const FLAGS: &[&str] = &["noout", "noin", "nodown", "noup", "norebalance", "noscrub"];
        if !FLAGS.contains(&flag) {
            return Err(CephError::InvalidName {
                what: "OSD flag",
                name: flag.to_owned(),
                reason: format!("not one of {}", FLAGS.join("|")),
            });
        }
        let verb = if set { "set" } else { "unset" };
        self.run(Tool::Ceph, &["osd", verb, flag], CLUSTER)
            .await
            .map(drop)
    }

    async fn blocklist_add(&self, address: &str) -> Result<(), CephError> {
        if super::types::address_ip(address).is_none() || address.starts_with('-') {
            return Err(CephError::InvalidName {
                what: "client address",
                name: address.to_owned(),
                reason: "not ip:port/nonce".into(),
            });
        }
        self.run(
            Tool::Ceph,
            &["osd", "blocklist", "add", address],
            &format!("client {address}"),
        )
        .await
        .map(drop)
    }

    async fn pool_list(&self) -> Result<Vec<PoolInfo>, CephError> {
        self.query(
            json!({"prefix": "osd pool ls", "detail": "detail"}),
            &["osd", "pool", "ls", "detail"],
        )
        .await
    }

    async fn pool_create(&self, pool: &str, pg_num: u32, size: u32) -> Result<(), CephError> {
        check_pool(pool)?;
        let object = format!("pool {pool}");
        let pg = pg_num.to_string();
        self.run(
            Tool::Ceph,
            &["osd", "pool", "create", pool, &pg, &pg, "replicated"],
            &object,
        )
        .await?;
        self.pool_set_size(pool, size).await?;
        self.run(
            Tool::Ceph,
            &["osd", "pool", "application", "enable", pool, "rbd"],
            &object,
        )
        .await
        .map(drop)
    }

    async fn pool_set_size(&self, pool: &str, size: u32) -> Result<(), CephError> {
        check_pool(pool)?;
        let s = size.to_string();
        self.run(
            Tool::Ceph,
            &[
                "osd",
                "pool",
                "set",
                pool,
                "size",
                &s,
                "--yes-i-really-mean-it",
            ],
            &format!("pool {pool}"),
        )
        .await
        .map(drop)
    }

    async fn pool_delete(&self, pool: &str) -> Result<(), CephError> {
        check_pool(pool)?;
        self.run(
            Tool::Ceph,
            &[
                "osd",
                "pool",
                "rm",
                pool,
                pool,
                "--yes-i-really-really-mean-it",
            ],
            &format!("pool {pool}"),
        )
        .await
        .map(drop)
    }

    async fn rbd_pool_init(&self, pool: &str) -> Result<(), CephError> {
        check_pool(pool)?;
        self.run(Tool::Rbd, &["pool", "init", pool], &format!("pool {pool}"))
            .await
            .map(drop)
    }

    async fn rbd_list(&self, pool: &str) -> Result<Vec<String>, CephError> {
        check_pool(pool)?;
        self.json(Tool::Rbd, &["ls", "--pool", pool], &format!("pool {pool}"))
            .await
    }

    async fn rbd_list_long(&self, pool: &str) -> Result<Vec<ImageListEntry>, CephError> {
        check_pool(pool)?;
        self.json(
            Tool::Rbd,
            &["ls", "-l", "--pool", pool],
            &format!("pool {pool}"),
        )
        .await
    }

    async fn rbd_info(&self, image: &ImageRef) -> Result<ImageInfo, CephError> {
        check_image(image)?;
        let spec = image.spec();
        self.json(Tool::Rbd, &["info", &spec], &format!("image {spec}"))
            .await
    }

    async fn rbd_du(&self, pool: &str) -> Result<Vec<ImageUsage>, CephError> {
        check_pool(pool)?;
        let du: RawDu = self
            .json(Tool::Rbd, &["du", "--pool", pool], &format!("pool {pool}"))
            .await?;
        Ok(du.images)
    }

    async fn rbd_pool_images(&self, pool: &str) -> Result<PoolImages, CephError> {
        check_pool(pool)?;
        if let Some(r) = self.rados.as_ref().filter(|_| self.uses_librbd()) {
            return r
                .pool_images(
                    pool,
                    &format!("rbd ls -l + rbd du --pool {pool} (librbd)"),
                    &format!("pool {pool}"),
                )
                .await;
        }
        let (rows, du) = futures::join!(self.rbd_list_long(pool), self.rbd_du(pool));
        let du = match du {
            // Ceph 16.2's `rbd du` now and then aborts (a mutex assertion, killed by SIGABRT):
            // once more before the whole call counts as failed.
            Err(CephError::Failed { code: None, .. }) => self.rbd_du(pool).await,
            r => r,
        };
        // The tools give no per-image verdict: a broken image fails the call (or is left
        // out by `rbd`).
        Ok(PoolImages {
            rows: rows?,
            usage: du?,
            unreadable: Vec::new(),
        })
    }

    fn pools_at_once(&self) -> usize {
        if self.uses_librbd() {
            POOLS_AT_ONCE_IN_PROCESS
        } else {
            super::POOLS_AT_ONCE
        }
    }

    async fn rbd_create(&self, image: &ImageRef, size_bytes: u64) -> Result<(), CephError> {
        check_image(image)?;
        let spec = image.spec();
        let size = format!("{size_bytes}B");
        self.run(
            Tool::Rbd,
            &["create", &spec, "--size", &size],
            &format!("image {spec}"),
        )
        .await
        .map(drop)
    }

    async fn rbd_resize(
        &self,
        image: &ImageRef,
        size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<(), CephError> {
        check_image(image)?;
        let spec = image.spec();
        let size = format!("{size_bytes}B");
        let mut args = vec!["resize", spec.as_str(), "--size", &size, "--no-progress"];
        if allow_shrink {
            args.push("--allow-shrink");
        }
        self.run(Tool::Rbd, &args, &format!("image {spec}"))
            .await
            .map(drop)
    }

    async fn rbd_remove(&self, image: &ImageRef) -> Result<(), CephError> {
        check_image(image)?;
        let spec = image.spec();
        self.run(
            Tool::Rbd,
            &["rm", &spec, "--no-progress"],
            &format!("image {spec}"),
        )
        .await
        .map(drop)
    }

    async fn rbd_clone(
        &self,
        source: &ImageRef,
        snap: &str,
        target: &ImageRef,
    ) -> Result<(), CephError> {
        check_image(source)?;
        check_snap(snap)?;
        check_image(target)?;
        let from = format!("{}@{snap}", source.spec());
        let to = target.spec();
        self.run(
            Tool::Rbd,
            &["clone", &from, &to],
            &format!("image {to} (from {from})"),
        )
        .await
        .map(drop)
    }

    async fn rbd_image_state(&self, image: &ImageRef) -> Result<Option<ImageState>, CephError> {
        check_image(image)?;
        let spec = image.spec();
        if let Some(r) = self.rados.as_ref().filter(|_| self.uses_librbd()) {
            return r
                .image_state(
                    &image.pool,
                    &image.image,
                    &format!("rbd info + rbd snap ls {spec} (librbd)"),
                    &format!("image {spec}"),
                )
                .await;
        }
        let info = match self.rbd_info(image).await {
            Ok(i) => i,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let snapshots = self
            .rbd_snap_list(image)
            .await?
            .into_iter()
            .map(|s| (s.name, s.protected))
            .collect();
        Ok(Some(ImageState {
            size: info.size,
            snapshots,
        }))
    }

    async fn rbd_snap_list(&self, image: &ImageRef) -> Result<Vec<Snapshot>, CephError> {
        check_image(image)?;
        let spec = image.spec();
        self.json(Tool::Rbd, &["snap", "ls", &spec], &format!("image {spec}"))
            .await
    }

    async fn rbd_snap_create(&self, image: &ImageRef, snap: &str) -> Result<(), CephError> {
        self.snap_op(image, snap, "create").await
    }

    async fn rbd_snap_rollback(&self, image: &ImageRef, snap: &str) -> Result<(), CephError> {
        self.snap_op(image, snap, "rollback").await
    }

    async fn rbd_snap_remove(&self, image: &ImageRef, snap: &str) -> Result<(), CephError> {
        self.snap_op(image, snap, "rm").await
    }

    async fn rbd_snap_protect(&self, image: &ImageRef, snap: &str) -> Result<(), CephError> {
        self.snap_op(image, snap, "protect").await
    }

    async fn rbd_snap_unprotect(&self, image: &ImageRef, snap: &str) -> Result<(), CephError> {
        self.snap_op(image, snap, "unprotect").await
    }

    async fn rbd_snap_purge(&self, image: &ImageRef) -> Result<(), CephError> {
        check_image(image)?;
        let spec = image.spec();
        self.run(
            Tool::Rbd,
            &["snap", "purge", &spec, "--no-progress"],
            &format!("image {spec}"),
        )
        .await
        .map(drop)
    }

    async fn rbd_lock_list(&self, image: &ImageRef) -> Result<Vec<ImageLock>, CephError> {
        check_image(image)?;
        let spec = image.spec();
        self.json(Tool::Rbd, &["lock", "ls", &spec], &format!("image {spec}"))
            .await
    }

    async fn rbd_lock_remove(&self, image: &ImageRef, lock: &ImageLock) -> Result<(), CephError> {
        check_image(image)?;
        check_lock(lock)?;
        let spec = image.spec();
        self.run(
            Tool::Rbd,
            &["lock", "rm", &spec, &lock.id, &lock.locker],
            &format!("image {spec}"),
        )
        .await
        .map(drop)
    }

    async fn rbd_watchers(&self, image: &ImageRef) -> Result<Vec<Watcher>, CephError> {
        check_image(image)?;
        let spec = image.spec();
        let st: RawStatus = self
            .json(Tool::Rbd, &["status", &spec], &format!("image {spec}"))
            .await?;
        Ok(st.watchers)
    }
}

impl CephCli {
    async fn snap_op(&self, image: &ImageRef, snap: &str, verb: &str) -> Result<(), CephError> {
        check_image(image)?;
        check_snap(snap)?;
        let at = format!("{}@{snap}", image.spec());
        let mut args = vec!["snap", verb, at.as_str()];
        if matches!(verb, "rm" | "rollback") {
            args.push("--no-progress");
        }
        self.run(Tool::Rbd, &args, &format!("snapshot {at}"))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_are_dropped_from_stderr() {
        let raw = b"Removing snap: 0% complete...failed.\nrbd: failed to remove snapshot: (30) Read-only file system\n";
        assert_eq!(
            clean_stderr(raw),
            "rbd: failed to remove snapshot: (30) Read-only file system"
        );
    }

    #[tokio::test]
    async fn bad_names_never_reach_a_command() {
        // A conf path that does not exist: any command would fail differently.
        let cli = CephCli::new(
            "/nonexistent/ceph.conf",
            "admin",
            None,
            Duration::from_secs(1),
        );
        let e = cli
            .rbd_create(&ImageRef::new("rbd", "../x"), 1)
            .await
            .expect_err("refused");
        assert!(
            matches!(e, CephError::InvalidName { what: "image", .. }),
            "{e}"
        );
        let e = cli.pool_delete("-rf").await.expect_err("refused");
        assert!(
            matches!(e, CephError::InvalidName { what: "pool", .. }),
            "{e}"
        );
        let e = cli
            .rbd_snap_create(&ImageRef::new("rbd", "vm1"), "a@b")
            .await
            .expect_err("refused");
        assert!(
            matches!(
                e,
                CephError::InvalidName {
                    what: "snapshot",
                    ..
                }
            ),
            "{e}"
        );
        let e = cli.blocklist_add("--all").await.expect_err("refused");
        assert!(matches!(e, CephError::InvalidName { .. }), "{e}");
        let e = cli.osd_flag("pause", true).await.expect_err("refused");
        assert!(matches!(e, CephError::InvalidName { .. }), "{e}");
    }
}
