//! What a KVM guest needs to open an RBD volume of a test [`CephCluster`] through qemu's rbd
//! block driver, set up as an operator would: a libvirt `ceph` secret holding the client key
//! (removed by its guard), and the `<disk type='network'>` element naming the volume, the mon
//! and the secret.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::ceph::CephCluster;
use crate::error::{HarnessError, IoContext, Result};
use crate::libvirt::{random_uuid, run_bounded, QEMU_URI};

/// qemu's rbd block driver module (Debian `qemu-block-extra`).
pub const QEMU_RBD_DRIVER: &str = "/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so";

/// Whether qemu can open RBD volumes on this host.
pub fn qemu_rbd_available() -> bool {
    Path::new(QEMU_RBD_DRIVER).exists()
}

/// Why an RBD guest cannot run on this machine (no Ceph tools, no qemu RBD driver), or
/// `None`: the tests with RBD guests skip with this reason instead of failing obscurely.
pub fn rbd_guest_skip_reason() -> Option<String> {
    if !crate::ceph::ceph_installed() {
        return Some("ceph not installed (scripts/deps.sh)".into());
    }
    if !qemu_rbd_available() {
        return Some(format!(
            "qemu rbd driver {QEMU_RBD_DRIVER} missing (qemu-block-extra)"
        ));
    }
    None
}

fn virsh(uri: &str, args: &[&str]) -> Result<String> {
    let out = run_bounded(
        Command::new("virsh").args(["-c", uri]).args(args),
        "virsh",
        Duration::from_secs(20),
    )?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: format!("virsh {}", args.first().copied().unwrap_or_default()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Define a persistent libvirt secret `uuid` of usage `ceph` holding the cephx `key`
/// ([`CephCluster::client_key`]) on the libvirtd at `uri` (`virsh secret-define` and
/// `secret-set-value --file`, so the key never appears on a command line). The multi-node
/// harness defines one UUID on every node's libvirtd, so a guest's disk XML is valid
/// wherever it runs.
pub fn define_ceph_secret(uri: &str, key: &str, uuid: &str) -> Result<()> {
    let dir = tempfile::tempdir().ctx(|| "secret temp dir".into())?;
    let xml_path = dir.path().join("secret.xml");
    std::fs::write(
        &xml_path,
        format!(
            "<secret ephemeral='no' private='yes'><uuid>{uuid}</uuid>\
             <usage type='ceph'><name>dvtest-{pid} {uuid}</name></usage></secret>",
            pid = std::process::id()
        ),
    )
    .ctx(|| "writing secret.xml".into())?;
    virsh(uri, &["secret-define", &xml_path.to_string_lossy()])?;
    let key_path = dir.path().join("key");
    std::fs::write(&key_path, key.trim()).ctx(|| "writing the key file".into())?;
    virsh(
        uri,
        &[
            "secret-set-value",
            "--secret",
            uuid,
            "--file",
            &key_path.to_string_lossy(),
        ],
    )?;
    Ok(())
}

/// The `<disk>` of volume `pool/image` on `cluster` as guest device `dev` (virtio), its
/// cephx key in libvirt secret `secret_uuid`; the mon is named by address
/// ([`CephCluster::addr`]) and port.
pub fn rbd_disk_xml(
    cluster: &CephCluster,
    secret_uuid: &str,
    pool: &str,
    image: &str,
    dev: &str,
) -> String {
    format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>\
         <source protocol='rbd' name='{pool}/{image}'><host name='{addr}' port='{port}'/></source>\
         <auth username='{client}'><secret type='ceph' uuid='{secret_uuid}'/></auth>\
         <target dev='{dev}' bus='virtio'/></disk>",
        addr = cluster.addr(),
        port = cluster.mon_port(),
        client = cluster.client(),
    )
}

/// A libvirt secret of usage `ceph` holding the cluster client's key; undefined on drop.
pub struct CephSecret {
    /// The secret's UUID (`<secret type='ceph' uuid=…>` in a disk's `<auth>`).
    pub uuid: String,
}

impl CephSecret {
    /// Define the secret for `cluster`'s client (`virsh secret-define` and
    /// `secret-set-value --file`, so the key never appears on a command line).
    pub fn new(cluster: &CephCluster) -> Result<CephSecret> {
        let secret = CephSecret {
            uuid: random_uuid(),
        };
        define_ceph_secret(QEMU_URI, &cluster.client_key()?, &secret.uuid)?;
        Ok(secret)
    }

    /// The `<disk>` of volume `pool/image` on `cluster` as guest device `dev` (virtio).
    pub fn disk_xml(&self, cluster: &CephCluster, pool: &str, image: &str, dev: &str) -> String {
        rbd_disk_xml(cluster, &self.uuid, pool, image, dev)
    }
}

impl Drop for CephSecret {
    fn drop(&mut self) {
        if let Err(e) = virsh(QEMU_URI, &["secret-undefine", &self.uuid]) {
            eprintln!("CephSecret {}: cleanup failed: {e}", self.uuid);
        }
    }
}

/// Write `len` bytes at offset 0 of virtio disk `alias` (libvirt's device alias, e.g.
/// `virtio-disk0` for `vda`) of running domain `domain` on the libvirtd at `uri`, through
/// the device's own block backend (HMP `qemu-io -d` on its `virtio-backend`), as the
/// guest's own write would go: on an RBD volume
/// librbd then takes the image's exclusive lock for this qemu, which `rbd lock ls` shows
/// with the qemu's client address. The tiny test guests boot no OS, so nothing else writes.
pub fn qemu_io_write(uri: &str, domain: &str, alias: &str, len: u32) -> Result<()> {
    qemu_io_write_at(uri, domain, alias, 0, len)
}

/// [`qemu_io_write`] at byte `offset` (e.g. into an RBD object the volume did not have yet).
pub fn qemu_io_write_at(uri: &str, domain: &str, alias: &str, offset: u64, len: u32) -> Result<()> {
    // The qdev of a virtio disk is the PCI proxy; its block backend hangs off the
    // virtio-backend child (the QOM path libvirt itself uses for such disks).
    let cmd =
        format!("qemu-io -d /machine/peripheral/{alias}/virtio-backend \"write {offset} {len}\"");
    let out = virsh(uri, &["qemu-monitor-command", domain, "--hmp", &cmd])?;
    // qemu-io prints its own report on qemu's stdout (the domain log); the monitor answers
    // nothing unless the command failed, and virsh exits 0 either way.
    if !out.trim().is_empty() {
        return Err(HarnessError::Command {
            command: format!("virsh qemu-monitor-command {domain} --hmp {cmd:?}"),
            status: "0".into(),
            stderr: out.trim().to_owned(),
        });
    }
    Ok(())
}

/// `xml` with `devices` added at the end of its `<devices>`.
pub fn with_devices(xml: &str, devices: &str) -> String {
    xml.replacen("</devices>", &format!("{devices}</devices>"), 1)
}
