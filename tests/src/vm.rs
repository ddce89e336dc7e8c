//! A VM as the tests see it in etcd: its keys under `/debvisor/vms/<uuid>/`, requests written
//! in one transaction (as `debvisorctl` writes them), and waits on the status its node writes.

use std::time::Duration;

use serde_json::Value;

use crate::etcd::EtcdProcess;
use crate::libvirt::{random_uuid, unique_name, TestDomain};

/// A test VM: a fresh UUID and a unique `dvtest-…` name.
#[derive(Debug, Clone)]
pub struct TestVm {
    /// Canonical lower-case UUID.
    pub uuid: String,
    /// Domain name.
    pub name: String,
    /// How long [`TestVm::wait_status`] waits.
    pub wait: Duration,
}

impl TestVm {
    /// A new VM identity; waits last `wait`.
    pub fn new(label: &str, wait: Duration) -> TestVm {
        TestVm {
            uuid: random_uuid(),
            name: unique_name(label),
            wait,
        }
    }

    /// The etcd side of libvirt test guest `d` (same UUID and name; its `TestDomain` guard
    /// removes it from libvirt); waits last `wait`.
    pub fn of_domain(d: &TestDomain, wait: Duration) -> TestVm {
        TestVm {
            uuid: d.uuid.clone(),
            name: d.name.clone(),
            wait,
        }
    }

    /// The VM's key `vms/<uuid>/<field>` (relative to `/debvisor/`).
    pub fn key(&self, field: &str) -> String {
        format!("vms/{}/{field}", self.uuid)
    }

    /// Write `fields` (`(field, value)`) in one transaction.
    ///
    /// # Panics
    /// If etcd refuses.
    pub fn put(&self, etcd: &EtcdProcess, fields: &[(&str, &str)]) {
        let keys: Vec<(String, &str)> = fields.iter().map(|(f, v)| (self.key(f), *v)).collect();
        let pairs: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        etcd.put_keys(&pairs).expect("write VM keys");
    }

    /// A request as `debvisorctl` writes it: target and state together.
    pub fn request(&self, etcd: &EtcdProcess, node: &str, state: &str) {
        self.put(etcd, &[("node", node), ("state", state)]);
    }

    /// One field's value.
    ///
    /// # Panics
    /// If etcd does not answer.
    pub fn get(&self, etcd: &EtcdProcess, field: &str) -> Option<String> {
        etcd.get_key(&self.key(field)).expect("get VM key")
    }

    /// The status JSON, if written.
    pub fn status(&self, etcd: &EtcdProcess) -> Option<Value> {
        self.get(etcd, "status")
            .and_then(|s| serde_json::from_str(&s).ok())
    }

    /// Wait until the status says `state`, written by `node`; returns it.
    ///
    /// # Panics
    /// After [`TestVm::wait`] without it.
    pub fn wait_status(&self, etcd: &EtcdProcess, state: &str, node: &str) -> Value {
        crate::eventually(
            &format!("{} status {state} from {node}", self.name),
            self.wait,
            || {
                self.status(etcd)
                    .filter(|s| s["state"] == state && s["node"] == node)
            },
        )
    }
}
