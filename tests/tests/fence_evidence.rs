//! A node stops its guests for `daemon_state = fenced` only on evidence: the primary's fence
//! record must name a lease this node held that is no longer its good current lease.
//!
//! One clustered node (the lease watch on, fencing off so no self-fence acts on its own) on
//! a real etcd, one guest of its own on `test:///default`:
//! - (a) a forged `daemon_state = fenced` without a record: the guest keeps running, one
//!   warning naming the missing record (not one per resync); a garbage record likewise;
//! - (c) a record naming the lease the node holds now, good by its own clock: still running,
//!   one warning naming the lease;
//! - (b) the lease is revoked, the node re-registers with a fresh one: the record now names
//!   a lease this node held before (its lease history has it) — the guest is stopped and the
//!   node says it is fenced.

use std::time::Duration;

use debvisor_tests::libvirt::test_driver_xml;
use debvisor_tests::{
    is_message, str_field, DaemonBuilder, DaemonProcess, EtcdProcess, HarnessError, TestVm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const NODE: &str = "fev1";
const HOLD: &str = "daemon_state says this node is fenced, without evidence";
const STOPPED: &str = "self-fence: guest stopped";

/// The lease `nodes/<NODE>/alive` is bound to.
fn alive_lease(etcd: &EtcdProcess) -> i64 {
    let key = format!("/debvisor/nodes/{NODE}/alive");
    etcd.with_client(|mut c| async move {
        let r = c
            .get(key.clone(), None)
            .await
            .map_err(|e| HarnessError::State(format!("get {key}: {e}")))?;
        r.kvs()
            .first()
            .map(|kv| kv.lease())
            .ok_or_else(|| HarnessError::State(format!("{key} is absent")))
    })
    .expect("alive lease")
}

/// The hold warnings whose reason contains `text`.
fn holds(d: &DaemonProcess, text: &str) -> Vec<Value> {
    d.json_lines()
        .into_iter()
        .filter(|l| {
            l.get("message")
                .and_then(Value::as_str)
                .is_some_and(|m| m.starts_with(HOLD))
                && str_field(l, "node") == Some(NODE)
                && str_field(l, "reason").is_some_and(|r| r.contains(text))
        })
        .collect()
}

/// Wait for one hold warning with `text`, then a few ticks: still exactly one.
fn wait_one_hold(d: &mut DaemonProcess, etcd: &EtcdProcess, text: &str) {
    d.wait_for(
        |l| {
            l.get("message")
                .and_then(Value::as_str)
                .is_some_and(|m| m.starts_with(HOLD))
                && str_field(l, "reason").is_some_and(|r| r.contains(text))
        },
        WAIT,
    )
    .unwrap_or_else(|e| panic!("hold warning with {text:?}: {e}"));
    etcd.wait_ticks(NODE, 3, WAIT);
    assert_eq!(
        holds(d, text).len(),
        1,
        "one line per reason, not per resync"
    );
}

fn stops(d: &DaemonProcess, vm: &TestVm) -> usize {
    d.json_lines()
        .iter()
        .filter(|l| is_message(l, STOPPED) && str_field(l, "vm") == Some(vm.name.as_str()))
        .count()
}

fn fence_record(lease: i64) -> String {
    serde_json::json!({
        "state": "fenced",
        "by": "ipmi",
        "since": "2026-01-01T00:00:00Z",
        "primary": "somebody",
        "lease": format!("{lease:x}"),
    })
    .to_string()
}

#[test]
fn a_fenced_daemon_state_stops_the_guests_only_on_evidence() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new(NODE)
        .endpoints(&[etcd.endpoint()])
        .clustered(&[NODE])
        .spawn()
        .expect("spawn");
    d.wait_run(WAIT).expect("run");
    let first = alive_lease(&etcd);
    let vm = TestVm::new("fev", WAIT);
    vm.put(
        &etcd,
        &[
            ("xml", &test_driver_xml(&vm.name, &vm.uuid)),
            ("node", NODE),
            ("state", "start"),
        ],
    );
    vm.wait_status(&etcd, "running", NODE);

    // (a) A forged verdict, no record: nothing is stopped.
    etcd.put_key(&format!("nodes/{NODE}/daemon_state"), "fenced")
        .expect("forge daemon_state");
    wait_one_hold(
        &mut d,
        &etcd,
        &format!("daemon_state is fenced but nodes/{NODE}/fence is missing"),
    );
    assert_eq!(stops(&d, &vm), 0, "a forged daemon_state stopped a guest");
    assert_eq!(
        vm.status(&etcd).map(|s| s["state"].clone()),
        Some("running".into())
    );

    // A garbage record is no evidence either.
    etcd.put_key(&format!("nodes/{NODE}/fence"), "{not json")
        .expect("garbage record");
    wait_one_hold(
        &mut d,
        &etcd,
        &format!("daemon_state is fenced but nodes/{NODE}/fence does not parse"),
    );
    assert_eq!(stops(&d, &vm), 0, "a garbage record stopped a guest");

    // (c) A record naming the lease the node holds now, good by its own clock.
    etcd.put_key(&format!("nodes/{NODE}/fence"), &fence_record(first))
        .expect("forge record");
    wait_one_hold(
        &mut d,
        &etcd,
        &format!("names lease {first:x} which this node still holds with a good lease"),
    );
    assert_eq!(
        stops(&d, &vm),
        0,
        "a record naming the good lease stopped a guest"
    );
    assert_eq!(
        vm.status(&etcd).map(|s| s["state"].clone()),
        Some("running".into())
    );
    assert_eq!(
        etcd.get_key(&format!("nodes/{NODE}/daemon_state"))
            .expect("get")
            .as_deref(),
        Some("fenced")
    );

    // (b) The lease ends; the node registers a fresh one. The record now names a lease it
    // held before: evidence — the guest is stopped.
    etcd.with_client(|mut c| async move {
        c.lease_revoke(first)
            .await
            .map_err(|e| HarnessError::State(format!("revoke {first:x}: {e}")))?;
        Ok(())
    })
    .expect("revoke");
    d.wait_for_message(
        "this node is fenced: the primary saw its lease expire",
        WAIT,
    )
    .expect("the node says it is fenced");
    d.wait_for(
        |l| is_message(l, STOPPED) && str_field(l, "vm") == Some(vm.name.as_str()),
        WAIT,
    )
    .expect("the guest is stopped");
    let history =
        std::fs::read_to_string(d.state_dir().join("lease_history")).expect("lease history");
    assert!(
        history.lines().any(|l| l == format!("{first:x}")),
        "{history}"
    );
    // It stays stopped: nothing starts while fenced.
    etcd.wait_ticks(NODE, 3, WAIT);
    assert_eq!(stops(&d, &vm), 1);
    debvisor_tests::eventually("the status no longer says running", WAIT, || {
        vm.status(&etcd).filter(|s| s["state"] != "running")
    });
    assert!(d.is_running());
}
