//! The Ceph objects end to end: a standalone debvisord with `ceph.enabled` against a real
//! one-host Ceph (1 mon, 1 mgr, 2 memstore OSDs, cephx) and a real etcd. Specs are written
//! to etcd as an operator would; every effect is checked with `ceph`/`rbd` themselves and
//! the status keys. One cluster serves the sections (a cluster start is the expensive part).

use std::time::{Duration, Instant};

use debvisor_objects::ceph::{CephState, CephStatus};
use debvisor_tests::ceph::data_file;
use debvisor_tests::{eventually, CephCluster, DaemonBuilder, DaemonProcess, EtcdProcess};

const POOL: &str = "dv-obj";
const MIB: u64 = 1 << 20;
/// A generous deadline for a reconcile to show (not a speed claim).
const SETTLE: Duration = Duration::from_secs(60);

/// Fields drop in order: the daemon stops before etcd and Ceph go away.
struct Env {
    daemon: DaemonProcess,
    etcd: EtcdProcess,
    cluster: CephCluster,
}

impl Env {
    fn put(&self, key: &str, value: &str) {
        self.etcd.put_key(key, value).expect("etcd put");
    }

    fn status(&self, key: &str) -> Option<CephStatus> {
        let raw = self.etcd.get_key(key).expect("etcd get")?;
        Some(serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{key}: {e}: {raw}")))
    }

    /// Wait until the status at `key` has `state` (and `field`, when given).
    fn wait_status(&self, key: &str, state: CephState, field: Option<&str>) -> CephStatus {
        eventually(
            &format!("{key} state {state:?} field {field:?}"),
            SETTLE,
            || {
                self.status(key).filter(|s| {
                    s.state == state && (field.is_none() || s.field.as_deref() == field)
                })
            },
        )
    }

    /// `mod_revision` of `/debvisor/<key>` (0 when absent).
    fn mod_rev(&self, key: &str) -> i64 {
        self.etcd.mod_revision(key).expect("etcd get").unwrap_or(0)
    }

    fn image_size(&self, spec: &str) -> Option<u64> {
        let out = self.cluster.rbd(&["info", spec, "--format", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).expect("rbd info json");
        v["size"].as_u64()
    }

    fn images(&self) -> Vec<String> {
        let out = self
            .cluster
            .rbd(&["ls", "--pool", POOL, "--format", "json"])
            .expect("rbd ls");
        serde_json::from_str(&out).expect("rbd ls json")
    }

    fn snaps(&self, spec: &str) -> Vec<String> {
        let out = self
            .cluster
            .rbd(&["snap", "ls", spec, "--format", "json"])
            .expect("rbd snap ls");
        let v: Vec<serde_json::Value> = serde_json::from_str(&out).expect("snap ls json");
        v.iter()
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect()
    }

    fn export(&self, spec: &str, name: &str) -> Vec<u8> {
        self.cluster.export(spec, name).expect("rbd export")
    }
}

fn timed(what: &str, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    eprintln!("ceph_object: {what}: {:.1?}", t.elapsed());
}

#[test]
fn ceph_objects_reconciled_by_the_daemon() {
    if !debvisor_tests::ceph_installed() {
        return debvisor_tests::skip_or_fail(
            "the Ceph binaries are not installed (scripts/deps.sh installs them)",
            debvisor_tests::SkipKind::Environment,
        );
    }
    let t0 = Instant::now();
    let cluster = CephCluster::start().expect("starting a one-host Ceph");
    eprintln!("ceph_object: Ceph up: {:.1?}", t0.elapsed());
    let etcd = EtcdProcess::start().expect("etcd");
    eprintln!("ceph_object: etcd up: {:.1?}", t0.elapsed());
    let yaml = format!(
        "ceph:\n  enabled: true\n  conf: {}\n  client: {}\n  keyring: {}\n  interval: 1s\n  timeout: 10s\n",
        cluster.conf_path().display(),
        cluster.client(),
        cluster.keyring_path().display()
    );
    let mut daemon = DaemonBuilder::new("cephobj1")
        .endpoints(&[etcd.endpoint()])
        .yaml(&yaml)
        .spawn()
        .expect("spawn daemon");
    let run = daemon.wait_run(SETTLE).expect("daemon reaches run");
    eprintln!(
        "ceph_object: Ceph, etcd and daemon up: {:.1?}",
        t0.elapsed()
    );
    eprintln!("ceph_object: daemon in run: {run}");
    let objects_stage = daemon
        .json_lines()
        .into_iter()
        .find(|v| {
            debvisor_tests::str_field(v, "stage") == Some("objects")
                && debvisor_tests::str_field(v, "outcome") == Some("ok")
        })
        .expect("objects stage logged");
    let detail = objects_stage["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(detail.contains("0 pools, 0 volumes"), "{detail}");
    let mut env = Env {
        cluster,
        etcd,
        daemon,
    };

    let mut pool_rev = 0;
    timed("pool", || pool_rev = pool_created(&env));
    timed("volume create/grow/shrink", || volume_sizes(&env));
    timed("snapshot and rollback", || snapshot_and_rollback(&env));
    timed("template clone", || template_clone(&env));
    timed("bad input", || bad_input(&env));
    timed("protected pool", || protected_pool(&env, pool_rev));
    timed("volume delete", || volume_delete(&env));
    timed("spec removed", || spec_removed(&mut env));
    timed("teardown (daemon, etcd, Ceph)", || drop(env));
}

/// Returns the `mod_revision` of the ready pool status.
fn pool_created(env: &Env) -> i64 {
    env.put(
        &format!("ceph/pools/{POOL}/spec"),
        r#"{"pg_num":8,"size":1,"protected":true}"#,
    );
    let st = env.wait_status(&format!("ceph/pools/{POOL}/status"), CephState::Ready, None);
    assert!(st.since.is_some(), "since set: {st:?}");
    let size = env
        .cluster
        .ceph_json(&["osd", "pool", "get", POOL, "size"])
        .expect("pool get");
    assert_eq!(size["size"], 1);
    env.mod_rev(&format!("ceph/pools/{POOL}/status"))
}

fn volume_sizes(env: &Env) {
    let spec = format!("{POOL}/v1");
    let key = "ceph/volumes/dv-obj:v1/spec";
    let status = "ceph/volumes/dv-obj:v1/status";
    env.put(key, r#"{"size":"8M"}"#);
    env.wait_status(status, CephState::Ready, None);
    assert_eq!(env.image_size(&spec), Some(8 * MIB));

    env.put(key, r#"{"size":"16M"}"#);
    eventually("v1 grown to 16M", SETTLE, || {
        (env.image_size(&spec) == Some(16 * MIB)).then_some(())
    });
    env.wait_status(status, CephState::Ready, None);

    // Shrink without allow_shrink: refused naming the field, the image unchanged.
    env.put(key, r#"{"size":"4M"}"#);
    let st = env.wait_status(status, CephState::Error, Some("spec.size"));
    assert!(
        st.error.as_deref().unwrap_or("").contains("allow_shrink"),
        "{st:?}"
    );
    assert_eq!(env.image_size(&spec), Some(16 * MIB));
    env.put(key, r#"{"size":"16M"}"#);
    env.wait_status(status, CephState::Ready, None);
}

fn snapshot_and_rollback(env: &Env) {
    // An image with known bytes (the operator imports it), then declared: adopted as is.
    let data = data_file(env.cluster.dir(), "v2.img", 8 << 20, 41).expect("writing test data");
    env.cluster
        .rbd(&[
            "import",
            "--no-progress",
            &data.to_string_lossy(),
            "dv-obj/v2",
        ])
        .expect("import");
    env.etcd
        .put_keys(&[
            ("ceph/volumes/dv-obj:v2/spec", r#"{"size":"8M"}"#),
            ("ceph/volumes/dv-obj:v2/snapshots/s1/spec", "{}"),
        ])
        .expect("put volume with snapshot");
    env.wait_status(
        "ceph/volumes/dv-obj:v2/snapshots/s1/status",
        CephState::Ready,
        None,
    );
    env.wait_status("ceph/volumes/dv-obj:v2/status", CephState::Ready, None);
    assert!(env.snaps("dv-obj/v2").contains(&"s1".to_string()));
    let original = std::fs::read(&data).expect("read data");

    env.cluster.overwrite("dv-obj/v2", "2M").expect("overwrite");
    assert!(env.export("dv-obj/v2", "v2.a") != original, "overwritten");

    env.put(
        "ceph/volumes/dv-obj:v2/snapshots/s1/spec",
        r#"{"rollback":"r1"}"#,
    );
    eventually("rollback r1 recorded", SETTLE, || {
        env.status("ceph/volumes/dv-obj:v2/snapshots/s1/status")
            .filter(|s| s.rolled_back.as_deref() == Some("r1") && s.state == CephState::Ready)
    });
    assert!(env.export("dv-obj/v2", "v2.b") == original, "rolled back");
}

fn template_clone(env: &Env) {
    let data = data_file(env.cluster.dir(), "base.img", 6 << 20, 7).expect("writing test data");
    env.cluster
        .rbd(&[
            "import",
            "--no-progress",
            &data.to_string_lossy(),
            "dv-obj/base",
        ])
        .expect("import base");
    env.cluster
        .rbd(&["snap", "create", "dv-obj/base@gold"])
        .expect("snap");
    // The template is missing at first: an error naming it, retried until it appears.
    env.put(
        "ceph/volumes/dv-obj:v3/spec",
        r#"{"size":"8M","clone_from":{"template":"golden"}}"#,
    );
    env.wait_status(
        "ceph/volumes/dv-obj:v3/status",
        CephState::Error,
        Some("spec.clone_from.template"),
    );
    assert!(!env.images().contains(&"v3".to_string()));
    env.put(
        "templates/golden",
        r#"{"backend":"rbd","pool":"dv-obj","image":"base","snapshot":"gold"}"#,
    );
    env.wait_status("ceph/volumes/dv-obj:v3/status", CephState::Ready, None);
    let info: serde_json::Value = serde_json::from_str(
        &env.cluster
            .rbd(&["info", "dv-obj/v3", "--format", "json"])
            .expect("info"),
    )
    .expect("json");
    assert_eq!(info["size"], 8 << 20, "grown past the template's 6M");
    assert_eq!(info["parent"]["image"], "base");
    assert_eq!(info["parent"]["snapshot"], "gold");
    let original = std::fs::read(&data).expect("read");
    let clone = env.export("dv-obj/v3", "v3.a");
    assert!(
        clone[..original.len()] == original[..],
        "the clone holds the template's data"
    );
}

fn bad_input(env: &Env) {
    let before = env.images();
    env.put("ceph/pools/-bad/spec", "{}");
    env.put("ceph/volumes/dv-obj:v4/spec", r#"{"size":"10X"}"#);
    env.put("ceph/volumes/dv-obj:v5/snapshots/s1/spec", "{}");
    // An existing volume's spec turned invalid (even asking for delete): nothing deleted.
    env.put(
        "ceph/volumes/dv-obj:v1/spec",
        r#"{"size":"ten","delete":true}"#,
    );
    env.wait_status("ceph/pools/-bad/status", CephState::Error, Some("pool"));
    let st = env.wait_status(
        "ceph/volumes/dv-obj:v4/status",
        CephState::Error,
        Some("spec.size"),
    );
    assert!(st.error.as_deref().unwrap_or("").contains("10X"), "{st:?}");
    env.wait_status(
        "ceph/volumes/dv-obj:v5/status",
        CephState::Error,
        Some("spec"),
    );
    env.wait_status(
        "ceph/volumes/dv-obj:v1/status",
        CephState::Error,
        Some("spec.size"),
    );
    // Others unaffected, nothing created or deleted.
    assert_eq!(
        env.status("ceph/volumes/dv-obj:v3/status").map(|s| s.state),
        Some(CephState::Ready)
    );
    assert_eq!(env.images(), before);
    assert_eq!(env.image_size("dv-obj/v1"), Some(16 * MIB));
    let pools = env.cluster.ceph(&["osd", "pool", "ls"]).expect("pool ls");
    assert!(!pools.lines().any(|l| l.contains("bad")), "{pools}");
    env.put("ceph/volumes/dv-obj:v1/spec", r#"{"size":"16M"}"#);
    env.wait_status("ceph/volumes/dv-obj:v1/status", CephState::Ready, None);
}

fn protected_pool(env: &Env, ready_rev: i64) {
    // Resynced every second since it became ready, never rewritten: statuses are written
    // only when they change.
    assert_eq!(
        env.mod_rev(&format!("ceph/pools/{POOL}/status")),
        ready_rev,
        "pool status rewritten without a change"
    );
    env.put(
        &format!("ceph/pools/{POOL}/spec"),
        r#"{"pg_num":8,"size":1,"protected":true,"delete":true}"#,
    );
    env.wait_status(
        &format!("ceph/pools/{POOL}/status"),
        CephState::Error,
        Some("spec.delete"),
    );
    let pools = env.cluster.ceph(&["osd", "pool", "ls"]).expect("pool ls");
    assert!(pools.lines().any(|l| l.trim() == POOL), "{pools}");
    env.put(
        &format!("ceph/pools/{POOL}/spec"),
        r#"{"pg_num":8,"size":1,"protected":true}"#,
    );
    env.wait_status(&format!("ceph/pools/{POOL}/status"), CephState::Ready, None);
}

fn volume_delete(env: &Env) {
    assert!(env.snaps("dv-obj/v2").contains(&"s1".to_string()));
    env.put("ceph/volumes/dv-obj:v2/spec", r#"{"delete":true}"#);
    env.wait_status("ceph/volumes/dv-obj:v2/status", CephState::Deleted, None);
    assert!(!env.images().contains(&"v2".to_string()));
    env.wait_status(
        "ceph/volumes/dv-obj:v2/snapshots/s1/status",
        CephState::Deleted,
        None,
    );
    // The others stay.
    let images = env.images();
    for i in ["v1", "v3", "base"] {
        assert!(images.contains(&i.to_string()), "{i} kept: {images:?}");
    }
}

/// A spec removed from etcd is forgotten, never deleted from Ceph; then Ceph goes away
/// (the mon frozen): a new volume reports `ceph` in error, and becomes ready once it is back.
fn spec_removed(env: &mut Env) {
    env.etcd
        .delete_prefix("ceph/volumes/dv-obj:v1/")
        .expect("delete spec");
    env.daemon
        .wait_for_message("volume spec removed", SETTLE)
        .expect("forget logged");
    assert_eq!(
        env.image_size("dv-obj/v1"),
        Some(16 * MIB),
        "v1 kept in Ceph"
    );

    let node = env.daemon.node().to_string();
    {
        let _pause = env.cluster.pause_mon().expect("pause mon");
        env.put("ceph/volumes/dv-obj:v6/spec", r#"{"size":"8M"}"#);
        let st = env.wait_status("ceph/volumes/dv-obj:v6/status", CephState::Error, None);
        assert!(
            st.field.as_deref().is_some_and(|f| f.starts_with("ceph")),
            "{st:?}"
        );
        assert!(
            env.etcd
                .get_key(&format!("nodes/{node}/alive"))
                .expect("get alive")
                .is_some(),
            "the node stays alive while Ceph is away"
        );
    }
    env.wait_status("ceph/volumes/dv-obj:v6/status", CephState::Ready, None);
    assert_eq!(env.image_size("dv-obj/v6"), Some(8 * MIB));
}
