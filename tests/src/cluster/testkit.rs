//! Small helpers the cluster tests share: tiny guests asked for through etcd, waiting for a
//! VM's reported state, and checking that a dropped cluster left nothing behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{wait_until, Cluster};
use crate::error::Result;
use crate::libvirt::{random_uuid, tiny_guest_xml, unique_name};
use crate::rbd_guest::with_devices;

impl Cluster {
    /// Ask for a tiny KVM guest on `node` through etcd (`xml`, `node`, `state = start` in one
    /// transaction); returns its UUID and name.
    pub fn request_tiny_guest(&self, node: &str, label: &str) -> Result<(String, String)> {
        self.request_guest_with(node, label, "")
    }

    /// [`Cluster::request_tiny_guest`] with `devices` (XML elements, e.g. an RBD disk from
    /// [`Cluster::rbd_disk_xml`]) added to the guest's `<devices>`.
    pub fn request_guest_with(
        &self,
        node: &str,
        label: &str,
        devices: &str,
    ) -> Result<(String, String)> {
        let (uuid, name) = (random_uuid(), unique_name(label));
        let xml = with_devices(&tiny_guest_xml(&name, &uuid), devices);
        let k = |f: &str| format!("vms/{uuid}/{f}");
        self.etcd_put_all(&[
            (&k("xml"), &xml),
            (&k("node"), node),
            (&k("state"), "start"),
        ])?;
        Ok((uuid, name))
    }

    /// Wait up to `timeout` until `vms/<uuid>/status` says `running` on a node that `on`
    /// accepts; returns that node.
    pub fn wait_vm_running(
        &self,
        uuid: &str,
        timeout: Duration,
        on: impl Fn(&str) -> bool,
    ) -> Result<String> {
        wait_until(&format!("{uuid} running"), timeout, || {
            let s: Value =
                serde_json::from_str(&self.etcd_get(&format!("vms/{uuid}/status")).ok()??).ok()?;
            let node = s["node"].as_str()?;
            (s["state"] == "running" && on(node)).then(|| node.to_string())
        })
    }
}

/// Whether a process with this PID exists.
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// What a cluster leaves behind — its processes, namespaces and directory — recorded before
/// the drop, so a test can assert that the drop removed them all.
pub struct Leftovers {
    /// The cluster's processes (daemons, etcd members, libvirtds, BMCs).
    pub pids: Vec<u32>,
    /// Its network namespaces.
    pub netns: Vec<String>,
    /// Its directory.
    pub dir: PathBuf,
}

impl Leftovers {
    /// Record what `c` holds now.
    pub fn of(c: &Cluster) -> Leftovers {
        Leftovers {
            pids: c.pids(),
            netns: c.netns_names(),
            dir: c.dir().to_path_buf(),
        }
    }

    /// Assert that none of them exist any more.
    pub fn assert_gone(&self) {
        for p in &self.pids {
            assert!(!pid_alive(*p), "process {p} survived the cluster");
        }
        for n in &self.netns {
            assert!(
                !Path::new("/run/netns").join(n).exists(),
                "namespace {n} survived the cluster"
            );
        }
        assert!(!self.dir.exists(), "{} survived", self.dir.display());
    }
}
