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

fn virsh(args: &[&str]) -> Result<String> {
    let out = run_bounded(
        Command::new("virsh").args(["-c", QEMU_URI]).args(args),
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

/// A libvirt secret of usage `ceph` holding the cluster client's key; undefined on drop.
pub struct CephSecret {
    /// The secret's UUID (`<secret type='ceph' uuid=…>` in a disk's `<auth>`).
    pub uuid: String,
}

impl CephSecret {
    /// Define the secret for `cluster`'s client (`virsh secret-define` and
    /// `secret-set-value --file`, so the key never appears on a command line).
    pub fn new(cluster: &CephCluster) -> Result<CephSecret> {
        let key = cluster.ceph(&["auth", "get-key", &format!("client.{}", cluster.client())])?;
        let uuid = random_uuid();
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
        let secret = CephSecret { uuid };
        virsh(&["secret-define", &xml_path.to_string_lossy()])?;
        let key_path = dir.path().join("key");
        std::fs::write(&key_path, key.trim()).ctx(|| "writing the key file".into())?;
        virsh(&[
            "secret-set-value",
            "--secret",
            &secret.uuid,
            "--file",
            &key_path.to_string_lossy(),
        ])?;
        Ok(secret)
    }

    /// The `<disk>` of volume `pool/image` on `cluster` as guest device `dev` (virtio).
    pub fn disk_xml(&self, cluster: &CephCluster, pool: &str, image: &str, dev: &str) -> String {
        format!(
            "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>\
             <source protocol='rbd' name='{pool}/{image}'><host name='127.0.0.1' port='{port}'/></source>\
             <auth username='{client}'><secret type='ceph' uuid='{uuid}'/></auth>\
             <target dev='{dev}' bus='virtio'/></disk>",
            port = cluster.mon_port(),
            client = cluster.client(),
            uuid = self.uuid,
        )
    }
}

impl Drop for CephSecret {
    fn drop(&mut self) {
        if let Err(e) = virsh(&["secret-undefine", &self.uuid]) {
            eprintln!("CephSecret {}: cleanup failed: {e}", self.uuid);
        }
    }
}

/// `xml` with `devices` added at the end of its `<devices>`.
pub fn with_devices(xml: &str, devices: &str) -> String {
    xml.replacen("</devices>", &format!("{devices}</devices>"), 1)
}
