//! `debvisorctl ceph …` against a real etcd: the real binary, the spec keys it writes (read
//! back raw and through the parsers the primary uses), what it refuses (argument named,
//! nothing written), what it prints (JSON and tables), the compare-and-swap guard, the status
//! summary from keys in the primary's format, and `--wait` with the test playing the
//! primary's part in etcd. No Ceph is needed: `debvisorctl` only talks to etcd.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use debvisor_daemon::ctl::ceph as ctl_ceph;
use debvisor_objects::ceph::{parse_pool, parse_template, parse_volume, CloneSource};
use debvisor_objects::KeyEntry;
use debvisor_tests::CtlCluster as Cluster;
use etcd_client::Client;
use serde_json::{json, Value};

const P: &str = "/debvisor/";

async fn raw(c: &mut Client, key: &str) -> Option<(Vec<u8>, i64)> {
    let r = c.get(format!("{P}{key}"), None).await.expect("get");
    r.kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision()))
}

async fn get_json(c: &mut Client, key: &str) -> Option<Value> {
    raw(c, key)
        .await
        .map(|(v, _)| serde_json::from_slice(&v).expect("stored JSON"))
}

async fn put(c: &mut Client, key: &str, value: &str) {
    c.put(format!("{P}{key}"), value, None).await.expect("put");
}

/// The keys of one object under `prefix` (relative), as the reactor groups them.
async fn object(c: &mut Client, prefix: &str) -> BTreeMap<String, KeyEntry> {
    let r = c
        .get(
            format!("{P}{prefix}"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("list");
    r.kvs()
        .iter()
        .map(|kv| {
            let k = String::from_utf8_lossy(kv.key()).into_owned();
            (
                k.strip_prefix(&format!("{P}{prefix}"))
                    .expect("under prefix")
                    .to_string(),
                KeyEntry {
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                },
            )
        })
        .collect()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Wait (event-driven, no timing assertion) until `key` exists: the CLI running in the
/// background has written its request.
async fn until_written(c: &mut Client, key: &str) -> i64 {
    loop {
        if let Some((_, rev)) = raw(c, key).await {
            return rev;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_add_list_show_set_remove() {
    let cl = Cluster::start();
    let mut c = cl.client().await;

    let added = cl.json(&[
        "ceph", "pool", "add", "rbd", "--pg-num", "64", "--size", "2",
    ]);
    let spec = get_json(&mut c, "ceph/pools/rbd/spec")
        .await
        .expect("spec written");
    assert_eq!(added["spec"], spec);
    assert_eq!(
        spec,
        json!({"pg_num": 64, "size": 2, "protected": false, "delete": false})
    );
    let p = parse_pool("rbd", &object(&mut c, "ceph/pools/rbd/").await).expect("parses");
    assert_eq!((p.spec.pg_num, p.spec.size), (64, 2));
    let text = cl.ok(&["ceph", "pool", "add", "vms", "--protected"]);
    assert!(text.contains("pool vms added"), "{text}");
    let p = parse_pool("vms", &object(&mut c, "ceph/pools/vms/").await).expect("defaults");
    assert!(p.spec.protected && p.spec.size == 3 && p.spec.pg_num == 32);

    // Refusals: argument named, nothing written.
    cl.refused(&["ceph", "pool", "add", "rbd"], "already exists")
        .await;
    cl.refused(&["ceph", "pool", "add", "a/b"], "POOL").await;
    cl.refused(&["ceph", "pool", "add", "_x"], "POOL").await;
    cl.refused(&["ceph", "pool", "add", "p1", "--pg-num", "48"], "--pg-num")
        .await;
    cl.refused(&["ceph", "pool", "add", "p1", "--size", "0"], "--size")
        .await;
    cl.refused(&["ceph", "pool", "add", "p1", "--size", "11"], "--size")
        .await;
    cl.refused(&["ceph", "pool", "set", "rbd"], "--size").await;
    cl.refused(&["ceph", "pool", "set", "nope", "--size", "2"], "not found")
        .await;

    // The primary's reports; one pool exists in Ceph without being declared.
    put(
        &mut c,
        "ceph/pools/rbd/status",
        r#"{"state":"ready","since":"2026-11-23T10:00:00Z"}"#,
    )
    .await;
    put(
        &mut c,
        "ceph/pools/vms/status",
        r#"{"state":"error","field":"spec.size","error":"only 2 OSDs"}"#,
    )
    .await;
    put(
        &mut c,
        "ceph/observed/pools/rbd",
        r#"{"id":1,"size":2,"min_size":1,"pg_num":64,"applications":["rbd"],"stored":1048576,"objects":3,"bytes_used":2097152,"max_avail":1073741824}"#,
    )
    .await;
    put(
        &mut c,
        "ceph/observed/pools/.mgr",
        r#"{"id":2,"size":3,"min_size":2,"pg_num":1,"applications":["mgr"],"stored":0,"objects":0,"bytes_used":0,"max_avail":0}"#,
    )
    .await;
    let list = cl.json(&["ceph", "pool", "list"]);
    let arr = list.as_array().expect("array");
    let names: Vec<&str> = arr.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, [".mgr", "rbd", "vms"]);
    assert_eq!(arr[0]["declared"], false);
    assert_eq!(arr[0]["observed"]["pg_num"], 1);
    assert_eq!(arr[1]["status"]["state"], "ready");
    assert_eq!(arr[1]["observed"]["stored"], 1048576);
    assert_eq!(arr[1]["valid"], true);
    assert_eq!(arr[2]["status"]["error"], "only 2 OSDs");
    assert!(arr[2]["observed"].is_null());
    let table = cl.ok(&["ceph", "pool", "list"]);
    let mut lines = table.lines();
    let header = lines.next().expect("header");
    for col in ["POOL", "PG_NUM", "SIZE", "PROTECTED", "STATE", "STORED"] {
        assert!(header.contains(col), "{header}");
    }
    let rbd = table
        .lines()
        .find(|l| l.starts_with("rbd "))
        .expect("rbd row");
    assert!(rbd.contains("ready") && rbd.contains("1M"), "{rbd}");
    let vms = table
        .lines()
        .find(|l| l.starts_with("vms "))
        .expect("vms row");
    assert!(vms.contains("spec.size: only 2 OSDs"), "{vms}");
    assert!(table.contains("undeclared"), "{table}");

    let show = cl.json(&["ceph", "pool", "show", "rbd"]);
    assert_eq!(show["spec"]["size"], 2);
    assert_eq!(show["observed"]["id"], 1);
    let show = cl.json(&["ceph", "pool", "show", ".mgr"]);
    assert_eq!(show["declared"], false);
    cl.refused(&["ceph", "pool", "show", "a/b"], "POOL").await;
    cl.refused(&["ceph", "pool", "show", "nope"], "not found")
        .await;

    // set keeps the other fields.
    let v = cl.json(&[
        "ceph",
        "pool",
        "set",
        "rbd",
        "--size",
        "3",
        "--protected",
        "true",
    ]);
    assert_eq!(v["spec"]["size"], 3);
    let p = parse_pool("rbd", &object(&mut c, "ceph/pools/rbd/").await).expect("parses");
    assert_eq!(
        (p.spec.pg_num, p.spec.size, p.spec.protected),
        (64, 3, true)
    );

    // remove: refused while protected, naming it; then delete: true in the spec.
    let e = cl
        .refused(&["ceph", "pool", "remove", "rbd"], "protected")
        .await;
    assert!(e.contains("--protected false"), "{e}");
    cl.ok(&["ceph", "pool", "set", "rbd", "--protected", "false"]);
    cl.ok(&["ceph", "volume", "add", "rbd/vm1", "--size", "1G"]);
    let e = cl
        .refused(&["ceph", "pool", "remove", "rbd"], "rbd/vm1")
        .await;
    assert!(e.contains("still has declared volumes"), "{e}");
    cl.ok(&["ceph", "volume", "remove", "rbd/vm1"]);
    let text = cl.ok(&["ceph", "pool", "remove", "rbd"]);
    assert!(text.contains("removal requested"), "{text}");
    let p = parse_pool("rbd", &object(&mut c, "ceph/pools/rbd/").await).expect("parses");
    assert!(p.spec.delete && !p.spec.protected && p.spec.size == 3);
    cl.refused(&["ceph", "pool", "remove", "nope"], "not found")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_snapshots_and_templates() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    cl.ok(&["ceph", "pool", "add", "rbd"]);

    // Templates.
    let t = cl.json(&[
        "ceph",
        "template",
        "add",
        "deb12",
        "--pool",
        "rbd",
        "--image",
        "deb12-base",
        "--snapshot",
        "golden",
    ]);
    let (tv, _) = raw(&mut c, "templates/deb12").await.expect("template");
    assert_eq!(
        parse_template("deb12", &tv).expect("parses").image,
        "deb12-base"
    );
    assert_eq!(t["spec"]["backend"], "rbd");
    cl.refused(
        &[
            "ceph",
            "template",
            "add",
            "bad",
            "--pool",
            "rbd",
            "--image",
            "a@b",
            "--snapshot",
            "s",
        ],
        "--image",
    )
    .await;
    cl.refused(
        &[
            "ceph",
            "template",
            "add",
            "deb12",
            "--pool",
            "rbd",
            "--image",
            "i",
            "--snapshot",
            "s",
        ],
        "already exists",
    )
    .await;
    let tl = cl.json(&["ceph", "template", "list"]);
    assert_eq!(tl[0]["name"], "deb12");
    assert_eq!(tl[0]["valid"], true);
    assert!(cl
        .ok(&["ceph", "template", "list"])
        .contains("rbd/deb12-base@golden"));
    assert_eq!(
        cl.json(&["ceph", "template", "show", "deb12"])["snapshot"],
        "golden"
    );

    // Volumes.
    let v = cl.json(&["ceph", "volume", "add", "rbd/vm1", "--size", "10G"]);
    assert_eq!(v["spec"], json!({"size": "10G"}));
    let vol =
        parse_volume("rbd:vm1", &object(&mut c, "ceph/volumes/rbd:vm1/").await).expect("parses");
    assert_eq!(vol.spec.size, 10 << 30);
    cl.ok(&[
        "ceph",
        "volume",
        "add",
        "rbd/vm2",
        "--size",
        "20G",
        "--from-template",
        "deb12",
    ]);
    let vol =
        parse_volume("rbd:vm2", &object(&mut c, "ceph/volumes/rbd:vm2/").await).expect("parses");
    assert_eq!(
        vol.spec.clone_from,
        Some(CloneSource::Template("deb12".into()))
    );
    cl.ok(&[
        "ceph",
        "volume",
        "add",
        "rbd/vm3",
        "--size",
        "20G",
        "--clone-from",
        "rbd/vm1@s1",
    ]);
    let vol =
        parse_volume("rbd:vm3", &object(&mut c, "ceph/volumes/rbd:vm3/").await).expect("parses");
    assert_eq!(
        vol.spec.clone_from,
        Some(CloneSource::Snapshot {
            pool: "rbd".into(),
            image: "vm1".into(),
            snapshot: "s1".into()
        })
    );
    for (args, needle) in [
        (vec!["rbd/vm1", "--size", "1G"], "already exists"),
        (vec!["rbd/x", "--size", "1.5G"], "--size"),
        (vec!["rbd/x", "--size", "0"], "--size"),
        (vec!["rbd/x", "--size", "2P"], "--size"),
        (vec!["rbd/a@b", "--size", "1G"], "VOLUME"),
        (vec!["rbd", "--size", "1G"], "VOLUME"),
        (vec!["nopool/x", "--size", "1G"], "pool nopool of VOLUME"),
        (
            vec!["rbd/x", "--size", "1G", "--from-template", "missing"],
            "--from-template",
        ),
        (
            vec!["rbd/x", "--size", "1G", "--clone-from", "rbd/vm1"],
            "--clone-from",
        ),
    ] {
        let mut a = vec!["ceph", "volume", "add"];
        a.extend(args);
        cl.refused(&a, needle).await;
    }

    // Resize: shrinking needs --allow-shrink; the observed size counts when known.
    put(
        &mut c,
        "ceph/observed/volumes/rbd:vm1",
        r#"{"size":10737418240,"used":1048576,"parent":null,"snapshots":[{"name":"s0","size":10737418240,"protected":false,"used":0}]}"#,
    )
    .await;
    put(
        &mut c,
        "ceph/volumes/rbd:vm1/status",
        r#"{"state":"ready"}"#,
    )
    .await;
    let e = cl
        .refused(&["ceph", "volume", "resize", "rbd/vm1", "5G"], "SIZE")
        .await;
    assert!(e.contains("--allow-shrink"), "{e}");
    cl.refused(&["ceph", "volume", "resize", "rbd/vm1", "5X"], "SIZE")
        .await;
    cl.refused(&["ceph", "volume", "resize", "rbd/none", "5G"], "not found")
        .await;
    cl.ok(&["ceph", "volume", "resize", "rbd/vm1", "20G"]);
    let vol =
        parse_volume("rbd:vm1", &object(&mut c, "ceph/volumes/rbd:vm1/").await).expect("parses");
    assert_eq!((vol.spec.size, vol.spec.allow_shrink), (20 << 30, false));
    cl.ok(&[
        "ceph",
        "volume",
        "resize",
        "rbd/vm1",
        "5G",
        "--allow-shrink",
    ]);
    let vol =
        parse_volume("rbd:vm1", &object(&mut c, "ceph/volumes/rbd:vm1/").await).expect("parses");
    assert_eq!((vol.spec.size, vol.spec.allow_shrink), (5 << 30, true));

    // Snapshots.
    let s = cl.json(&["ceph", "snapshot", "add", "rbd/vm1", "s1"]);
    assert_eq!(s["spec"], json!({}));
    let auto = cl.json(&["ceph", "snapshot", "add", "rbd/vm1"]);
    let auto_name = auto["snapshot"].as_str().expect("name").to_string();
    assert!(
        auto_name.starts_with("auto-") && auto_name.len() == "auto-20261123-180405".len(),
        "{auto_name}"
    );
    cl.refused(
        &["ceph", "snapshot", "add", "rbd/vm1", "s1"],
        "already exists",
    )
    .await;
    cl.refused(&["ceph", "snapshot", "add", "rbd/vm1", "a@b"], "SNAPSHOT")
        .await;
    let e = cl
        .refused(&["ceph", "snapshot", "add", "rbd/ghost", "s1"], "rbd/ghost")
        .await;
    assert!(e.contains("has no spec"), "{e}");
    cl.refused(
        &["ceph", "snapshot", "rollback", "rbd/vm1", "nope"],
        "not found",
    )
    .await;

    let r1 = cl.json(&["ceph", "snapshot", "rollback", "rbd/vm1", "s1"]);
    let t1 = r1["spec"]["rollback"].as_str().expect("token").to_string();
    let r2 = cl.json(&["ceph", "snapshot", "rollback", "rbd/vm1", "s1"]);
    let t2 = r2["spec"]["rollback"].as_str().expect("token").to_string();
    assert_ne!(t1, t2, "every rollback writes a new token");
    let vol =
        parse_volume("rbd:vm1", &object(&mut c, "ceph/volumes/rbd:vm1/").await).expect("parses");
    assert_eq!(
        vol.snapshots["s1"]
            .as_ref()
            .expect("s1")
            .rollback
            .as_deref(),
        Some(t2.as_str())
    );
    assert!(vol.snapshots[&auto_name].is_ok());

    put(
        &mut c,
        "ceph/volumes/rbd:vm1/snapshots/s1/status",
        r#"{"state":"ready","rolled_back":"x"}"#,
    )
    .await;
    let sl = cl.json(&["ceph", "snapshot", "list", "rbd/vm1"]);
    let names: Vec<&str> = sl
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, [auto_name.as_str(), "s0", "s1"]);
    let s0 = &sl[1];
    assert_eq!(
        (s0["declared"].clone(), s0["observed"]["protected"].clone()),
        (json!(false), json!(false))
    );
    assert_eq!(sl[2]["status"]["state"], "ready");
    let table = cl.ok(&["ceph", "snapshot", "list", "rbd/vm1"]);
    assert!(table.starts_with("SNAPSHOT"), "{table}");
    assert!(table.contains("undeclared"), "{table}");

    cl.ok(&["ceph", "snapshot", "remove", "rbd/vm1", "s1"]);
    let vol =
        parse_volume("rbd:vm1", &object(&mut c, "ceph/volumes/rbd:vm1/").await).expect("parses");
    let s1 = vol.snapshots["s1"].as_ref().expect("s1");
    assert!(s1.delete);
    assert_eq!(s1.rollback.as_deref(), Some(t2.as_str()));

    // Lists and show.
    let vl = cl.json(&["ceph", "volume", "list"]);
    let vols: Vec<&str> = vl
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v["volume"].as_str())
        .collect();
    assert_eq!(vols, ["rbd/vm1", "rbd/vm2", "rbd/vm3"]);
    assert_eq!(vl[0]["observed"]["used"], 1048576);
    assert_eq!(vl[0]["snapshots"], 3);
    assert_eq!(vl[0]["size_bytes"], 5u64 << 30);
    assert!(cl
        .json(&["ceph", "volume", "list", "--pool", "other"])
        .as_array()
        .expect("array")
        .is_empty());
    cl.refused(&["ceph", "volume", "list", "--pool", "a/b"], "--pool")
        .await;
    let table = cl.ok(&["ceph", "volume", "list"]);
    assert!(table.starts_with("VOLUME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("rbd/vm1") && l.contains("ready")),
        "{table}"
    );
    let show = cl.json(&["ceph", "volume", "show", "rbd/vm1"]);
    assert_eq!(show["snapshots"].as_array().expect("snapshots").len(), 3);
    assert_eq!(show["status"]["state"], "ready");
    cl.refused(&["ceph", "volume", "show", "rbd/none"], "not found")
        .await;

    cl.ok(&["ceph", "volume", "remove", "rbd/vm2"]);
    let vol =
        parse_volume("rbd:vm2", &object(&mut c, "ceph/volumes/rbd:vm2/").await).expect("parses");
    assert!(vol.spec.delete && vol.spec.size == 20 << 30);
    cl.refused(
        &["ceph", "snapshot", "add", "rbd/vm2", "s9"],
        "being removed",
    )
    .await;
    cl.refused(
        &["ceph", "volume", "resize", "rbd/vm2", "30G"],
        "being removed",
    )
    .await;

    let v = cl.json(&["ceph", "template", "remove", "deb12"]);
    assert_eq!(v["deleted"], true);
    assert!(raw(&mut c, "templates/deb12").await.is_none());
    cl.refused(&["ceph", "template", "remove", "deb12"], "not found")
        .await;
    cl.refused(&["ceph", "template", "show", "a/b"], "NAME")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_compare_and_swap_on_the_revision_read() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    cl.ok(&["ceph", "pool", "add", "rbd", "--size", "2"]);
    let st = cl.store().await;
    let key = "ceph/pools/rbd/spec";
    let (_, stale) = raw(&mut c, key).await.expect("spec");
    // Someone else protects the pool between our read and our write.
    put(
        &mut c,
        key,
        r#"{"pg_num":32,"size":2,"protected":true,"delete":false}"#,
    )
    .await;
    let planned = ctl_ceph::plan_pool_spec(
        "rbd",
        Some(&KeyEntry {
            value: br#"{"pg_num":32,"size":2,"protected":false,"delete":false}"#.to_vec(),
            mod_revision: stale,
            lease: 0,
        }),
        None,
        None,
        None,
        Some(true),
    )
    .expect("plan");
    let before = cl.etcd.current_revision().await.expect("revision");
    assert_eq!(
        ctl_ceph::put_guarded(&st, key, stale, planned, &[])
            .await
            .expect("txn"),
        None,
        "a stale write must lose"
    );
    assert_eq!(cl.etcd.current_revision().await.expect("revision"), before);
    assert_eq!(
        get_json(&mut c, key).await.expect("spec")["protected"],
        true
    );
    // A create guarded on absence loses against an existing key too.
    assert_eq!(
        ctl_ceph::put_guarded(&st, key, 0, b"{}".to_vec(), &[])
            .await
            .expect("txn"),
        None
    );
    // The CLI re-reads: its change applies on top of the other one, which is kept; and the
    // protection written meanwhile now refuses the removal.
    cl.ok(&["ceph", "pool", "set", "rbd", "--size", "3"]);
    let spec = get_json(&mut c, key).await.expect("spec");
    assert_eq!(
        (spec["size"].clone(), spec["protected"].clone()),
        (json!(3), json!(true))
    );
    cl.refused(&["ceph", "pool", "remove", "rbd"], "protected")
        .await;

    // A snapshot write is also guarded on its volume's spec.
    cl.ok(&["ceph", "volume", "add", "rbd/vm1", "--size", "1G"]);
    let (_, vrev) = raw(&mut c, "ceph/volumes/rbd:vm1/spec")
        .await
        .expect("volume");
    put(
        &mut c,
        "ceph/volumes/rbd:vm1/spec",
        r#"{"size":"1G","delete":true}"#,
    )
    .await;
    assert_eq!(
        ctl_ceph::put_guarded(
            &st,
            "ceph/volumes/rbd:vm1/snapshots/s1/spec",
            0,
            b"{}".to_vec(),
            &[("ceph/volumes/rbd:vm1/spec".into(), vrev)]
        )
        .await
        .expect("txn"),
        None
    );
    assert!(raw(&mut c, "ceph/volumes/rbd:vm1/snapshots/s1/spec")
        .await
        .is_none());
    // An operator spec that is not JSON is named, not overwritten.
    put(&mut c, key, "not json").await;
    cl.refused(
        &["ceph", "pool", "set", "rbd", "--size", "2"],
        "ceph/pools/rbd/spec",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_summarises_what_the_primary_wrote() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    let v = cl.json(&["ceph", "status"]);
    assert_eq!(v["reported"], false);
    assert!(v["health"].is_null());
    let text = cl.ok(&["ceph", "status"]);
    assert!(text.contains("no Ceph state reported yet"), "{text}");
    assert!(text.contains("ceph/health"), "{text}");

    // The primary's format (daemon/src/ceph/collect.rs).
    put(
        &mut c,
        "ceph/health",
        r#"{"status":"HEALTH_WARN","checks":{"OSDMAP_FLAGS":{"severity":"HEALTH_WARN","message":"noout flag(s) set","detail":[],"muted":false}}}"#,
    )
    .await;
    put(
        &mut c,
        "ceph/usage",
        r#"{"total_bytes":3221225472,"avail_bytes":2147483648,"used_bytes":1073741824,"used_ratio":0.3333}"#,
    )
    .await;
    for (id, up, inn) in [(0, true, true), (1, true, true), (2, false, false)] {
        put(
            &mut c,
            &format!("ceph/observed/osds/{id}"),
            &json!({"up": up, "in": inn, "node": format!("n{id}"), "crush_host": format!("n{id}"),
                "kb": 1048576, "kb_used": 1024, "utilization": 0.1, "pgs": 33})
            .to_string(),
        )
        .await;
    }
    put(
        &mut c,
        "ceph/observed/pools/rbd",
        r#"{"id":1,"size":3,"min_size":2,"pg_num":32,"applications":["rbd"],"stored":0,"objects":0,"bytes_used":0,"max_avail":0}"#,
    )
    .await;
    cl.ok(&["ceph", "pool", "add", "rbd"]);
    cl.ok(&["ceph", "pool", "add", "vms"]);
    put(&mut c, "ceph/pools/rbd/status", r#"{"state":"ready"}"#).await;
    put(
        &mut c,
        "ceph/pools/vms/status",
        r#"{"state":"error","field":"spec.size","error":"x"}"#,
    )
    .await;

    let v = cl.json(&["ceph", "status"]);
    assert_eq!(v["reported"], true);
    assert_eq!(v["health"]["status"], "HEALTH_WARN");
    assert_eq!(v["usage"]["total_bytes"], 3221225472u64);
    assert_eq!(
        v["osds"],
        json!({"total": 3, "up": 2, "in": 2, "down": ["2"]})
    );
    assert_eq!(v["pools"]["declared"], 2);
    assert_eq!(v["pools"]["observed"], 1);
    assert_eq!(v["pools"]["ready"], 1);
    assert_eq!(v["pools"]["error"], json!(["vms"]));
    let text = cl.ok(&["ceph", "status"]);
    for needle in [
        "health: HEALTH_WARN",
        "OSDMAP_FLAGS HEALTH_WARN: noout flag(s) set",
        "1G used of 3G",
        "3 total, 2 up, 2 in; down: 2",
        "2 declared (1 ready), 1 in Ceph; in error: vms",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_end_on_the_primarys_status() {
    let cl = Cluster::start();
    let mut c = cl.client().await;

    // Ready after the request: success, the status printed.
    let h = cl.spawn(&[
        "ceph",
        "pool",
        "add",
        "rbd",
        "--wait",
        "--timeout",
        "60s",
        "-o",
        "json",
    ]);
    let rev = until_written(&mut c, "ceph/pools/rbd/spec").await;
    assert!(rev > 0);
    put(&mut c, "ceph/pools/rbd/status", r#"{"state":"pending"}"#).await;
    put(&mut c, "ceph/pools/rbd/status", r#"{"state":"ready"}"#).await;
    let out = h.await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["status"]["state"], "ready");

    // An error status: exit 1 with the reason, the status still on stdout.
    cl.ok(&["ceph", "volume", "add", "rbd/vm1", "--size", "1G"]);
    let h = cl.spawn(&[
        "ceph",
        "volume",
        "resize",
        "rbd/vm1",
        "2G",
        "--wait",
        "--timeout",
        "60s",
        "-o",
        "json",
    ]);
    loop {
        let s = get_json(&mut c, "ceph/volumes/rbd:vm1/spec")
            .await
            .expect("spec");
        if s["size"] == "2G" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    put(
        &mut c,
        "ceph/volumes/rbd:vm1/status",
        r#"{"state":"error","field":"spec.size","error":"no space"}"#,
    )
    .await;
    let out = h.await.expect("join");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no space"), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["status"]["state"], "error");

    // A rollback waits for its own token.
    cl.ok(&["ceph", "snapshot", "add", "rbd/vm1", "s1"]);
    let h = cl.spawn(&[
        "ceph",
        "snapshot",
        "rollback",
        "rbd/vm1",
        "s1",
        "--wait",
        "--timeout",
        "60s",
    ]);
    let token = loop {
        let s = get_json(&mut c, "ceph/volumes/rbd:vm1/snapshots/s1/spec")
            .await
            .expect("spec");
        if let Some(t) = s["rollback"].as_str() {
            break t.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    put(
        &mut c,
        "ceph/volumes/rbd:vm1/snapshots/s1/status",
        r#"{"state":"ready","rolled_back":"older"}"#,
    )
    .await;
    put(
        &mut c,
        "ceph/volumes/rbd:vm1/snapshots/s1/status",
        &json!({"state": "ready", "rolled_back": token}).to_string(),
    )
    .await;
    let out = h.await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("snapshot s1 of rbd/vm1: ready"),
        "{}",
        stdout(&out)
    );

    // Nobody answers: exit 1 after the timeout, with the current status.
    let out = cl.run(&[
        "ceph",
        "volume",
        "remove",
        "rbd/vm1",
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
    assert!(stderr(&out).contains("deleted"), "{}", stderr(&out));
    let spec = get_json(&mut c, "ceph/volumes/rbd:vm1/spec")
        .await
        .expect("spec");
    assert_eq!(spec["delete"], true, "the request stays written");
}
