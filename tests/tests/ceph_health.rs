//! Ceph health and state in the running daemon (`daemon/src/reactors/ceph_monitor.rs`) against a real
//! one-host Ceph: `ceph/health` and the node's own health follow Ceph's health checks, the
//! observed pools/OSDs/volumes follow changes made with the `ceph`/`rbd` tools, a restart
//! rewrites nothing unchanged, and a frozen mon is reported as unreachable while the node's
//! lease and keepalive go on untouched. Two clustered nodes without a primary (no election
//! yet) each report Ceph in their node health but write no cluster state and reconcile no
//! Ceph object.

use std::time::Duration;

use debvisor_tests::{
    ceph_installed, eventually, free_port, is_message, skip_or_fail, str_field, CephCluster,
    DaemonBuilder, DaemonProcess, EtcdProcess, SkipKind,
};
use serde_json::Value;

const NODE: &str = "cephmon";
const POOL: &str = "dvh";
const IMAGE: &str = "img1";
const MIB: u64 = 1 << 20;
/// A generous deadline for the daemon to notice a change (interval 1 s; not a speed claim).
const SEE: Duration = Duration::from_secs(60);

fn json_key(etcd: &EtcdProcess, key: &str) -> Option<Value> {
    let v = etcd.get_key(key).expect("etcd get")?;
    Some(serde_json::from_str(&v).unwrap_or_else(|e| panic!("{key}: invalid JSON {v:?}: {e}")))
}

/// `mod_revision` of `/debvisor/<key>`, if present.
fn mod_revision(etcd: &EtcdProcess, key: &str) -> Option<i64> {
    etcd.mod_revision(key).expect("etcd get")
}

fn health_key() -> String {
    format!("nodes/{NODE}/health")
}

/// The `ceph` field of this node's health, when its status is `status`.
fn node_ceph(etcd: &EtcdProcess, status: &str) -> Option<Value> {
    let h = json_key(etcd, &health_key())?;
    (h["ceph"]["status"] == status).then_some(h)
}

/// The `ceph:` section of a daemon against `cluster` (interval 1 s, no units).
/// The daemon's Ceph section for `cluster`. The CLI timeout is generous: the `ceph` tool
/// (Python) takes seconds just to start on a loaded 2-core machine, and a timeout here is
/// an outage, not what these tests look at.
fn ceph_yaml(cluster: &CephCluster) -> String {
    format!(
        "ceph:\n  enabled: true\n  conf: {}\n  client: {}\n  keyring: {}\n  interval: 1s\n  \
         timeout: 10s\n  coordinator_units: []\n",
        cluster.conf_path().display(),
        cluster.client(),
        cluster.keyring_path().display()
    )
}

fn spawn(etcd: &EtcdProcess, cluster: &CephCluster) -> DaemonProcess {
    spawn_with(etcd, cluster, &[])
}

fn spawn_with(etcd: &EtcdProcess, cluster: &CephCluster, env: &[(&str, &str)]) -> DaemonProcess {
    let mut b = DaemonBuilder::new(NODE)
        .endpoints(&[etcd.endpoint()])
        .yaml(&ceph_yaml(cluster));
    for (k, v) in env {
        b = b.env(k, v);
    }
    let mut d = b.spawn().expect("spawn debvisord");
    d.wait_run(Duration::from_secs(60))
        .expect("daemon reaches run");
    d
}

/// The value of the sample line `series` (name and labels as written) in a `/metrics`
/// scrape of `addr`.
fn metric(addr: &str, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    raw.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn ceph_health_is(etcd: &EtcdProcess, status: &str) -> Option<Value> {
    json_key(etcd, "ceph/health").filter(|h| h["status"] == status)
}

#[test]
fn ceph_health_state_and_outage_in_the_running_daemon() {
    if !ceph_installed() {
        return skip_or_fail(
            "Ceph binaries not installed (scripts/deps.sh installs them)",
            SkipKind::Environment,
        );
    }
    let cluster = CephCluster::start().expect("ceph cluster");
    let etcd = EtcdProcess::start().expect("etcd");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut d = spawn_with(&etcd, &cluster, &[("DEBVISOR_METRICS_LISTEN", &addr)]);

    // Healthy: ceph/health and the node's health agree; this host's two OSDs are up and in.
    eventually("ceph/health HEALTH_OK", SEE, || {
        ceph_health_is(&etcd, "HEALTH_OK")
    });
    let h = eventually("node health with ceph HEALTH_OK", SEE, || {
        node_ceph(&etcd, "HEALTH_OK")
    });
    // /metrics shows the same status, and how long the monitor's pass took.
    eventually("debvisor_ceph_health ok in /metrics", SEE, || {
        (metric(&addr, "debvisor_ceph_health{status=\"ok\"}")? == 1.0).then_some(())
    });
    assert_eq!(
        metric(&addr, "debvisor_ceph_health{status=\"unreachable\"}"),
        Some(0.0)
    );
    // Stored when the pass returns, just after it published the status.
    eventually("a Ceph pass duration in /metrics", SEE, || {
        (metric(&addr, "debvisor_ceph_collection_duration_seconds")? > 0.0).then_some(())
    });
    let osds = h["ceph"]["osds"].as_array().cloned().unwrap_or_default();
    assert_eq!(osds.len(), 2, "this host's OSDs in {h}");
    assert!(
        osds.iter().all(|o| o["up"] == true && o["in"] == true),
        "{h}"
    );
    assert!(
        !h["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p.as_str().is_some_and(|p| p.contains("ceph"))),
        "no ceph problem while healthy: {h}"
    );

    // noout → HEALTH_WARN with OSDMAP_FLAGS, in ceph/health and in the node's health/problems.
    cluster.ceph(&["osd", "set", "noout"]).expect("set noout");
    let ch = eventually("ceph/health HEALTH_WARN", SEE, || {
        ceph_health_is(&etcd, "HEALTH_WARN")
    });
    assert!(ch["checks"]["OSDMAP_FLAGS"].is_object(), "{ch}");
    let h = eventually("node health HEALTH_WARN", SEE, || {
        node_ceph(&etcd, "HEALTH_WARN")
    });
    assert!(
        h["ceph"]["checks"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "OSDMAP_FLAGS")),
        "{h}"
    );
    assert!(
        h["problems"].as_array().is_some_and(|p| p.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.contains("HEALTH_WARN") && p.contains("OSDMAP_FLAGS")))),
        "problems name the check: {h}"
    );
    cluster
        .ceph(&["osd", "unset", "noout"])
        .expect("unset noout");
    eventually("ceph/health back to HEALTH_OK", SEE, || {
        ceph_health_is(&etcd, "HEALTH_OK")
    });
    eventually("node health back to HEALTH_OK", SEE, || {
        node_ceph(&etcd, "HEALTH_OK")
    });

    // Stats: usage and OSDs, then a pool and an image made with the tools, followed.
    let usage = eventually("ceph/usage", SEE, || json_key(&etcd, "ceph/usage"));
    assert!(usage["total_bytes"].as_u64().unwrap_or(0) > 0, "{usage}");
    for id in ["0", "1"] {
        let o = eventually("observed OSD", SEE, || {
            json_key(&etcd, &format!("ceph/observed/osds/{id}"))
        });
        assert_eq!(o["up"], true, "osd.{id}: {o}");
    }
    cluster.rbd_pool(POOL).expect("rbd pool");
    cluster
        .rbd(&["create", &format!("{POOL}/{IMAGE}"), "--size", "16M"])
        .expect("rbd create");
    let pool_key = format!("ceph/observed/pools/{POOL}");
    let vol_key = format!("ceph/observed/volumes/{POOL}:{IMAGE}");
    let p = eventually("observed pool", SEE, || json_key(&etcd, &pool_key));
    assert_eq!(p["pg_num"], 8, "{p}");
    eventually("observed volume of 16 MiB", SEE, || {
        json_key(&etcd, &vol_key).filter(|v| v["size"] == 16 * MIB)
    });
    cluster
        .rbd(&["resize", &format!("{POOL}/{IMAGE}"), "--size", "32M"])
        .expect("rbd resize");
    eventually("observed volume resized to 32 MiB", SEE, || {
        json_key(&etcd, &vol_key).filter(|v| v["size"] == 32 * MIB)
    });
    cluster
        .rbd(&["snap", "create", &format!("{POOL}/{IMAGE}@s1")])
        .expect("rbd snap create");
    eventually("observed snapshot", SEE, || {
        json_key(&etcd, &vol_key).filter(|v| v["snapshots"][0]["name"] == "s1")
    });
    cluster
        .rbd(&["snap", "purge", &format!("{POOL}/{IMAGE}")])
        .expect("rbd snap purge");
    cluster
        .rbd(&["rm", &format!("{POOL}/{IMAGE}")])
        .expect("rbd rm");
    eventually("observed volume deleted", SEE, || {
        json_key(&etcd, &vol_key).is_none().then_some(())
    });
    // Keep one image for the restart and outage checks.
    cluster
        .rbd(&["create", &format!("{POOL}/keep"), "--size", "8M"])
        .expect("rbd create keep");
    let keep_key = format!("ceph/observed/volumes/{POOL}:keep");
    eventually("observed volume keep", SEE, || json_key(&etcd, &keep_key));

    unreadable_volume_is_kept(&cluster, &etcd, &mut d, &keep_key);

    // A restarted daemon compares with what etcd holds: the unchanged volume is not rewritten.
    let rev_before = mod_revision(&etcd, &keep_key).expect("keep key");
    d.signal(libc::SIGTERM).expect("SIGTERM");
    d.wait_exit(Duration::from_secs(30)).expect("graceful stop");
    drop(d);
    let mut d = spawn(&etcd, &cluster);
    eventually("restarted daemon reports ceph", SEE, || {
        node_ceph(&etcd, "HEALTH_OK")
    });
    // The node summary comes from the primary's first pass; give it a few more passes.
    eventually("a few more passes", SEE, || {
        let h = json_key(&etcd, &health_key())?;
        (h["daemon_uptime_s"].as_u64()? >= 3).then_some(())
    });
    assert_eq!(
        mod_revision(&etcd, &keep_key),
        Some(rev_before),
        "an unchanged volume is not rewritten after a restart"
    );

    // The mon frozen: unreachable reported, observed keys kept, lease and keepalive go on.
    let pause = cluster.pause_mon().expect("pause mon");
    let ch = eventually("ceph/health unreachable", SEE, || {
        ceph_health_is(&etcd, "unreachable")
    });
    assert!(
        ch["error"].as_str().is_some_and(|e| !e.is_empty()) && ch["since"].is_string(),
        "{ch}"
    );
    let h = eventually("node health unreachable", SEE, || {
        node_ceph(&etcd, "unreachable")
    });
    assert!(
        h["problems"].as_array().is_some_and(|p| p.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.starts_with("ceph unreachable")))),
        "{h}"
    );
    let rev0 = mod_revision(&etcd, &health_key()).expect("health key");
    let up0 = h["daemon_uptime_s"].as_u64().expect("daemon_uptime_s");
    // Several keepalive ticks while Ceph calls hang for their whole timeout.
    eventually("keepalive ticks go on while ceph hangs", SEE, || {
        let h = json_key(&etcd, &health_key())?;
        let rev = mod_revision(&etcd, &health_key())?;
        (rev >= rev0 + 5 && h["daemon_uptime_s"].as_u64()? >= up0 + 5).then_some(())
    });
    assert!(
        etcd.get_key(&format!("nodes/{NODE}/alive"))
            .expect("get alive")
            .is_some(),
        "the lease still holds alive"
    );
    assert!(
        json_key(&etcd, &pool_key).is_some() && json_key(&etcd, &keep_key).is_some(),
        "observed keys are kept while Ceph is unreachable"
    );
    assert!(d.is_running());
    drop(pause);

    eventually(
        "ceph/health recovers to HEALTH_OK",
        Duration::from_secs(180),
        || ceph_health_is(&etcd, "HEALTH_OK"),
    );
    eventually("node health recovers", Duration::from_secs(60), || {
        node_ceph(&etcd, "HEALTH_OK")
    });
    let lines = d.json_lines();
    let count = |m: &str| lines.iter().filter(|v| is_message(v, m)).count();
    assert_eq!(
        count("ceph unreachable; reporting it and keeping the observed state"),
        1,
        "one warning per outage"
    );
    assert_eq!(count("ceph reachable again"), 1, "one line on recovery");
    assert!(
        !lines
            .iter()
            .any(|v| is_message(v, "ceph call timed out; killed") && v["level"] == "WARN"),
        "the monitor's timed-out calls are not a warning each"
    );
    assert!(
        !lines
            .iter()
            .any(|v| is_message(v, "node lease lost; re-registering")),
        "the lease never lapsed"
    );
}

/// `keep`'s header damaged (its `size` made undecodable: librbd fails to open it with EIO):
/// the daemon warns naming pool and image, keeps `keep_key` untouched (neither deleted nor
/// rewritten) and goes on observing the pool (a volume created meanwhile shows up); the
/// header is restored at the end.
fn unreadable_volume_is_kept(
    cluster: &CephCluster,
    etcd: &EtcdProcess,
    d: &mut DaemonProcess,
    keep_key: &str,
) {
    let rev = mod_revision(etcd, keep_key).expect("keep key");
    let info: Value = serde_json::from_str(
        &cluster
            .rbd(&["info", &format!("{POOL}/keep"), "--format", "json"])
            .expect("rbd info keep"),
    )
    .expect("rbd info JSON");
    let id = info["id"].as_str().expect("image id");
    let mut damage = cluster
        .damage_header(POOL, id)
        .expect("damage the header's size");
    let warned = d.wait_for(
        |v| {
            is_message(v, "ceph: volume not readable; its last observation is kept")
                && str_field(v, "pool") == Some(POOL)
                && str_field(v, "image") == Some("keep")
                && str_field(v, "error").is_some_and(|e| !e.is_empty())
        },
        SEE,
    );
    cluster
        .rbd(&["create", &format!("{POOL}/later"), "--size", "8M"])
        .expect("rbd create later");
    let later = eventually("a volume made while keep is unreadable", SEE, || {
        json_key(etcd, &format!("ceph/observed/volumes/{POOL}:later"))
    });
    let kept = mod_revision(etcd, keep_key);
    // Repaired before the assertions, so that the rest of the test finds `keep` readable.
    damage.repair().expect("restore the header's size");
    warned.expect("warning naming pool and image");
    assert_eq!(later["size"], 8 * MIB, "{later}");
    assert_eq!(
        kept,
        Some(rev),
        "the unreadable volume's key is left as it was"
    );
}

/// The `ceph` field of `node`'s health when its status is `status`.
fn ceph_of(etcd: &EtcdProcess, node: &str, status: &str) -> Option<Value> {
    let h = json_key(etcd, &format!("nodes/{node}/health"))?;
    (h["ceph"]["status"] == status).then(|| h["ceph"].clone())
}

#[test]
fn clustered_nodes_without_a_primary_report_but_neither_write_nor_reconcile() {
    if !ceph_installed() {
        return skip_or_fail(
            "Ceph binaries not installed (scripts/deps.sh installs them)",
            SkipKind::Environment,
        );
    }
    const NODES: [&str; 2] = ["cephsec1", "cephsec2"];
    const SPEC_POOL: &str = "dvsec";
    let cluster = CephCluster::start().expect("ceph cluster");
    let etcd = EtcdProcess::start().expect("etcd");
    // Clustered nodes whose coordinator list names neither of them: neither may stand in
    // the election, so the cluster has no primary.
    let _daemons: Vec<DaemonProcess> = NODES
        .iter()
        .map(|n| {
            let mut d = DaemonBuilder::new(n)
                .endpoints(&[etcd.endpoint()])
                .env("DEBVISOR_NODE_MODE", "clustered")
                .env("DEBVISOR_NODE_COORDINATORS", "cephsec9")
                .yaml(&ceph_yaml(&cluster))
                .spawn()
                .expect("spawn debvisord");
            d.wait_run(Duration::from_secs(60))
                .expect("daemon reaches run");
            d
        })
        .collect();
    etcd.put_key(
        &format!("ceph/pools/{SPEC_POOL}/spec"),
        r#"{"pg_num":8,"size":1}"#,
    )
    .expect("put pool spec");

    // Each node reports Ceph in its own health, with this host's OSDs (the cluster's OSDs
    // run on this host, so both nodes see the same two as theirs: the hostname matches).
    for n in NODES {
        let c = eventually(&format!("{n}: ceph HEALTH_OK"), SEE, || {
            ceph_of(&etcd, n, "HEALTH_OK")
        });
        let mut ids: Vec<i64> = c["osds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["id"].as_i64())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [0, 1], "{n}: this host's OSDs in {c}");
    }
    // Several passes that a primary would have written: both nodes follow HEALTH_WARN (noout)
    // and back to HEALTH_OK, so each has asked Ceph at least twice after the spec was put.
    cluster.ceph(&["osd", "set", "noout"]).expect("set noout");
    for n in NODES {
        let c = eventually(&format!("{n}: ceph HEALTH_WARN"), SEE, || {
            ceph_of(&etcd, n, "HEALTH_WARN")
        });
        assert!(
            c["checks"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == "OSDMAP_FLAGS")),
            "{n}: {c}"
        );
    }
    cluster
        .ceph(&["osd", "unset", "noout"])
        .expect("unset noout");
    for n in NODES {
        eventually(&format!("{n}: ceph back to HEALTH_OK"), SEE, || {
            ceph_of(&etcd, n, "HEALTH_OK")
        });
    }
    // Three more health writes of each node with the summary in them (seen revisions: a
    // lower bound of the writes).
    for n in NODES {
        let key = format!("nodes/{n}/health");
        let mut seen = std::collections::BTreeSet::new();
        eventually(
            &format!("{n}: three more health writes with ceph"),
            SEE,
            || {
                let rev = mod_revision(&etcd, &key)?;
                if ceph_of(&etcd, n, "HEALTH_OK").is_some()
                    && mod_revision(&etcd, &key) == Some(rev)
                {
                    seen.insert(rev);
                }
                (seen.len() > 3).then_some(())
            },
        );
    }

    // No primary: no cluster state written, the pool spec not reconciled.
    for key in ["ceph/health", "ceph/usage"] {
        assert_eq!(etcd.get_key(key).expect("etcd get"), None, "{key} written");
    }
    assert_eq!(
        etcd.keys_under("ceph/observed/").expect("etcd keys"),
        Vec::<String>::new(),
        "observed keys written without a primary"
    );
    assert_eq!(
        etcd.get_key(&format!("ceph/pools/{SPEC_POOL}/status"))
            .expect("etcd get"),
        None,
        "pool status written without a primary"
    );
    let pools = cluster.ceph(&["osd", "pool", "ls"]).expect("pool ls");
    assert!(
        !pools.lines().any(|l| l.trim() == SPEC_POOL),
        "pool {SPEC_POOL} created without a primary: {pools}"
    );
}
