//! Ceph access for the daemon: the [`Ceph`] driver trait (cluster health and usage, OSDs,
//! pools, RBD images, snapshots, locks, watchers), its implementation over the `ceph`/`rbd`
//! tools ([`CephCli`]), typed views of their JSON ([`types`]), and the helpers built on the
//! trait that the Ceph and Domain objects use (snapshot purge before removal, RBD lock
//! hygiene before a VM start).
//!
//! Every name is validated before a command runs (see `debvisor_objects::ceph`); every call
//! has a timeout and runs outside the liveness path.

pub mod apply;
pub mod cli;
pub mod collect;
pub mod disks;
pub mod error;
pub mod locks;
pub mod rados;
pub mod start_check;
pub mod types;

use std::fmt;
use std::future::Future;

pub use apply::{
    apply_pool_step, apply_volume_step, observe_volume, observed_pools, volume_in_use,
};
pub use cli::CephCli;
pub use collect::{
    batches, collect_state, diff, local_osds, same_host, Collected, KeyChange, POOLS_AT_ONCE,
};
pub use disks::{rbd_disks, DiskError, RbdDisk};
pub use error::CephError;
pub use locks::{
    break_fenced_locks, plan_lock_hygiene, release_stale_locks, LockVerdict, NodeAddrs,
};
pub use start_check::{check_rbd_start, Refusal};
pub use types::{
    ClusterStatus, Df, Health, HealthCheck, HealthStatus, ImageInfo, ImageListEntry, ImageLock,
    ImageState, ImageUsage, OsdDf, OsdMetadata, OsdTree, PoolImages, PoolInfo, Snapshot,
    UnreadableImage, Watcher,
};

use debvisor_objects::ceph::{validate_image_name, validate_pool_name, validate_snapshot_name};

/// An RBD image: pool and image name (`pool/image`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    /// Pool.
    pub pool: String,
    /// Image.
    pub image: String,
}

impl ImageRef {
    /// `pool/image`.
    pub fn new(pool: impl Into<String>, image: impl Into<String>) -> Self {
        ImageRef {
            pool: pool.into(),
            image: image.into(),
        }
    }

    /// The image spec `pool/image` the `rbd` tool takes.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)
    }
}

fn invalid(what: &'static str, name: &str, reason: String) -> CephError {
    CephError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    }
}

pub(crate) fn check_pool(pool: &str) -> Result<(), CephError> {
    validate_pool_name(pool).map_err(|r| invalid("pool", pool, r))
}

pub(crate) fn check_image(image: &ImageRef) -> Result<(), CephError> {
    check_pool(&image.pool)?;
    validate_image_name(&image.image).map_err(|r| invalid("image", &image.image, r))
}

pub(crate) fn check_snap(snap: &str) -> Result<(), CephError> {
    validate_snapshot_name(snap).map_err(|r| invalid("snapshot", snap, r))
}

/// Lock ids and lockers come from `rbd lock ls`; still refuse anything that could read as an
/// option or is not a `client.<n>` entity.
pub(crate) fn check_lock(lock: &ImageLock) -> Result<(), CephError> {
    if lock.id.is_empty() || lock.id.starts_with('-') || lock.id.contains('\0') {
        return Err(invalid("lock id", &lock.id, "empty or option-like".into()));
    }
    let ok = lock
        .locker
        .strip_prefix("client.")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return Err(invalid(
            "locker",
            &lock.locker,
            "not client.<number>".into(),
        ));
    }
    Ok(())
}

/// The Ceph operations the daemon needs. Every call may take long or fail (the cluster is
/// slow or away): implementations bound each call with a timeout.
pub trait Ceph: Send + Sync {
    /// `ceph status`: health, quorum, OSD/PG summary.
    fn status(&self) -> impl Future<Output = Result<ClusterStatus, CephError>> + Send;
    /// `ceph health detail`: status and the failing checks with detail lines.
    fn health(&self) -> impl Future<Output = Result<Health, CephError>> + Send;
    /// `ceph df`: cluster and per-pool usage.
    fn df(&self) -> impl Future<Output = Result<Df, CephError>> + Send;
    /// `ceph osd tree`: OSDs with their CRUSH host and up/in state.
    fn osd_tree(&self) -> impl Future<Output = Result<OsdTree, CephError>> + Send;
    /// `ceph osd df`: per-OSD utilisation.
    fn osd_df(&self) -> impl Future<Output = Result<OsdDf, CephError>> + Send;
    /// `ceph osd metadata`: per-OSD host name (how a node finds its OSDs) and store.
    fn osd_metadata(&self) -> impl Future<Output = Result<Vec<OsdMetadata>, CephError>> + Send;
    /// `ceph osd set|unset <flag>` (maintenance flags such as `noout`).
    fn osd_flag(&self, flag: &str, set: bool)
        -> impl Future<Output = Result<(), CephError>> + Send;
    /// `ceph osd blocklist add <address>`: cut off a client (a killed or fenced one whose
    /// watch would otherwise linger for `osd_client_watch_timeout`, 30 s by default).
    fn blocklist_add(&self, address: &str) -> impl Future<Output = Result<(), CephError>> + Send;
    /// `ceph osd pool ls detail`.
    fn pool_list(&self) -> impl Future<Output = Result<Vec<PoolInfo>, CephError>> + Send;
    /// Create a replicated pool with `pg_num` PGs and `size` replicas, application `rbd`.
    fn pool_create(
        &self,
        pool: &str,
        pg_num: u32,
        size: u32,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Change a pool's replica count.
    fn pool_set_size(
        &self,
        pool: &str,
        size: u32,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Delete a pool and all its data (the caller decides whether that is allowed); a pool
    /// that does not exist counts as deleted (Ceph answers success).
    fn pool_delete(&self, pool: &str) -> impl Future<Output = Result<(), CephError>> + Send;
    /// `rbd pool init` (slow, ≈3 s; [`Ceph::pool_create`] already enables `rbd`).
    fn rbd_pool_init(&self, pool: &str) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Image names in a pool.
    fn rbd_list(&self, pool: &str) -> impl Future<Output = Result<Vec<String>, CephError>> + Send;
    /// `rbd ls -l`: every image head and snapshot with sizes, parents, protection.
    fn rbd_list_long(
        &self,
        pool: &str,
    ) -> impl Future<Output = Result<Vec<ImageListEntry>, CephError>> + Send;
    /// `rbd info`.
    fn rbd_info(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<ImageInfo, CephError>> + Send;
    /// `rbd du --pool`: provisioned and used bytes per image head and snapshot.
    fn rbd_du(&self, pool: &str)
        -> impl Future<Output = Result<Vec<ImageUsage>, CephError>> + Send;
    /// Every image head and snapshot of a pool with size, parent and protection (the rows of
    /// `rbd ls -l`) and their usage (the rows of `rbd du`): what the state collection needs
    /// per pool, in one call. An image that cannot be read is reported in
    /// [`PoolImages::unreadable`] rather than failing the pool (where the implementation
    /// can tell).
    fn rbd_pool_images(
        &self,
        pool: &str,
    ) -> impl Future<Output = Result<PoolImages, CephError>> + Send;
    /// How many pools [`Ceph::rbd_pool_images`] should list at the same time.
    fn pools_at_once(&self) -> usize {
        POOLS_AT_ONCE
    }
    /// Create an image of `size_bytes`.
    fn rbd_create(
        &self,
        image: &ImageRef,
        size_bytes: u64,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Resize an image; shrinking needs `allow_shrink`.
    fn rbd_resize(
        &self,
        image: &ImageRef,
        size_bytes: u64,
        allow_shrink: bool,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Remove an image (fails while it has snapshots: see [`purge_and_remove`]).
    fn rbd_remove(&self, image: &ImageRef) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Clone `source@snap` into `target`.
    fn rbd_clone(
        &self,
        source: &ImageRef,
        snap: &str,
        target: &ImageRef,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// An image's size and user snapshots with their protection (`None`: no such image or
    /// pool): what the volume reconciler looks at on every pass. In-process over librbd
    /// when it is loaded (no process per volume), else `rbd info` + `rbd snap ls`.
    fn rbd_image_state(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<Option<ImageState>, CephError>> + Send;
    /// Snapshots of an image.
    fn rbd_snap_list(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<Vec<Snapshot>, CephError>> + Send;
    /// Create a snapshot.
    fn rbd_snap_create(
        &self,
        image: &ImageRef,
        snap: &str,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Roll the image back to a snapshot (the image must not be in use).
    fn rbd_snap_rollback(
        &self,
        image: &ImageRef,
        snap: &str,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Remove a snapshot (must be unprotected).
    fn rbd_snap_remove(
        &self,
        image: &ImageRef,
        snap: &str,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Protect a snapshot (a clone source).
    fn rbd_snap_protect(
        &self,
        image: &ImageRef,
        snap: &str,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Unprotect a snapshot (fails while clones of it exist).
    fn rbd_snap_unprotect(
        &self,
        image: &ImageRef,
        snap: &str,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Remove every unprotected snapshot.
    fn rbd_snap_purge(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Advisory locks on an image.
    fn rbd_lock_list(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<Vec<ImageLock>, CephError>> + Send;
    /// Break a lock.
    fn rbd_lock_remove(
        &self,
        image: &ImageRef,
        lock: &ImageLock,
    ) -> impl Future<Output = Result<(), CephError>> + Send;
    /// Clients that have the image open (`rbd status`).
    fn rbd_watchers(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<Vec<Watcher>, CephError>> + Send;
}

/// Remove an image with its snapshots: unprotect protected ones (fails naming the snapshot
/// while clones of it exist), purge, then remove. A missing image counts as removed. An
/// advisory lock of another client (`rbd lock add`) makes `rbd rm` wait for it until the
/// call's timeout: release stale locks first (see [`release_stale_locks`]).
pub async fn purge_and_remove<C: Ceph>(ceph: &C, image: &ImageRef) -> Result<(), CephError> {
    let snaps = match ceph.rbd_snap_list(image).await {
        Ok(s) => s,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    for s in snaps.iter().filter(|s| s.protected) {
        ceph.rbd_snap_unprotect(image, &s.name).await?;
    }
    if !snaps.is_empty() {
        ceph.rbd_snap_purge(image).await?;
    }
    match ceph.rbd_remove(image).await {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}
