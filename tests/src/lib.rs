//! Test harness for `debvisor-daemon`: private etcd processes, a cuttable TCP proxy, a test
//! PKI, the real `debvisord`/`debvisorctl` binaries, network namespaces and systemd containers.
//!
//! Everything spawned is killed by PID and every temp directory removed on drop, including
//! when a test panics.

#![warn(missing_docs)]

pub mod daemon;
pub mod error;
pub mod etcd;
pub mod libvirt;
pub mod netns;
pub mod nspawn;
pub mod ports;
pub mod proxy;
pub mod tls;

pub use daemon::{bin_path, ctl, is_message, str_field, DaemonBuilder, DaemonProcess};
pub use error::{HarnessError, Result};
pub use etcd::EtcdProcess;
pub use libvirt::{ensure_libvirtd, kvm_available, tiny_guest_xml, TestDomain};
pub use netns::{is_root, NetNs};
pub use ports::free_port;
pub use proxy::TcpProxy;
pub use tls::CertSet;
