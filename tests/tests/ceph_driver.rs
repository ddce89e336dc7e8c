//! The Ceph driver against a real one-host Ceph (1 mon, 1 mgr, 2 memstore OSDs on 127.0.0.1).

use debvisor_tests::CephCluster;

#[test]
fn ceph_driver_against_a_real_cluster() {
    let cluster = CephCluster::start().expect("starting a one-host Ceph");
    let h = cluster.ceph_json(&["health"]).expect("ceph health");
    assert_eq!(h["status"], "HEALTH_OK");
}
