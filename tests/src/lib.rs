//! Test harness for `debvisor-daemon`: private etcd processes, a cuttable TCP proxy, a test
//! PKI, the real `debvisord`/`debvisorctl` binaries, network namespaces, isolated libvirtd
//! instances (own network, mount and UTS namespaces) for real migration, systemd containers,
//! a real one-host Ceph cluster (mon, mgr, memstore OSDs) for the storage driver, and a
//! multi-node cluster in namespaces with faults and an invariant checker ([`cluster`]).
//!
//! Everything spawned is killed by PID and every temp directory removed on drop, including
//! when a test panics.

#![warn(missing_docs)]

pub mod ceph;
pub mod cluster;
pub mod ctl_env;
pub mod daemon;
pub mod error;
pub mod etcd;
pub mod libvirt;
pub mod libvirt_pair;
pub mod netns;
pub mod nspawn;
pub mod ports;
pub mod proxy;
pub mod rbd_guest;
pub mod skip;
pub mod tls;
pub mod vm;

pub use ceph::{ceph_installed, CephCluster, MonPause};
pub use cluster::{Cluster, ClusterBuilder};
pub use ctl_env::CtlCluster;
pub use daemon::{
    bin_path, ctl, ctl_in, harness_bin_path, is_message, str_field, DaemonBuilder, DaemonProcess,
};
pub use error::{HarnessError, Result};
pub use etcd::EtcdProcess;
pub use libvirt::{ensure_libvirtd, kvm_available, tiny_guest_xml, TestDomain};
pub use libvirt_pair::{IsolatedLibvirt, LibvirtCluster, LibvirtPair, LibvirtSolo};
pub use netns::{is_root, NetNs};
pub use ports::free_port;
pub use proxy::TcpProxy;
pub use skip::{skip_or_fail, SkipKind};
pub use tls::CertSet;
pub use vm::TestVm;

/// Poll `f` every 50 ms until it returns `Some`, or panic naming `what` after `within`
/// (a generous deadline for a condition, never a speed assertion).
pub fn eventually<T>(
    what: &str,
    within: std::time::Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let until = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < until,
            "timed out after {within:?} waiting for: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
