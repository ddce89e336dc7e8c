//! The Ceph driver (`debvisor_daemon::ceph`) against a real one-host Ceph (1 mon, 1 mgr,
//! 2 memstore OSDs on 127.0.0.1, cephx), every effect checked with `ceph`/`rbd` themselves.
//! One cluster serves the sections of one test (a cluster start is the expensive part).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use debvisor_daemon::ceph::{
    break_fenced_locks, collect_state, diff, local_osds, plan_lock_hygiene, purge_and_remove,
    release_stale_locks, volume_in_use, Ceph, CephCli, CephError, HealthStatus, ImageRef,
    KeyChange, LockVerdict, NodeAddrs,
};
use debvisor_tests::ceph::data_file;
use debvisor_tests::CephCluster;

const POOL: &str = "dv-test";
const MIB: u64 = 1 << 20;
/// A generous deadline for cluster state to settle (not a speed claim).
const SETTLE: Duration = Duration::from_secs(60);

/// Per-call latencies, printed at the end (measured, never asserted).
#[derive(Default)]
struct Latencies(BTreeMap<&'static str, Vec<Duration>>);

impl Latencies {
    async fn time<T>(&mut self, what: &'static str, f: impl Future<Output = T>) -> T {
        let t = Instant::now();
        let r = f.await;
        self.0.entry(what).or_default().push(t.elapsed());
        r
    }

    fn report(&self) {
        for (what, ds) in &self.0 {
            let max = ds.iter().max().copied().unwrap_or_default();
            let avg = ds.iter().sum::<Duration>() / ds.len().max(1) as u32;
            eprintln!(
                "ceph latency: {what:<22} n={:<2} avg={avg:>8.1?} max={max:>8.1?}",
                ds.len()
            );
        }
    }
}

/// Poll `f` until it yields `Some`, failing with `what` after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_driver_against_a_real_cluster() {
    let cluster = CephCluster::start().expect("starting a one-host Ceph");
    eprintln!("ceph cluster start: {:.1?}", cluster.started_in());
    let cli = cluster.cli(Duration::from_secs(60));
    let mut lat = Latencies::default();

    health_ok_then_warn_with_noout(&cluster, &cli, &mut lat).await;
    osds_usage_and_metadata(&cluster, &cli, &mut lat).await;
    pool_lifecycle(&cluster, &cli, &mut lat).await;
    volume_lifecycle_and_clone(&cluster, &cli, &mut lat).await;
    snapshot_rollback_restores_data(&cluster, &cli, &mut lat).await;
    lock_hygiene(&cluster, &cli, &mut lat).await;
    fenced_locks_broken(&cluster, &cli, &mut lat).await;
    state_collection(&cli, &mut lat).await;
    unreadable_volume_keeps_its_observation(&cluster, &cli).await;
    errors_name_the_object(&cli).await;
    timeout_against_a_frozen_mon(&cluster).await;
    lat.report();
    eprintln!(
        "ceph daemons RSS at the end: {} MiB",
        cluster.rss_bytes() >> 20
    );
}

async fn health_ok_then_warn_with_noout(cluster: &CephCluster, cli: &CephCli, lat: &mut Latencies) {
    let st = lat.time("status", cli.status()).await.expect("status");
    assert_eq!(st.fsid, cluster.fsid());
    assert_eq!(st.health.status, HealthStatus::Ok, "{:?}", st.health);
    assert_eq!((st.osdmap.num_osds, st.osdmap.num_up_osds), (2, 2));
    assert!(st.mgrmap.available);

    lat.time("osd set", cli.osd_flag("noout", true))
        .await
        .expect("set noout");
    let h = eventually("HEALTH_WARN with OSDMAP_FLAGS", SETTLE, || async {
        let h = cli.health().await.ok()?;
        (h.status == HealthStatus::Warn && h.checks.contains_key("OSDMAP_FLAGS")).then_some(h)
    })
    .await;
    let check = &h.checks["OSDMAP_FLAGS"];
    assert_eq!(check.severity, HealthStatus::Warn);
    assert!(check.message.contains("noout"), "{check:?}");
    // Ceph itself agrees.
    let raw = cluster.ceph_json(&["health"]).expect("ceph health");
    assert_eq!(raw["status"], "HEALTH_WARN");
    assert!(raw["checks"]["OSDMAP_FLAGS"].is_object(), "{raw}");
    let st = cli.status().await.expect("status");
    assert_eq!(st.health.status, HealthStatus::Warn);
    assert!(st.health.checks.contains_key("OSDMAP_FLAGS"));

    cli.osd_flag("noout", false).await.expect("unset noout");
    eventually("HEALTH_OK after unsetting noout", SETTLE, || async {
        let h = cli.health().await.ok()?;
        (h.status == HealthStatus::Ok).then_some(())
    })
    .await;
}

async fn osds_usage_and_metadata(cluster: &CephCluster, cli: &CephCli, lat: &mut Latencies) {
    let tree = lat
        .time("osd tree", cli.osd_tree())
        .await
        .expect("osd tree");
    let meta = lat
        .time("osd metadata", cli.osd_metadata())
        .await
        .expect("osd metadata");
    assert_eq!(meta.len(), 2);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    for m in &meta {
        assert_eq!(m.hostname, hostname.trim(), "OSDs run on this host");
        assert_eq!(m.osd_objectstore, "memstore");
        assert_eq!(tree.host_of(m.id), Some(hostname.trim()));
    }
    let osd_df = lat.time("osd df", cli.osd_df()).await.expect("osd df");
    assert_eq!(osd_df.nodes.len(), 2);
    assert!(osd_df.nodes.iter().all(|o| o.kb > 0 && o.reweight == 1.0));
    let df = lat.time("df", cli.df()).await.expect("df");
    let raw = cluster.ceph_json(&["df"]).expect("ceph df");
    assert_eq!(
        Some(df.stats.total_bytes),
        raw["stats"]["total_bytes"].as_u64()
    );
}

async fn pool_lifecycle(cluster: &CephCluster, cli: &CephCli, lat: &mut Latencies) {
    lat.time("pool create", cli.pool_create(POOL, 8, 1))
        .await
        .expect("pool create");
    let pools = lat.time("pool ls", cli.pool_list()).await.expect("pool ls");
    let p = pools
        .iter()
        .find(|p| p.pool_name == POOL)
        .expect("the new pool is listed");
    assert_eq!((p.pg_num, p.size), (8, 1));
    assert!(p.application_metadata.contains_key("rbd"));
    let size = cluster
        .ceph_json(&["osd", "pool", "get", POOL, "size"])
        .expect("pool get");
    assert_eq!(size["size"], 1);

    lat.time("pool set size", cli.pool_set_size(POOL, 2))
        .await
        .expect("size 2");
    let size = cluster
        .ceph_json(&["osd", "pool", "get", POOL, "size"])
        .expect("pool get");
    assert_eq!(size["size"], 2);
    cli.pool_set_size(POOL, 1).await.expect("size 1");

    // Creating an existing pool again is harmless (idempotent reconcile).
    cli.pool_create(POOL, 8, 1).await.expect("create again");

    cli.pool_create("dv-doomed", 8, 1)
        .await
        .expect("second pool");
    lat.time("pool delete", cli.pool_delete("dv-doomed"))
        .await
        .expect("pool delete");
    let names = cluster.ceph_json(&["osd", "pool", "ls"]).expect("pool ls");
    let names: Vec<&str> = names
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        names.contains(&POOL) && !names.contains(&"dv-doomed"),
        "{names:?}"
    );
    // Ceph answers success for a pool that is already gone (idempotent delete).
    cli.pool_delete("dv-doomed")
        .await
        .expect("deleting a deleted pool");
}

fn rbd_info_size(cluster: &CephCluster, spec: &str) -> u64 {
    let out = cluster
        .rbd(&["info", spec, "--format", "json"])
        .expect("rbd info");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["size"].as_u64().expect("size")
}

fn rbd_names(cluster: &CephCluster) -> Vec<String> {
    rbd_names_in(cluster, POOL)
}

fn rbd_names_in(cluster: &CephCluster, pool: &str) -> Vec<String> {
    let out = cluster
        .rbd(&["ls", "--pool", pool, "--format", "json"])
        .expect("rbd ls");
    serde_json::from_str(&out).expect("json")
}

async fn volume_lifecycle_and_clone(cluster: &CephCluster, cli: &CephCli, lat: &mut Latencies) {
    let vol = ImageRef::new(POOL, "vol1");
    lat.time("rbd create", cli.rbd_create(&vol, 64 * MIB))
        .await
        .expect("create");
    assert_eq!(rbd_info_size(cluster, "dv-test/vol1"), 64 * MIB);
    let info = lat
        .time("rbd info", cli.rbd_info(&vol))
        .await
        .expect("info");
    assert_eq!(info.size, 64 * MIB);
    assert!(info.parent.is_none());

    lat.time("rbd resize", cli.rbd_resize(&vol, 128 * MIB, false))
        .await
        .expect("grow");
    assert_eq!(rbd_info_size(cluster, "dv-test/vol1"), 128 * MIB);
    let e = cli
        .rbd_resize(&vol, 32 * MIB, false)
        .await
        .expect_err("shrink without the flag");
    let msg = e.to_string();
    assert!(
        msg.contains("dv-test/vol1") && msg.contains("allow-shrink"),
        "{msg}"
    );
    assert_eq!(
        rbd_info_size(cluster, "dv-test/vol1"),
        128 * MIB,
        "unchanged"
    );
    cli.rbd_resize(&vol, 32 * MIB, true)
        .await
        .expect("shrink with the flag");
    assert_eq!(rbd_info_size(cluster, "dv-test/vol1"), 32 * MIB);

    // A template: data imported, snapshot, protected; a clone shows the same bytes.
    let src =
        data_file(cluster.dir(), "template.img", 6 * MIB as usize, 7).expect("writing test data");
    cluster
        .rbd(&[
            "import",
            "--no-progress",
            &src.to_string_lossy(),
            "dv-test/tmpl",
        ])
        .expect("rbd import");
    let tmpl = ImageRef::new(POOL, "tmpl");
    lat.time("rbd snap create", cli.rbd_snap_create(&tmpl, "base"))
        .await
        .expect("snap");
    lat.time("rbd snap protect", cli.rbd_snap_protect(&tmpl, "base"))
        .await
        .expect("protect");
    // What the volume reconciler looks at: in-process (librbd) and with the tools, the same.
    cli.rbd_snap_create(&tmpl, "later").await.expect("snap");
    let tools = cli.clone().without_librbd();
    assert!(cli.uses_librbd(), "librbd is loadable here");
    let state = lat
        .time("image state (librbd)", cli.rbd_image_state(&tmpl))
        .await
        .expect("image state")
        .expect("the image exists");
    assert_eq!(
        (state.size, state.snapshots.clone()),
        (
            6 * MIB,
            vec![("base".to_string(), true), ("later".to_string(), false)]
        )
    );
    let by_tools = lat
        .time(
            "image state (rbd info + snap ls)",
            tools.rbd_image_state(&tmpl),
        )
        .await
        .expect("image state by the tools");
    assert_eq!(by_tools, Some(state));
    for c in [cli, &tools] {
        let gone = c.rbd_image_state(&ImageRef::new(POOL, "nosuch")).await;
        assert_eq!(gone.expect("an absent image is no error"), None);
        let no_pool = c.rbd_image_state(&ImageRef::new("nosuchpool", "x")).await;
        assert_eq!(no_pool.expect("an absent pool is no error"), None);
    }
    cli.rbd_snap_remove(&tmpl, "later").await.expect("snap rm");
    let clone = ImageRef::new(POOL, "vol2");
    lat.time("rbd clone", cli.rbd_clone(&tmpl, "base", &clone))
        .await
        .expect("clone");
    let info = cli.rbd_info(&clone).await.expect("clone info");
    let parent = info.parent.expect("a clone has a parent");
    assert_eq!(
        (parent.image.as_str(), parent.snapshot.as_str()),
        ("tmpl", "base")
    );
    let original = std::fs::read(&src).expect("read template data");
    assert!(
        cluster
            .export("dv-test/vol2", "vol2.export")
            .expect("rbd export")
            == original,
        "clone differs"
    );

    let du = lat.time("rbd du", cli.rbd_du(POOL)).await.expect("du");
    let used = du
        .iter()
        .find(|u| u.name == "tmpl" && u.snapshot.as_deref() == Some("base"))
        .expect("du lists the template snapshot");
    assert_eq!(used.provisioned_size, 6 * MIB);
    let names = lat.time("rbd ls", cli.rbd_list(POOL)).await.expect("ls");
    assert!(names.contains(&"vol2".to_string()) && names.contains(&"tmpl".to_string()));

    // The template cannot go while its clone exists; the error names the snapshot.
    let e = purge_and_remove(cli, &tmpl)
        .await
        .expect_err("clone still depends on tmpl@base");
    assert!(
        e.is_busy() && e.to_string().contains("dv-test/tmpl@base"),
        "{e}"
    );
    assert!(
        rbd_names(cluster).contains(&"tmpl".to_string()),
        "nothing removed"
    );
    // Clone first, then the template with its protected snapshot.
    purge_and_remove(cli, &clone).await.expect("remove clone");
    lat.time("purge+remove", purge_and_remove(cli, &tmpl))
        .await
        .expect("remove template with its snapshot");
    purge_and_remove(cli, &vol).await.expect("remove vol1");
    let left = rbd_names(cluster);
    assert!(left.is_empty(), "{left:?}");
    // Removing what is gone is fine.
    purge_and_remove(cli, &vol).await.expect("idempotent");
}

async fn snapshot_rollback_restores_data(
    cluster: &CephCluster,
    cli: &CephCli,
    lat: &mut Latencies,
) {
    let src =
        data_file(cluster.dir(), "vol3.img", 4 * MIB as usize, 11).expect("writing test data");
    cluster
        .rbd(&[
            "import",
            "--no-progress",
            &src.to_string_lossy(),
            "dv-test/vol3",
        ])
        .expect("rbd import");
    let vol = ImageRef::new(POOL, "vol3");
    let original = cluster
        .export("dv-test/vol3", "vol3.a")
        .expect("rbd export");
    assert!(original == std::fs::read(&src).expect("read"));
    cli.rbd_snap_create(&vol, "auto-20261123-180000")
        .await
        .expect("snapshot");
    let snaps = lat
        .time("rbd snap ls", cli.rbd_snap_list(&vol))
        .await
        .expect("snap ls");
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].name, "auto-20261123-180000");
    assert!(!snaps[0].protected);

    // Overwrite the head with other data.
    cluster
        .overwrite("dv-test/vol3", "4M")
        .expect("rbd bench write");
    let overwritten = cluster
        .export("dv-test/vol3", "vol3.b")
        .expect("rbd export");
    assert!(overwritten != original, "the bench write changed the image");

    lat.time(
        "rbd snap rollback",
        cli.rbd_snap_rollback(&vol, "auto-20261123-180000"),
    )
    .await
    .expect("rollback");
    let restored = cluster
        .export("dv-test/vol3", "vol3.c")
        .expect("rbd export");
    assert!(
        restored == original,
        "rollback restores the snapshot's bytes"
    );

    lat.time(
        "rbd snap rm",
        cli.rbd_snap_remove(&vol, "auto-20261123-180000"),
    )
    .await
    .expect("snap rm");
    let out = cluster
        .rbd(&["snap", "ls", "dv-test/vol3", "--format", "json"])
        .expect("snap ls");
    assert_eq!(out.trim(), "[]");
}

async fn lock_hygiene(cluster: &CephCluster, cli: &CephCli, lat: &mut Latencies) {
    let vol = ImageRef::new(POOL, "vol3");
    cluster
        .rbd(&["lock", "add", "dv-test/vol3", "debvisor-test"])
        .expect("rbd lock add");
    let locks = lat
        .time("rbd lock ls", cli.rbd_lock_list(&vol))
        .await
        .expect("lock ls");
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].id, "debvisor-test");
    assert!(locks[0].locker.starts_with("client."));
    assert_eq!(locks[0].ip(), Some([127, 0, 0, 1].into()));
    let watchers = lat
        .time("rbd status", cli.rbd_watchers(&vol))
        .await
        .expect("status");
    assert!(watchers.is_empty(), "{watchers:?}");

    // Seen from a node whose peer n2 has 127.0.0.1: held by n2, nothing released.
    let elsewhere = NodeAddrs {
        local: vec!["10.255.0.1".parse().expect("ip")],
        others: BTreeMap::from([("n2".to_string(), vec!["127.0.0.1".parse().expect("ip")])]),
    };
    let v = release_stale_locks(cli, &vol, &elsewhere)
        .await
        .expect("check");
    assert_eq!(
        v,
        LockVerdict::HeldBy {
            node: "n2".into(),
            what: "debvisor-test".into()
        }
    );
    assert_eq!(cli.rbd_lock_list(&vol).await.expect("ls").len(), 1, "kept");

    // While another client's advisory lock stands, `rbd rm` waits for it: the call times
    // out (its child killed) and the image stays. The timeout leaves the tool time to
    // connect and open the image under load (its watch is what comes next); it can never
    // succeed while the foreign lock stands.
    let e = cluster
        .cli(Duration::from_secs(15))
        .rbd_remove(&vol)
        .await
        .expect_err("rm waits for the foreign lock");
    assert!(e.is_timeout(), "{e}");
    assert!(rbd_names(cluster).contains(&"vol3".to_string()));
    // The killed client's watch lingers (osd_client_watch_timeout, 30 s): the image looks in
    // use until it expires or the client is blocklisted.
    let stale = eventually("the killed rm's watch", SETTLE, || async {
        let w = cli.rbd_watchers(&vol).await.ok()?;
        (!w.is_empty()).then_some(w)
    })
    .await;
    assert!(volume_in_use(cli, &vol).await.expect("rbd status"));
    for w in &stale {
        lat.time("blocklist add", cli.blocklist_add(&w.address))
            .await
            .expect("blocklist the killed client");
    }
    eventually("the stale watch is gone", SETTLE, || async {
        cli.rbd_watchers(&vol).await.ok()?.is_empty().then_some(())
    })
    .await;

    // Seen from the holder itself: stale, released.
    let here = NodeAddrs {
        local: vec!["127.0.0.1".parse().expect("ip")],
        others: BTreeMap::new(),
    };
    assert!(matches!(
        plan_lock_hygiene(&locks, &watchers, &here),
        LockVerdict::Release(ref l) if l.len() == 1
    ));
    let v = lat
        .time("lock hygiene", release_stale_locks(cli, &vol, &here))
        .await
        .expect("release");
    assert!(
        matches!(v, LockVerdict::Release(ref l) if l.len() == 1),
        "{v:?}"
    );
    let out = cluster
        .rbd(&["lock", "ls", "dv-test/vol3", "--format", "json"])
        .expect("lock ls");
    assert_eq!(out.trim(), "[]", "the lock is gone for rbd too");
    purge_and_remove(cli, &vol).await.expect("remove vol3");
}

/// Recovery of a fenced node's VM: its Ceph client is blocklisted and its RBD lock broken;
/// a lock of any other address is left alone.
async fn fenced_locks_broken(cluster: &CephCluster, cli: &CephCli, lat: &mut Latencies) {
    let vol = ImageRef::new(POOL, "fenced1");
    cli.rbd_create(&vol, MIB).await.expect("create");
    cluster
        .rbd(&["lock", "add", "dv-test/fenced1", "fenced-node"])
        .expect("rbd lock add");
    let other: std::net::IpAddr = "10.255.0.9".parse().expect("ip");
    let kept = break_fenced_locks(cli, &vol, &[other], "n9", "vm1")
        .await
        .expect("another node's address");
    assert_eq!(kept, 0);
    assert_eq!(cli.rbd_lock_list(&vol).await.expect("ls").len(), 1, "kept");
    let holder = cli.rbd_lock_list(&vol).await.expect("ls")[0]
        .address
        .clone();
    let fenced: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    let broken = lat
        .time(
            "break fenced locks",
            break_fenced_locks(cli, &vol, &[fenced], "n9", "vm1"),
        )
        .await
        .expect("break");
    assert_eq!(broken, 1);
    let out = cluster
        .rbd(&["lock", "ls", "dv-test/fenced1", "--format", "json"])
        .expect("lock ls");
    assert_eq!(
        out.trim(),
        "[]",
        "the fenced node's lock is gone for rbd too"
    );
    let blocklist = cluster
        .ceph(&["osd", "blocklist", "ls"])
        .expect("blocklist ls");
    assert!(blocklist.contains(&holder), "{holder} not in {blocklist}");
    purge_and_remove(cli, &vol).await.expect("remove fenced1");
}

async fn state_collection(cli: &CephCli, lat: &mut Latencies) {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let meta = cli.osd_metadata().await.expect("metadata");
    assert_eq!(local_osds(&meta, hostname.trim()), [0, 1]);
    assert!(local_osds(&meta, "some-other-node").is_empty());

    let before = lat
        .time("collect state", collect_state(cli))
        .await
        .expect("collect")
        .state;
    let json = |m: &BTreeMap<String, String>, k: &str| -> serde_json::Value {
        serde_json::from_str(m.get(k).unwrap_or_else(|| panic!("{k} collected"))).expect("json")
    };
    assert_eq!(json(&before, "ceph/health")["status"], "HEALTH_OK");
    assert!(json(&before, "ceph/usage")["total_bytes"].as_u64() > Some(0));
    for id in [0, 1] {
        let osd = json(&before, &format!("ceph/observed/osds/{id}"));
        assert_eq!(
            (osd["up"].as_bool(), osd["in"].as_bool()),
            (Some(true), Some(true)),
            "{osd}"
        );
        assert_eq!(osd["node"], hostname.trim());
    }
    let pool = json(&before, "ceph/observed/pools/dv-test");
    assert_eq!(
        (pool["size"].as_u64(), pool["pg_num"].as_u64()),
        (Some(1), Some(8))
    );

    // A new volume with a snapshot shows up, and only it (and usage) changes.
    let vol = ImageRef::new(POOL, "observed1");
    cli.rbd_create(&vol, 16 * MIB).await.expect("create");
    cli.rbd_snap_create(&vol, "s1").await.expect("snap");
    let after = collect_state(cli).await.expect("collect").state;
    let v = json(&after, "ceph/observed/volumes/dv-test:observed1");
    assert_eq!(v["size"], 16 * MIB);
    assert_eq!(v["snapshots"][0]["name"], "s1");
    assert_eq!(v["parent"], serde_json::Value::Null);
    let changes = diff(&before, &after);
    assert!(changes.contains(&KeyChange::Put(
        "ceph/observed/volumes/dv-test:observed1".into(),
        after["ceph/observed/volumes/dv-test:observed1"].clone()
    )));
    assert!(
        changes.iter().all(|c| !matches!(c, KeyChange::Delete(_))),
        "{changes:?}"
    );
    purge_and_remove(cli, &vol).await.expect("remove");
    let gone = collect_state(cli).await.expect("collect").state;
    assert!(diff(&after, &gone).contains(&KeyChange::Delete(
        "ceph/observed/volumes/dv-test:observed1".into()
    )));
}

/// A volume whose header cannot be read (its `size` made undecodable with `rados
/// setomapval`: librbd fails to open it with EIO) does not fail the collection, is not taken
/// for gone (its key is neither deleted nor overwritten), and the other volumes are listed.
async fn unreadable_volume_keeps_its_observation(cluster: &CephCluster, cli: &CephCli) {
    if !cli.uses_librbd() {
        eprintln!("skipped unreadable volume: librbd not loadable (the `rbd` tool gives no per-image verdict)");
        return;
    }
    let (good, bad) = (
        ImageRef::new(POOL, "readable1"),
        ImageRef::new(POOL, "broken1"),
    );
    for v in [&good, &bad] {
        cli.rbd_create(v, MIB).await.expect("create");
    }
    cli.rbd_snap_create(&bad, "s1").await.expect("snap");
    let (good_key, bad_key) = (
        "ceph/observed/volumes/dv-test:readable1",
        "ceph/observed/volumes/dv-test:broken1",
    );
    let before = collect_state(cli).await.expect("collect");
    assert!(before.unreadable.is_empty(), "{:?}", before.unreadable);
    assert!(before.state.contains_key(bad_key) && before.state.contains_key(good_key));

    let id = cli.rbd_info(&bad).await.expect("info").id;
    let mut damage = cluster
        .damage_header(POOL, &id)
        .expect("damage the header's size");
    let during = collect_state(cli).await;
    // Repaired before any assertion, so that the volume can be removed whatever happens.
    damage.repair().expect("restore the header's size");
    let during = during.expect("one unreadable volume does not fail the collection");
    assert_eq!(during.unreadable, BTreeSet::from([bad_key.to_owned()]));
    assert!(!during.state.contains_key(bad_key));
    assert_eq!(during.state.get(good_key), before.state.get(good_key));
    let changes = during.changes_since(&before.state);
    assert!(
        changes.iter().all(|c| match c {
            KeyChange::Put(k, _) | KeyChange::Delete(k) => k != bad_key,
        }),
        "{changes:?}"
    );

    let after = collect_state(cli).await.expect("collect");
    assert!(after.unreadable.is_empty(), "{:?}", after.unreadable);
    assert_eq!(after.state.get(bad_key), before.state.get(bad_key));
    for v in [&good, &bad] {
        purge_and_remove(cli, v).await.expect("remove");
    }
}

async fn errors_name_the_object(cli: &CephCli) {
    let missing = ImageRef::new(POOL, "nope");
    let e = cli.rbd_info(&missing).await.expect_err("missing image");
    assert!(e.is_not_found(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("rbd info dv-test/nope") && msg.contains("image dv-test/nope"),
        "{msg}"
    );
    let e = cli
        .rbd_snap_create(&missing, "s1")
        .await
        .expect_err("snapshot of a missing volume");
    assert!(
        e.is_not_found() && e.to_string().contains("dv-test/nope@s1"),
        "{e}"
    );
    let e = cli
        .rbd_create(&ImageRef::new("no-such-pool", "v"), MIB)
        .await
        .expect_err("missing pool");
    assert!(e.is_not_found(), "{e}");
    let e = cli
        .rbd_create(&ImageRef::new(POOL, "bad/name"), MIB)
        .await
        .expect_err("invalid name");
    assert!(
        matches!(e, CephError::InvalidName { what: "image", .. }),
        "{e}"
    );
}

/// The ceph processes running with this cluster's config (children the driver spawned).
fn tool_processes(conf: &Path) -> Vec<u32> {
    let conf = conf.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_tool = args
            .iter()
            .take(2)
            .any(|a| a.ends_with("/ceph") || a == "ceph");
        if is_tool && args.contains(&conf) && args.iter().any(|a| a == "status") {
            out.push(pid);
        }
    }
    out
}

async fn timeout_against_a_frozen_mon(cluster: &CephCluster) {
    let short = cluster.cli(Duration::from_secs(2));
    {
        let _paused = cluster.pause_mon().expect("SIGSTOP the mon");
        let e = short.status().await.expect_err("the mon does not answer");
        assert!(e.is_timeout(), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("ceph status") && msg.contains("timed out after 2s"),
            "{msg}"
        );
        // The timed-out child was killed, not left hunting for the mon.
        eventually("the timed-out ceph process is gone", SETTLE, || async {
            tool_processes(&cluster.conf_path())
                .is_empty()
                .then_some(())
        })
        .await;
    }
    // Once the mon runs again, the same driver answers.
    eventually("status after the mon resumed", SETTLE, || async {
        short.status().await.ok()
    })
    .await;
}
