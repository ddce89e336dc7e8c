//! Checks done before libvirt is called: UUID and name syntax (the rules of
//! `debvisor_objects::domain`, so etcd keys and libvirt agree) and the identity a domain XML
//! declares.

use debvisor_objects::domain::{valid_domain_name, valid_uuid, xml_identity};

use super::error::HypervisorError;
use super::types::Op;

/// `uuid` if it is canonical (36 characters, lower-case hex `8-4-4-4-12`), else
/// [`HypervisorError::InvalidUuid`]. Upper case is refused rather than folded: etcd keys are
/// lower case and a second spelling would be a second key.
pub fn check_uuid(op: Op, uuid: &str) -> Result<&str, HypervisorError> {
    if valid_uuid(uuid) {
        Ok(uuid)
    } else {
        Err(HypervisorError::InvalidUuid {
            op,
            value: uuid.to_string(),
        })
    }
}

/// `name` if it is a domain name we accept (1-64 of `[A-Za-z0-9_.-]`, not starting with `-`
/// or `.`: it becomes file names under /run and /var/log), else
/// [`HypervisorError::InvalidName`].
pub fn check_name(op: Op, name: &str) -> Result<&str, HypervisorError> {
    if valid_domain_name(name) {
        Ok(name)
    } else {
        Err(HypervisorError::InvalidName {
            op,
            value: name.to_string(),
        })
    }
}

/// What a domain XML declares about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlDomain {
    /// `<uuid>`, canonical.
    pub uuid: String,
    /// `<name>`.
    pub name: String,
    /// `<memory>` in KiB (the maximum), if present and parseable.
    pub max_memory_kib: Option<u64>,
    /// `<currentMemory>` in KiB, if present and parseable.
    pub memory_kib: Option<u64>,
    /// `<vcpu current=…>` or `<vcpu>`, if present and parseable.
    pub vcpus: Option<u32>,
}

/// Parse the identity of a domain XML: well-formed, `<domain type=…>`, a canonical `<uuid>`
/// (required: the VM's etcd key is its UUID, and redefining by UUID is what makes `define`
/// idempotent) and a valid `<name>`. Everything else is left to libvirt's own validation.
pub fn parse_domain_xml(op: Op, xml: &str) -> Result<XmlDomain, HypervisorError> {
    let (uuid, name) = xml_identity(xml).map_err(|e| HypervisorError::InvalidXml {
        op,
        message: e.reason,
    })?;
    check_uuid(op, &uuid)?;
    check_name(op, &name)?;
    // xml_identity succeeded, so this parses.
    let doc = roxmltree::Document::parse(xml).map_err(|e| HypervisorError::InvalidXml {
        op,
        message: e.to_string(),
    })?;
    let root = doc.root_element();
    let child = |n: &str| root.children().find(|c| c.has_tag_name(n));
    let memory = |n: &str| {
        child(n).and_then(|c| {
            let v: u64 = c.text()?.trim().parse().ok()?;
            to_kib(v, c.attribute("unit").unwrap_or("KiB"))
        })
    };
    let vcpus = child("vcpu").and_then(|c| {
        c.attribute("current")
            .or_else(|| c.text())
            .and_then(|t| t.trim().parse().ok())
    });
    Ok(XmlDomain {
        uuid,
        name,
        max_memory_kib: memory("memory"),
        memory_kib: memory("currentMemory"),
        vcpus,
    })
}

/// libvirt's memory units (`b`, `KB`, `KiB`, `MiB`, `G`…) to KiB.
fn to_kib(v: u64, unit: &str) -> Option<u64> {
    let bytes: u128 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "K" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    u64::try_from(u128::from(v) * bytes / 1024).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";

    #[test]
    fn uuids() {
        assert!(check_uuid(Op::Get, UUID).is_ok());
        for bad in [
            "",
            "0A1B2C3D-4E5F-6789-ABCD-EF0123456789",
            "0a1b2c3d4e5f6789abcdef0123456789",
            "0a1b2c3d-4e5f-6789-abcd-ef012345678",
            "0a1b2c3d-4e5f-6789-abcd-ef01234567890",
            "0a1b2c3d-4e5f-6789-abcd_ef0123456789",
            "../../../../../etc/passwd-aaaaaaaaaa",
            "0a1b2c3d-4e5f-6789-abcd-ef012345678\0",
        ] {
            let e = check_uuid(Op::Start, bad).expect_err(bad);
            assert!(matches!(
                e,
                HypervisorError::InvalidUuid { op: Op::Start, .. }
            ));
            assert!(
                e.to_string().starts_with("start: invalid domain UUID"),
                "{e}"
            );
        }
    }

    #[test]
    fn names() {
        for good in ["vm1", "web.example-1", "A_b"] {
            assert!(check_name(Op::Define, good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "a\0b", &"x".repeat(65)] {
            assert!(check_name(Op::Define, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn xml_identity_and_sizes() {
        let xml = format!(
            "<domain type='kvm'><name>vm1</name><uuid>{UUID}</uuid>\
             <memory unit='MiB'>64</memory><currentMemory>32768</currentMemory>\
             <vcpu current='1'>2</vcpu></domain>"
        );
        let d = parse_domain_xml(Op::Define, &xml).expect("valid");
        assert_eq!(d.uuid, UUID);
        assert_eq!(d.name, "vm1");
        assert_eq!(d.max_memory_kib, Some(65536));
        assert_eq!(d.memory_kib, Some(32768));
        assert_eq!(d.vcpus, Some(1));
        assert_eq!(to_kib(1, "GiB"), Some(1 << 20));
        assert_eq!(to_kib(2048, "b"), Some(2));
        assert_eq!(to_kib(1, "parsecs"), None);
    }

    #[test]
    fn xml_refusals() {
        let cases = [
            ("<domain", "not well-formed"),
            ("<network/>", "not <domain>"),
            ("<domain type='kvm'><name>a</name></domain>", "no <uuid>"),
            (
                "<domain type='kvm'><name>a</name><uuid>nope</uuid></domain>",
                "invalid domain UUID",
            ),
            (
                &format!("<domain type='kvm'><name>a b</name><uuid>{UUID}</uuid></domain>"),
                "domain name",
            ),
        ];
        for (xml, want) in cases {
            let e = parse_domain_xml(Op::Define, xml).expect_err(xml);
            assert!(e.to_string().contains(want), "{xml}: {e}");
        }
    }
}
