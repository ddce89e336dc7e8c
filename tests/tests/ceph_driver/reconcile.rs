//! Desired state from a real etcd, planned by `debvisor_objects::ceph_plan`, carried out by
//! the driver on the real cluster, with the status written back to etcd: a stand-in for the
//! reconciler the daemon will run, exercising every piece it will use.

use std::collections::BTreeMap;

use debvisor_daemon::ceph::{
    apply_pool_step, apply_volume_step, observe_volume, observed_pools, volume_in_use, Ceph,
    CephCli, ImageRef,
};
use debvisor_objects::ceph::{
    parse_template, pool_status_key, snapshot_status_key, volume_status_key, CephState, CephStatus,
    PoolKind, VolumeKind, POOLS_PREFIX, TEMPLATES_PREFIX, VOLUMES_PREFIX,
};
use debvisor_objects::ceph_plan::{plan_pool, plan_volume, Verdict, VolumeContext};
use debvisor_objects::{KeyEntry, Kind, ObjectError};
use debvisor_tests::{CephCluster, EtcdProcess};

/// Every key under `/debvisor/<rel_prefix>`, relative to that prefix.
fn keys_under(etcd: &EtcdProcess, rel_prefix: &str) -> BTreeMap<String, KeyEntry> {
    let full = format!("/debvisor/{rel_prefix}");
    etcd.with_client(|mut c| async move {
        let r = c
            .get(
                full.clone(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| debvisor_tests::HarnessError::State(e.to_string()))?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                let k = String::from_utf8_lossy(kv.key());
                let sub = k.strip_prefix(&full).unwrap_or(&k).to_owned();
                let e = KeyEntry {
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                };
                (sub, e)
            })
            .collect())
    })
    .expect("etcd prefix get")
}

fn status_json(v: &Verdict, rolled_back: Option<String>) -> String {
    let (field, error) = match v {
        Verdict::Error(e) => (Some(e.field.clone()), Some(e.reason.clone())),
        _ => (None, None),
    };
    let s = CephStatus {
        state: v.state(),
        field,
        error,
        rolled_back,
        since: None,
    };
    serde_json::to_string(&s).expect("status JSON")
}

fn read_status(etcd: &EtcdProcess, rel: &str) -> CephStatus {
    let raw = etcd
        .get_key(rel)
        .expect("get status")
        .unwrap_or_else(|| panic!("no status at {rel}"));
    serde_json::from_str(&raw).expect("status parses")
}

/// One reconcile pass of a pool; returns how many steps it applied.
async fn reconcile_pool(etcd: &EtcdProcess, cli: &CephCli, pool: &str) -> usize {
    let keys = keys_under(etcd, &format!("{POOLS_PREFIX}{pool}/"));
    let parsed = PoolKind.parse(pool, &keys);
    let observed = observed_pools(&cli.pool_list().await.expect("pool ls"));
    let plan = plan_pool(&parsed, observed.get(pool));
    for step in &plan.steps {
        apply_pool_step(cli, pool, step).await.expect("pool step");
    }
    etcd.put_key(&pool_status_key(pool), &status_json(&plan.verdict, None))
        .expect("put status");
    plan.steps.len()
}

/// One reconcile pass of a volume; returns how many steps it applied.
async fn reconcile_volume(etcd: &EtcdProcess, cli: &CephCli, id: &str) -> usize {
    let (pool, image) = id.split_once(':').expect("pool:image");
    let keys = keys_under(etcd, &format!("{VOLUMES_PREFIX}{id}/"));
    let parsed = VolumeKind.parse(id, &keys);
    let templates: BTreeMap<String, Result<_, ObjectError>> = keys_under(etcd, TEMPLATES_PREFIX)
        .into_iter()
        .map(|(name, e)| {
            let t = parse_template(&name, &e.value);
            (name, t)
        })
        .collect();
    let rolled_back: BTreeMap<String, String> = keys
        .iter()
        .filter_map(|(sub, e)| {
            let snap = sub.strip_prefix("snapshots/")?.strip_suffix("/status")?;
            let st: CephStatus = serde_json::from_slice(&e.value).ok()?;
            Some((snap.to_owned(), st.rolled_back?))
        })
        .collect();
    let img = ImageRef::new(pool, image);
    let ctx = VolumeContext {
        templates: Some(&templates),
        in_use: volume_in_use(cli, &img).await.expect("rbd status"),
        rolled_back: Some(&rolled_back),
    };
    let observed = observe_volume(cli, &img).await.expect("observe");
    let plan = plan_volume(&parsed, observed.as_ref(), &ctx);
    let mut done = rolled_back.clone();
    for step in &plan.steps {
        if let Some(token) = apply_volume_step(cli, &img, step)
            .await
            .expect("volume step")
        {
            if let debvisor_objects::ceph_plan::VolumeStep::Rollback { snapshot, .. } = step {
                done.insert(snapshot.clone(), token);
            }
        }
    }
    etcd.put_key(
        &volume_status_key(pool, image),
        &status_json(&plan.verdict, None),
    )
    .expect("put status");
    for (snap, v) in &plan.snapshots {
        etcd.put_key(
            &snapshot_status_key(pool, image, snap),
            &status_json(v, done.get(snap).cloned()),
        )
        .expect("put snapshot status");
    }
    plan.steps.len()
}

/// Reconcile until a pass applies nothing (at most 4 passes).
async fn converge_volume(etcd: &EtcdProcess, cli: &CephCli, id: &str) {
    for _ in 0..4 {
        if reconcile_volume(etcd, cli, id).await == 0 {
            return;
        }
    }
    panic!("volume {id} did not converge in 4 passes");
}

pub async fn etcd_to_ceph_and_back(cluster: &CephCluster, cli: &CephCli) {
    let etcd = EtcdProcess::start().expect("etcd");
    const POOL: &str = "dv-plan";

    // Pool from etcd.
    etcd.put_key(
        "ceph/pools/dv-plan/spec",
        r#"{"pg_num":8,"size":1,"protected":true}"#,
    )
    .expect("put");
    assert_eq!(reconcile_pool(&etcd, cli, POOL).await, 1, "created");
    assert_eq!(reconcile_pool(&etcd, cli, POOL).await, 0, "converged");
    assert_eq!(
        read_status(&etcd, &pool_status_key(POOL)).state,
        CephState::Ready
    );
    let size = cluster
        .ceph_json(&["osd", "pool", "get", POOL, "size"])
        .expect("pool get");
    assert_eq!(size["size"], 1);

    // A template image (the operator's job), then a volume cloned from it with a snapshot.
    let data = super::data_file(cluster.dir(), "golden.img", 6 << 20, 23);
    cluster
        .rbd(&[
            "import",
            "--no-progress",
            &data.to_string_lossy(),
            "dv-plan/base",
        ])
        .expect("import");
    cluster
        .rbd(&["snap", "create", "dv-plan/base@gold"])
        .expect("snap");
    etcd.put_key(
        "templates/golden",
        r#"{"backend":"rbd","pool":"dv-plan","image":"base","snapshot":"gold"}"#,
    )
    .expect("put template");
    etcd.put_keys(&[
        (
            "ceph/volumes/dv-plan:v1/spec",
            r#"{"size":"8M","clone_from":{"template":"golden"}}"#,
        ),
        ("ceph/volumes/dv-plan:v1/snapshots/s1/spec", "{}"),
    ])
    .expect("put volume");
    converge_volume(&etcd, cli, "dv-plan:v1").await;
    let info: serde_json::Value = serde_json::from_str(
        &cluster
            .rbd(&["info", "dv-plan/v1", "--format", "json"])
            .expect("info"),
    )
    .expect("json");
    assert_eq!(info["size"], 8 << 20, "grown past the template's 6M");
    assert_eq!(info["parent"]["image"], "base");
    assert_eq!(info["parent"]["snapshot"], "gold");
    let snaps = cluster
        .rbd(&["snap", "ls", "dv-plan/v1", "--format", "json"])
        .expect("snap ls");
    assert!(snaps.contains("\"s1\""), "{snaps}");
    assert_eq!(
        read_status(&etcd, &volume_status_key(POOL, "v1")).state,
        CephState::Ready
    );
    assert_eq!(
        read_status(&etcd, &snapshot_status_key(POOL, "v1", "s1")).state,
        CephState::Ready
    );
    let at_s1 = super::export(cluster, "dv-plan/v1", "v1.a");
    let original = std::fs::read(&data).expect("read");
    assert!(
        at_s1[..original.len()] == original[..],
        "the clone holds the template's data"
    );

    // Rollback requested through etcd restores the bytes, once per token.
    cluster
        .rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "65536",
            "--io-total",
            "2M",
            "--io-pattern",
            "seq",
            "dv-plan/v1",
        ])
        .expect("overwrite");
    assert!(super::export(cluster, "dv-plan/v1", "v1.b") != at_s1);
    etcd.put_key(
        "ceph/volumes/dv-plan:v1/snapshots/s1/spec",
        r#"{"rollback":"r1"}"#,
    )
    .expect("put rollback");
    converge_volume(&etcd, cli, "dv-plan:v1").await;
    assert!(
        super::export(cluster, "dv-plan/v1", "v1.c") == at_s1,
        "rolled back"
    );
    let st = read_status(&etcd, &snapshot_status_key(POOL, "v1", "s1"));
    assert_eq!(
        (st.state, st.rolled_back.as_deref()),
        (CephState::Ready, Some("r1"))
    );
    assert_eq!(
        reconcile_volume(&etcd, cli, "dv-plan:v1").await,
        0,
        "token done"
    );

    // Bad input: the volume in error naming the field, nothing deleted.
    etcd.put_key(
        "ceph/volumes/dv-plan:v1/spec",
        r#"{"size":"ten","delete":true}"#,
    )
    .expect("put bad spec");
    assert_eq!(reconcile_volume(&etcd, cli, "dv-plan:v1").await, 0);
    let st = read_status(&etcd, &volume_status_key(POOL, "v1"));
    assert_eq!(
        (st.state, st.field.as_deref()),
        (CephState::Error, Some("spec.size"))
    );
    assert!(super::rbd_names_in(cluster, POOL).contains(&"v1".to_string()));
    // Shrink without the flag: error, size kept.
    etcd.put_key("ceph/volumes/dv-plan:v1/spec", r#"{"size":"4M"}"#)
        .expect("put shrink");
    assert_eq!(reconcile_volume(&etcd, cli, "dv-plan:v1").await, 0);
    let st = read_status(&etcd, &volume_status_key(POOL, "v1"));
    assert_eq!(
        (st.state, st.field.as_deref()),
        (CephState::Error, Some("spec.size"))
    );
    assert_eq!(
        cli.rbd_info(&ImageRef::new(POOL, "v1"))
            .await
            .expect("info")
            .size,
        8 << 20
    );

    // Delete: snapshots purged, image gone, status deleted.
    etcd.put_key("ceph/volumes/dv-plan:v1/spec", r#"{"delete":true}"#)
        .expect("put delete");
    converge_volume(&etcd, cli, "dv-plan:v1").await;
    assert!(!super::rbd_names_in(cluster, POOL).contains(&"v1".to_string()));
    assert_eq!(
        read_status(&etcd, &volume_status_key(POOL, "v1")).state,
        CephState::Deleted
    );

    // A protected pool is not deleted; once unprotected it is.
    etcd.put_key(
        "ceph/pools/dv-plan/spec",
        r#"{"pg_num":8,"size":1,"protected":true,"delete":true}"#,
    )
    .expect("put");
    assert_eq!(reconcile_pool(&etcd, cli, POOL).await, 0);
    let st = read_status(&etcd, &pool_status_key(POOL));
    assert_eq!(
        (st.state, st.field.as_deref()),
        (CephState::Error, Some("spec.delete"))
    );
    assert!(cli
        .pool_list()
        .await
        .expect("ls")
        .iter()
        .any(|p| p.pool_name == POOL));
    etcd.put_key(
        "ceph/pools/dv-plan/spec",
        r#"{"pg_num":8,"size":1,"delete":true}"#,
    )
    .expect("put");
    assert_eq!(reconcile_pool(&etcd, cli, POOL).await, 1);
    assert_eq!(reconcile_pool(&etcd, cli, POOL).await, 0);
    assert_eq!(
        read_status(&etcd, &pool_status_key(POOL)).state,
        CephState::Deleted
    );
    assert!(!cli
        .pool_list()
        .await
        .expect("ls")
        .iter()
        .any(|p| p.pool_name == POOL));
}
