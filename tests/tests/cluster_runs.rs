//! The cluster harness's run recorder (`debvisor_tests::cluster::Runs`, the double-run
//! checker) against real KVM guests on two nodes' isolated libvirtds, started and destroyed
//! by hand (the daemons are not started, so nothing else touches the guests): one VM UUID
//! started on both nodes at once is caught as a double run naming both nodes, and the same
//! VM stopped on one node and then started on the other stays clean.

use std::time::{Duration, Instant};

use debvisor_daemon::hypervisor::Libvirt;
use debvisor_tests::cluster::{wait_until, Cluster, Evidence};
use debvisor_tests::libvirt::{random_uuid, require_kvm, tiny_guest_xml, unique_name};
use debvisor_tests::skip_unless_root;

/// How long a libvirt call, or a guest to be reported running, may take.
const WAIT: Duration = Duration::from_secs(30);

/// A 2-node cluster (1 etcd member) with isolated libvirtds and the run recorder; the
/// daemons are never started.
fn cluster() -> Cluster {
    let t = Instant::now();
    let c = Cluster::builder()
        .nodes(2)
        .etcd_members(1)
        .isolated_libvirt(true)
        .track_runs(true)
        .defer_start(&[0, 1])
        .build()
        .expect("cluster");
    eprintln!("cluster with the run recorder up in {:?}", t.elapsed());
    c
}

/// A current-thread runtime for the libvirt calls.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Node `i`'s libvirtd.
fn libvirt(c: &Cluster, i: usize) -> Libvirt {
    c.node(i)
        .libvirt()
        .expect("isolated libvirtd")
        .libvirt(WAIT)
}

#[test]
fn the_same_vm_started_on_two_nodes_at_once_is_caught_as_a_double_run() {
    skip_unless_root!();
    require_kvm();
    let c = cluster();
    let rt = runtime();
    let (lv1, lv2) = (libvirt(&c, 0), libvirt(&c, 1));
    let (uuid, name) = (random_uuid(), unique_name("double"));
    let xml = tiny_guest_xml(&name, &uuid);
    rt.block_on(lv1.define(&xml)).expect("define on c1");
    rt.block_on(lv2.define(&xml)).expect("define on c2");
    c.runs().check().expect("defined only: nothing runs");

    let t = Instant::now();
    let (r1, r2) = rt.block_on(async { tokio::join!(lv1.start(&uuid), lv2.start(&uuid)) });
    r1.expect("start on c1");
    r2.expect("start on c2");
    eprintln!("started on both nodes in {:?}", t.elapsed());
    let caught = wait_until("the double run", Duration::from_secs(10), || {
        c.runs().check().err()
    })
    .expect("caught");
    eprintln!("caught after {:?}: {caught}", t.elapsed());
    assert_eq!(caught.0.len(), 1, "{caught:?}");
    let d = &caught.0[0];
    assert_eq!(d.uuid, uuid);
    let mut nodes = [d.first.node.as_str(), d.second.node.as_str()];
    nodes.sort();
    assert_eq!(nodes, ["c1", "c2"]);
    for side in [&d.first, &d.second] {
        assert!(
            matches!(side.started_by, Evidence::Event(_) | Evidence::List),
            "{side:?}"
        );
    }
    let text = caught.to_string();
    assert!(
        text.contains("c1") && text.contains("c2") && text.contains(&uuid),
        "{text}"
    );
    let runs = c.runs().clone();
    eprintln!("(the panic printed next is assert_no_double_run's, expected)");
    std::panic::catch_unwind(move || runs.assert_no_double_run())
        .expect_err("assert_no_double_run panics");

    // Destroyed on c2: the overlap closes and stays recorded; c1 still runs it.
    rt.block_on(lv2.destroy(&uuid)).expect("destroy on c2");
    let closed = wait_until("the overlap closed", Duration::from_secs(10), || {
        c.runs().overlaps().first().and_then(|o| o.until)
    })
    .expect("closed");
    eprintln!("the double run lasted {:?}", closed - caught.0[0].from);
    assert_eq!(c.runs().running_on(&uuid).as_deref(), Some("c1"));
    c.runs().sync(2, WAIT).expect("lists");
    assert_eq!(c.runs().overlaps().len(), 1);
    eprintln!("run recorder: {:?}", c.runs().stats());
}

#[test]
fn a_vm_stopped_on_one_node_then_started_on_another_stays_clean() {
    skip_unless_root!();
    require_kvm();
    let c = cluster();
    let rt = runtime();
    let (lv1, lv2) = (libvirt(&c, 0), libvirt(&c, 1));
    let (uuid, name) = (random_uuid(), unique_name("handover"));
    let xml = tiny_guest_xml(&name, &uuid);
    rt.block_on(lv1.define(&xml)).expect("define on c1");
    rt.block_on(lv2.define(&xml)).expect("define on c2");

    rt.block_on(lv1.start(&uuid)).expect("start on c1");
    c.runs()
        .wait_running_on(&uuid, "c1", WAIT)
        .expect("recorded on c1");
    rt.block_on(lv1.destroy(&uuid)).expect("destroy on c1");
    // The next start only once the recorder saw the stop event: a start on c2 racing an
    // undelivered stop event would not be a handover. (Closed by a domain list is not
    // enough: a stop event arriving within the list's grace makes that list stale after the
    // fact, and the end moves to the event's later stamp.)
    wait_until("c1's interval closed by its stop event", WAIT, || {
        let closed = c.runs().intervals(&uuid).iter().any(|i| {
            i.node == "c1" && i.end.is_some() && matches!(i.ended_by, Some(Evidence::Event(_)))
        });
        (closed && c.runs().running_on(&uuid).is_none()).then_some(())
    })
    .expect("stopped on c1");
    rt.block_on(lv2.start(&uuid)).expect("start on c2");
    c.runs()
        .wait_running_on(&uuid, "c2", WAIT)
        .expect("recorded on c2");
    // Two more rounds of domain lists: any start or stop the events missed is in by now.
    c.runs().sync(2, WAIT).expect("lists");
    c.runs().check().expect("a handover is not a double run");
    let i = c.runs().intervals(&uuid);
    assert_eq!(i.len(), 2, "{i:?}");
    assert_eq!((i[0].node.as_str(), i[1].node.as_str()), ("c1", "c2"));
    let c1_end = i[0].end.expect("c1's interval closed");
    assert!(c1_end <= i[1].start, "{i:?}");
    assert_eq!(i[1].end, None);
    eprintln!(
        "handover: c1 stopped {:?} before c2 started; {:?}",
        i[1].start - c1_end,
        c.runs().stats()
    );
}
