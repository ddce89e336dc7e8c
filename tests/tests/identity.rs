//! A node knows its own registration by the token in its `alive` record (boot id, pid,
//! process start time), not by a lease id in its state dir: a restored etcd never makes it
//! stop itself; a real takeover by another daemon stops it with exit code 1 and leaves the
//! node's keys to the other daemon; a lost lease is re-registered exactly once.

use std::time::Duration;

use debvisor_tests::libvirt::test_driver_xml;
use debvisor_tests::{eventually, is_message, DaemonBuilder, DaemonProcess, EtcdProcess, TestVm};
use etcd_client::{Client, PutOptions};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

async fn lease_of(c: &mut Client, key: &str) -> Option<i64> {
    c.get(key, None)
        .await
        .ok()
        .and_then(|r| r.kvs().first().map(|kv| kv.lease()))
}

fn count(d: &DaemonProcess, msg: &str) -> usize {
    d.json_lines().iter().filter(|l| is_message(l, msg)).count()
}

/// Break 4: etcd's data is put back (a snapshot taken while this daemon held lease L1,
/// restored after it had moved on to L2): the restored `alive` bound to L1 is this very
/// process's registration — taken over, not obeyed as another daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_etcd_does_not_make_the_daemon_stop_itself() {
    let mut etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("restore1")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    d.wait_run(WAIT).expect("run");
    let mut c = etcd.client().await.expect("client");
    let alive = "/debvisor/nodes/restore1/alive";
    let l1 = lease_of(&mut c, alive).await.expect("alive");
    let snap = tempfile::tempdir().expect("tmp");
    let snap_file = snap.path().join("snap.db");
    etcd.snapshot_save(&snap_file).expect("snapshot");

    // The daemon moves on to a new lease (its state dir now names L2)…
    c.lease_revoke(l1).await.expect("revoke");
    d.wait_for(|v| is_message(v, "re-registered with a fresh lease"), WAIT)
        .expect("re-registered");
    let l2 = lease_of(&mut c, alive).await.expect("alive again");
    assert_ne!(l1, l2);

    // …and etcd is put back to the snapshot, where L1 holds `alive` again.
    etcd.restore(&snap_file).expect("restore");
    let mut c = etcd.client().await.expect("client after restore");
    let l3 = eventually("registered in the restored store", WAIT, || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(lease_of(&mut c, alive))
        })
        .filter(|l| *l != l1 && *l != l2)
    });
    assert!(c.lease_time_to_live(l3, None).await.expect("ttl").ttl() > 0);
    etcd.wait_ticks("restore1", 3, WAIT);
    assert!(d.is_running(), "the daemon keeps running");
    assert_eq!(
        count(
            &d,
            "another daemon took this node name while our lease was lost; stopping (exit 1)"
        ),
        0
    );
}

/// Break 4, the other side: another daemon really took the name while this one's lease
/// was lost. This one stops, exits 1 (so `Restart=on-failure` applies), and does not write
/// `daemon_state` over the other daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_takeover_exits_one_and_leaves_the_keys_alone() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("taken1")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    d.wait_run(WAIT).expect("run");
    let mut c = etcd.client().await.expect("client");
    let other = c.lease_grant(60, None).await.expect("grant").id();
    let record = json!({"hostname": "elsewhere", "pid": 4242, "node_id": "someone-else",
        "since": "2026-01-01T00:00:00Z", "boot_id": "b", "start_ticks": 1})
    .to_string();
    c.put(
        "/debvisor/nodes/taken1/alive",
        record,
        Some(PutOptions::new().with_lease(other)),
    )
    .await
    .expect("take the name");
    c.put("/debvisor/nodes/taken1/daemon_state", "run", None)
        .await
        .expect("the other daemon's state");
    let status = d.wait_exit(WAIT).expect("exits");
    assert_eq!(status.code(), Some(1), "giving up is never exit 0");
    assert_eq!(
        count(
            &d,
            "another daemon took this node name while our lease was lost; stopping (exit 1)"
        ),
        1
    );
    assert_eq!(
        etcd.get_key("nodes/taken1/daemon_state")
            .expect("get")
            .as_deref(),
        Some("run"),
        "the other daemon's daemon_state is left alone"
    );
    assert_eq!(
        lease_of(&mut c, "/debvisor/nodes/taken1/alive").await,
        Some(other),
        "the other daemon's registration stays"
    );
}

/// Break 7: one lost lease, one re-registration. The lease keeper and the keepalive both
/// notice the loss; the second notice must not revoke the fresh lease (and with it the VM
/// lock taken on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_re_registered_once_and_the_new_locks_stay() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("once1")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    d.wait_run(WAIT).expect("run");
    let vm = TestVm::new("once", WAIT);
    vm.put(
        &etcd,
        &[
            ("xml", &test_driver_xml(&vm.name, &vm.uuid)),
            ("node", "once1"),
            ("state", "start"),
        ],
    );
    vm.wait_status(&etcd, "running", "once1");
    let mut c = etcd.client().await.expect("client");
    let alive = "/debvisor/nodes/once1/alive";
    let lock = format!("/debvisor/vms/{}/lock", vm.uuid);
    let l1 = lease_of(&mut c, alive).await.expect("alive");
    assert_eq!(lease_of(&mut c, &lock).await, Some(l1));

    // Several losses in a row: each time both the lease keeper and the keepalive notice.
    let mut current = l1;
    for round in 1..=5 {
        c.lease_revoke(current).await.expect("revoke");
        let fresh = eventually(&format!("re-registration {round}"), WAIT, || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(lease_of(&mut c, alive))
            })
            .filter(|l| *l != current)
        });
        eventually(
            &format!("the VM's lock taken again on lease {round}"),
            WAIT,
            || {
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(lease_of(&mut c, &lock))
                })
                .filter(|l| *l == fresh)
            },
        );
        etcd.wait_ticks("once1", 3, WAIT);
        assert_eq!(
            lease_of(&mut c, alive).await,
            Some(fresh),
            "round {round}: the fresh lease stays"
        );
        assert_eq!(
            lease_of(&mut c, &lock).await,
            Some(fresh),
            "round {round}: and so does the lock"
        );
        assert_eq!(
            count(&d, "re-registered with a fresh lease"),
            round,
            "one re-registration per loss"
        );
        current = fresh;
    }
}

/// Break 8: two standalone nodes cannot share one store prefix (both would act as the
/// primary: gateways, dnsmasq, Ceph); nor can a clustered node join a standalone one. The
/// newcomer refuses to start, naming the other node, and exits non-zero.
#[test]
fn a_standalone_node_refuses_to_share_its_prefix() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut first = DaemonBuilder::new("solo1")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    first.wait_run(WAIT).expect("run");
    for (name, clustered) in [("solo2", false), ("join1", true)] {
        let mut b = DaemonBuilder::new(name).endpoints(&[etcd.endpoint()]);
        if clustered {
            b = b.clustered(&[name]);
        }
        let mut second = b.spawn().expect("spawn");
        let status = second.wait_exit(WAIT).expect("refused at once");
        assert_eq!(status.code(), Some(1), "{}", second.tail(5));
        let (stage, error) = second.failed_stage().expect("a failed stage");
        assert_eq!(stage, "self-registration");
        assert!(error.contains("solo1"), "names the other node: {error}");
        assert!(
            error.contains(if clustered {
                "standalone"
            } else {
                "must be alone"
            }),
            "{error}"
        );
        assert!(
            etcd.get_key(&format!("nodes/{name}/alive"))
                .expect("get")
                .is_none(),
            "{name} did not register"
        );
    }
    assert!(first.is_running(), "the first node is untouched");
    etcd.wait_ticks("solo1", 2, WAIT);
}
