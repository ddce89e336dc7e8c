//! RBD lock hygiene of the Domain object with real KVM guests whose disks are RBD volumes of
//! a real one-host Ceph cluster (qemu's rbd block driver, cephx through a libvirt secret):
//! a guest starts through the Domain object and qemu opens its volume; while it is open, a
//! rollback or a removal of that volume declared as a Ceph object is refused on that object
//! only (error status naming the field; the data and the guest unaffected); a lock held by another
//! live node refuses the start naming that node, then (node gone) naming the address, and the
//! guest starts once the lock is removed; a stale lock of this node's own address is released
//! and the guest starts; while Ceph does not answer the start is refused, and made once it
//! answers again.
//!
//! Needs root, Ceph and qemu's rbd driver (guests run under KVM when qemu may use it, else
//! TCG). Guests, the secret, etcd, the daemons and
//! the cluster are removed by their guards, also when the test fails.

use std::time::Duration;

use debvisor_daemon::ceph::{collect_state, Collected};
use debvisor_daemon::hypervisor::{DomainState, Libvirt};
use debvisor_tests::libvirt::{
    assert_guest_uses_kvm, require_kvm, system_libvirt, TestDomain, QEMU_URI,
};
use debvisor_tests::rbd_guest::{
    qemu_io_write_at, rbd_guest_skip_reason, with_devices, CephSecret,
};
use debvisor_tests::{
    eventually, is_message, skip_or_fail, skip_unless_root, str_field, CephCluster, DaemonBuilder,
    DaemonProcess, EtcdProcess, SkipKind, TestVm,
};
use serde_json::{json, Value};

/// Generous deadline (libvirt answers slowly on a loaded 2-core machine); not a speed claim.
const WAIT: Duration = Duration::from_secs(120);
const POOL: &str = "dvrbd";

fn daemon(
    etcd: &EtcdProcess,
    cluster: &CephCluster,
    node: &str,
    state_dir: &std::path::Path,
    client_addresses: &str,
) -> DaemonProcess {
    let yaml = format!(
        "ceph:\n  enabled: true\n  conf: {}\n  client: {}\n  keyring: {}\n  timeout: 20s\n  client_addresses: {client_addresses}\n",
        cluster.conf_path().display(),
        cluster.client(),
        cluster.keyring_path().display(),
    );
    let mut d = DaemonBuilder::qemu(node, etcd, state_dir)
        .env("DEBVISOR_HYPERVISOR_TIMEOUT", "60s")
        .yaml(&yaml)
        .spawn()
        .expect("spawn daemon");
    d.wait_run(WAIT).expect("daemon reaches run");
    d
}

fn vm(d: &TestDomain) -> TestVm {
    TestVm::of_domain(d, WAIT)
}

/// Define `d` in etcd on `node` with `disk` added to the tiny guest, state start.
fn define(etcd: &EtcdProcess, d: &TestDomain, node: &str, disk: &str) {
    let xml = with_devices(&d.xml(), disk);
    vm(d).put(etcd, &[("xml", &xml), ("node", node), ("state", "start")]);
}

fn active(rt: &tokio::runtime::Runtime, lv: &Libvirt, d: &TestDomain) -> bool {
    rt.block_on(lv.get(&d.uuid))
        .ok()
        .flatten()
        .is_some_and(|i| i.state == DomainState::Running)
}

fn rbd_json(cluster: &CephCluster, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    let out = cluster.rbd(&a).expect("rbd");
    serde_json::from_str(&out).expect("rbd json")
}

fn watchers(cluster: &CephCluster, image: &str) -> Vec<Value> {
    rbd_json(cluster, &["status", &format!("{POOL}/{image}")])["watchers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `(id, locker)` of each lock on the image.
fn locks(cluster: &CephCluster, image: &str) -> Vec<(String, String)> {
    let v = rbd_json(cluster, &["lock", "ls", &format!("{POOL}/{image}")]);
    // Ceph 16 prints an array of {id, locker, address}.
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|l| {
                    (
                        l["id"].as_str().unwrap_or_default().to_string(),
                        l["locker"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Register node `name` as its daemon would (alive on a lease, info with `addresses`);
/// returns the lease (revoke it to make the node dead).
fn add_node(etcd: &EtcdProcess, name: &str, addresses: &[&str]) -> i64 {
    let info = json!({
        "hostname": name, "addresses": addresses, "version": "0.1.0",
        "cpus": 1, "memory_mib": 1024,
    })
    .to_string();
    let (alive_key, info_key) = (
        format!("/debvisor/nodes/{name}/alive"),
        format!("/debvisor/nodes/{name}/info"),
    );
    etcd.with_client(|mut c| async move {
        let err = |e: etcd_client::Error| debvisor_tests::HarnessError::State(e.to_string());
        let lease = c.lease_grant(120, None).await.map_err(err)?.id();
        c.put(info_key, info, None).await.map_err(err)?;
        c.put(
            alive_key,
            r#"{"hostname":"other","pid":1}"#,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(err)?;
        Ok(lease)
    })
    .expect("register the other node")
}

fn revoke(etcd: &EtcdProcess, lease: i64) {
    etcd.with_client(|mut c| async move {
        c.lease_revoke(lease)
            .await
            .map_err(|e| debvisor_tests::HarnessError::State(e.to_string()))?;
        Ok(())
    })
    .expect("revoke lease");
}

/// `/debvisor/<rel>` parsed as a Ceph object status.
fn ceph_status(etcd: &EtcdProcess, rel: &str) -> Option<Value> {
    let raw = etcd.get_key(rel).expect("etcd get")?;
    serde_json::from_str(&raw).ok()
}

/// Wait for the status at `rel` to have `state` (and, for an error, `field`).
fn wait_ceph_status(etcd: &EtcdProcess, rel: &str, state: &str, field: Option<&str>) -> Value {
    eventually(&format!("{rel} {state} {field:?}"), WAIT, || {
        ceph_status(etcd, rel)
            .filter(|s| s["state"] == state && field.is_none_or(|f| s["field"] == f))
    })
}

fn snapshots(cluster: &CephCluster, image: &str) -> Vec<String> {
    rbd_json(cluster, &["snap", "ls", &format!("{POOL}/{image}")])
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// disk1 (16M, open by the running guest `g`) declared as `ceph/volumes/dvrbd:disk1` with
/// snapshot s1, made by the daemon; then data other than s1 is written. A rollback to s1 is
/// refused (the snapshot's status names `snapshots/s1/spec.rollback`, the volume stays
/// ready, the token is not recorded, the data and the guest are unchanged); `delete: true`
/// is refused naming `spec.delete` and the image stays. Both requests are withdrawn after.
fn volume_in_use_refuses_rollback_and_delete(
    etcd: &EtcdProcess,
    cluster: &CephCluster,
    rt: &tokio::runtime::Runtime,
    lv: &Libvirt,
    g: &TestDomain,
) {
    let vol = format!("ceph/volumes/{POOL}:disk1");
    let (spec, status) = (format!("{vol}/spec"), format!("{vol}/status"));
    let (snap_spec, snap_status) = (
        format!("{vol}/snapshots/s1/spec"),
        format!("{vol}/snapshots/s1/status"),
    );
    // The image's current size: nothing to resize.
    etcd.put_keys(&[(&spec, r#"{"size":"16M"}"#), (&snap_spec, "{}")])
        .expect("declare the volume and its snapshot");
    wait_ceph_status(etcd, &snap_status, "ready", None);
    wait_ceph_status(etcd, &status, "ready", None);
    assert_eq!(snapshots(cluster, "disk1"), ["s1"], "the daemon took s1");
    let image = format!("{POOL}/disk1");
    cluster.overwrite(&image, "1M").expect("write past s1");
    let at_s1 = cluster
        .export(&format!("{image}@s1"), "disk1-s1")
        .expect("export s1");
    let before = cluster.export(&image, "disk1-before").expect("export");
    assert!(before != at_s1, "a rollback to s1 would change the data");

    // Rollback while qemu has the disk open: refused on the snapshot only.
    etcd.put_key(&snap_spec, r#"{"rollback":"t1"}"#)
        .expect("request a rollback");
    let s = wait_ceph_status(
        etcd,
        &snap_status,
        "error",
        Some("snapshots/s1/spec.rollback"),
    );
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("in use by a running VM")),
        "{s}"
    );
    assert_ne!(s["rolled_back"], "t1", "not recorded as done: {s}");
    let v = ceph_status(etcd, &status).expect("volume status");
    assert_eq!(v["state"], "ready", "the volume itself is fine: {v}");
    assert!(active(rt, lv, g), "the guest still runs");
    assert!(
        !watchers(cluster, "disk1").is_empty(),
        "qemu still has disk1 open"
    );
    let after = cluster.export(&image, "disk1-after").expect("export");
    assert!(after == before, "the refused rollback changed disk1's data");
    assert_eq!(snapshots(cluster, "disk1"), ["s1"]);
    // Withdrawn: the snapshot is ready again, nothing rolled back.
    etcd.put_key(&snap_spec, "{}")
        .expect("withdraw the rollback");
    let s = wait_ceph_status(etcd, &snap_status, "ready", None);
    assert!(s["rolled_back"].is_null(), "{s}");

    // Removal while in use: refused naming spec.delete; the image and s1 stay.
    etcd.put_key(&spec, r#"{"size":"16M","delete":true}"#)
        .expect("request the removal");
    let v = wait_ceph_status(etcd, &status, "error", Some("spec.delete"));
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("in use by a running VM")),
        "{v}"
    );
    assert_eq!(
        snapshots(cluster, "disk1"),
        ["s1"],
        "image and snapshot stay"
    );
    assert!(active(rt, lv, g), "the guest still runs");
    let after = cluster.export(&image, "disk1-after").expect("export");
    assert!(after == before, "the refused removal changed disk1's data");
    etcd.put_key(&spec, r#"{"size":"16M"}"#)
        .expect("withdraw the removal");
    wait_ceph_status(etcd, &status, "ready", None);
    wait_ceph_status(etcd, &snap_status, "ready", None);
}

#[test]
fn rbd_guest_starts_and_foreign_locks_refuse_the_start() {
    skip_unless_root!();
    if let Some(why) = rbd_guest_skip_reason() {
        return skip_or_fail(&why, SkipKind::Environment);
    }
    require_kvm();
    let (rt, lv) = system_libvirt().expect("libvirtd running");

    let cluster = CephCluster::start_with_osds(1).expect("ceph cluster");
    cluster.rbd_pool(POOL).expect("rbd pool");
    for img in ["disk1", "disk2", "disk3"] {
        cluster
            .rbd(&["create", &format!("{POOL}/{img}"), "--size", "16M"])
            .expect("image");
    }
    let secret = CephSecret::new(&cluster).expect("libvirt ceph secret");
    let etcd = EtcdProcess::start().expect("etcd");
    let state = tempfile::tempdir().expect("state dir");
    // This node's Ceph clients appear as 127.0.0.1, but only the node's interface addresses
    // count as its own: a lock from 127.0.0.1 is someone else's.
    // Guests before the daemon: on a failure the daemon (declared later) is dropped first, so
    // it cannot define a guest again after the guest's guard removed it.
    let g1 = TestDomain::new(&lv, "rbd");
    let g2 = TestDomain::new(&lv, "rbdheld");
    let g3 = TestDomain::new(&lv, "rbdstale");
    let g4 = TestDomain::new(&lv, "rbdnomon");
    let mut d1 = daemon(&etcd, &cluster, "rbd1", state.path(), "[]");

    // 1. A guest with an RBD data disk starts through the Domain object; qemu opens it.
    define(
        &etcd,
        &g1,
        "rbd1",
        &secret.disk_xml(&cluster, POOL, "disk1", "vdb"),
    );
    let s = vm(&g1).wait_status(&etcd, "running", "rbd1");
    assert!(s["error"].is_null(), "{s}");
    assert!(active(&rt, &lv, &g1), "the guest runs");
    let pid = rt
        .block_on(lv.get(&g1.uuid))
        .expect("get")
        .and_then(|i| i.pid)
        .expect("qemu PID of the running guest");
    assert_guest_uses_kvm(pid);
    let w = eventually("qemu watches disk1", WAIT, || {
        Some(watchers(&cluster, "disk1")).filter(|w| !w.is_empty())
    });
    assert_eq!(w.len(), 1, "one client (qemu) has disk1 open: {w:?}");

    // 2. disk1 declared as a volume object with a snapshot: while the guest has it open a
    // rollback and a removal are refused on that object only, and its data stays.
    volume_in_use_refuses_rollback_and_delete(&etcd, &cluster, &rt, &lv, &g1);

    // 3. Another live node (its published address is where the lock comes from) holds an
    // advisory lock on disk2: the start is refused naming the node.
    let other = add_node(&etcd, "rbd-other", &["127.0.0.1/8"]);
    cluster
        .rbd(&["lock", "add", &format!("{POOL}/disk2"), "dvtest-held"])
        .expect("lock add");
    define(
        &etcd,
        &g2,
        "rbd1",
        &secret.disk_xml(&cluster, POOL, "disk2", "vdb"),
    );
    let s = eventually("refusal names the holder node", WAIT, || {
        vm(&g2).status(&etcd).filter(|s| {
            s["error"]
                .as_str()
                .is_some_and(|e| e.contains("live node rbd-other"))
        })
    });
    assert_eq!(s["state"], "starting", "{s}");
    assert!(
        s["error"]
            .as_str()
            .unwrap_or_default()
            .contains("dvrbd/disk2"),
        "{s}"
    );
    assert!(
        !active(&rt, &lv, &g2),
        "not started under another node's lock"
    );
    let line = d1
        .wait_for(
            |l| {
                is_message(l, "vm start refused by the RBD lock check; retrying")
                    && str_field(l, "vm") == Some(g2.name.as_str())
            },
            WAIT,
        )
        .expect("refusal logged");
    assert_eq!(str_field(&line, "volume"), Some("dvrbd/disk2"), "{line}");

    // The node dies: its address belongs to no live node any more, still refused, now
    // naming the address.
    revoke(&etcd, other);
    let s = eventually("refusal names the unknown holder", WAIT, || {
        vm(&g2).status(&etcd).filter(|s| {
            s["error"]
                .as_str()
                .is_some_and(|e| e.contains("no live node"))
        })
    });
    assert!(
        s["error"]
            .as_str()
            .unwrap_or_default()
            .contains("127.0.0.1:"),
        "{s}"
    );
    assert!(
        !active(&rt, &lv, &g2),
        "not started under an unknown holder's lock"
    );

    // The lock goes away: the retry starts the guest.
    let (id, locker) = locks(&cluster, "disk2")
        .into_iter()
        .find(|(id, _)| id == "dvtest-held")
        .expect("our lock is listed");
    cluster
        .rbd(&["lock", "rm", &format!("{POOL}/disk2"), &id, &locker])
        .expect("lock rm");
    let s = vm(&g2).wait_status(&etcd, "running", "rbd1");
    assert!(s["error"].is_null(), "{s}");
    assert!(active(&rt, &lv, &g2));
    // Logged once per distinct refusal, not once per retry.
    let refusals: Vec<String> = d1
        .json_lines()
        .into_iter()
        .filter(|l| {
            is_message(l, "vm start refused by the RBD lock check; retrying")
                && str_field(l, "vm") == Some(g2.name.as_str())
        })
        .map(|l| str_field(&l, "error").unwrap_or_default().to_string())
        .collect();
    assert!(
        refusals.len() >= 2 && refusals.windows(2).all(|w| w[0] != w[1]),
        "{refusals:#?}"
    );

    // 4. The same node restarted knowing that its Ceph clients appear as 127.0.0.1 (one
    // libvirtd: a second daemon would fight over its domains) finds its own stale lock on
    // disk3: released, and the guest starts. The running guests are adopted.
    cluster
        .rbd(&["lock", "add", &format!("{POOL}/disk3"), "dvtest-stale"])
        .expect("lock add");
    drop(d1);
    let mut d1 = daemon(&etcd, &cluster, "rbd1", state.path(), "[127.0.0.1]");
    define(
        &etcd,
        &g3,
        "rbd1",
        &secret.disk_xml(&cluster, POOL, "disk3", "vdb"),
    );
    let line = d1
        .wait_for(
            |l| {
                is_message(l, "stale RBD locks of this node released before the start")
                    && str_field(l, "vm") == Some(g3.name.as_str())
            },
            WAIT,
        )
        .expect("release logged");
    assert_eq!(str_field(&line, "volume"), Some("dvrbd/disk3"), "{line}");
    let s = eventually("rbdstale running", WAIT, || {
        vm(&g3)
            .status(&etcd)
            .filter(|s| s["state"] == "running" && s["node"] == "rbd1")
    });
    assert!(s["error"].is_null(), "{s}");
    assert!(active(&rt, &lv, &g3));
    assert!(
        !locks(&cluster, "disk3")
            .iter()
            .any(|(id, _)| id == "dvtest-stale"),
        "the stale lock was released"
    );
    assert!(
        active(&rt, &lv, &g1) && active(&rt, &lv, &g2),
        "adopted, still running"
    );

    // 5. Ceph does not answer (mon frozen): the start is refused with the reason, never made
    // without the check; once the mon is back the retry starts the guest.
    cluster
        .rbd(&["create", &format!("{POOL}/disk4"), "--size", "16M"])
        .expect("image");
    let pause = cluster.pause_mon().expect("freeze the mon");
    define(
        &etcd,
        &g4,
        "rbd1",
        &secret.disk_xml(&cluster, POOL, "disk4", "vdb"),
    );
    let s = eventually("refusal while Ceph does not answer", WAIT, || {
        vm(&g4).status(&etcd).filter(|s| {
            s["error"]
                .as_str()
                .is_some_and(|e| e.contains("not started unchecked"))
        })
    });
    assert_eq!(s["state"], "starting", "{s}");
    assert!(
        s["error"]
            .as_str()
            .unwrap_or_default()
            .contains("dvrbd/disk4"),
        "{s}"
    );
    assert!(!active(&rt, &lv, &g4), "not started without the check");
    drop(pause);
    vm(&g4).wait_status(&etcd, "running", "rbd1");
    assert!(active(&rt, &lv, &g4));

    // Guests go before the cluster their qemu processes have open.
    drop(d1);
    drop((g1, g2, g3, g4));
}

/// The state collection's in-process listing serves images it finds unchanged (header and
/// object map at the same RADOS versions) from the previous listing. A running guest holds
/// the exclusive lock, so its writes leave the header alone: a write into a new object must
/// still show in the volume's `used` at the next collection (the object map changed), the
/// same as `rbd du` says; a snapshot (a header change) at the next collection too.
#[test]
fn a_running_guests_writes_show_in_the_collected_usage() {
    skip_unless_root!();
    if let Some(why) = rbd_guest_skip_reason() {
        return skip_or_fail(&why, SkipKind::Environment);
    }
    require_kvm();
    let (rt, lv) = system_libvirt().expect("libvirtd running");
    let cluster = CephCluster::start_with_osds(1).expect("ceph cluster");
    cluster.rbd_pool(POOL).expect("rbd pool");
    cluster
        .rbd(&["create", &format!("{POOL}/used1"), "--size", "64M"])
        .expect("image");
    let secret = CephSecret::new(&cluster).expect("libvirt ceph secret");
    let g = TestDomain::new(&lv, "rbdused");
    let xml = with_devices(&g.xml(), &secret.disk_xml(&cluster, POOL, "used1", "vda"));
    rt.block_on(lv.define(&xml)).expect("define");
    rt.block_on(lv.start(&g.uuid)).expect("start");
    let cli = cluster.cli(Duration::from_secs(60));
    if !cli.uses_librbd() {
        eprintln!("skipped: librbd not loadable (no in-process listing to check)");
        return;
    }
    let key = format!("ceph/observed/volumes/{POOL}:used1");
    let used = |c: &Collected| -> u64 {
        let v: Value = serde_json::from_str(c.state.get(&key).expect("volume collected"))
            .expect("volume JSON");
        v["used"].as_u64().expect("used")
    };
    let collect = || rt.block_on(collect_state(&cli)).expect("collect");
    let rbd_du = || -> u64 {
        let v: Value = serde_json::from_str(
            &cluster
                .rbd(&["du", "--format", "json", &format!("{POOL}/used1")])
                .expect("rbd du"),
        )
        .expect("rbd du JSON");
        v["images"][0]["used_size"].as_u64().expect("used_size")
    };
    const OBJECT: u64 = 4 << 20;

    // The first write takes the exclusive lock (a header change); then two collections, the
    // second one finding the volume unchanged.
    qemu_io_write_at(QEMU_URI, &g.name, "virtio-disk0", 0, 65536).expect("write object 0");
    assert_eq!(used(&collect()), OBJECT);
    assert_eq!(used(&collect()), OBJECT);
    // The lock held: a write into a new object changes the object map only. Twice: one of
    // two successive collections serves the volume from the cache wherever its periodic
    // full read falls.
    for objects in [2, 3] {
        qemu_io_write_at(QEMU_URI, &g.name, "virtio-disk0", objects * OBJECT, 65536)
            .expect("write into a new object");
        let after = used(&collect());
        assert_eq!(after, objects * OBJECT, "the new object is counted");
        assert_eq!(after, rbd_du(), "the same as rbd du");
    }
    // A snapshot changes the header (made by the lock owner, the guest's librbd): it shows
    // at the next collection, twice for the same reason.
    for snap in ["s1", "s2"] {
        cluster
            .rbd(&["snap", "create", &format!("{POOL}/used1@{snap}")])
            .expect("rbd snap create");
        let c = collect();
        let v: Value = serde_json::from_str(c.state.get(&key).expect("volume collected"))
            .expect("volume JSON");
        let snaps = v["snapshots"].as_array().expect("snapshots");
        assert_eq!(snaps.last().map(|s| &s["name"]), Some(&json!(snap)), "{v}");
    }
}
