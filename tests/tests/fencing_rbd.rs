//! Fencing of a node whose guest has an RBD disk, with a real one-host Ceph reachable from
//! every node namespace (in the switch namespace at 192.0.2.254), real KVM guests on each
//! node's own libvirtd, real BMCs (`ipmi_sim`, fenced with `ipmitool -I lanplus`) and the run
//! recorder following the guest on every node.
//!
//! The guest runs on a secondary and writes to its RBD disk, so its qemu holds the image's
//! exclusive lock (and its watch) from that node's address. The node's daemon and its
//! guardian are killed (kill -9): nothing self-fences the guest, whose qemu runs on holding
//! the lock until the fence, so only the fence may end it. The primary declares the node
//! dead, powers it off over IPMI (qemu dies with its lock held), blocklists the node's Ceph
//! client by address and breaks its lock, and only then retargets the VM; the new node's RBD
//! start check finds the image free and starts it. (With the guardian alive, it would destroy
//! the guest at the lease deadline and qemu would release its lock cleanly: nothing to break.)
//! Checked: the chain in the primary's log in that order, the blocklist holding the dead
//! node's client, the old lock gone and the new node's qemu able to write and holding the lock
//! from its own address, the new run beginning after the fenced node was down, and no instant
//! at which the guest ran on two nodes. Nothing is left behind (daemons, libvirtds, guests,
//! Ceph daemons and directory, namespaces).
//!
//! Skipped (a failure under `DEBVISOR_REQUIRE_ALL=1`) without Ceph, qemu's rbd driver or
//! `ipmi_sim`.

use std::time::{Duration, Instant};

use debvisor_tests::cluster::{
    require_ipmi_sim, wait_until, Cluster, Evidence, Leftovers, Power, PowerEventKind,
};
use debvisor_tests::libvirt::require_kvm;
use debvisor_tests::rbd_guest::{qemu_io_write, rbd_guest_skip_reason};
use debvisor_tests::{
    is_message, skip_or_fail, skip_unless_root, str_field, CephCluster, SkipKind,
};
use serde_json::Value;

/// Generous deadline for each step (a loaded 2-core CI machine); not a speed claim.
const WAIT: Duration = Duration::from_secs(90);
const POOL: &str = "dvfence";
const IMAGE: &str = "disk";
/// The guest's RBD disk is its only disk: `vda`, libvirt alias `virtio-disk0`.
const DEV: &str = "vda";
const ALIAS: &str = "virtio-disk0";

/// `rbd <args> --format json` on the cluster's Ceph, parsed.
fn rbd_json(ceph: &CephCluster, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    let out = ceph.rbd(&a).expect("rbd");
    serde_json::from_str(&out).expect("rbd json")
}

/// The client addresses (`ip:port/nonce`) holding locks on the image.
fn lockers(ceph: &CephCluster) -> Vec<String> {
    rbd_json(ceph, &["lock", "ls", &format!("{POOL}/{IMAGE}")])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["address"].as_str().map(str::to_owned))
        .collect()
}

/// The client addresses watching the image (clients that have it open).
fn watchers(ceph: &CephCluster) -> Vec<String> {
    rbd_json(ceph, &["status", &format!("{POOL}/{IMAGE}")])["watchers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["address"].as_str().map(str::to_owned))
        .collect()
}

/// The blocklisted client addresses (`ceph osd blocklist ls`; Ceph 16 prints the list of
/// addresses, then that of ranges, as two JSON arrays: the first one is read).
fn blocklist(ceph: &CephCluster) -> Vec<String> {
    let out = ceph
        .ceph(&["osd", "blocklist", "ls", "--format", "json"])
        .expect("ceph osd blocklist ls");
    let start = out.find('[').unwrap_or(0);
    let v: Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<Value>()
        .next()
        .expect("a JSON value")
        .expect("blocklist json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["addr"].as_str().map(str::to_owned))
        .collect()
}

/// Whether a client address (`ip:port/nonce`, maybe `v2:`/`any:` prefixed) is from `ip`.
fn from_ip(address: &str, ip: &str) -> bool {
    let a = address.trim_start_matches("v2:").trim_start_matches("any:");
    a.split(':').next() == Some(ip)
}

/// Wait for a lock on the image held from `ip`; returns the locker's address.
fn wait_locked_from(ceph: &CephCluster, ip: &str) -> String {
    wait_until(&format!("{POOL}/{IMAGE} locked from {ip}"), WAIT, || {
        lockers(ceph).into_iter().find(|a| from_ip(a, ip))
    })
    .expect("lock")
}

/// The victim: a node that is not the primary; and the primary.
fn victim_and_primary(c: &Cluster) -> (String, String) {
    let p = wait_until("a primary", WAIT, || c.primary().ok().flatten()).expect("primary");
    let v = c
        .nodes()
        .iter()
        .map(|n| n.name().to_string())
        .find(|n| *n != p)
        .expect("a secondary");
    (v, p)
}

/// Position of the first line of `lines` with `message` (and, when given, `field` = value).
fn line_of(lines: &[Value], message: &str, field: Option<(&str, &str)>) -> usize {
    lines
        .iter()
        .position(|l| {
            is_message(l, message) && field.is_none_or(|(k, v)| str_field(l, k) == Some(v))
        })
        .unwrap_or_else(|| panic!("no {message:?} {field:?} in the primary's log"))
}

#[test]
fn an_rbd_guest_of_a_killed_node_runs_elsewhere_after_its_lock_is_broken_never_twice() {
    skip_unless_root!();
    if let Some(why) = rbd_guest_skip_reason() {
        return skip_or_fail(&why, SkipKind::Environment);
    }
    if !require_ipmi_sim() {
        return;
    }
    require_kvm();
    let t0 = Instant::now();
    // Three nodes: with two, one dead node is half the cluster and the partition guard
    // (rightly) refuses to fence.
    let c = Cluster::builder()
        .nodes(3)
        .etcd_members(1)
        .isolated_libvirt(true)
        .with_bmcs()
        .track_runs(true)
        .ceph(true)
        .yaml("fencing:\n  enabled: true\n")
        .env("DEBVISOR_DOMAINS_SHUTDOWN_TIMEOUT", "3s")
        .build()
        .expect("cluster with Ceph");
    let built = t0.elapsed();
    let ceph = c.ceph();
    let ceph_dir = ceph.dir().to_path_buf();
    ceph.rbd_pool(POOL).expect("rbd pool");
    ceph.rbd(&["create", &format!("{POOL}/{IMAGE}"), "--size", "16M"])
        .expect("image");

    // The guest on a secondary, its only disk the RBD volume; it writes, so its qemu takes
    // the image's exclusive lock from the node's address.
    let (v, p) = victim_and_primary(&c);
    let victim = c.node_named(&v).expect("victim node");
    let v_ip = victim.addr().to_string();
    let disk = c.rbd_disk_xml(POOL, IMAGE, DEV);
    let (uuid, name) = c
        .request_guest_with(&v, "fence-rbd", &disk)
        .expect("VM keys");
    c.wait_vm_running(&uuid, WAIT, |n| n == v)
        .expect("running on the victim");
    c.runs()
        .wait_running_on(&uuid, &v, WAIT)
        .expect("the recorder sees it on the victim");
    let v_uri = victim.libvirt().expect("isolated libvirtd").local_uri();
    qemu_io_write(&v_uri, &name, ALIAS, 65536).expect("the guest writes on the victim");
    let old_locker = wait_locked_from(ceph, &v_ip);
    assert!(
        watchers(ceph).iter().any(|w| from_ip(w, &v_ip)),
        "the victim's qemu has the image open"
    );
    eprintln!("{v} ({v_ip}) holds the lock of {POOL}/{IMAGE} as {old_locker}; primary {p}");

    // kill -9 of the victim's daemon and guardian: qemu lives on, holding the lock, until
    // the fence.
    let i = victim.index();
    let killed = victim.kill9_with_guardian().expect("kill -9");
    let on = c
        .wait_vm_running(&uuid, WAIT, |n| n != v)
        .expect("running on another node");
    c.runs()
        .wait_running_on(&uuid, &on, WAIT)
        .expect("the recorder sees it on the new node");
    let recovered = killed.elapsed();
    assert_eq!(c.bmc(i).power().expect("power status"), Power::Off);
    assert_eq!(c.daemon_state(&v).expect("get").as_deref(), Some("fenced"));
    let rec: Value = serde_json::from_str(
        &c.etcd_get(&format!("nodes/{v}/fence"))
            .expect("get")
            .expect("fence record"),
    )
    .expect("fence record json");
    assert_eq!(rec["by"], "ipmi", "{rec}");

    // The primary's chain, in order: dead → fence started → confirmed → fenced → the dead
    // node's client blocklisted → its lock broken → the VM retargeted.
    let lines = c.node_named(&p).expect("primary").json_lines();
    let node = Some(("node", v.as_str()));
    let image = format!("{POOL}/{IMAGE}");
    let chain = [
        line_of(
            &lines,
            "node declared dead: its lease expired and it did not stop cleanly",
            node,
        ),
        line_of(&lines, "fence started: IPMI power off", node),
        line_of(&lines, "fence confirmed: the BMC reports power off", node),
        line_of(
            &lines,
            "node fenced: it stays out until `debvisorctl node readmit`",
            node,
        ),
        line_of(
            &lines,
            "fenced node's Ceph client blocklisted",
            Some(("image", &image)),
        ),
        line_of(
            &lines,
            "fenced node's RBD lock broken",
            Some(("image", &image)),
        ),
        line_of(
            &lines,
            "VM recovered: it starts on its new node",
            Some(("vm", &name)),
        ),
    ];
    assert!(
        chain.windows(2).all(|w| w[0] < w[1]),
        "out of order: {chain:?}"
    );
    for &at in &chain {
        eprintln!("{p}: {}", lines[at]);
    }
    let blocked = &lines[chain[4]];
    assert_eq!(
        str_field(blocked, "client"),
        Some(old_locker.as_str()),
        "{blocked}"
    );
    let broken = &lines[chain[5]];
    assert!(
        str_field(broken, "locker").is_some_and(|l| l.starts_with("client.")),
        "{broken}"
    );
    let moved = &lines[chain[6]];
    assert_eq!(str_field(moved, "target"), Some(on.as_str()), "{moved}");
    let started = c
        .node_named(&on)
        .expect("new node")
        .wait_log("the guest started", WAIT, |l| {
            is_message(l, "domain started") && str_field(l, "vm") == Some(name.as_str())
        })
        .expect("domain started on the new node");
    eprintln!("{on}: {started}");

    // Ceph: the dead node's client is blocklisted, its lock gone; the new node's qemu writes
    // and so holds the lock, from its own address.
    let bl = blocklist(ceph);
    assert!(bl.contains(&old_locker), "{old_locker} not in {bl:?}");
    let lk = lockers(ceph);
    assert!(
        !lk.iter().any(|a| from_ip(a, &v_ip)),
        "{v}'s lock left: {lk:?}"
    );
    let new_node = c.node_named(&on).expect("new node");
    let new_ip = new_node.addr().to_string();
    let new_uri = new_node.libvirt().expect("isolated libvirtd").local_uri();
    qemu_io_write(&new_uri, &name, ALIAS, 65536).expect("the guest writes on its new node");
    let new_locker = wait_locked_from(ceph, &new_ip);
    let lk = lockers(ceph);
    assert_eq!(
        lk,
        std::slice::from_ref(&new_locker),
        "one lock, the new node's"
    );
    eprintln!("{on} ({new_ip}) holds the lock as {new_locker}; blocklist {bl:?}");

    // Never before the fence: the new run began after the victim was down (the BMC's power
    // off confirmed), and the recorder finds no instant with two runs.
    let down = c
        .bmc(i)
        .power_log()
        .into_iter()
        .find(|e| matches!(e.kind, PowerEventKind::Down { .. }))
        .expect("the victim went down")
        .at;
    let runs = c.runs().intervals(&uuid);
    let new_run = runs
        .iter()
        .find(|r| r.node == on)
        .expect("a run on the new node");
    assert!(
        new_run.start > down,
        "started before the victim was down: {runs:?}"
    );
    let old_run = runs
        .iter()
        .find(|r| r.node == v)
        .expect("the run on the victim");
    assert_eq!(
        old_run.ended_by,
        Some(Evidence::NodeDown),
        "the guest ran on the victim until the fence powered it off: {runs:?}"
    );
    c.runs().sync(2, WAIT).expect("recorder sync");
    c.runs().assert_no_double_run();
    eprintln!(
        "timings: cluster with Ceph built in {built:?}, kill -9 → running on {on} in {recovered:?}, test {:?}",
        t0.elapsed()
    );

    let left = Leftovers::of(&c);
    drop(c);
    left.assert_gone();
    assert!(!ceph_dir.exists(), "{} survived", ceph_dir.display());
}
