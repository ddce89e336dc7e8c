//! State collection by the primary: health, usage, per-pool, per-OSD and per-volume state as
//! `ceph/…` key → JSON value, the difference to what was written last (only changes are
//! written), and bounded transactions. Runs on its own interval, never in the liveness path.

use std::collections::{BTreeMap, BTreeSet};

use debvisor_objects::ceph::{
    health_key, observed_osd_key, observed_pool_key, observed_volume_key, usage_key,
};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use super::{Ceph, CephError, OsdMetadata, PoolImages};

/// Pools whose images are listed at the same time by default (two `rbd` processes each: a
/// few at once rather than a burst of processes on a small host). A driver listing
/// in-process says its own ([`Ceph::pools_at_once`]).
pub const POOLS_AT_ONCE: usize = 3;

/// One write of the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// Put `value` at key.
    Put(String, String),
    /// Delete the key (the pool, OSD or volume is gone).
    Delete(String),
}

/// Does an OSD's host name (from its metadata) name this host? Equal, or equal short names
/// (`n1` and `n1.example`).
pub fn same_host(osd_host: &str, hostname: &str) -> bool {
    let short = |h: &str| h.split('.').next().unwrap_or(h).to_owned();
    osd_host == hostname || short(osd_host) == short(hostname)
}

/// The OSD ids whose metadata names `hostname` (how a node finds its own OSDs).
pub fn local_osds(meta: &[OsdMetadata], hostname: &str) -> Vec<i64> {
    meta.iter()
        .filter(|m| same_host(&m.hostname, hostname))
        .map(|m| m.id)
        .collect()
}

/// One collection: what was observed, and which keys could not be observed this time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Key → compact JSON.
    pub state: BTreeMap<String, String>,
    /// Keys of volumes listed in their pool but not readable this time (see
    /// [`super::PoolImages::unreadable`]): not in `state`, yet not gone either — whatever
    /// was written for them last stands.
    pub unreadable: BTreeSet<String>,
}

impl Collected {
    /// What to write to go from `previous` (last written) to this collection: [`diff`],
    /// except that the [`Collected::unreadable`] keys are neither put nor deleted (a volume
    /// that failed to read keeps its last observation; one never observed gets none).
    pub fn changes_since(&self, previous: &BTreeMap<String, String>) -> Vec<KeyChange> {
        diff(previous, &self.state)
            .into_iter()
            .filter(|c| {
                let (KeyChange::Put(k, _) | KeyChange::Delete(k)) = c;
                !self.unreadable.contains(k)
            })
            .collect()
    }
}

/// Collect the observed state: `ceph/health`, `ceph/usage`, `ceph/observed/pools/<pool>`,
/// `ceph/observed/osds/<id>` and `ceph/observed/volumes/<pool>:<image>` (images of pools with
/// the `rbd` application), as key → compact JSON. A volume that cannot be read is logged
/// (once per collection) and left out, its key in [`Collected::unreadable`]; any other
/// failure fails the collection.
pub async fn collect_state<C: Ceph>(ceph: &C) -> Result<Collected, CephError> {
    let mut collected = Collected::default();
    let out = &mut collected.state;
    let mut put = |k: String, v: serde_json::Value| {
        out.insert(k, v.to_string());
    };
    // Independent calls run together: one collection takes about the slowest call, not the sum.
    let (health, df, pools, tree, osd_df, meta) = futures::try_join!(
        ceph.health(),
        ceph.df(),
        ceph.pool_list(),
        ceph.osd_tree(),
        ceph.osd_df(),
        ceph.osd_metadata()
    )?;
    put(
        health_key(),
        serde_json::to_value(&health).unwrap_or_default(),
    );

    put(
        usage_key(),
        json!({
            "total_bytes": df.stats.total_bytes,
            "avail_bytes": df.stats.total_avail_bytes,
            "used_bytes": df.stats.total_used_raw_bytes,
            "used_ratio": df.stats.total_used_raw_ratio,
        }),
    );

    let usage: BTreeMap<&str, _> = df
        .pools
        .iter()
        .map(|p| (p.name.as_str(), &p.stats))
        .collect();
    for p in &pools {
        let u = usage.get(p.pool_name.as_str());
        put(
            observed_pool_key(&p.pool_name),
            json!({
                "id": p.pool_id,
                "size": p.size,
                "min_size": p.min_size,
                "pg_num": p.pg_num,
                "applications": p.application_metadata.keys().collect::<Vec<_>>(),
                "stored": u.map(|s| s.stored),
                "objects": u.map(|s| s.objects),
                "bytes_used": u.map(|s| s.bytes_used),
                "max_avail": u.map(|s| s.max_avail),
            }),
        );
    }

    let host: BTreeMap<i64, &str> = meta.iter().map(|m| (m.id, m.hostname.as_str())).collect();
    for n in tree.nodes.iter().filter(|n| n.kind == "osd") {
        let Ok(id) = u32::try_from(n.id) else {
            continue;
        };
        let d = osd_df.nodes.iter().find(|o| o.id == n.id);
        put(
            observed_osd_key(id),
            json!({
                "up": n.is_up(),
                "in": n.is_in(),
                "node": host.get(&n.id),
                "crush_host": tree.host_of(n.id),
                "kb": d.map(|d| d.kb),
                "kb_used": d.map(|d| d.kb_used),
                "utilization": d.map(|d| d.utilization),
                "pgs": d.map(|d| d.pgs),
            }),
        );
    }

    let rbd_pools: Vec<&str> = pools
        .iter()
        .filter(|p| p.application_metadata.contains_key("rbd"))
        .map(|p| p.pool_name.as_str())
        .collect();
    // A few pools at a time: a collection takes about the slowest pools rather than their
    // sum, without a burst of `rbd` processes on a small host.
    let calls: Vec<_> = rbd_pools.iter().map(|p| ceph.rbd_pool_images(p)).collect();
    let per_pool: Vec<_> = futures::stream::iter(calls)
        .buffered(ceph.pools_at_once().max(1))
        .try_collect()
        .await?;
    for (pool, images) in rbd_pools.iter().zip(per_pool) {
        for u in &images.unreadable {
            tracing::warn!(pool = %pool, image = %u.image, error = %u.error,
                "ceph: volume not readable; its last observation is kept");
        }
        volume_keys(pool, &images, &mut collected);
    }
    Ok(collected)
}

/// Put the `ceph/observed/volumes/<pool>:<image>` keys of one pool's listing into `out`,
/// and the keys of its unreadable images into `out.unreadable`.
fn volume_keys(pool: &str, images: &PoolImages, out: &mut Collected) {
    let (rows, du) = (&images.rows, &images.usage);
    let used = |image: &str, snap: Option<&str>| {
        du.iter()
            .find(|u| u.name == image && u.snapshot.as_deref() == snap)
            .map(|u| u.used_size)
    };
    for head in rows.iter().filter(|r| r.snapshot.is_none()) {
        let snaps: Vec<_> = rows
            .iter()
            .filter(|r| r.image == head.image)
            .filter_map(|r| {
                let name = r.snapshot.as_deref()?;
                Some(json!({
                    "name": name,
                    "size": r.size,
                    "protected": r.protected,
                    "used": used(&head.image, Some(name)),
                }))
            })
            .collect();
        let value = json!({
            "size": head.size,
            "used": used(&head.image, None),
            "parent": head.parent.as_ref().map(|pa| format!("{}/{}@{}", pa.pool, pa.image, pa.snapshot)),
            "snapshots": snaps,
        });
        out.state
            .insert(observed_volume_key(pool, &head.image), value.to_string());
    }
    out.unreadable.extend(
        images
            .unreadable
            .iter()
            .map(|u| observed_volume_key(pool, &u.image)),
    );
}

/// What to write to go from `previous` (last written) to `current`: changed or new keys, and
/// deletions of keys that are gone.
pub fn diff(
    previous: &BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
) -> Vec<KeyChange> {
    let mut out: Vec<KeyChange> = current
        .iter()
        .filter(|(k, v)| previous.get(*k) != Some(*v))
        .map(|(k, v)| KeyChange::Put(k.clone(), v.clone()))
        .collect();
    out.extend(
        previous
            .keys()
            .filter(|k| !current.contains_key(*k))
            .map(|k| KeyChange::Delete(k.clone())),
    );
    out
}

/// Split changes into transactions of at most `max_ops` operations (etcd's default limit is
/// 128 per transaction).
pub fn batches(changes: Vec<KeyChange>, max_ops: usize) -> Vec<Vec<KeyChange>> {
    let max = max_ops.max(1);
    let mut out = Vec::new();
    let mut it = changes.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(max).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ceph::{ImageListEntry, ImageUsage, UnreadableImage};

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_changes_are_written() {
        let a = map(&[
            ("ceph/health", "ok"),
            ("ceph/observed/osds/0", "x"),
            ("ceph/usage", "1"),
        ]);
        assert!(diff(&a, &a).is_empty());
        let b = map(&[
            ("ceph/health", "warn"),
            ("ceph/usage", "1"),
            ("ceph/observed/osds/1", "y"),
        ]);
        assert_eq!(
            diff(&a, &b),
            [
                KeyChange::Put("ceph/health".into(), "warn".into()),
                KeyChange::Put("ceph/observed/osds/1".into(), "y".into()),
                KeyChange::Delete("ceph/observed/osds/0".into()),
            ]
        );
    }

    fn head(image: &str, size: u64) -> ImageListEntry {
        ImageListEntry {
            image: image.into(),
            snapshot: None,
            size,
            parent: None,
            protected: false,
        }
    }

    #[test]
    fn an_unreadable_volume_keeps_its_last_observation() {
        let listing = |size_a: u64, unreadable: &[&str]| PoolImages {
            rows: vec![head("a", size_a)],
            usage: vec![ImageUsage {
                name: "a".into(),
                snapshot: None,
                provisioned_size: size_a,
                used_size: 0,
            }],
            unreadable: unreadable
                .iter()
                .map(|i| UnreadableImage {
                    image: i.to_string(),
                    error: "rbd_open_read_only: Input/output error (os error 5)".into(),
                })
                .collect(),
        };
        // Last written: volumes a and b of pool p.
        let mut first = Collected::default();
        let mut both = listing(1, &[]);
        both.rows.push(head("b", 2));
        volume_keys("p", &both, &mut first);
        assert!(first.unreadable.is_empty());
        let (a, b) = ("ceph/observed/volumes/p:a", "ceph/observed/volumes/p:b");
        assert_eq!(first.state.keys().collect::<Vec<_>>(), [a, b]);
        let v: serde_json::Value = serde_json::from_str(&first.state[a]).expect("json");
        assert_eq!(
            v,
            json!({"size": 1, "used": 0, "parent": null, "snapshots": []})
        );
        let previous = first.state.clone();

        // b fails to read, a grew: a is put, b neither put nor deleted.
        let mut now = Collected::default();
        volume_keys("p", &listing(5, &["b"]), &mut now);
        assert!(!now.state.contains_key(b));
        assert_eq!(now.unreadable, BTreeSet::from([b.to_owned()]));
        assert_eq!(
            now.changes_since(&previous),
            [KeyChange::Put(a.into(), now.state[a].clone())]
        );
        // Without the verdict b would count as gone (what `diff` alone says).
        assert!(diff(&previous, &now.state).contains(&KeyChange::Delete(b.into())));

        // Readable again: its new value is put; gone for good: deleted.
        let mut back = Collected::default();
        let mut again = listing(5, &[]);
        again.rows.push(head("b", 3));
        volume_keys("p", &again, &mut back);
        assert!(back
            .changes_since(&previous)
            .contains(&KeyChange::Put(b.into(), back.state[b].clone())));
        let mut gone = Collected::default();
        volume_keys("p", &listing(1, &[]), &mut gone);
        assert_eq!(gone.changes_since(&previous), [KeyChange::Delete(b.into())]);

        // Never observed and unreadable: nothing written for it.
        let mut fresh = Collected::default();
        volume_keys("p", &listing(1, &["c"]), &mut fresh);
        assert_eq!(
            fresh.changes_since(&BTreeMap::new()),
            [KeyChange::Put(a.into(), fresh.state[a].clone())]
        );
    }

    #[test]
    fn transactions_are_bounded() {
        let changes: Vec<KeyChange> = (0..300)
            .map(|i| KeyChange::Delete(format!("k{i}")))
            .collect();
        let b = batches(changes, 128);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [128, 128, 44]);
        assert!(batches(vec![], 128).is_empty());
    }

    #[test]
    fn local_osds_by_hostname() {
        let m = |id, h: &str| OsdMetadata {
            id,
            hostname: h.into(),
            osd_objectstore: String::new(),
            ceph_version_short: String::new(),
            front_addr: String::new(),
        };
        let meta = [m(0, "n1"), m(1, "n2.example"), m(2, "n1.example")];
        assert_eq!(local_osds(&meta, "n1"), [0, 2]);
        assert_eq!(local_osds(&meta, "n2"), [1]);
        assert!(local_osds(&meta, "n3").is_empty());
    }
}
