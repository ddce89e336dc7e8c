//! Typed views of the JSON the `ceph`/`rbd` tools print (Ceph 16.2), keeping only what the
//! daemon reports or decides on. Unknown fields are ignored: newer Ceph adds fields freely.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// Overall health as Ceph reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Everything fine.
    #[serde(rename = "HEALTH_OK")]
    Ok,
    /// Degraded but serving (e.g. `noout` set, a pool near full).
    #[serde(rename = "HEALTH_WARN")]
    Warn,
    /// Not serving some data.
    #[serde(rename = "HEALTH_ERR")]
    Err,
}

impl HealthStatus {
    /// The string Ceph uses (`HEALTH_OK`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Ok => "HEALTH_OK",
            HealthStatus::Warn => "HEALTH_WARN",
            HealthStatus::Err => "HEALTH_ERR",
        }
    }
}

/// One health check (`OSDMAP_FLAGS`, `POOL_NEARFULL`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// How bad it is.
    pub severity: HealthStatus,
    /// One-line summary (`noout flag(s) set`).
    pub message: String,
    /// Detail lines (only `ceph health detail` fills them).
    #[serde(default)]
    pub detail: Vec<String>,
    /// Muted by an operator.
    #[serde(default)]
    pub muted: bool,
}

/// Health: overall status and the checks that are not passing, by name. Deserialized from
/// Ceph's shape (`summary.message`, `detail[].message`), serialized flat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// Overall status.
    pub status: HealthStatus,
    /// Failing checks by name.
    pub checks: BTreeMap<String, HealthCheck>,
}

#[derive(Deserialize)]
struct RawHealth {
    status: HealthStatus,
    #[serde(default)]
    checks: BTreeMap<String, RawCheck>,
}

#[derive(Deserialize)]
struct RawCheck {
    severity: HealthStatus,
    summary: RawSummary,
    #[serde(default)]
    detail: Vec<RawSummary>,
    #[serde(default)]
    muted: bool,
}

#[derive(Deserialize)]
struct RawSummary {
    message: String,
}

impl<'de> Deserialize<'de> for Health {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawHealth::deserialize(d)?;
        Ok(Health {
            status: raw.status,
            checks: raw
                .checks
                .into_iter()
                .map(|(name, c)| {
                    let check = HealthCheck {
                        severity: c.severity,
                        message: c.summary.message,
                        detail: c.detail.into_iter().map(|s| s.message).collect(),
                        muted: c.muted,
                    };
                    (name, check)
                })
                .collect(),
        })
    }
}

/// OSD counts from the OSD map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdMapSummary {
    /// Map epoch.
    pub epoch: u64,
    /// OSDs known.
    pub num_osds: u32,
    /// OSDs up.
    pub num_up_osds: u32,
    /// OSDs in.
    pub num_in_osds: u32,
}

/// One PG state count (`active+clean: 9`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgStateCount {
    /// The state name.
    pub state_name: String,
    /// How many PGs are in it.
    pub count: u64,
}

/// Placement-group and capacity summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgMapSummary {
    /// PGs by state.
    #[serde(default)]
    pub pgs_by_state: Vec<PgStateCount>,
    /// Total PGs.
    pub num_pgs: u64,
    /// Pools.
    pub num_pools: u64,
    /// Objects.
    pub num_objects: u64,
    /// Raw bytes used.
    pub bytes_used: u64,
    /// Raw bytes available.
    pub bytes_avail: u64,
    /// Raw capacity.
    pub bytes_total: u64,
}

/// Whether a mgr is active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MgrMapSummary {
    /// An active mgr answers.
    pub available: bool,
}

/// `ceph status`: health, quorum, OSD and PG summaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Cluster id.
    pub fsid: String,
    /// Health with the failing checks.
    pub health: Health,
    /// Mons in quorum.
    #[serde(default)]
    pub quorum_names: Vec<String>,
    /// OSD counts.
    pub osdmap: OsdMapSummary,
    /// PG and capacity summary.
    pub pgmap: PgMapSummary,
    /// Mgr availability.
    pub mgrmap: MgrMapSummary,
}

/// Cluster-wide capacity from `ceph df`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DfTotals {
    /// Raw capacity.
    pub total_bytes: u64,
    /// Raw bytes available.
    pub total_avail_bytes: u64,
    /// Raw bytes used.
    pub total_used_raw_bytes: u64,
    /// Used fraction (0–1).
    pub total_used_raw_ratio: f64,
}

/// One pool's usage from `ceph df`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolUsage {
    /// Pool name.
    pub name: String,
    /// Pool id.
    pub id: i64,
    /// Usage.
    pub stats: PoolUsageStats,
}

/// The numbers of one pool in `ceph df`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolUsageStats {
    /// Bytes stored (before replication).
    pub stored: u64,
    /// Objects.
    pub objects: u64,
    /// Raw bytes used (after replication).
    pub bytes_used: u64,
    /// Used fraction of what the pool could hold (0–1).
    pub percent_used: f64,
    /// Bytes the pool can still take.
    pub max_avail: u64,
}

/// `ceph df`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Df {
    /// Cluster totals.
    pub stats: DfTotals,
    /// Per pool.
    pub pools: Vec<PoolUsage>,
}

/// One pool from `ceph osd pool ls detail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Pool name.
    pub pool_name: String,
    /// Pool id.
    pub pool_id: i64,
    /// Replica count.
    pub size: u32,
    /// Replicas needed to serve I/O.
    pub min_size: u32,
    /// Placement groups.
    pub pg_num: u32,
    /// Enabled applications (`rbd`, …).
    #[serde(default)]
    pub application_metadata: BTreeMap<String, serde_json::Value>,
}

/// A node of `ceph osd tree` (root, host or OSD).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OsdTreeNode {
    /// Negative for buckets, the OSD id for OSDs.
    pub id: i64,
    /// `default`, `host1`, `osd.0`.
    pub name: String,
    /// `root`, `host`, `osd`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Child ids of a bucket.
    #[serde(default)]
    pub children: Vec<i64>,
    /// `up` or `down` (OSDs only).
    #[serde(default)]
    pub status: Option<String>,
    /// 0 (out) to 1 (in) (OSDs only).
    #[serde(default)]
    pub reweight: Option<f64>,
}

impl OsdTreeNode {
    /// The OSD daemon answers (`status: up`).
    pub fn is_up(&self) -> bool {
        self.status.as_deref() == Some("up")
    }

    /// The OSD holds data (`reweight` above 0).
    pub fn is_in(&self) -> bool {
        self.reweight.unwrap_or(0.0) > 0.0
    }
}

/// `ceph osd tree`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OsdTree {
    /// Every bucket and OSD.
    pub nodes: Vec<OsdTreeNode>,
}

impl OsdTree {
    /// The CRUSH host bucket holding OSD `id`.
    pub fn host_of(&self, id: i64) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.kind == "host" && n.children.contains(&id))
            .map(|n| n.name.as_str())
    }
}

/// One OSD of `ceph osd df`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OsdUsage {
    /// OSD id.
    pub id: i64,
    /// `osd.<id>`.
    pub name: String,
    /// Capacity in KiB.
    pub kb: u64,
    /// Used KiB.
    pub kb_used: u64,
    /// Available KiB.
    pub kb_avail: u64,
    /// Used percent (0–100).
    pub utilization: f64,
    /// PGs on it.
    pub pgs: u64,
    /// 0 (out) to 1 (in).
    pub reweight: f64,
    /// `up` or `down`.
    #[serde(default)]
    pub status: Option<String>,
}

/// `ceph osd df`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OsdDf {
    /// Per OSD.
    pub nodes: Vec<OsdUsage>,
}

/// One OSD of `ceph osd metadata` (the host it runs on, its store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdMetadata {
    /// OSD id.
    pub id: i64,
    /// Host name the OSD reported (how a node finds its own OSDs).
    pub hostname: String,
    /// `bluestore`, `memstore`, …
    #[serde(default)]
    pub osd_objectstore: String,
    /// `16.2.15`.
    #[serde(default)]
    pub ceph_version_short: String,
    /// Front (public) address.
    #[serde(default)]
    pub front_addr: String,
}

/// The parent of a cloned image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageParent {
    /// Parent pool.
    pub pool: String,
    /// Parent image.
    pub image: String,
    /// Parent snapshot.
    pub snapshot: String,
}

/// `rbd info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Image name.
    pub name: String,
    /// Image id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Number of snapshots.
    #[serde(default)]
    pub snapshot_count: u64,
    /// Enabled features (`layering`, `exclusive-lock`, …).
    #[serde(default)]
    pub features: Vec<String>,
    /// Set for clones.
    #[serde(default)]
    pub parent: Option<ImageParent>,
}

/// One row of `rbd ls -l`: an image head, or one of its snapshots (`snapshot` set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageListEntry {
    /// Image name.
    pub image: String,
    /// Snapshot name; `None` for the image head.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Set for clones (image heads only).
    #[serde(default)]
    pub parent: Option<ImageParent>,
    /// Protected (snapshot rows only).
    #[serde(deserialize_with = "bool_or_string", default)]
    pub protected: bool,
}

/// One line of `rbd du` (an image head or one of its snapshots).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUsage {
    /// Image name.
    pub name: String,
    /// Snapshot name; `None` for the image head.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Size in bytes.
    pub provisioned_size: u64,
    /// Bytes allocated.
    pub used_size: u64,
}

/// What [`super::Ceph::rbd_pool_images`] found in one pool: the rows of `rbd ls -l` and
/// `rbd du`, and the images listed but not readable this time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolImages {
    /// Every readable image head and user snapshot (`rbd ls -l`).
    pub rows: Vec<ImageListEntry>,
    /// Their usage (`rbd du`).
    pub usage: Vec<ImageUsage>,
    /// Images in the pool's directory that failed to open or to read (not because they
    /// were removed meanwhile): none of their rows above. One broken image must not hide
    /// the others, nor be taken for gone (the collector keeps its last observation).
    pub unreadable: Vec<UnreadableImage>,
}

/// One image's head as the volume reconciler needs it ([`super::Ceph::rbd_image_state`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageState {
    /// Size in bytes.
    pub size: u64,
    /// User snapshots in creation order: name and whether it is protected.
    pub snapshots: Vec<(String, bool)>,
}

/// An image of [`PoolImages::unreadable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableImage {
    /// Image name.
    pub image: String,
    /// What failed (`rbd_open_read_only: Input/output error (os error 5)`).
    pub error: String,
}

#[derive(Deserialize)]
pub(crate) struct RawDu {
    pub(crate) images: Vec<ImageUsage>,
}

/// One snapshot of `rbd snap ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Snapshot id.
    pub id: u64,
    /// Snapshot name.
    pub name: String,
    /// Image size at snapshot time.
    pub size: u64,
    /// Protected against removal (needed by v1 clones).
    #[serde(deserialize_with = "bool_or_string", default)]
    pub protected: bool,
    /// Creation time as rbd prints it (`Mon Nov 23 18:45:34 2026`).
    #[serde(default)]
    pub timestamp: String,
}

/// `rbd` prints booleans as the strings `"true"`/`"false"` in places.
fn bool_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        Bool(bool),
        Str(String),
    }
    match B::deserialize(d)? {
        B::Bool(b) => Ok(b),
        B::Str(s) => match s.as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not true|false"
            ))),
        },
    }
}

/// One advisory lock of `rbd lock ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLock {
    /// Lock id (cookie; `auto <n>` for exclusive-lock).
    pub id: String,
    /// Holder, `client.<gid>`.
    pub locker: String,
    /// Holder address, `ip:port/nonce`.
    pub address: String,
}

impl ImageLock {
    /// The holder's IP address (without port and nonce), e.g. to map it to a node.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        address_ip(&self.address)
    }
}

/// One watcher of `rbd status` (a client that has the image open).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watcher {
    /// Address, `ip:port/nonce`.
    pub address: String,
    /// Client id.
    #[serde(default)]
    pub client: Option<u64>,
    /// Watch cookie.
    #[serde(default)]
    pub cookie: Option<u64>,
}

impl Watcher {
    /// The watcher's IP address.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        address_ip(&self.address)
    }
}

#[derive(Deserialize)]
pub(crate) struct RawStatus {
    #[serde(default)]
    pub(crate) watchers: Vec<Watcher>,
}

/// The IP of a Ceph entity address: `127.0.0.1:0/123`, `v2:10.0.0.1:6800/1`, `[::1]:0/5`.
pub fn address_ip(addr: &str) -> Option<std::net::IpAddr> {
    let a = addr
        .strip_prefix("v2:")
        .or_else(|| addr.strip_prefix("v1:"));
    let a = a.unwrap_or(addr);
    let host_port = a.split('/').next()?;
    if let Ok(sa) = host_port.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    host_port.parse().ok()
}

#[cfg(test)]
mod tests {
    //! Parsing of outputs captured from a real Ceph 16.2.15 cluster (the test harness's).
    use super::*;

    fn fixture<T: for<'de> Deserialize<'de>>(name: &str) -> T {
        let path = format!("{}/src/ceph/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("fixture");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn status_ok_and_warn() {
        let ok: ClusterStatus = fixture("status_ceph.json");
        assert_eq!(ok.health.status, HealthStatus::Ok);
        assert!(ok.health.checks.is_empty());
        assert_eq!(ok.osdmap.num_up_osds, 2);
        assert!(ok.mgrmap.available);
        assert_eq!(ok.pgmap.bytes_total, 536_870_912);
        let warn: ClusterStatus = fixture("status_warn.json");
        assert_eq!(warn.health.status, HealthStatus::Warn);
        let c = &warn.health.checks["OSDMAP_FLAGS"];
        assert_eq!(c.severity, HealthStatus::Warn);
        assert_eq!(c.message, "noout flag(s) set");
        let detail: Health = fixture("health_warn.json");
        assert_eq!(detail.checks.keys().collect::<Vec<_>>(), ["OSDMAP_FLAGS"]);
    }

    #[test]
    fn df_pools_and_osds() {
        let df: Df = fixture("df.json");
        assert_eq!(df.stats.total_bytes, 536_870_912);
        assert_eq!(
            df.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["device_health_metrics", "rbdt"]
        );
        let pools: Vec<PoolInfo> = fixture("poolls.json");
        let rbdt = pools.iter().find(|p| p.pool_name == "rbdt").expect("rbdt");
        assert_eq!((rbdt.size, rbdt.pg_num), (1, 8));
        assert!(rbdt.application_metadata.contains_key("rbd"));
        let tree: OsdTree = fixture("osdtree.json");
        assert_eq!(tree.host_of(0), Some("vm"));
        assert_eq!(tree.host_of(7), None);
        let osd_df: OsdDf = fixture("osddf.json");
        assert_eq!(osd_df.nodes.len(), 2);
        assert_eq!(osd_df.nodes[0].kb, 262_144);
        let meta: Vec<OsdMetadata> = fixture("osdmeta.json");
        assert_eq!(meta[1].id, 1);
        assert_eq!(meta[0].hostname, "vm");
        assert_eq!(meta[0].osd_objectstore, "memstore");
    }

    #[test]
    fn images_snapshots_locks_watchers() {
        let info: ImageInfo = fixture("info.json");
        assert_eq!((info.name.as_str(), info.size), ("img1", 67_108_864));
        assert!(info.parent.is_none());
        let clone: ImageInfo = fixture("info_clone.json");
        let p = clone.parent.expect("parent");
        assert_eq!(
            (p.pool.as_str(), p.image.as_str(), p.snapshot.as_str()),
            ("rbdt", "img1", "s1")
        );
        let du: RawDu = fixture("du_pool.json");
        let snap = du
            .images
            .iter()
            .find(|u| u.name == "img4" && u.snapshot.is_some())
            .expect("img4@a");
        assert_eq!(
            (snap.snapshot.as_deref(), snap.used_size),
            (Some("a"), 5_000_000)
        );
        let snaps: Vec<Snapshot> = fixture("snapls.json");
        assert!(!snaps[0].protected);
        let snaps: Vec<Snapshot> = fixture("snapls_protected.json");
        assert!(snaps[0].protected);
        assert_eq!(snaps[0].name, "s1");
        let locks: Vec<ImageLock> = fixture("lockls.json");
        assert_eq!(locks[0].locker, "client.4173");
        assert_eq!(locks[0].ip(), Some([127, 0, 0, 1].into()));
        let st: RawStatus = fixture("status.json");
        assert!(st.watchers.is_empty());
        let long: Vec<ImageListEntry> = fixture("lsl_snaps.json");
        assert_eq!(long.len(), 3);
        assert_eq!(
            (long[1].snapshot.as_deref(), long[1].protected),
            (Some("s1"), true)
        );
        assert_eq!(
            long[2].parent.as_ref().map(|p| p.image.as_str()),
            Some("img1")
        );
        let names: Vec<String> = fixture("ls.json");
        assert_eq!(names, ["img1"]);
    }

    #[test]
    fn entity_addresses() {
        assert_eq!(
            address_ip("v2:10.0.0.1:6800/13948"),
            Some([10, 0, 0, 1].into())
        );
        assert_eq!(address_ip("[::1]:0/5"), Some("::1".parse().unwrap()));
        assert_eq!(address_ip("garbage"), None);
    }

    #[test]
    fn protected_flag_rejects_other_strings() {
        let r: Result<Snapshot, _> =
            serde_json::from_str(r#"{"id":1,"name":"s","size":1,"protected":"maybe"}"#);
        assert!(r.is_err());
    }
}
