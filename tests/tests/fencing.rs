//! Dead nodes, fencing and VM recovery on the multi-node harness (`tests/src/cluster/`):
//! three daemons in their own namespaces, a 3-member etcd, guests on each node's libvirt
//! (`test:///default`: the decisions and the etcd guards are what is tested here; real
//! guests and BMCs are in the harness's fake-BMC tests).
//!
//! - kill -9 of a node with two VMs, `failed_fence: migrate` and self-fence on, no BMC: the
//!   primary declares it dead after the grace, marks it fenced (the self-fence bound), and
//!   both VMs run elsewhere with `last_node` = the dead node; the record names the lease
//!   that expired, which the node finds in its lease history when it comes back; it stays
//!   fenced (no guest starts there) until `debvisorctl node readmit`.
//! - fencing disabled: the dead node is declared dead, the fence fails, its VM stays
//!   assigned to it, and `vm migrate` of that VM is refused with the reason.
//! - two of three nodes killed at once: the partition guard holds, nothing is fenced or
//!   moved, and the skip is recorded with its reason.

use std::time::Duration;

use debvisor_tests::cluster::{wait_until, Cluster, Node};
use debvisor_tests::libvirt::{random_uuid, test_driver_xml};
use debvisor_tests::skip_unless_root;
use serde_json::Value;

/// A generous bound for each step (the `--failover` benchmark measures the real figures).
const STEP: Duration = Duration::from_secs(60);

fn cluster(yaml: &str) -> Cluster {
    Cluster::builder()
        .nodes(3)
        .yaml(yaml)
        .build()
        .expect("cluster")
}

fn primary(c: &Cluster) -> String {
    wait_until("a primary", STEP, || c.primary().ok().flatten()).expect("primary")
}

fn node<'a>(c: &'a Cluster, name: &str) -> &'a Node {
    c.node_named(name).expect("node")
}

/// Names of the nodes other than `p`.
fn others(c: &Cluster, p: &str) -> Vec<String> {
    c.nodes()
        .iter()
        .map(|n| n.name().to_string())
        .filter(|n| n != p)
        .collect()
}

/// Define a VM meant to run on `on`; returns its UUID.
fn put_vm(c: &Cluster, label: &str, on: &str) -> String {
    let uuid = random_uuid();
    let name = format!("dvtest-{label}-{}", &uuid[..8]);
    c.etcd_put(&format!("vms/{uuid}/xml"), &test_driver_xml(&name, &uuid))
        .expect("xml");
    c.etcd_put(&format!("vms/{uuid}/node"), on).expect("node");
    c.etcd_put(&format!("vms/{uuid}/state"), "start")
        .expect("state");
    uuid
}

fn status(c: &Cluster, uuid: &str) -> Option<Value> {
    let s = c.etcd_get(&format!("vms/{uuid}/status")).ok()??;
    serde_json::from_str(&s).ok()
}

/// Wait until the VM runs and return the node reporting it.
fn wait_running(c: &Cluster, uuid: &str, not_on: Option<&str>) -> String {
    wait_until(&format!("VM {uuid} running"), STEP, || {
        let s = status(c, uuid)?;
        let on = s["node"].as_str()?.to_string();
        (s["state"] == "running" && Some(on.as_str()) != not_on).then_some(on)
    })
    .expect("VM running")
}

fn daemon_state(c: &Cluster, n: &str) -> Option<String> {
    c.etcd_get(&format!("nodes/{n}/daemon_state")).ok()?
}

fn fence_record(c: &Cluster, n: &str) -> Option<Value> {
    let s = c.etcd_get(&format!("nodes/{n}/fence")).ok()??;
    serde_json::from_str(&s).ok()
}

fn wait_daemon_state(c: &Cluster, n: &str, want: &str) {
    wait_until(&format!("{n} daemon_state {want}"), STEP, || {
        (daemon_state(c, n).as_deref() == Some(want)).then_some(())
    })
    .expect("daemon_state");
}

/// Wait until `n` has written `last_seen` `ticks` more times (its keepalive ran): the
/// "nothing happened" checks wait for ticks, not for a fixed time.
fn wait_ticks(c: &Cluster, n: &str, ticks: usize) {
    let key = format!("nodes/{n}/last_seen");
    let mut seen = std::collections::BTreeSet::new();
    wait_until(&format!("{ticks} keepalive ticks of {n}"), STEP, || {
        seen.insert(c.etcd_get(&key).ok()??);
        (seen.len() > ticks).then_some(())
    })
    .expect("ticks");
}

const SELF_FENCE_MIGRATE: &str = "fencing:\n  enabled: true\n  failed_fence: migrate\n";

#[test]
fn kill9_of_a_node_with_two_vms_recovers_them_and_the_node_stays_fenced_until_readmitted() {
    skip_unless_root!();
    let c = cluster(SELF_FENCE_MIGRATE);
    let p = primary(&c);
    let victim = others(&c, &p)[0].clone();
    let vms = [put_vm(&c, "rec-a", &victim), put_vm(&c, "rec-b", &victim)];
    for uuid in &vms {
        assert_eq!(wait_running(&c, uuid, None), victim);
    }

    node(&c, &victim).kill9().expect("kill -9");
    for uuid in &vms {
        let on = wait_running(&c, uuid, Some(&victim));
        assert_ne!(on, victim);
        assert_eq!(
            c.etcd_get(&format!("vms/{uuid}/last_node"))
                .expect("get")
                .as_deref(),
            Some(victim.as_str()),
            "last_node records the dead node"
        );
        assert_eq!(
            c.etcd_get(&format!("vms/{uuid}/node"))
                .expect("get")
                .as_deref(),
            Some(on.as_str())
        );
    }
    assert_eq!(daemon_state(&c, &victim).as_deref(), Some("fenced"));
    let rec = wait_until("fence record recovered", STEP, || {
        fence_record(&c, &victim).filter(|r| r["state"] == "recovered")
    })
    .expect("record");
    assert_eq!(rec["by"], "self-fence", "{rec}");
    // The record names the lease the primary saw expire: the node's evidence.
    assert!(
        rec["lease"]
            .as_str()
            .is_some_and(|l| !l.is_empty() && l.bytes().all(|c| c.is_ascii_hexdigit())),
        "{rec}"
    );
    // The operator's trail: one line per step on the primary.
    let pn = node(&c, &primary(&c));
    for msg in ["node declared dead", "node fenced", "VM recovered"] {
        pn.wait_for_message(msg, STEP).expect(msg);
    }

    // The node comes back: it registers but stays fenced and starts nothing.
    let back = node(&c, &victim);
    back.start().expect("restart the fenced node");
    back.wait_for_message("this node is fenced", STEP)
        .expect("the node says it is fenced");
    // Its lease history has the lease the record names: the verdict is taken on evidence.
    back.wait_for_message(
        "this node is fenced: the primary saw its lease expire",
        STEP,
    )
    .expect("the node finds the evidence");
    let alive = format!("nodes/{victim}/alive");
    wait_until("the fenced node alive again", STEP, || {
        c.etcd_get(&alive).ok()?.map(|_| ())
    })
    .expect("alive");
    assert_eq!(daemon_state(&c, &victim).as_deref(), Some("fenced"));
    // A VM sent to the fenced node does not start there.
    let held = put_vm(&c, "held", &victim);
    let other = others(&c, &victim)[0].clone();
    wait_ticks(&c, &victim, 4);
    assert_ne!(
        status(&c, &held).map(|s| s["state"].clone()),
        Some(Value::from("running")),
        "a fenced node started a guest"
    );
    node(&c, &other)
        .ctl_ok(&["node", "readmit", &victim])
        .expect("readmit");
    wait_until("the readmitted node runs again", STEP, || {
        matches!(daemon_state(&c, &victim).as_deref(), Some("run")).then_some(())
    })
    .expect("run");
    assert_eq!(wait_running(&c, &held, None), victim);
    assert_eq!(fence_record(&c, &victim), None, "readmit clears the record");
    c.checker().assert_clean();
}

#[test]
fn without_fencing_a_dead_nodes_vm_stays_and_migrate_is_refused() {
    skip_unless_root!();
    let c = cluster("");
    let p = primary(&c);
    let victim = others(&c, &p)[0].clone();
    let uuid = put_vm(&c, "stay", &victim);
    wait_running(&c, &uuid, None);

    node(&c, &victim).kill9().expect("kill -9");
    wait_daemon_state(&c, &victim, "dead");
    let rec = wait_until("fence record failed", STEP, || {
        fence_record(&c, &victim).filter(|r| r["state"] == "failed")
    })
    .expect("record");
    assert!(
        rec["reason"]
            .as_str()
            .is_some_and(|r| r.contains("fencing.enabled")),
        "{rec}"
    );
    let out = node(&c, &p)
        .ctl(&["vm", "migrate", &uuid])
        .expect("run debvisorctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "migrate accepted: {text}");
    assert!(text.contains("not fenced"), "{text}");
    assert_eq!(
        c.etcd_get(&format!("vms/{uuid}/node"))
            .expect("get")
            .as_deref(),
        Some(victim.as_str()),
        "the VM stays assigned to its dead node"
    );
    assert_eq!(daemon_state(&c, &victim).as_deref(), Some("dead"));
}

#[test]
fn half_the_cluster_dead_at_once_is_a_partition_and_nothing_is_fenced() {
    skip_unless_root!();
    let c = cluster(SELF_FENCE_MIGRATE);
    let p = primary(&c);
    let gone = others(&c, &p);
    let uuid = put_vm(&c, "part", &gone[0]);
    wait_running(&c, &uuid, None);

    for n in &gone {
        node(&c, n).kill9().expect("kill -9");
    }
    for n in &gone {
        wait_daemon_state(&c, n, "dead");
        let rec = wait_until(&format!("{n}: skip recorded"), STEP, || {
            fence_record(&c, n).filter(|r| r["state"] == "skipped")
        })
        .expect("record");
        assert!(
            rec["reason"]
                .as_str()
                .is_some_and(|r| r.contains("partition guard")),
            "{rec}"
        );
    }
    // A few ticks more: still nothing fenced, nothing moved.
    wait_ticks(&c, &p, 4);
    for n in &gone {
        assert_eq!(daemon_state(&c, n).as_deref(), Some("dead"));
    }
    assert_eq!(
        c.etcd_get(&format!("vms/{uuid}/node"))
            .expect("get")
            .as_deref(),
        Some(gone[0].as_str())
    );
    node(&c, &p)
        .wait_for_message("fence skipped", STEP)
        .expect("skip logged");
}
