//! The Domain (VM) object: `vms/<uuid>/…` parsed and validated into a spec the node plans
//! from. A bad value (invalid XML, a UUID that does not match the key, an unknown state, a
//! metadata field of the wrong type) marks that VM in error with the field named; no other
//! VM is affected.
//!
//! Desired state is written by operators (`xml`, `state`, `node`, `metadata`); `owner`,
//! `lock` (bound to the owner's lease), `last_node` and `status` by the owning node, and the
//! VM's stats record ([`VmStats`]) under `vmstats/<uuid>`, outside `vms/`, so that no VM
//! watch receives it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::reactor::{KeyEntry, Kind, ObjectError};
use crate::schema;

/// Prefix of all VM keys.
pub const VMS_PREFIX: &str = "vms/";

/// One key of a VM below `vms/<uuid>/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmField {
    /// libvirt domain XML (operator).
    Xml,
    /// Desired state (operator).
    State,
    /// Target node (operator).
    Node,
    /// Policy flags (operator).
    Metadata,
    /// Current authoritative node (owner, by transaction).
    Owner,
    /// Run lock, lease-bound (owner).
    Lock,
    /// Node the VM ran on before a migration (owner).
    LastNode,
    /// Actual state report (owner).
    Status,
    /// Legacy: where per-VM statistics were written before they moved to
    /// `vmstats/<uuid>` ([`vm_stats_key`]). Never written; the owner deletes it with the
    /// first record under the new key, and the VM's removal deletes it.
    Stats,
    /// Node whose drain shut the VM down (method `none`); its unflush starts it again.
    FlushedFrom,
}

impl VmField {
    /// Every field.
    pub const ALL: [VmField; 10] = [
        VmField::Xml,
        VmField::State,
        VmField::Node,
        VmField::Metadata,
        VmField::Owner,
        VmField::Lock,
        VmField::LastNode,
        VmField::Status,
        VmField::Stats,
        VmField::FlushedFrom,
    ];

    /// The key suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            VmField::Xml => "xml",
            VmField::State => "state",
            VmField::Node => "node",
            VmField::Metadata => "metadata",
            VmField::Owner => "owner",
            VmField::Lock => "lock",
            VmField::LastNode => "last_node",
            VmField::Status => "status",
            VmField::Stats => "stats",
            VmField::FlushedFrom => "flushed_from",
        }
    }

    /// Inverse of [`VmField::suffix`].
    pub fn from_suffix(s: &str) -> Option<VmField> {
        VmField::ALL.into_iter().find(|f| f.suffix() == s)
    }

    /// Keys that are desired state or ownership (the reactor ignores reports: status, stats).
    pub fn drives_reconcile(self) -> bool {
        !matches!(self, VmField::Status | VmField::Stats)
    }
}

/// Key of one VM field.
pub fn vm_key(uuid: &str, f: VmField) -> String {
    format!("{VMS_PREFIX}{uuid}/{}", f.suffix())
}

/// Prefix of the per-VM stats records: outside [`VMS_PREFIX`], so that the VM reactors'
/// watches (every node watches `vms/`) never receive a stats write.
pub const VMSTATS_PREFIX: &str = "vmstats/";

/// Key of a VM's stats record (`vmstats/<uuid>`), written by the VM's owner node.
pub fn vm_stats_key(uuid: &str) -> String {
    format!("{VMSTATS_PREFIX}{uuid}")
}

/// `vmstats/<uuid>`: what placement and an operator need of a VM, rewritten only when it
/// moves (see the daemon's `vmstats` module for when). Full-rate counters (CPU time, disk
/// and network bytes) are on the owner's `/metrics`, not here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// The node that sampled it (the VM's owner).
    pub node: String,
    /// Whether the domain is running.
    pub active: bool,
    /// CPU use between the last two samples, percent of one host core (a 4-vCPU guest
    /// busy on all of them reads 400); `None` until two samples of the running domain.
    pub cpu_pct: Option<u32>,
    /// Current memory (balloon), KiB.
    pub memory_kib: u64,
    /// Maximum memory, KiB.
    pub max_memory_kib: u64,
    /// Current vCPUs.
    pub vcpus: u32,
    /// When these values were sampled (RFC 3339).
    pub at: String,
}

state_enum!(
    /// `vms/<uuid>/state`: what the operator wants.
    DesiredState {
        Start = "start",
        Restart = "restart",
        Shutdown = "shutdown",
        Stop = "stop",
        Disable = "disable",
        Migrate = "migrate",
        MigrateLive = "migrate-live",
        Unmigrate = "unmigrate",
    }
);

impl DesiredState {
    /// A move to another node is requested (`migrate`, `migrate-live`, `unmigrate`).
    pub fn is_migration(self) -> bool {
        matches!(
            self,
            DesiredState::Migrate | DesiredState::MigrateLive | DesiredState::Unmigrate
        )
    }

    /// The VM should be running on its target node (start, restart or on the move).
    pub fn runs(self) -> bool {
        self == DesiredState::Start || self == DesiredState::Restart || self.is_migration()
    }
}

/// Mod revision of one VM key among an object's keys (0 when absent): the guard of a
/// transaction that must not act on a stale view.
pub fn key_revision(keys: &BTreeMap<String, KeyEntry>, f: VmField) -> i64 {
    keys.get(f.suffix()).map(|k| k.mod_revision).unwrap_or(0)
}

state_enum!(
    /// `metadata.migration_method`.
    MigrationMethod { Live = "live", Shutdown = "shutdown", None = "none" }
);

state_enum!(
    /// `metadata.node_selector`: how a target node is chosen.
    NodeSelector { Mem = "mem", Memprov = "memprov", Load = "load", Vcpus = "vcpus", Vms = "vms" }
);

/// `vms/<uuid>/metadata`: policy flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Start on the node's boot / after recovery even if `state` was not touched.
    #[serde(default)]
    pub autostart: bool,
    #[serde(default = "default_method")]
    pub migration_method: MigrationMethod,
    /// Maximum downtime of a live migration, milliseconds.
    #[serde(default)]
    pub migration_max_downtime: Option<u64>,
    /// Nodes the VM may run on (empty: any).
    #[serde(default)]
    pub node_limit: Vec<String>,
    #[serde(default = "default_selector")]
    pub node_selector: NodeSelector,
    /// Never recovered or migrated automatically.
    #[serde(default)]
    pub protected: bool,
    /// HA group name.
    #[serde(default)]
    pub ha_group: Option<String>,
}

fn default_method() -> MigrationMethod {
    MigrationMethod::Live
}

fn default_selector() -> NodeSelector {
    NodeSelector::Mem
}

impl Default for Metadata {
    fn default() -> Self {
        Metadata {
            autostart: false,
            migration_method: MigrationMethod::Live,
            migration_max_downtime: None,
            node_limit: Vec::new(),
            node_selector: NodeSelector::Mem,
            protected: false,
            ha_group: None,
        }
    }
}

/// The run lock's value: who holds it (the lease is on the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// Node name in the lock's value.
    pub node: String,
    /// The lease the key is bound to (0 = none: a stale or hand-written lock).
    pub lease: i64,
    /// Revision of the lock key: the fencing token.
    pub revision: i64,
}

/// A VM as the cluster wants it, every field checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub uuid: String,
    /// Domain name from the XML.
    pub name: String,
    pub xml: String,
    pub state: DesiredState,
    /// Target node (the node that should run it).
    pub node: Option<String>,
    pub metadata: Metadata,
    pub owner: Option<String>,
    pub lock: Option<LockHolder>,
    pub last_node: Option<String>,
    /// Set by a drain that shut the VM down (method `none`): that node's unflush restarts it.
    pub flushed_from: Option<String>,
}

/// Is `s` a canonical lower-case UUID (`8-4-4-4-12` hex)?
pub fn valid_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

/// Is `s` usable as a libvirt domain name here (no path or shell surprises)?
pub fn valid_domain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with(['-', '.'])
}

/// The UUID and name a libvirt domain XML declares.
pub fn xml_identity(xml: &str) -> Result<(String, String), ObjectError> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| ObjectError::new("xml", format!("not well-formed XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(ObjectError::new(
            "xml",
            format!("root element is <{}>, not <domain>", root.tag_name().name()),
        ));
    }
    if root.attribute("type").is_none() {
        return Err(ObjectError::new(
            "xml",
            "<domain> has no type attribute (kvm, qemu, test)",
        ));
    }
    let child = |n: &str| {
        root.children()
            .find(|c| c.has_tag_name(n))
            .and_then(|c| c.text())
            .map(|t| t.trim().to_string())
    };
    let uuid = child("uuid")
        .ok_or_else(|| ObjectError::new("xml", "no <uuid>: the key's UUID must be in the XML"))?
        .to_ascii_lowercase();
    let name = child("name").ok_or_else(|| ObjectError::new("xml", "no <name>"))?;
    if !valid_domain_name(&name) {
        return Err(ObjectError::new(
            "xml",
            format!("domain name {name:?} is not 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.'"),
        ));
    }
    Ok((uuid, name))
}

/// XML namespace of the element the daemon adds to every domain it defines: it tells our
/// domains from foreign ones, and carries a digest of the etcd XML so a changed definition
/// is noticed without comparing libvirt's rewritten XML.
pub const MARK_NS: &str = "urn:debvisor:vm:1";

/// What the daemon's mark on a defined domain says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// Node that defined it.
    pub node: String,
    /// [`xml_digest`] of the etcd XML it was defined from.
    pub digest: String,
}

/// A stable digest (FNV-1a, 64 bit, hex) of a desired XML text.
pub fn xml_digest(xml: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in xml.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The desired XML with our mark inside `<metadata>` (added when absent; an existing mark is
/// replaced). `node` must be a valid node name (it goes into an attribute unescaped).
pub fn mark_xml(xml: &str, node: &str) -> Result<String, ObjectError> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| ObjectError::new("xml", format!("not well-formed XML: {e}")))?;
    let root = doc.root_element();
    let mark = format!(
        "<dv:vm xmlns:dv=\"{MARK_NS}\" node=\"{node}\" digest=\"{}\"/>",
        xml_digest(xml)
    );
    let meta = root.children().find(|c| c.has_tag_name("metadata"));
    let Some(meta) = meta else {
        // Insert before the root's closing tag.
        let end = root.range().end;
        let close = xml[..end]
            .rfind("</")
            .ok_or_else(|| ObjectError::new("xml", "<domain> has no closing tag"))?;
        return Ok(format!(
            "{}<metadata>{mark}</metadata>{}",
            &xml[..close],
            &xml[close..]
        ));
    };
    if let Some(old) = meta
        .children()
        .find(|c| c.is_element() && c.tag_name().namespace() == Some(MARK_NS))
    {
        let r = old.range();
        return Ok(format!("{}{mark}{}", &xml[..r.start], &xml[r.end..]));
    }
    let r = meta.range();
    let text = &xml[r.clone()];
    if text.trim_end().ends_with("/>") {
        return Ok(format!(
            "{}<metadata>{mark}</metadata>{}",
            &xml[..r.start],
            &xml[r.end..]
        ));
    }
    let close = r.start
        + text
            .rfind("</")
            .ok_or_else(|| ObjectError::new("xml", "<metadata> has no closing tag"))?;
    Ok(format!("{}{mark}{}", &xml[..close], &xml[close..]))
}

/// Our mark in a domain's XML as libvirt returns it, if the daemon defined the domain.
pub fn read_mark(xml: &str) -> Option<Mark> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let meta = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("metadata"))?;
    let m = meta
        .children()
        .find(|c| c.is_element() && c.tag_name().namespace() == Some(MARK_NS))?;
    Some(Mark {
        node: m.attribute("node")?.to_string(),
        digest: m.attribute("digest")?.to_string(),
    })
}

fn text<'a>(field: &str, v: &'a [u8]) -> Result<&'a str, ObjectError> {
    std::str::from_utf8(v)
        .map(str::trim)
        .map_err(|_| ObjectError::new(field, "not UTF-8"))
}

/// Parse one VM from its keys (relative to `vms/<uuid>/`).
pub fn parse_vm(id: &str, keys: &BTreeMap<String, KeyEntry>) -> Result<Vm, ObjectError> {
    if !valid_uuid(id) {
        return Err(ObjectError::new(
            "uuid",
            format!("{id:?} is not a lower-case canonical UUID"),
        ));
    }
    let get = |f: VmField| keys.get(f.suffix());
    let xml = text(
        "xml",
        &get(VmField::Xml)
            .ok_or_else(|| ObjectError::new("xml", "missing"))?
            .value,
    )?
    .to_string();
    let (uuid, name) = xml_identity(&xml)?;
    if uuid != id {
        return Err(ObjectError::new(
            "xml",
            format!("<uuid> {uuid} does not match the key's UUID {id}"),
        ));
    }
    let state = match get(VmField::State) {
        Some(e) => text("state", &e.value)?
            .parse()
            .map_err(|e: String| ObjectError::new("state", e))?,
        None => DesiredState::Stop,
    };
    let node_field = |f: VmField| -> Result<Option<String>, ObjectError> {
        match get(f) {
            None => Ok(None),
            Some(e) => {
                let n = text(f.suffix(), &e.value)?;
                if n.is_empty() {
                    return Ok(None);
                }
                if !schema::valid_node_name(n) {
                    return Err(ObjectError::new(
                        f.suffix(),
                        format!("{n:?} is not a node name"),
                    ));
                }
                Ok(Some(n.to_string()))
            }
        }
    };
    let node = node_field(VmField::Node)?;
    let owner = node_field(VmField::Owner)?;
    let last_node = node_field(VmField::LastNode)?;
    let flushed_from = node_field(VmField::FlushedFrom)?;
    let metadata = match get(VmField::Metadata) {
        None => Metadata::default(),
        Some(e) => serde_json::from_slice(&e.value)
            .map_err(|err| ObjectError::new("metadata", format!("{err}")))?,
    };
    for (i, n) in metadata.node_limit.iter().enumerate() {
        if !schema::valid_node_name(n) {
            return Err(ObjectError::new(
                format!("metadata.node_limit[{i}]"),
                format!("{n:?} is not a node name"),
            ));
        }
    }
    if let Some(d) = metadata.migration_max_downtime {
        if d == 0 || d > 60_000 {
            return Err(ObjectError::new(
                "metadata.migration_max_downtime",
                format!("{d} ms is outside 1..=60000"),
            ));
        }
    }
    let lock = match get(VmField::Lock) {
        None => None,
        Some(e) => {
            let n = text("lock", &e.value)?;
            if !schema::valid_node_name(n) {
                return Err(ObjectError::new(
                    "lock",
                    format!("{n:?} is not a node name"),
                ));
            }
            Some(LockHolder {
                node: n.to_string(),
                lease: e.lease,
                revision: e.mod_revision,
            })
        }
    };
    Ok(Vm {
        uuid,
        name,
        xml,
        state,
        node,
        metadata,
        owner,
        lock,
        last_node,
        flushed_from,
    })
}

/// The Domain kind for the reactor.
pub struct VmKind;

impl Kind for VmKind {
    type Object = Vm;
    const NAME: &'static str = "vm";
    fn prefix(&self) -> &str {
        VMS_PREFIX
    }
    fn parse(&self, id: &str, keys: &BTreeMap<String, KeyEntry>) -> Result<Vm, ObjectError> {
        parse_vm(id, keys)
    }
    fn relevant(&self, sub: &str) -> bool {
        VmField::from_suffix(sub)
            .map(VmField::drives_reconcile)
            .unwrap_or(false)
    }
    /// `status` is cached too: its owner compares it with what it wrote (repairs a deleted
    /// or forged status); a legacy `stats` key is not.
    fn cached(&self, sub: &str) -> bool {
        self.relevant(sub) || sub == VmField::Status.suffix()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vm_field_is_documented() {
        // The legacy `stats` key is never written: its successor is documented instead.
        assert!(crate::schema::KEYS
            .iter()
            .any(|k| k.pattern.strip_prefix(VMSTATS_PREFIX) == Some("<vm>")));
        for f in VmField::ALL.into_iter().filter(|f| *f != VmField::Stats) {
            let pattern = format!("vms/<vm>/{}", f.suffix());
            assert!(
                crate::schema::KEYS.iter().any(|k| k.pattern == pattern),
                "{pattern} missing from KEYS"
            );
        }
    }

    const UUID: &str = "8f3c2a1e-5b7d-4c9a-9e1f-0a2b3c4d5e6f";

    fn xml(uuid: &str, name: &str) -> String {
        format!("<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>")
    }

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, KeyEntry> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    KeyEntry {
                        value: v.as_bytes().to_vec(),
                        mod_revision: 7,
                        lease: 0,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn parses_a_vm_with_defaults() {
        let x = xml(UUID, "web-1");
        let vm = parse_vm(
            UUID,
            &keys(&[("xml", &x), ("state", "start"), ("node", "hv1")]),
        )
        .expect("valid");
        assert_eq!(vm.name, "web-1");
        assert_eq!(vm.state, DesiredState::Start);
        assert_eq!(vm.node.as_deref(), Some("hv1"));
        assert_eq!(vm.metadata, Metadata::default());
        assert_eq!(vm.metadata.migration_method, MigrationMethod::Live);
        let vm = parse_vm(UUID, &keys(&[("xml", &x)])).expect("valid");
        assert_eq!(vm.state, DesiredState::Stop, "no state: stopped");
    }

    #[test]
    fn metadata_and_lock() {
        let x = xml(UUID, "db");
        let mut k = keys(&[
            ("xml", &x),
            (
                "metadata",
                r#"{"autostart":true,"migration_method":"shutdown","node_limit":["hv1","hv2"],"node_selector":"load","protected":true,"ha_group":"g1","migration_max_downtime":300}"#,
            ),
            ("lock", "hv2"),
        ]);
        if let Some(e) = k.get_mut("lock") {
            e.lease = 42;
        }
        let vm = parse_vm(UUID, &k).expect("valid");
        assert!(vm.metadata.autostart && vm.metadata.protected);
        assert_eq!(vm.metadata.migration_method, MigrationMethod::Shutdown);
        assert_eq!(vm.metadata.node_selector, NodeSelector::Load);
        assert_eq!(
            vm.lock,
            Some(LockHolder {
                node: "hv2".into(),
                lease: 42,
                revision: 7
            })
        );
    }

    #[test]
    fn every_bad_value_names_its_field() {
        let good = xml(UUID, "vm");
        let other = xml("00000000-0000-4000-8000-000000000000", "vm");
        type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
        let cases: Vec<Case> = vec![
            ("NOT-A-UUID", vec![("xml", good.clone())], "uuid"),
            (
                "8F3C2A1E-5B7D-4C9A-9E1F-0A2B3C4D5E6F",
                vec![("xml", good.clone())],
                "uuid",
            ),
            (UUID, vec![], "xml"),
            (UUID, vec![("xml", "<domain".into())], "xml"),
            (UUID, vec![("xml", "<network/>".into())], "xml"),
            (
                UUID,
                vec![(
                    "xml",
                    format!("<domain><name>x</name><uuid>{UUID}</uuid></domain>"),
                )],
                "xml",
            ),
            (
                UUID,
                vec![("xml", "<domain type='kvm'><name>x</name></domain>".into())],
                "xml",
            ),
            (UUID, vec![("xml", xml(UUID, "bad name; rm -rf"))], "xml"),
            (UUID, vec![("xml", other)], "xml"),
            (
                UUID,
                vec![("xml", good.clone()), ("state", "running".into())],
                "state",
            ),
            (
                UUID,
                vec![("xml", good.clone()), ("node", "Bad_Node".into())],
                "node",
            ),
            (
                UUID,
                vec![("xml", good.clone()), ("owner", "../etc".into())],
                "owner",
            ),
            (
                UUID,
                vec![
                    ("xml", good.clone()),
                    ("metadata", "{\"autostart\":\"yes\"}".into()),
                ],
                "metadata",
            ),
            (
                UUID,
                vec![("xml", good.clone()), ("metadata", "{\"colour\":1}".into())],
                "metadata",
            ),
            (
                UUID,
                vec![
                    ("xml", good.clone()),
                    ("metadata", "{\"migration_method\":\"teleport\"}".into()),
                ],
                "metadata",
            ),
            (
                UUID,
                vec![
                    ("xml", good.clone()),
                    ("metadata", "{\"node_limit\":[\"ok\",\"NOT OK\"]}".into()),
                ],
                "metadata.node_limit[1]",
            ),
            (
                UUID,
                vec![
                    ("xml", good.clone()),
                    ("metadata", "{\"migration_max_downtime\":0}".into()),
                ],
                "metadata.migration_max_downtime",
            ),
            (
                UUID,
                vec![("xml", good.clone()), ("lock", "x y".into())],
                "lock",
            ),
        ];
        for (id, kv, field) in cases {
            let k: BTreeMap<String, KeyEntry> = kv
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        KeyEntry {
                            value: v.into_bytes(),
                            mod_revision: 1,
                            lease: 0,
                        },
                    )
                })
                .collect();
            let e = parse_vm(id, &k).expect_err(field);
            assert_eq!(e.field, field, "{id}: {e}");
        }
    }

    #[test]
    fn marks_go_into_metadata_and_read_back() {
        let plain = xml(UUID, "web");
        let m = mark_xml(&plain, "hv1").expect("mark");
        assert_eq!(
            xml_identity(&m).expect("still valid"),
            (UUID.to_string(), "web".into())
        );
        assert_eq!(
            read_mark(&m),
            Some(Mark {
                node: "hv1".into(),
                digest: xml_digest(&plain)
            })
        );
        assert_eq!(read_mark(&plain), None, "foreign domains carry no mark");
        // Existing metadata is kept; an existing mark is replaced, not duplicated.
        let with_meta = plain.replace(
            "</domain>",
            "<metadata><app:x xmlns:app='urn:app'>1</app:x></metadata></domain>",
        );
        let m = mark_xml(&with_meta, "hv2").expect("mark");
        assert!(m.contains("<app:x xmlns:app='urn:app'>1</app:x>"), "{m}");
        let again = mark_xml(&m, "hv3").expect("re-mark");
        assert_eq!(again.matches(MARK_NS).count(), 1, "{again}");
        assert_eq!(read_mark(&again).map(|k| k.node), Some("hv3".into()));
        let empty_meta = plain.replace("</domain>", "<metadata/></domain>");
        let m = mark_xml(&empty_meta, "hv1").expect("mark");
        assert_eq!(m.matches("<metadata").count(), 1, "{m}");
        assert!(read_mark(&m).is_some());
        assert_ne!(xml_digest("a"), xml_digest("b"));
    }

    #[test]
    fn uuids_and_names() {
        assert!(valid_uuid(UUID));
        assert!(!valid_uuid("8f3c2a1e5b7d4c9a9e1f0a2b3c4d5e6f"));
        assert!(valid_domain_name("web-1.prod_a"));
        assert!(!valid_domain_name("-x") && !valid_domain_name("a/b") && !valid_domain_name(""));
        for f in VmField::ALL {
            assert_eq!(VmField::from_suffix(f.suffix()), Some(f));
        }
        assert!(
            !VmKind.relevant("status") && VmKind.relevant("state") && !VmKind.relevant("unknown")
        );
    }
}
