//! The RBD volumes a domain XML opens (`<disk type='network'><source protocol='rbd'
//! name='pool/image'>`), read before a start so the Domain object can check their locks.
//! Pure: no I/O; every name is validated before it can reach the `rbd` tool.

use debvisor_objects::ceph::{validate_image_name, validate_pool_name};

use super::ImageRef;

/// One RBD disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdDisk {
    /// The volume.
    pub image: ImageRef,
    /// The guest device (`vdb`), for messages; `-` when the disk has no `<target>`.
    pub target: String,
    /// Opened read-only or shared on purpose (`<readonly/>`, `<shareable/>`, a cdrom or a
    /// snapshot `pool/image@snap`): other holders are expected, no lock check applies.
    pub shared: bool,
}

/// Why the RBD disks of a domain XML could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// The XML does not parse.
    #[error("xml: not well-formed XML: {0}")]
    Xml(String),
    /// An RBD `<source>` without a usable `name`.
    #[error("xml: RBD disk {target}: {reason}")]
    BadSource {
        /// The disk's target device (`-` without one).
        target: String,
        /// What is wrong.
        reason: String,
    },
}

/// The RBD disks of `xml`, in document order. Non-RBD disks (files, block devices, other
/// network protocols) are ignored.
pub fn rbd_disks(xml: &str) -> Result<Vec<RbdDisk>, DiskError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| DiskError::Xml(e.to_string()))?;
    let Some(devices) = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("devices"))
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for disk in devices.children().filter(|c| c.has_tag_name("disk")) {
        if disk.attribute("type") != Some("network") {
            continue;
        }
        let Some(source) = disk.children().find(|c| c.has_tag_name("source")) else {
            continue;
        };
        if source.attribute("protocol") != Some("rbd") {
            continue;
        }
        let target = disk
            .children()
            .find(|c| c.has_tag_name("target"))
            .and_then(|t| t.attribute("dev"))
            .unwrap_or("-")
            .to_string();
        let bad = |reason: String| DiskError::BadSource {
            target: target.clone(),
            reason,
        };
        let name = source
            .attribute("name")
            .ok_or_else(|| bad("<source> has no name (pool/image)".into()))?;
        let (spec, snap) = match name.split_once('@') {
            Some((s, snap)) => (s, Some(snap)),
            None => (name, None),
        };
        let Some((pool, image)) = spec.split_once('/') else {
            return Err(bad(format!("source name {name:?} is not pool/image")));
        };
        validate_pool_name(pool).map_err(|r| bad(format!("pool {pool:?}: {r}")))?;
        // A namespace (`pool/ns/image`) fails here: '/' is no image name character.
        validate_image_name(image).map_err(|r| bad(format!("image {image:?}: {r}")))?;
        let flag = |n: &str| disk.children().any(|c| c.has_tag_name(n));
        let shared = snap.is_some()
            || flag("readonly")
            || flag("shareable")
            || disk.attribute("device") == Some("cdrom");
        out.push(RbdDisk {
            image: ImageRef::new(pool, image),
            target,
            shared,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(devices: &str) -> String {
        format!(
            "<domain type='kvm'><name>v</name><uuid>8c3c5c86-5b3e-4a53-9d8a-5b1a1d3c0b11</uuid>\
             <devices>{devices}</devices></domain>"
        )
    }

    const RBD: &str = "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
        <source protocol='rbd' name='vms/disk-1'><host name='10.0.0.1' port='3300'/></source>\
        <target dev='vda' bus='virtio'/></disk>";

    #[test]
    fn reads_rbd_disks_and_ignores_others() {
        let xml = domain(&format!(
            "<disk type='file' device='disk'><source file='/var/lib/a.img'/><target dev='sda'/></disk>\
             {RBD}\
             <disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='vdc'/></disk>\
             <disk type='network' device='disk'><source protocol='rbd' name='vms/shared'/>\
               <shareable/><target dev='vdd'/></disk>\
             <disk type='network' device='cdrom'><source protocol='rbd' name='iso/inst'/></disk>\
             <disk type='network' device='disk'><source protocol='rbd' name='vms/base@gold'/>\
               <target dev='vde'/></disk>\
             <interface type='network'><source network='default'/></interface>"
        ));
        let disks = rbd_disks(&xml).expect("parses");
        let got: Vec<_> = disks
            .iter()
            .map(|d| (d.image.spec(), d.target.as_str(), d.shared))
            .collect();
        assert_eq!(
            got,
            vec![
                ("vms/disk-1".to_string(), "vda", false),
                ("vms/shared".to_string(), "vdd", true),
                ("iso/inst".to_string(), "-", true),
                ("vms/base".to_string(), "vde", true),
            ]
        );
    }

    #[test]
    fn no_devices_or_no_rbd_is_empty() {
        assert_eq!(rbd_disks("<domain type='kvm'/>"), Ok(vec![]));
        assert_eq!(
            rbd_disks(&domain(
                "<disk type='block'><source dev='/dev/sdb'/></disk>"
            )),
            Ok(vec![])
        );
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(matches!(
            rbd_disks("<domain><devices>"),
            Err(DiskError::Xml(_))
        ));
    }

    #[test]
    fn bad_sources_are_errors_naming_the_disk() {
        let cases = [
            ("<source protocol='rbd'/>", "no name"),
            (
                "<source protocol='rbd' name='justimage'/>",
                "not pool/image",
            ),
            (
                "<source protocol='rbd' name='vms/ns/img'/>",
                "image \"ns/img\"",
            ),
            ("<source protocol='rbd' name='-x/img'/>", "pool \"-x\""),
            ("<source protocol='rbd' name='vms/a b'/>", "image \"a b\""),
            ("<source protocol='rbd' name='vms/'/>", "image \"\""),
        ];
        for (source, want) in cases {
            let xml = domain(&format!(
                "<disk type='network' device='disk'>{source}<target dev='vdz'/></disk>"
            ));
            let e = rbd_disks(&xml).expect_err(source);
            let msg = e.to_string();
            assert!(msg.contains("vdz") && msg.contains(want), "{source}: {msg}");
        }
    }
}
