//! The Domain object through real daemons on libvirt's test driver (`test:///default`, one
//! in-process host per daemon) and a real etcd: the lock-first lifecycle, status reports,
//! restart, bad input isolated to its VM, a lock held by another live lease, foreign
//! domains, VMs removed from etcd, and a shutdown migration with unmigrate between two
//! daemons. Real guests are in `domain_qemu.rs`.

use std::time::Duration;

use debvisor_tests::libvirt::{random_uuid, test_driver_xml};
use debvisor_tests::{
    eventually, is_message, str_field, DaemonBuilder, DaemonProcess, EtcdProcess, TestVm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn daemon(etcd: &EtcdProcess, node: &str) -> DaemonProcess {
    // Clustered (each its own coordinator): several daemons share the etcd in some tests.
    let mut d = DaemonBuilder::new(node)
        .endpoints(&[etcd.endpoint()])
        .clustered(&[node])
        .env("DEBVISOR_DOMAINS_SHUTDOWN_TIMEOUT", "3s")
        .env("DEBVISOR_DOMAINS_RESTART_BACKOFF", "200ms")
        .spawn()
        .expect("spawn daemon");
    d.wait_run(WAIT).expect("daemon reaches run");
    d
}

/// A VM on the test driver: its definition written in one transaction.
fn define(vm: &TestVm, etcd: &EtcdProcess, node: &str, state: &str) {
    let xml = test_driver_xml(&vm.name, &vm.uuid);
    vm.put(etcd, &[("xml", &xml), ("node", node), ("state", state)]);
}

fn new_vm(label: &str) -> TestVm {
    TestVm::new(label, WAIT)
}

/// Wait until the keepalive of `node` has written `last_seen` twice after this call: the
/// second of those ticks began after the call (so after everything the caller saw); the
/// host resync's per-tick work (fence verdict, status repair, drain) runs on the same
/// interval.
fn two_keepalive_ticks(etcd: &EtcdProcess, node: &str) {
    let key = format!("nodes/{node}/last_seen");
    let rev = || etcd.mod_revision(&key).expect("etcd get").unwrap_or(0);
    let mut last = rev();
    for tick in 1..=2 {
        last = eventually(&format!("keepalive tick {tick} of {node}"), WAIT, || {
            let r = rev();
            (r > last).then_some(r)
        });
    }
}

/// Positive evidence that `node`'s daemon has worked past everything written before this
/// call: a VM defined now reaches `running` there (its watch events and the libvirt events
/// of its start came after everything earlier), then two keepalive ticks pass.
fn later_work_done(etcd: &EtcdProcess, node: &str) {
    let marker = new_vm("marker");
    define(&marker, etcd, node, "start");
    marker.wait_status(etcd, "running", node);
    two_keepalive_ticks(etcd, node);
}

fn logged(d: &DaemonProcess, msg: &str, vm: &str) -> bool {
    d.json_lines()
        .iter()
        .any(|l| is_message(l, msg) && (vm.is_empty() || str_field(l, "vm") == Some(vm)))
}

#[test]
fn lifecycle_lock_first_with_status_reports() {
    let etcd = EtcdProcess::start().expect("etcd");
    let d = daemon(&etcd, "dom1");
    let vm = new_vm("life");
    define(&vm, &etcd, "dom1", "start");

    let s = vm.wait_status(&etcd, "running", "dom1");
    assert_eq!(s["error"], Value::Null, "{s}");
    assert_eq!(vm.get(&etcd, "lock").as_deref(), Some("dom1"));
    assert_eq!(vm.get(&etcd, "owner").as_deref(), Some("dom1"));
    let lines = d.json_lines();
    let pos = |m: &str| {
        lines
            .iter()
            .position(|l| is_message(l, m) && str_field(l, "vm") == Some(vm.name.as_str()))
            .unwrap_or_else(|| panic!("no {m:?} line for {}", vm.name))
    };
    assert!(
        pos("run lock acquired") < pos("domain started"),
        "the lock is won before the start"
    );
    let lock_line = &lines[pos("run lock acquired")];
    assert!(
        lock_line["fencing_token"].as_i64().unwrap_or(0) > 0,
        "{lock_line}"
    );

    etcd.put_key(&vm.key("state"), "stop").expect("stop");
    vm.wait_status(&etcd, "stopped", "dom1");
    eventually("lock released after stop", WAIT, || {
        vm.get(&etcd, "lock").is_none().then_some(())
    });

    etcd.put_key(&vm.key("state"), "start").expect("start");
    let running = vm.wait_status(&etcd, "running", "dom1");

    etcd.put_key(&vm.key("state"), "restart").expect("restart");
    eventually("restart settles back to start", WAIT, || {
        (vm.get(&etcd, "state").as_deref() == Some("start")).then_some(())
    });
    let after = vm.wait_status(&etcd, "running", "dom1");
    assert_eq!(after["reason"], "restarted", "{after}");
    assert!(after["since"].as_str() >= running["since"].as_str());

    etcd.put_key(&vm.key("state"), "shutdown")
        .expect("shutdown");
    vm.wait_status(&etcd, "stopped", "dom1");

    etcd.put_key(&vm.key("state"), "disable").expect("disable");
    vm.wait_status(&etcd, "disabled", "dom1");

    // Removed from etcd: the domain goes, and no report resurrects the VM's keys.
    etcd.put_key(&vm.key("state"), "start").expect("start");
    vm.wait_status(&etcd, "running", "dom1");
    etcd.delete_prefix(&format!("vms/{}/", vm.uuid))
        .expect("delete");
    eventually("removal logged", WAIT, || {
        logged(
            &d,
            "vm removed from etcd; domain destroyed and undefined here",
            "",
        )
        .then_some(())
    });
    // Not a fixed pause: the daemon demonstrably processed later work (events, ticks).
    later_work_done(&etcd, "dom1");
    assert!(vm.get(&etcd, "status").is_none(), "status not rewritten");
    assert!(vm.get(&etcd, "lock").is_none(), "lock not rewritten");
}

#[test]
fn bad_input_names_the_field_and_touches_nothing_else() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = daemon(&etcd, "dom2");
    let good = new_vm("good");
    define(&good, &etcd, "dom2", "start");
    good.wait_status(&etcd, "running", "dom2");

    /// A VM, the bad values written over a valid definition, the field its error names.
    type Case<'a> = (TestVm, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            new_vm("badxml"),
            vec![("xml", "<domain type='test'><name>x".into())],
            "xml",
        ),
        (
            new_vm("mismatch"),
            vec![("xml", test_driver_xml("other", &random_uuid()))],
            "xml",
        ),
        (
            new_vm("badstate"),
            vec![("state", "running".into())],
            "state",
        ),
        (
            new_vm("badmeta"),
            vec![("metadata", "{\"autostart\":\"yes\"}".into())],
            "metadata",
        ),
        (
            new_vm("badlimit"),
            vec![("metadata", "{\"node_limit\":[\"dom2\",\"NO SUCH\"]}".into())],
            "metadata.node_limit[1]",
        ),
    ];
    for (vm, kv, _) in &cases {
        define(vm, &etcd, "dom2", "start");
        for (k, v) in kv {
            etcd.put_key(&vm.key(k), v).expect("put bad value");
        }
    }
    for (vm, _, field) in &cases {
        let s = eventually(&format!("{} invalid", vm.name), WAIT, || {
            vm.status(&etcd).filter(|s| s["state"] == "invalid")
        });
        let err = s["error"].as_str().unwrap_or_default();
        assert!(err.starts_with(&format!("{field}: ")), "{}: {s}", vm.name);
    }
    // The good VM is untouched; the daemon is alive.
    let s = good.status(&etcd).expect("good status");
    assert_eq!(s["state"], "running", "{s}");
    assert!(d.is_running(), "daemon still running");

    // Repairing a VM heals it.
    let (fixed, _, _) = &cases[2];
    etcd.put_key(&fixed.key("state"), "start").expect("repair");
    fixed.wait_status(&etcd, "running", "dom2");

    // A running VM whose metadata turns bad keeps running.
    etcd.put_key(&good.key("metadata"), "{\"migration_method\":\"teleport\"}")
        .expect("break");
    let s = eventually("good vm invalid", WAIT, || {
        good.status(&etcd).filter(|s| s["state"] == "invalid")
    });
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("left as it is"),
        "{s}"
    );
    etcd.put_key(&good.key("metadata"), "{}").expect("repair");
    let s = good.wait_status(&etcd, "running", "dom2");
    assert_eq!(s["reason"], "running", "not restarted: {s}");
    let _ = d.wait_for(|l| is_message(l, "vm state changed"), WAIT);
}

/// Write `vm`'s run lock as node `holder` would: bound to a fresh live lease (returned).
fn lock_elsewhere(etcd: &EtcdProcess, vm: &TestVm, holder: &'static str) -> i64 {
    let key = format!("/debvisor/{}", vm.key("lock"));
    etcd.with_client(|mut c| async move {
        let err = |e: etcd_client::Error| debvisor_tests::HarnessError::State(e.to_string());
        let lease = c.lease_grant(60, None).await.map_err(err)?.id();
        c.put(
            key,
            holder,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(err)?;
        Ok(lease)
    })
    .expect("lock held elsewhere")
}

#[test]
fn never_starts_while_another_live_lease_holds_the_lock() {
    let etcd = EtcdProcess::start().expect("etcd");
    // Debug logging: the reconciler's plan for each VM is the evidence it looked at this one.
    let mut d = DaemonBuilder::new("dom3")
        .endpoints(&[etcd.endpoint()])
        .env("DEBVISOR_DOMAINS_SHUTDOWN_TIMEOUT", "3s")
        .env("DEBVISOR_DOMAINS_RESTART_BACKOFF", "200ms")
        .env("DEBVISOR_LOGGING_LEVEL", "debug")
        .spawn()
        .expect("spawn daemon");
    d.wait_run(WAIT).expect("daemon reaches run");
    let vm = new_vm("locked");
    // Another node's lock on a live lease.
    let lease = lock_elsewhere(&etcd, &vm, "other");
    define(&vm, &etcd, "dom3", "start");
    // Not a fixed pause: the reconciler planned nothing for this VM (it waits for the lock),
    // then two keepalive ticks (and the host resync's per-tick work) passed after that
    // decision. No start, no lock taken, no status claiming it runs.
    d.wait_for(
        |l| {
            is_message(l, "plan")
                && str_field(l, "vm") == Some(vm.name.as_str())
                && str_field(l, "steps") == Some("[]")
        },
        WAIT,
    )
    .expect("the VM's (empty) plan logged");
    two_keepalive_ticks(&etcd, "dom3");
    assert!(
        !logged(&d, "domain started", &vm.name) && !logged(&d, "run lock acquired", &vm.name),
        "started under another node's lock"
    );
    assert!(
        vm.status(&etcd).is_none_or(|s| s["state"] != "running"),
        "started under another node's lock"
    );
    assert_eq!(vm.get(&etcd, "lock").as_deref(), Some("other"));
    // The holder's lease ends: the lock vanishes and this node takes it.
    etcd.with_client(|mut c| async move {
        c.lease_revoke(lease)
            .await
            .map_err(|e| debvisor_tests::HarnessError::State(e.to_string()))?;
        Ok(())
    })
    .expect("revoke");
    vm.wait_status(&etcd, "running", "dom3");
    assert_eq!(vm.get(&etcd, "lock").as_deref(), Some("dom3"));

    // Split-brain guard: another live node takes the lock of the running VM → stopped here.
    lock_elsewhere(&etcd, &vm, "intruder");
    let s = vm.wait_status(&etcd, "stopped", "dom3");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("split-brain guard: lock held by intruder"),
        "{s}"
    );
}

#[test]
fn foreign_domains_are_listed_and_left_alone() {
    let etcd = EtcdProcess::start().expect("etcd");
    let d = daemon(&etcd, "dom4");
    // The test driver's own domain "test" was not created by debvisor.
    eventually("foreign domain logged", WAIT, || {
        logged(
            &d,
            "foreign domain (not defined by this node) left alone",
            "test",
        )
        .then_some(())
    });
}

#[test]
fn shutdown_migration_and_unmigrate_between_two_daemons() {
    let etcd = EtcdProcess::start().expect("etcd");
    let a = daemon(&etcd, "mig-a");
    let b = daemon(&etcd, "mig-b");
    let vm = new_vm("mover");
    define(&vm, &etcd, "mig-a", "start");
    vm.wait_status(&etcd, "running", "mig-a");

    // The test driver cannot migrate live: the source falls back to a shutdown migration.
    vm.request(&etcd, "mig-b", "migrate");
    eventually("state settles to start", WAIT, || {
        (vm.get(&etcd, "state").as_deref() == Some("start")).then_some(())
    });
    let s = vm.wait_status(&etcd, "running", "mig-b");
    assert_eq!(s["reason"], "migrated", "{s}");
    assert_eq!(vm.get(&etcd, "last_node").as_deref(), Some("mig-a"));
    assert_eq!(vm.get(&etcd, "owner").as_deref(), Some("mig-b"));
    assert_eq!(vm.get(&etcd, "lock").as_deref(), Some("mig-b"));
    assert!(
        logged(&a, "live migration failed", &vm.name),
        "live tried first"
    );
    assert!(logged(&a, "lock released; ownership handed over", &vm.name));
    assert!(
        logged(&a, "definition removed from this host", &vm.name),
        "no stale definition"
    );

    etcd.put_key(&vm.key("state"), "unmigrate")
        .expect("unmigrate");
    vm.wait_status(&etcd, "running", "mig-a");
    eventually("unmigrate settles", WAIT, || {
        (vm.get(&etcd, "state").as_deref() == Some("start")
            && vm.get(&etcd, "node").as_deref() == Some("mig-a")
            && vm.get(&etcd, "last_node").is_none())
        .then_some(())
    });
    assert!(logged(&b, "definition removed from this host", &vm.name));

    // migrate-live forbids the fallback: the VM stays where it runs, with the reason.
    vm.request(&etcd, "mig-b", "migrate-live");
    let s = vm.wait_status(&etcd, "fail", "mig-a");
    assert!(
        s["reason"].as_str().unwrap_or_default().contains("forbids"),
        "{s}"
    );
    assert_eq!(vm.get(&etcd, "lock").as_deref(), Some("mig-a"));
}

#[test]
fn per_vm_stats_go_to_vmstats_bounded_per_sample_unseen_by_the_vm_watch() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("stat1")
        .endpoints(&[etcd.endpoint()])
        .env("DEBVISOR_DOMAINS_STATS_WRITES_PER_TICK", "2")
        .env("DEBVISOR_DOMAINS_STATS_SAMPLE_INTERVAL", "1s")
        .spawn()
        .expect("spawn daemon");
    d.wait_run(WAIT).expect("run");
    let vms: Vec<TestVm> = (0..5).map(|i| new_vm(&format!("st{i}"))).collect();
    for vm in &vms {
        define(vm, &etcd, "stat1", "start");
    }
    for vm in &vms {
        vm.wait_status(&etcd, "running", "stat1");
    }
    // Every VM gets its record (at most 2 per sample: 3 samples or more).
    let record = |vm: &TestVm| etcd.get_key(&format!("vmstats/{}", vm.uuid)).expect("get");
    for vm in &vms {
        let s: Value = serde_json::from_str(&eventually("vmstats record", WAIT, || record(vm)))
            .expect("vmstats JSON");
        assert_eq!(s["node"], "stat1", "{s}");
        assert_eq!(s["active"], true, "{s}");
        assert!(s["vcpus"].as_u64().unwrap_or(0) >= 1, "{s}");
        assert!(s["max_memory_kib"].as_u64().unwrap_or(0) > 0, "{s}");
        assert!(s.get("cpu_time_ns").is_none(), "no counters in etcd: {s}");
    }
    // The whole history so far, replayed from revision 1 on two watches: the one every
    // node's VM reactor opens (`vms/`) holds no stats write at all; `vmstats/` holds at
    // most 2 records per revision (one transaction per batch of a sample). Each replay
    // runs until the latest revision of a key under its prefix (history comes in order).
    let (vm_keys, per_rev) = etcd
        .with_client(|mut c| async move {
            let err = |e: etcd_client::Error| debvisor_tests::HarnessError::State(e.to_string());
            let mut vm_keys: Vec<String> = Vec::new();
            let mut per_rev: std::collections::BTreeMap<i64, Vec<String>> = Default::default();
            for prefix in ["/debvisor/vms/", "/debvisor/vmstats/"] {
                let now = c
                    .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                    .await
                    .map_err(err)?;
                let last = now
                    .kvs()
                    .iter()
                    .map(|kv| kv.mod_revision())
                    .max()
                    .unwrap_or(0);
                let opts = etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(1);
                let mut stream = c.watch(prefix, Some(opts)).await.map_err(err)?;
                let mut seen = 0;
                while seen < last {
                    let Some(resp) = stream.message().await.map_err(err)? else {
                        break;
                    };
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        seen = seen.max(kv.mod_revision());
                        let k = String::from_utf8_lossy(kv.key()).into_owned();
                        if prefix.ends_with("/vms/") {
                            vm_keys.push(k);
                        } else {
                            per_rev.entry(kv.mod_revision()).or_default().push(k);
                        }
                    }
                }
            }
            Ok((vm_keys, per_rev))
        })
        .expect("replay the history");
    assert!(
        !vm_keys.is_empty(),
        "the VMs' own writes are on the vms/ watch"
    );
    assert!(
        !vm_keys.iter().any(|k| k.ends_with("/stats")),
        "a stats write reached the vms/ watch: {vm_keys:?}"
    );
    assert!(
        per_rev.values().flatten().count() >= vms.len(),
        "{per_rev:?}"
    );
    for (rev, keys) in &per_rev {
        assert!(
            keys.len() <= 2,
            "revision {rev} wrote {} records",
            keys.len()
        );
    }
    let health: Value = serde_json::from_str(
        &etcd
            .get_key("nodes/stat1/health")
            .expect("get")
            .expect("health"),
    )
    .expect("health JSON");
    assert!(
        health["alloc"]["vcpus"].as_u64().unwrap_or(0) >= 5,
        "{health}"
    );
    assert!(
        health["alloc"]["memory_provisioned_mib"]
            .as_u64()
            .unwrap_or(0)
            >= health["alloc"]["memory_mib"].as_u64().unwrap_or(u64::MAX),
        "{health}"
    );
    assert!(
        health["foreign"]
            .as_array()
            .is_some_and(|f| f.iter().any(|n| n == "test")),
        "the test driver's own domain is listed as foreign: {health}"
    );
    // The VM's removal from etcd removes its record too.
    let gone = &vms[0];
    etcd.delete_prefix(&format!("vms/{}/", gone.uuid))
        .expect("delete");
    eventually("the record of the removed VM deleted", WAIT, || {
        record(gone).is_none().then_some(())
    });
    assert!(record(&vms[1]).is_some(), "the other records stay");
}

#[test]
fn on_shutdown_flush_drains_before_the_daemon_stops() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut a = DaemonBuilder::new("osf-a")
        .endpoints(&[etcd.endpoint()])
        .clustered(&["osf-a"])
        .env("DEBVISOR_DOMAINS_ON_SHUTDOWN", "flush")
        .spawn()
        .expect("spawn");
    a.wait_run(WAIT).expect("run");
    let _b = daemon(&etcd, "osf-b");
    let vm = new_vm("osf");
    define(&vm, &etcd, "osf-a", "start");
    vm.wait_status(&etcd, "running", "osf-a");
    eventually("health of osf-b", WAIT, || {
        etcd.get_key("nodes/osf-b/health").ok().flatten()
    });
    a.signal(libc::SIGTERM).expect("SIGTERM");
    let status = a.wait_exit(Duration::from_secs(60)).expect("exit");
    assert!(status.success(), "{status:?}");
    assert!(
        logged(&a, "on_shutdown flush complete", ""),
        "{}",
        a.tail(20)
    );
    vm.wait_status(&etcd, "running", "osf-b");
    assert_eq!(
        etcd.get_key("nodes/osf-a/domain_state")
            .expect("get")
            .as_deref(),
        Some("flushed")
    );
}

/// A drain on stop that has to wait (no other node can take the VM) keeps the node's
/// keepalive going: `last_seen` keeps advancing, so the primary does not mark the stopping
/// node degraded ("no keepalive") while it drains. (The keepalive task used to block on its
/// outcome channel once the run loop stopped reading it, about four ticks into the stop.)
/// The VM that cannot move is warned about once.
#[test]
fn the_keepalive_goes_on_while_a_stop_waits_for_its_drain() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut a = DaemonBuilder::new("osk-a")
        .endpoints(&[etcd.endpoint()])
        .clustered(&["osk-a"])
        .env("DEBVISOR_DOMAINS_ON_SHUTDOWN", "flush")
        .env("DEBVISOR_DOMAINS_FLUSH_TIMEOUT", "60s")
        .spawn()
        .expect("spawn");
    a.wait_run(WAIT).expect("run");
    let vm = new_vm("osk");
    define(&vm, &etcd, "osk-a", "start");
    vm.wait_status(&etcd, "running", "osk-a");
    a.signal(libc::SIGTERM).expect("SIGTERM");
    a.wait_for(
        |l| is_message(l, "flush: no node can take the VM; it keeps running here"),
        WAIT,
    )
    .expect("the drain waits: no other node");
    // Ten keepalive writes (1 s apart in the harness) after the drain began waiting: far
    // more than the four a blocked keepalive task still managed.
    let key = "nodes/osk-a/last_seen";
    let rev = || etcd.mod_revision(key).expect("etcd get").unwrap_or(0);
    let mut last = rev();
    for tick in 1..=10 {
        last = eventually(&format!("keepalive {tick} while draining"), WAIT, || {
            let r = rev();
            (r > last).then_some(r)
        });
    }
    assert!(a.is_running(), "still draining: {}", a.tail(10));
    // The operator stops the guest: the drain completes and the daemon exits cleanly.
    vm.put(&etcd, &[("state", "stop")]);
    let status = a.wait_exit(Duration::from_secs(60)).expect("exit");
    assert!(status.success(), "{status:?}\n{}", a.tail(20));
    // One drain, one warning: the resync tick's passes and the stop's share their record.
    let warned = a
        .json_lines()
        .iter()
        .filter(|l| is_message(l, "flush: no node can take the VM; it keeps running here"))
        .count();
    assert_eq!(warned, 1, "{}", a.tail(30));
}

#[test]
fn flush_and_unflush_move_every_vm_by_its_method() {
    let etcd = EtcdProcess::start().expect("etcd");
    let a = daemon(&etcd, "drain-a");
    let _b = daemon(&etcd, "drain-b");
    let methods = ["live", "shutdown", "none"];
    let vms: Vec<TestVm> = methods.iter().map(|m| new_vm(&format!("dr-{m}"))).collect();
    for (vm, m) in vms.iter().zip(methods) {
        define(vm, &etcd, "drain-a", "start");
        etcd.put_key(
            &vm.key("metadata"),
            &format!("{{\"migration_method\":\"{m}\"}}"),
        )
        .expect("metadata");
    }
    for vm in &vms {
        vm.wait_status(&etcd, "running", "drain-a");
    }
    // Both nodes must have reported health before placement can rank them.
    eventually("health of drain-b", WAIT, || {
        etcd.get_key("nodes/drain-b/health").ok().flatten()
    });

    a.ctl_ok(&["node", "flush", "drain-a", "--wait", "--timeout", "60s"]);
    assert_eq!(
        etcd.get_key("nodes/drain-a/domain_state")
            .expect("get")
            .as_deref(),
        Some("flushed")
    );
    // live and shutdown methods run on drain-b now; `none` is shut down and marked.
    for vm in &vms[..2] {
        vm.wait_status(&etcd, "running", "drain-b");
        assert_eq!(vm.get(&etcd, "last_node").as_deref(), Some("drain-a"));
    }
    let none = &vms[2];
    assert_eq!(none.get(&etcd, "state").as_deref(), Some("shutdown"));
    assert_eq!(none.get(&etcd, "flushed_from").as_deref(), Some("drain-a"));
    none.wait_status(&etcd, "stopped", "drain-a");

    a.ctl_ok(&["node", "unflush", "drain-a", "--wait", "--timeout", "60s"]);
    assert_eq!(
        etcd.get_key("nodes/drain-a/domain_state")
            .expect("get")
            .as_deref(),
        Some("ready")
    );
    for vm in &vms {
        vm.wait_status(&etcd, "running", "drain-a");
        assert_eq!(vm.get(&etcd, "lock").as_deref(), Some("drain-a"));
    }
    assert!(none.get(&etcd, "flushed_from").is_none());
}
