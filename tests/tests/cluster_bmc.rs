//! The cluster harness's fake BMCs (`debvisor_tests::cluster::Bmc`: openipmi's `ipmi_sim`
//! per node, driven with the real `ipmitool -I lanplus -H … -p … -U … -E`), against today's
//! daemon with a real KVM guest on a node's isolated libvirtd: a power off leaves no process
//! of the node (daemon, libvirtd, qemu) and reads Off, a power on boots it again (reads On,
//! daemon back in `run` with its state dir, the guest back), a cut BMC stops answering, and
//! the run recorder follows the guest through its node's death. Nothing is left behind.
//! Skipped (a failure under `DEBVISOR_REQUIRE_ALL=1`) without `ipmi_sim`.

use std::time::{Duration, Instant};

use debvisor_tests::cluster::{
    require_ipmi_sim, wait_until, Cluster, Evidence, Leftovers, Power, PowerEventKind, BMC_USER,
    IPMI_PORT,
};
use debvisor_tests::libvirt::require_kvm;
use debvisor_tests::skip_unless_root;

/// How long a guest may take to be reported running, a node to boot.
const WAIT: Duration = Duration::from_secs(60);

/// A 2-node cluster (1 etcd member) with isolated libvirtds, BMCs and the run recorder.
fn cluster() -> Cluster {
    let t = Instant::now();
    let c = Cluster::builder()
        .nodes(2)
        .etcd_members(1)
        .isolated_libvirt(true)
        .with_bmcs()
        .track_runs(true)
        .env("DEBVISOR_DOMAINS_SHUTDOWN_TIMEOUT", "3s")
        .build()
        .expect("cluster");
    eprintln!("cluster with BMCs up in {:?}", t.elapsed());
    c
}

#[test]
fn a_power_off_leaves_nothing_of_the_node_and_a_power_on_boots_it_again() {
    skip_unless_root!();
    if !require_ipmi_sim() {
        return;
    }
    require_kvm();
    let c = cluster();
    let c2 = c.node(1);
    let bmc = c.bmc(1);
    assert_eq!(
        (bmc.address().to_string(), bmc.port(), bmc.user()),
        ("192.0.2.152".to_owned(), IPMI_PORT, BMC_USER)
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(bmc.password_file())
            .expect("password file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(bmc.password_file(), c.node(0).bmc().password_file());
    let env = c2.with_daemon(|d| d.env().clone()).expect("daemon env");
    assert_eq!(env["DEBVISOR_FENCING_IPMI_HOST"], "192.0.2.152");
    assert_eq!(bmc.power().expect("power status"), Power::On);
    // The node's own IPMI traffic reaches its BMC over the cluster network.
    c2.exec_ok(
        "ipmitool",
        &[
            "-I",
            "lanplus",
            "-C",
            "3",
            "-H",
            "192.0.2.151",
            "-p",
            "623",
            "-U",
            BMC_USER,
            "-f",
            &bmc.password_file().display().to_string(),
            "power",
            "status",
        ],
    )
    .expect("ipmitool from c2 to c1's BMC");

    // A guest on c2 (through the daemon), so the power off has a qemu to kill.
    let (uuid, _) = c.request_tiny_guest("c2", "bmc-off").expect("VM keys");
    c.wait_vm_running(&uuid, WAIT, |n| n == "c2")
        .expect("status running");
    c.runs()
        .wait_running_on(&uuid, "c2", WAIT)
        .expect("recorded on c2");
    let before: Vec<String> = c2.processes().into_iter().map(|p| p.comm).collect();
    for want in ["debvisord", "libvirtd", "qemu-system-x86"] {
        assert!(
            before.iter().any(|p| p.starts_with(want)),
            "{want} in {before:?}"
        );
    }
    let state_dir = c2
        .with_daemon(|d| d.state_dir().to_path_buf())
        .expect("dir");

    let off = bmc.power_off().expect("power off");
    let down = bmc.wait_down(off, Duration::from_secs(10)).expect("down");
    let status_off = bmc
        .wait_power(Power::Off, Duration::from_secs(10))
        .expect("off");
    eprintln!(
        "power off: node dead {:?} after `ipmitool power off` was sent, status off after {:?}",
        down - off,
        status_off - off
    );
    assert_eq!(c2.processes(), [], "nothing of c2 runs");
    assert!(!c2.is_running());
    assert!(!c2.libvirt().expect("libvirtd").is_running());
    assert!(
        !c2.has_addr(c2.addr().into()).expect("addr"),
        "c2 is off the wire"
    );
    assert!(!c.node(0).ping(c2.addr()));
    let kinds: Vec<PowerEventKind> = bmc.power_log().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            PowerEventKind::On,
            PowerEventKind::OffRequested,
            PowerEventKind::Down { survivors: 0 }
        ]
    );
    let on_c2 = c.runs().intervals(&uuid);
    assert_eq!(on_c2.len(), 1, "{on_c2:?}");
    assert_eq!(
        (on_c2[0].end, &on_c2[0].ended_by),
        (Some(down), &Some(Evidence::NodeDown))
    );
    assert!(c2.start().is_err(), "no daemon on a powered-off node");

    // An unreachable BMC: IPMI times out; healed, it answers again.
    bmc.cut().expect("cut");
    let t = Instant::now();
    assert!(bmc.power().is_err(), "a cut BMC does not answer");
    eprintln!("ipmitool gave up on the cut BMC after {:?}", t.elapsed());
    bmc.heal().expect("heal");
    assert_eq!(bmc.power().expect("healed"), Power::Off);

    let on = bmc.power_on().expect("power on");
    c2.wait_run(WAIT).expect("c2 back in run");
    eprintln!(
        "power on: daemon in run {:?} after `ipmitool power on`",
        on.elapsed()
    );
    assert_eq!(bmc.power().expect("status"), Power::On);
    assert_eq!(
        c2.with_daemon(|d| d.state_dir().to_path_buf())
            .expect("dir"),
        state_dir,
        "same state dir"
    );
    wait_until("c2 alive again", WAIT, || {
        c.alive_nodes()
            .ok()?
            .iter()
            .any(|n| n == "c2")
            .then_some(())
    })
    .expect("alive");
    // Its daemon brings the guest back (its desired node is still c2).
    c.wait_vm_running(&uuid, WAIT, |n| n == "c2")
        .expect("status running");
    c.runs()
        .wait_running_on(&uuid, "c2", WAIT)
        .expect("running again");
    assert_eq!(c.runs().intervals(&uuid).len(), 2);
    c.runs().assert_no_double_run();
    c.checker().assert_clean();

    // A power cycle: the node dies and boots again by itself.
    let cycle = bmc.power_cycle().expect("power cycle");
    bmc.wait_down(cycle, Duration::from_secs(10))
        .expect("down in the cycle");
    c2.wait_run(WAIT).expect("c2 back in run after the cycle");
    assert_eq!(bmc.power().expect("status"), Power::On);
    let on_after: Vec<PowerEventKind> = bmc
        .power_log()
        .iter()
        .filter(|e| e.at >= cycle)
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        on_after,
        [
            PowerEventKind::OffRequested,
            PowerEventKind::Down { survivors: 0 },
            PowerEventKind::On
        ]
    );
    eprintln!("power cycle: daemon in run {:?} after it", cycle.elapsed());
    eprintln!("run recorder: {:?}", c.runs().stats());
    c.runs().assert_no_double_run();
    let left = Leftovers::of(&c);
    drop(c);
    left.assert_gone();
}
