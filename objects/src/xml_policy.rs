//! The domain-XML policy: what a VM's libvirt XML (`vms/<uuid>/xml`, written by anyone with
//! write access to that etcd key) may ask of the hypervisor host before a node defines it.
//!
//! libvirt does whatever the XML says, as root: `<qemu:commandline>` passes arguments straight
//! to qemu, a `<disk>` on `/etc/shadow` gets that file relabelled (chowned) for the qemu user,
//! an `<interface>` `<script>` runs a host program, `<seclabel type='none'>` drops the guest's
//! confinement. The policy is node configuration (`domains.xml_policy` in `debvisord.yaml`):
//! [`check_policy`] is pure and refuses every escape hatch the policy does not allow, naming
//! the element and the setting that would allow it. The Domain reconciler treats a refusal like
//! a parse error: status `invalid`, nothing done on the host, a running guest left running.
//!
//! Paths are judged lexically (the host is never consulted): `.` and repeated `/` are dropped,
//! a `..` component is refused outright (its meaning depends on symlinks), and a path is
//! allowed only strictly below one of the configured directories, component by component.
//! Symlinks inside those directories cannot be seen from here: keep them writable by root only.
//!
//! Matching follows how libvirt reads its XML (libxml2): attributes are looked up by local name
//! whatever their namespace, element text is the concatenation of all text below the element,
//! a missing `type` means libvirt's default (`file` disks, `user` interfaces, `pty` character
//! devices). So every namespaced element or attribute outside `<metadata>` is refused, path
//! elements are read as libvirt reads them, and any other absolute path found in an attribute
//! or text must lie under the configured directories too (the safety net for elements this
//! checker has no rule for).

use std::collections::HashSet;
use std::path::PathBuf;

use roxmltree::{Node, NodeId};
use serde::{Deserialize, Serialize};

use crate::reactor::ObjectError;

/// XML namespace of libvirt's qemu passthrough elements (`qemu:commandline`,
/// `qemu:capabilities`, `qemu:override`, `qemu:deprecation`).
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Where the daemon's configuration keeps the policy: refusals name `<this>.<setting>`.
pub const POLICY_KEY: &str = "domains.xml_policy";

/// Network disk protocols libvirt knows (the values `disk_protocols` may list).
pub const DISK_PROTOCOLS: &[&str] = &[
    "rbd", "nbd", "iscsi", "gluster", "sheepdog", "http", "https", "ftp", "ftps", "tftp", "ssh",
    "vxhs", "nfs",
];

/// Interface types libvirt knows (the values `interface_types` may list).
pub const INTERFACE_TYPES: &[&str] = &[
    "bridge",
    "network",
    "direct",
    "ethernet",
    "user",
    "hostdev",
    "vhostuser",
    "vdpa",
    "server",
    "client",
    "mcast",
    "udp",
    "internal",
    "null",
    "vds",
];

/// Character device types that use no host file, device or socket chosen by the XML (`unix`
/// without a path is a socket libvirt names itself, e.g. the guest agent's channel).
const SAFE_CHARDEVS: &[&str] = &[
    "pty",
    "vc",
    "null",
    "spicevmc",
    "spiceport",
    "qemu-vdagent",
    "dbus",
];

/// Elements whose text is free text or a guest-side path, never a host path.
const FREE_TEXT: &[&str] = &[
    "description",
    "title",
    "name",
    "partition",
    "cmdline",
    "init",
    "initarg",
    "initdir",
    "initenv",
    "serial",
    "wwn",
    "vendor",
    "product",
    "entry",
    "label",
    "imagelabel",
    "baselabel",
];

/// `domains.xml_policy`: what a VM's XML may use on this node. The defaults refuse every escape
/// hatch and allow what a guest on a DebVisor cluster needs: RBD disks, images under
/// `disk_dirs`, firmware under `firmware_dirs`, the stock emulators and the client networks'
/// bridges (`dvbr<vni>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XmlPolicy {
    /// Allow elements of the qemu namespace (`<qemu:commandline>` and friends): raw qemu
    /// arguments, environment and capability overrides.
    pub allow_qemu_passthrough: bool,
    /// Binaries an `<emulator>` may name (libvirt executes it); without `<emulator>` libvirt
    /// picks its own.
    pub emulators: Vec<PathBuf>,
    /// Directories whose files (and block devices) `file`/`block`/`dir` disks, cdroms and
    /// floppies, NVDIMM backing files and kernels may use.
    pub disk_dirs: Vec<PathBuf>,
    /// Directories of firmware and boot files: `<loader>`, `<nvram>` (and its template),
    /// `<kernel>`, `<initrd>`, `<dtb>`, ACPI tables, fw_cfg files (`disk_dirs` count too).
    pub firmware_dirs: Vec<PathBuf>,
    /// Protocols `<disk type='network'>` may use.
    pub disk_protocols: Vec<String>,
    /// Ceph pools RBD disks may use (empty: any).
    pub rbd_pools: Vec<String>,
    /// libvirt storage pools `<disk type='volume'>` may use (empty: none).
    pub libvirt_pools: Vec<String>,
    /// `<interface>` types allowed (libvirt's default type, when none is given, is `user`).
    pub interface_types: Vec<String>,
    /// Bridges a `type='bridge'` interface may join: exact names, or a prefix ending in `*`.
    pub bridges: Vec<String>,
    /// Allow host hardware and device backends: `<hostdev>`, NVMe/vhost-user/vDPA disks,
    /// `device='lun'`, TPM/input passthrough, GPU render nodes, host audio, host smartcards,
    /// `<shmem>`, interface `<backend>` devices, RNG sources other than /dev/(u)random.
    pub allow_host_devices: bool,
    /// Allow character devices (serial, console, channel, …) on host files, devices, pipes,
    /// named sockets or TCP/UDP sockets, `<log file>`, graphics and TPM/reservation sockets.
    pub allow_host_chardevs: bool,
    /// Allow `<filesystem>` (virtiofs/9p sharing of host directories, its `<binary>`).
    pub allow_host_filesystems: bool,
    /// Allow interface `<script>`/`<downscript>` (host programs libvirt runs as root).
    pub allow_interface_scripts: bool,
    /// Allow `<seclabel>` other than the default dynamic one: `type='none'`/`'static'`, chosen
    /// labels, `relabel='no'` on the domain, labels on devices.
    pub allow_custom_seclabels: bool,
}

impl Default for XmlPolicy {
    fn default() -> Self {
        let paths = |v: &[&str]| v.iter().map(PathBuf::from).collect();
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        XmlPolicy {
            allow_qemu_passthrough: false,
            emulators: paths(&[
                "/usr/bin/qemu-system-x86_64",
                "/usr/bin/qemu-system-aarch64",
                "/usr/bin/kvm",
            ]),
            disk_dirs: paths(&["/var/lib/debvisor/images", "/var/lib/libvirt/images"]),
            firmware_dirs: paths(&[
                "/usr/share/OVMF",
                "/usr/share/AAVMF",
                "/usr/share/qemu",
                "/usr/share/seabios",
                "/var/lib/libvirt/qemu/nvram",
            ]),
            disk_protocols: strings(&["rbd"]),
            rbd_pools: Vec::new(),
            libvirt_pools: Vec::new(),
            interface_types: strings(&["bridge"]),
            bridges: strings(&["dvbr*"]),
            allow_host_devices: false,
            allow_host_chardevs: false,
            allow_host_filesystems: false,
            allow_interface_scripts: false,
            allow_custom_seclabels: false,
        }
    }
}

impl XmlPolicy {
    /// The policy's own problems as `(field path, reason)`, field paths below `at`
    /// (`domains.xml_policy`).
    pub fn validate(&self, at: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let lists = [
            ("emulators", &self.emulators),
            ("disk_dirs", &self.disk_dirs),
            ("firmware_dirs", &self.firmware_dirs),
        ];
        for (name, list) in lists {
            for (i, p) in list.iter().enumerate() {
                let s = p.to_string_lossy();
                if let Err(e) = components(&s) {
                    out.push((format!("{at}.{name}[{i}]"), format!("{s:?} {e}")));
                }
            }
        }
        for (i, p) in self.disk_protocols.iter().enumerate() {
            if !DISK_PROTOCOLS.contains(&p.as_str()) {
                out.push((
                    format!("{at}.disk_protocols[{i}]"),
                    format!("{p:?} is not one of {}", DISK_PROTOCOLS.join(", ")),
                ));
            }
        }
        for (name, list) in [
            ("rbd_pools", &self.rbd_pools),
            ("libvirt_pools", &self.libvirt_pools),
        ] {
            for (i, p) in list.iter().enumerate() {
                let bad = p.is_empty() || p.contains(['/', '@']) || p.contains(char::is_whitespace);
                if bad {
                    out.push((
                        format!("{at}.{name}[{i}]"),
                        format!("{p:?} is not a pool name (non-empty, no '/', '@' or whitespace)"),
                    ));
                }
            }
        }
        for (i, t) in self.interface_types.iter().enumerate() {
            if !INTERFACE_TYPES.contains(&t.as_str()) {
                out.push((
                    format!("{at}.interface_types[{i}]"),
                    format!("{t:?} is not one of {}", INTERFACE_TYPES.join(", ")),
                ));
            }
        }
        for (i, b) in self.bridges.iter().enumerate() {
            let name = b.strip_suffix('*').unwrap_or(b);
            let ok = name.len() <= 15
                && (!name.is_empty() || b == "*")
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                out.push((
                    format!("{at}.bridges[{i}]"),
                    format!(
                        "{b:?} is not a bridge name (1-15 of a-z, A-Z, 0-9, '-', '_', '.') \
                         or such a prefix followed by '*'"
                    ),
                ));
            }
        }
        out
    }

    fn bridge_allowed(&self, bridge: &str) -> bool {
        self.bridges.iter().any(|b| match b.strip_suffix('*') {
            Some(prefix) => bridge.starts_with(prefix),
            None => b == bridge,
        })
    }
}

/// The components of an absolute path, `.` and empty ones dropped; `Err` names the problem.
fn components(path: &str) -> Result<Vec<&str>, &'static str> {
    if !path.starts_with('/') {
        return Err("is not an absolute path");
    }
    if path.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        return Err("has a '..' component (paths are checked lexically; write it without)");
    }
    Ok(parts)
}

/// Is `path` (already split) strictly below one of `dirs`?
fn below(parts: &[&str], dirs: &[&PathBuf]) -> bool {
    dirs.iter().any(|d| {
        let d = d.to_string_lossy();
        components(&d).is_ok_and(|dp| parts.len() > dp.len() && parts.starts_with(&dp))
    })
}

/// Is `path` (lexically) one of `list`?
fn listed(parts: &[&str], list: &[PathBuf]) -> bool {
    list.iter()
        .any(|p| components(&p.to_string_lossy()).is_ok_and(|lp| lp == parts))
}

/// All text below `n`, concatenated (what libvirt reads as an element's content).
fn content(n: Node) -> String {
    n.descendants()
        .filter(|d| d.is_text())
        .filter_map(|d| d.text())
        .collect()
}

/// The text directly inside `n` (its own text nodes).
fn own_text(n: Node) -> String {
    n.children()
        .filter(|d| d.is_text())
        .filter_map(|d| d.text())
        .collect()
}

/// How an element is named in a refusal: `<disk type='file'>`, `<qemu:commandline>`.
fn tag(n: Node) -> String {
    let name = n.tag_name().name();
    let prefix = n
        .tag_name()
        .namespace()
        .and_then(|ns| n.lookup_prefix(ns))
        .filter(|p| !p.is_empty());
    let mut s = match prefix {
        Some(p) => format!("<{p}:{name}"),
        None => format!("<{name}"),
    };
    for a in ["type", "device", "model", "mode"] {
        if let Some(v) = n.attribute(a) {
            s.push_str(&format!(" {a}='{v}'"));
        }
    }
    s.push('>');
    s
}

/// Is `n` an element named `name` in no namespace?
fn is(n: Node, name: &str) -> bool {
    n.is_element() && n.tag_name().namespace().is_none() && n.tag_name().name() == name
}

fn children<'a, 'i>(n: Node<'a, 'i>, name: &'a str) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    n.children().filter(move |c| is(*c, name))
}

/// One pass over a document: the first refusal wins.
struct Checker<'p> {
    p: &'p XmlPolicy,
    /// Attributes a rule has judged (the path net skips them).
    done_attrs: HashSet<(NodeId, String)>,
    /// Elements whose own text a rule has judged.
    done_text: HashSet<NodeId>,
    /// Subtrees a rule allowed as a whole (nothing below is checked).
    skip: HashSet<NodeId>,
}

type Check = Result<(), String>;

fn setting(name: &str) -> String {
    format!("{POLICY_KEY}.{name}")
}

fn not_allowed(n: Node, what: &str, switch: &str) -> Check {
    Err(format!("{} {what} ({})", tag(n), setting(switch)))
}

/// Check a domain XML against the policy. `Err` has field `xml` and names the element and the
/// setting that would allow it; malformed XML is refused too (see also
/// [`crate::domain::xml_identity`]).
pub fn check_policy(xml: &str, policy: &XmlPolicy) -> Result<(), ObjectError> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| ObjectError::new("xml", format!("not well-formed XML: {e}")))?;
    let root = doc.root_element();
    // roxmltree accepts a DOCTYPE without an internal subset; libxml2 might load it.
    if xml[..root.range().start].contains("<!DOCTYPE") {
        return Err(ObjectError::new(
            "xml",
            "<!DOCTYPE> is not allowed (libvirt's parser could load a DTD or expand entities)",
        ));
    }
    let mut c = Checker {
        p: policy,
        done_attrs: HashSet::new(),
        done_text: HashSet::new(),
        skip: HashSet::new(),
    };
    c.namespaces(root)
        .and_then(|()| c.walk(root))
        .map_err(|r| ObjectError::new("xml", r))
}

impl Checker<'_> {
    fn attr_done(&mut self, n: Node, a: &str) {
        self.done_attrs.insert((n.id(), a.to_string()));
    }

    /// Mark every attribute and text of `n`'s subtree judged.
    fn skip_subtree(&mut self, n: Node) {
        self.skip.insert(n.id());
    }

    fn walk(&mut self, n: Node) -> Check {
        if self.skip.contains(&n.id()) || n.tag_name().namespace().is_some() {
            return Ok(()); // judged by `namespaces`: an allowed qemu element
        }
        let parent_is_root = n
            .parent()
            .is_some_and(|p| p.parent().is_some_and(|g| g.is_root()));
        if parent_is_root && is(n, "metadata") {
            return Ok(()); // opaque to libvirt
        }
        self.rules(n, parent_is_root)?;
        if self.skip.contains(&n.id()) {
            return Ok(());
        }
        self.path_net(n)?;
        for ch in n.children().filter(|c| c.is_element()) {
            self.walk(ch)?;
        }
        Ok(())
    }

    /// First pass, over everything but `<metadata>`: namespaced elements and attributes. qemu
    /// passthrough by its switch, nothing else.
    fn namespaces(&self, n: Node) -> Check {
        let parent_is_root = n
            .parent()
            .is_some_and(|p| p.parent().is_some_and(|g| g.is_root()));
        if parent_is_root && is(n, "metadata") {
            return Ok(());
        }
        if let Some(ns) = n.tag_name().namespace() {
            if ns == QEMU_NS {
                if self.p.allow_qemu_passthrough {
                    return Ok(());
                }
                return Err(format!(
                    "{} is not allowed ({})",
                    tag(n),
                    setting("allow_qemu_passthrough")
                ));
            }
            return Err(format!(
                "{} in namespace {ns} is not allowed outside <metadata> (libvirt matches \
                 elements by local name in places)",
                tag(n)
            ));
        }
        if let Some(a) = n.attributes().find(|a| a.namespace().is_some()) {
            return Err(format!(
                "{} attribute {} in namespace {} is not allowed (libvirt reads attributes \
                 whatever their namespace)",
                tag(n),
                a.name(),
                a.namespace().unwrap_or_default()
            ));
        }
        for ch in n.children().filter(|c| c.is_element()) {
            self.namespaces(ch)?;
        }
        Ok(())
    }

    /// The element rules, by element name.
    fn rules(&mut self, n: Node, parent_is_root: bool) -> Check {
        if n.tag_name().namespace().is_some() {
            return Ok(());
        }
        match n.tag_name().name() {
            "emulator" => self.emulator(n),
            "disk" => self.disk(n),
            "interface" => self.interface(n),
            "hostdev" | "shmem" => self.host_device(n, "passes a host device through"),
            "filesystem" | "binary" => {
                if self.p.allow_host_filesystems {
                    self.skip_subtree(n);
                    return Ok(());
                }
                not_allowed(
                    n,
                    "shares a host directory or runs a host program",
                    "allow_host_filesystems",
                )
            }
            "serial" | "parallel" | "console" | "channel" | "redirdev" => self.chardev(n),
            "smartcard" => self.smartcard(n),
            "rng" => self.rng(n),
            "tpm" => self.tpm(n),
            "input" => match n.attribute("type") {
                Some("passthrough" | "evdev") => {
                    self.host_device(n, "passes a host input device through")
                }
                _ => Ok(()),
            },
            "graphics" => self.graphics(n),
            "audio" => self.audio(n),
            "log" => self.host_chardev(n, "writes to a host file"),
            "reservations" => self.reservations(n),
            "seclabel" => self.seclabel(n, parent_is_root),
            "memory" if n.attribute("model").is_some() => self.memory_device(n),
            "loader" | "nvram" | "kernel" | "initrd" | "dtb" | "shim" | "table" => {
                self.boot_file(n)
            }
            "entry" => {
                // sysinfo fw_cfg entries may name a host file the guest then reads.
                match n.attribute("file") {
                    Some(f) => self.boot_path(n, "file", f),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn emulator(&mut self, n: Node) -> Check {
        let path = content(n);
        self.done_text.insert(n.id());
        match components(&path) {
            Ok(parts) if listed(&parts, &self.p.emulators) => Ok(()),
            Ok(_) => Err(format!(
                "<emulator> {path} is not in {} (libvirt runs it)",
                setting("emulators")
            )),
            Err(e) => Err(format!("<emulator> {path:?} {e}")),
        }
    }

    fn host_device(&mut self, n: Node, what: &str) -> Check {
        if self.p.allow_host_devices {
            self.skip_subtree(n);
            return Ok(());
        }
        not_allowed(n, what, "allow_host_devices")
    }

    fn host_chardev(&mut self, n: Node, what: &str) -> Check {
        if self.p.allow_host_chardevs {
            self.skip_subtree(n);
            return Ok(());
        }
        not_allowed(n, what, "allow_host_chardevs")
    }

    /// A host path an element names for a file the guest boots or reads firmware from.
    fn boot_path(&mut self, n: Node, attr: &str, path: &str) -> Check {
        self.attr_done(n, attr);
        self.judge_path(n, attr, path, true)
    }

    fn boot_file(&mut self, n: Node) -> Check {
        // `<nvram>` may carry a template and a `<source file>` (libvirt ≥ 8.5).
        if let Some(t) = n.attribute("template") {
            self.boot_path(n, "template", t)?;
        }
        if is(n, "nvram") {
            for s in children(n, "source") {
                if let Some(f) = s.attribute("file") {
                    self.boot_path(s, "file", f)?;
                }
            }
            if n.attribute("type").is_some_and(|t| t != "file") {
                return Ok(()); // network nvram: its <source> is judged like a disk's
            }
        }
        let text = own_text(n);
        self.done_text.insert(n.id());
        if text.trim().is_empty() {
            return Ok(());
        }
        self.judge_path(n, "", &content(n), true)
    }

    /// `path` (`what` of element `n`, e.g. `source file`) must be absolute, without `..`,
    /// below `disk_dirs` (or `firmware_dirs` when `boot`).
    fn judge_path(&self, n: Node, what: &str, path: &str, boot: bool) -> Check {
        let at = if what.is_empty() {
            tag(n)
        } else {
            format!("{} {what}", tag(n))
        };
        let parts = components(path).map_err(|e| format!("{at} {path:?} {e}"))?;
        let mut dirs: Vec<&PathBuf> = self.p.disk_dirs.iter().collect();
        if boot {
            dirs.extend(self.p.firmware_dirs.iter());
        }
        if below(&parts, &dirs) {
            return Ok(());
        }
        let keys = if boot {
            format!("{} or {}", setting("disk_dirs"), setting("firmware_dirs"))
        } else {
            setting("disk_dirs")
        };
        Err(format!("{at} {path} is not under {keys}"))
    }

    fn disk(&mut self, n: Node) -> Check {
        if n.attribute("device") == Some("lun") && !self.p.allow_host_devices {
            return not_allowed(
                n,
                "passes SCSI commands to a host device",
                "allow_host_devices",
            );
        }
        self.storage(n)
    }

    /// A storage source: the disk itself, or a `<backingStore>`/`<mirror>`/`<dataStore>` in it,
    /// each with its own `type` (default `file`) and `<source>`.
    fn storage(&mut self, n: Node) -> Check {
        let ty = n.attribute("type").unwrap_or("file");
        const TYPES: &[&str] = &[
            "file",
            "block",
            "dir",
            "network",
            "volume",
            "nvme",
            "vhostuser",
            "vhostvdpa",
        ];
        if !TYPES.contains(&ty) {
            return Err(format!("{} is not a disk type this policy knows", tag(n)));
        }
        for s in children(n, "source") {
            self.source(n, ty, s)?;
        }
        // The old `<mirror file='…'>` form.
        if is(n, "mirror") {
            if let Some(f) = n.attribute("file") {
                self.attr_done(n, "file");
                self.judge_path(n, "file", f, false)?;
            }
        }
        let nested: Vec<Node> = n
            .children()
            .filter(|c| is(*c, "backingStore") || is(*c, "mirror"))
            .chain(children(n, "source").flat_map(|s| children(s, "dataStore")))
            .collect();
        for sub in nested {
            self.storage(sub)?;
        }
        Ok(())
    }

    fn source(&mut self, owner: Node, ty: &str, s: Node) -> Check {
        let file_attr = match ty {
            "file" => Some("file"),
            "block" => Some("dev"),
            "dir" => Some("dir"),
            _ => None,
        };
        if let Some(a) = file_attr {
            self.attr_done(s, a);
            return match s.attribute(a) {
                None | Some("") => Ok(()), // no medium
                Some(p) => self.judge_path(owner, &format!("source {a}"), p, false),
            };
        }
        match ty {
            "network" => self.network_source(owner, s),
            "volume" => {
                let pool = s.attribute("pool").unwrap_or_default();
                if self.p.libvirt_pools.iter().any(|p| p == pool) {
                    return Ok(());
                }
                Err(format!(
                    "{} libvirt storage pool {pool:?} is not in {}",
                    tag(owner),
                    setting("libvirt_pools")
                ))
            }
            "nvme" | "vhostuser" | "vhostvdpa" => {
                if self.p.allow_host_devices {
                    self.skip_subtree(s);
                    return Ok(());
                }
                Err(format!(
                    "{} uses a host device or device backend ({})",
                    tag(owner),
                    setting("allow_host_devices")
                ))
            }
            _ => Err(format!(
                "{} is not a disk type this policy knows",
                tag(owner)
            )),
        }
    }

    fn network_source(&mut self, disk: Node, s: Node) -> Check {
        let proto = s.attribute("protocol").unwrap_or_default();
        if !self.p.disk_protocols.iter().any(|p| p == proto) {
            return Err(format!(
                "{} protocol {proto:?} is not in {}",
                tag(disk),
                setting("disk_protocols")
            ));
        }
        // Where a network disk lives is not a host path (its `<host socket>` child still is).
        for a in s.attributes() {
            self.attr_done(s, a.name());
        }
        if proto == "rbd" && !self.p.rbd_pools.is_empty() {
            let name = s.attribute("name").unwrap_or_default();
            let pool = name.split('/').next().unwrap_or_default();
            if !self.p.rbd_pools.iter().any(|p| p == pool) {
                return Err(format!(
                    "{} RBD pool {pool:?} (volume {name}) is not in {}",
                    tag(disk),
                    setting("rbd_pools")
                ));
            }
        }
        Ok(())
    }

    fn interface(&mut self, n: Node) -> Check {
        let ty = n.attribute("type").unwrap_or("user");
        if !self.p.interface_types.iter().any(|t| t == ty) {
            return Err(format!(
                "<interface type='{ty}'> is not allowed: the type is not in {}",
                setting("interface_types")
            ));
        }
        if ty == "bridge" {
            let bridge = children(n, "source")
                .find_map(|s| s.attribute("bridge"))
                .unwrap_or_default();
            if !self.p.bridge_allowed(bridge) {
                return Err(format!(
                    "<interface type='bridge'> bridge {bridge:?} is not in {} (a host bridge \
                     would put the guest on the node's own networks)",
                    setting("bridges")
                ));
            }
        }
        for s in n
            .children()
            .filter(|c| is(*c, "script") || is(*c, "downscript"))
        {
            if !self.p.allow_interface_scripts {
                return not_allowed(s, "runs a host program as root", "allow_interface_scripts");
            }
            self.skip_subtree(s);
        }
        for b in children(n, "backend") {
            for a in ["tap", "vhost"] {
                if b.attribute(a).is_some() {
                    if !self.p.allow_host_devices {
                        return Err(format!(
                            "<interface><backend {a}=…> opens a host device ({})",
                            setting("allow_host_devices")
                        ));
                    }
                    self.attr_done(b, a);
                }
            }
        }
        // The type was allowed explicitly: its own source (host NIC, vhost-user socket, …) too.
        for s in children(n, "source") {
            for a in s.attributes() {
                self.attr_done(s, a.name());
            }
        }
        Ok(())
    }

    /// serial, parallel, console, channel, redirdev — and the chardev inside others.
    fn chardev(&mut self, n: Node) -> Check {
        let ty = n.attribute("type").unwrap_or("pty");
        let named_socket = ty == "unix"
            && n.descendants()
                .any(|d| is(d, "source") && d.attribute("path").is_some());
        if (SAFE_CHARDEVS.contains(&ty) || ty == "unix") && !named_socket {
            return Ok(());
        }
        if self.p.allow_host_chardevs {
            self.skip_subtree(n);
            return Ok(());
        }
        let what = match ty {
            "unix" => "uses a host socket path",
            "tcp" | "udp" => "opens a socket on the host",
            "file" | "pipe" | "dev" => "uses a host file, pipe or device",
            _ => "is a character device type this policy does not know",
        };
        not_allowed(n, what, "allow_host_chardevs")
    }

    fn smartcard(&mut self, n: Node) -> Check {
        match n.attribute("mode") {
            Some("passthrough") => self.chardev(n),
            _ => self.host_device(n, "uses the host's smartcard reader or certificates"),
        }
    }

    fn rng(&mut self, n: Node) -> Check {
        for b in children(n, "backend") {
            match b.attribute("model") {
                Some("random") => {
                    let dev = content(b);
                    self.done_text.insert(b.id());
                    if dev.is_empty() || dev == "/dev/urandom" || dev == "/dev/random" {
                        continue;
                    }
                    if !self.p.allow_host_devices {
                        return Err(format!(
                            "<rng><backend model='random'> {dev} is not /dev/urandom or /dev/random ({})",
                            setting("allow_host_devices")
                        ));
                    }
                }
                Some("egd") => self.chardev(b)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn tpm(&mut self, n: Node) -> Check {
        for b in children(n, "backend") {
            match b.attribute("type") {
                Some("passthrough") => self.host_device(b, "passes the host's TPM through")?,
                Some("external") => self.host_chardev(b, "connects to a host socket")?,
                _ => {}
            }
        }
        Ok(())
    }

    fn graphics(&mut self, n: Node) -> Check {
        let ty = n.attribute("type").unwrap_or_default();
        if matches!(ty, "sdl" | "desktop" | "egl-headless") {
            return self.host_device(n, "uses the host's display or GPU");
        }
        let rendernode = n.attribute("rendernode").is_some()
            || n.descendants()
                .any(|d| is(d, "gl") && d.attribute("rendernode").is_some());
        if rendernode && !self.p.allow_host_devices {
            return not_allowed(n, "opens a host GPU render node", "allow_host_devices");
        }
        let socket = n.attribute("socket").is_some()
            || n.attribute("address")
                .is_some_and(|a| a.starts_with("unix:"))
            || children(n, "listen").any(|l| l.attribute("socket").is_some());
        if socket {
            return self.host_chardev(n, "listens on or connects to a host socket path");
        }
        if rendernode {
            self.skip_subtree(n);
        }
        Ok(())
    }

    fn audio(&mut self, n: Node) -> Check {
        match n.attribute("type").unwrap_or("none") {
            "none" | "spice" | "dbus" => Ok(()),
            "file" => self.host_chardev(n, "writes guest audio to a host file"),
            _ => self.host_device(n, "uses the host's sound devices or sound server"),
        }
    }

    fn reservations(&mut self, n: Node) -> Check {
        let own_socket = n
            .descendants()
            .any(|d| is(d, "source") && d.attribute("path").is_some());
        if own_socket {
            return self.host_chardev(n, "connects to a host socket path");
        }
        Ok(())
    }

    fn seclabel(&mut self, n: Node, domain_level: bool) -> Check {
        let labelled = n
            .children()
            .any(|c| is(c, "label") || is(c, "baselabel") || is(c, "imagelabel"));
        let ok = if domain_level {
            matches!(n.attribute("type"), None | Some("dynamic"))
                && matches!(n.attribute("relabel"), None | Some("yes"))
                && !labelled
        } else {
            // A device may only opt out of relabelling (the safe direction).
            n.attribute("relabel") == Some("no") && !labelled
        };
        if ok {
            return Ok(());
        }
        if self.p.allow_custom_seclabels {
            self.skip_subtree(n);
            return Ok(());
        }
        let what = match n.attribute("type") {
            Some("none") => "turns the guest's confinement off",
            _ if domain_level => "chooses the guest's security label or turns relabelling off",
            _ => "sets a device's security label",
        };
        not_allowed(n, what, "allow_custom_seclabels")
    }

    /// NVDIMM / virtio-pmem: guest memory backed by a host file.
    fn memory_device(&mut self, n: Node) -> Check {
        for s in children(n, "source") {
            for p in children(s, "path") {
                let path = content(p);
                self.done_text.insert(p.id());
                self.judge_path(n, "source path", &path, false)?;
            }
        }
        Ok(())
    }

    /// The safety net: an absolute path in any attribute, or as the text of an element that is
    /// not free text, must lie under the configured directories.
    fn path_net(&mut self, n: Node) -> Check {
        for a in n.attributes() {
            if !a.value().starts_with('/') || self.done_attrs.contains(&(n.id(), a.name().into())) {
                continue;
            }
            self.judge_path(n, a.name(), a.value(), true)?;
        }
        if self.done_text.contains(&n.id()) || FREE_TEXT.contains(&n.tag_name().name()) {
            return Ok(());
        }
        let text = own_text(n);
        if text.trim_start().starts_with('/') {
            self.judge_path(n, "", text.trim(), true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "8f3c2a1e-5b7d-4c9a-9e1f-0a2b3c4d5e6f";

    /// A domain with `os` inside `<os>` and `devices` inside `<devices>`; `extra` after them.
    fn dom_with(os: &str, devices: &str, extra: &str) -> String {
        format!(
            "<domain type='kvm'><name>t</name><uuid>{UUID}</uuid><memory unit='MiB'>64</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type>{os}</os>\
             <devices>{devices}</devices>{extra}</domain>"
        )
    }

    fn dom(devices: &str) -> String {
        dom_with("", devices, "")
    }

    fn refused_by(xml: &str, p: &XmlPolicy) -> String {
        let e = check_policy(xml, p).expect_err(xml);
        assert_eq!(e.field, "xml", "{e}");
        e.reason
    }

    fn refused(xml: &str) -> String {
        refused_by(xml, &XmlPolicy::default())
    }

    fn allowed(xml: &str) {
        if let Err(e) = check_policy(xml, &XmlPolicy::default()) {
            panic!("{xml}\nrefused: {e}");
        }
    }

    /// Each (XML, substrings of the refusal) is refused by the default policy.
    fn all_refused(cases: &[(String, &[&str])]) {
        for (xml, want) in cases {
            let r = refused(xml);
            for w in *want {
                assert!(r.contains(w), "{xml}\nrefusal {r:?} lacks {w:?}");
            }
        }
    }

    const QEMU: &str = "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'";

    #[test]
    fn qemu_passthrough_is_refused_under_any_prefix() {
        let with = |body: &str, decl: &str| {
            dom_with("", "", body).replacen(
                "<domain type='kvm'>",
                &format!("<domain type='kvm' {decl}>"),
                1,
            )
        };
        let q = QEMU;
        let any = "xmlns:x='http://libvirt.org/schemas/domain/qemu/1.0'";
        let r = refused(&with(
            "<qemu:commandline><qemu:arg value='-S'/></qemu:commandline>",
            q,
        ));
        assert_eq!(
            r,
            "<qemu:commandline> is not allowed (domains.xml_policy.allow_qemu_passthrough)"
        );
        all_refused(&[
            (with("<x:commandline><x:arg value='-S'/></x:commandline>", any), &["<x:commandline> is not allowed", "allow_qemu_passthrough"]),
            (with("<qemu:capabilities><qemu:add capability='x'/></qemu:capabilities>", q), &["<qemu:capabilities>", "allow_qemu_passthrough"]),
            (with("<qemu:override><qemu:device alias='x'/></qemu:override>", q), &["<qemu:override>"]),
            (with("<qemu:deprecation behavior='crash'/>", q), &["<qemu:deprecation>"]),
            // Declared on the element itself, as the default namespace.
            (dom_with("", "", "<commandline xmlns='http://libvirt.org/schemas/domain/qemu/1.0'><arg value='-S'/></commandline>"), &["<commandline> is not allowed", "allow_qemu_passthrough"]),
            // Hidden deep in <devices>.
            (with("", q).replace("</devices>", "<qemu:commandline/></devices>"), &["<qemu:commandline>"]),
        ]);
        let p = XmlPolicy {
            allow_qemu_passthrough: true,
            ..XmlPolicy::default()
        };
        let xml = with("<qemu:commandline><qemu:arg value='-S'/><qemu:env name='A' value='/etc/shadow'/></qemu:commandline>", q);
        check_policy(&xml, &p).expect("allowed by the switch");
        // libvirt ignores <metadata>: anything may live there.
        allowed(&dom_with(
            "",
            "",
            &format!("<metadata><qemu:commandline {q}><qemu:arg value='-S'/></qemu:commandline><app:x xmlns:app='urn:app'>/etc/shadow</app:x></metadata>"),
        ));
    }

    #[test]
    fn other_namespaces_and_doctype_are_refused() {
        all_refused(&[
            (
                dom("<x:disk xmlns:x='urn:x' type='file'><source file='/etc/shadow'/></x:disk>"),
                &[
                    "<x:disk",
                    "namespace urn:x is not allowed outside <metadata>",
                ],
            ),
            (
                dom("<disk type='file' xmlns:x='urn:x'><source x:file='/etc/shadow'/></disk>"),
                &["attribute file in namespace urn:x"],
            ),
            (
                dom("").replacen(
                    "<domain type='kvm'>",
                    "<domain type='kvm' xmlns='urn:x'>",
                    1,
                ),
                &["<domain", "namespace urn:x"],
            ),
            // roxmltree refuses every DTD; the checker's own prolog scan is the second line.
            (
                format!("<!DOCTYPE domain SYSTEM \"/etc/shadow\">{}", dom("")),
                &["DTD"],
            ),
            (format!("<!DOCTYPE domain>{}", dom("")), &["DTD"]),
            (format!("<!DOCTYPE domain []>{}", dom("")), &["DTD"]),
            // An internal subset with entities never parses (roxmltree refuses DTDs).
            (
                format!(
                    "<!DOCTYPE domain [<!ENTITY x SYSTEM \"file:///etc/shadow\">]>{}",
                    dom("<disk type='file'><source file='&x;'/></disk>")
                ),
                &["not well-formed XML"],
            ),
            ("<domain".to_string(), &["not well-formed XML"]),
        ]);
        // Predefined entities and character references decode like libvirt's parser.
        all_refused(&[(
            dom("<disk type='file'><source file='&#47;etc&#x2F;shadow'/></disk>"),
            &["source file /etc/shadow is not under domains.xml_policy.disk_dirs"],
        )]);
    }

    #[test]
    fn disks_only_from_allowed_sources() {
        let d = |ty: &str, dev: &str, src: &str| {
            dom(&format!("<disk type='{ty}' device='{dev}'><driver name='qemu' type='raw'/>{src}<target dev='vda' bus='virtio'/></disk>"))
        };
        let img = "/var/lib/debvisor/images";
        for ok in [
            d("file", "disk", &format!("<source file='{img}/a.qcow2'/>")),
            d("file", "disk", "<source file='/var/lib/libvirt/images/b.img'/>"),
            d("file", "disk", &format!("<source file='{img}//./sub/c.img'/>")),
            d("file", "cdrom", ""),
            d("file", "cdrom", "<source file=''/>"),
            d("file", "floppy", &format!("<source file='{img}/f.img'/>")),
            d("network", "disk", "<source protocol='rbd' name='vms/web-1'><host name='10.0.0.1' port='6789'/></source><auth username='admin'><secret type='ceph' uuid='3e2a0f6c-2a7b-4c1d-9e55-0f0d2e9a7b11'/></auth>"),
            d("network", "cdrom", "<source protocol='rbd' name='iso/debian@gold'/>"),
            d("file", "disk", &format!("<source file='{img}/top.qcow2'/><backingStore type='file'><format type='raw'/><source file='{img}/base.img'/><backingStore/></backingStore>")),
        ] {
            allowed(&ok);
        }
        let shadow = "source file /etc/shadow is not under domains.xml_policy.disk_dirs";
        all_refused(&[
            (d("file", "disk", "<source file='/etc/shadow'/>"), &["<disk type='file' device='disk'>", shadow]),
            // No type: libvirt's default is file.
            (dom("<disk device='disk'><source file='/etc/shadow'/></disk>"), &[shadow]),
            (d("file", "cdrom", "<source file='/etc/shadow'/>"), &["device='cdrom'", shadow]),
            (d("file", "floppy", "<source file='/etc/shadow'/>"), &["device='floppy'", shadow]),
            (d("file", "disk", &format!("<source file='{img}/../../../../etc/shadow'/>")), &["has a '..' component"]),
            (d("file", "disk", &format!("<source file='{img}/a/../b.img'/>")), &["'..'"]),
            (d("file", "disk", "<source file='/var/lib/debvisor/images-evil/a.img'/>"), &["is not under domains.xml_policy.disk_dirs"]),
            (d("file", "disk", "<source file='etc/shadow'/>"), &["is not an absolute path"]),
            (d("block", "disk", "<source dev='/dev/sda'/>"), &["source dev /dev/sda is not under"]),
            (d("dir", "disk", &format!("<source dir='{img}'/>")), &["source dir /var/lib/debvisor/images is not under"]),
            (d("dir", "disk", "<source dir='/'/>"), &["source dir / is not under"]),
            (d("file", "disk", &format!("<source file='{img}/top.qcow2'/><backingStore type='file'><source file='/etc/shadow'/></backingStore>")), &["<backingStore type='file'>", shadow]),
            (d("file", "disk", &format!("<source file='{img}/top.qcow2'/><backingStore type='file'><source file='{img}/mid.qcow2'/><backingStore type='block'><source dev='/dev/sdb'/></backingStore></backingStore>")), &["<backingStore type='block'> source dev /dev/sdb"]),
            (d("file", "disk", &format!("<source file='{img}/a.img'/><mirror type='file'><source file='/etc/shadow'/></mirror>")), &["<mirror type='file'>", shadow]),
            (d("file", "disk", &format!("<source file='{img}/a.img'/><mirror file='/etc/shadow'/>")), &["<mirror> file /etc/shadow"]),
            (d("file", "disk", &format!("<source file='{img}/a.qcow2'><dataStore type='file'><source file='/etc/shadow'/></dataStore></source>")), &["<dataStore type='file'>", shadow]),
            (d("network", "disk", "<source protocol='nbd' name='x'><host name='127.0.0.1' port='10809'/></source>"), &["protocol \"nbd\" is not in domains.xml_policy.disk_protocols"]),
            (d("network", "disk", "<source protocol='http' name='/v3/kv/range'><host name='127.0.0.1' port='2379'/></source>"), &["protocol \"http\""]),
            (d("network", "disk", "<source name='x'/>"), &["protocol \"\""]),
            (d("volume", "disk", "<source pool='default' volume='a.img'/>"), &["libvirt storage pool \"default\" is not in domains.xml_policy.libvirt_pools"]),
            (d("nvme", "disk", "<source type='pci' managed='yes' namespace='1'><address domain='0' bus='1' slot='0' function='0'/></source>"), &["<disk type='nvme' device='disk'> uses a host device", "allow_host_devices"]),
            (d("vhostuser", "disk", "<source type='unix' path='/tmp/vhost.sock'/>"), &["<disk type='vhostuser' device='disk'>", "allow_host_devices"]),
            (d("vhostvdpa", "disk", "<source dev='/dev/vhost-vdpa-0'/>"), &["allow_host_devices"]),
            (d("block", "lun", "<source dev='/dev/sdc'/>"), &["device='lun'", "SCSI", "allow_host_devices"]),
            (d("floppy-ish", "disk", ""), &["is not a disk type this policy knows"]),
            (d("network", "disk", "<source protocol='rbd' name='vms/a'><config file='/etc/ceph/other.conf'/></source>"), &["<config> file /etc/ceph/other.conf is not under"]),
            (d("network", "disk", "<source protocol='rbd' name='vms/a'><host transport='unix' socket='/run/evil.sock'/></source>"), &["<host> socket /run/evil.sock"]),
            (d("block", "disk", "<source dev='/var/lib/debvisor/images/lv0'><reservations managed='no'><source type='unix' path='/run/pr.sock' mode='client'/></reservations></source>"), &["<reservations>", "allow_host_chardevs"]),
        ]);
        // Pools limit RBD when listed; directories and other knobs widen.
        let p = XmlPolicy {
            rbd_pools: vec!["vms".into()],
            disk_dirs: vec!["/srv/img".into()],
            disk_protocols: vec!["rbd".into(), "nbd".into()],
            libvirt_pools: vec!["default".into()],
            allow_host_devices: true,
            ..XmlPolicy::default()
        };
        let r = refused_by(
            &d(
                "network",
                "disk",
                "<source protocol='rbd' name='secret/img'/>",
            ),
            &p,
        );
        assert!(
            r.contains(
                "RBD pool \"secret\" (volume secret/img) is not in domains.xml_policy.rbd_pools"
            ),
            "{r}"
        );
        for ok in [
            d("network", "disk", "<source protocol='rbd' name='vms/img'/>"),
            d("network", "disk", "<source protocol='nbd' name='x'/>"),
            d("file", "disk", "<source file='/srv/img/a.img'/>"),
            d("volume", "disk", "<source pool='default' volume='a.img'/>"),
            d(
                "nvme",
                "disk",
                "<source type='pci' managed='yes' namespace='1'/>",
            ),
            d("block", "lun", "<source dev='/srv/img/lun0'/>"),
        ] {
            check_policy(&ok, &p).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let r = refused_by(
            &d(
                "file",
                "disk",
                "<source file='/var/lib/debvisor/images/a.img'/>",
            ),
            &p,
        );
        assert!(r.contains("not under domains.xml_policy.disk_dirs"), "{r}");
        let root = XmlPolicy {
            disk_dirs: vec!["/".into()],
            ..XmlPolicy::default()
        };
        check_policy(&d("file", "disk", "<source file='/etc/shadow'/>"), &root)
            .expect("disk_dirs: [/] allows any file");
    }

    #[test]
    fn emulators_only_from_the_list() {
        allowed(&dom("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
        allowed(&dom("<emulator>/usr//bin/./kvm</emulator>"));
        all_refused(&[
            (
                dom("<emulator>/tmp/evil</emulator>"),
                &["<emulator> /tmp/evil is not in domains.xml_policy.emulators"],
            ),
            (
                dom("<emulator>/usr/bin/../../tmp/qemu-system-x86_64</emulator>"),
                &["'..'"],
            ),
            (
                dom("<emulator>qemu-system-x86_64</emulator>"),
                &["not an absolute path"],
            ),
            // libvirt reads all the text below the element.
            (
                dom("<emulator>/usr/bin/kvm<!-- x -->-evil</emulator>"),
                &["/usr/bin/kvm-evil is not in"],
            ),
            (
                dom("<emulator><![CDATA[/tmp/x]]></emulator>"),
                &["/tmp/x is not in"],
            ),
        ]);
        let p = XmlPolicy {
            emulators: vec!["/opt/qemu/bin/qemu".into()],
            ..XmlPolicy::default()
        };
        check_policy(&dom("<emulator>/opt/qemu/bin/qemu</emulator>"), &p).expect("listed");
    }

    #[test]
    fn interfaces_by_type_bridge_and_without_scripts() {
        let bridge = |b: &str| {
            format!("<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='{b}'/><model type='virtio'/></interface>")
        };
        allowed(&dom(&bridge("dvbr100")));
        all_refused(&[
            (dom(&bridge("brcluster")), &["bridge \"brcluster\" is not in domains.xml_policy.bridges"]),
            (dom("<interface type='bridge'/>"), &["bridge \"\""]),
            (dom("<interface><model type='virtio'/></interface>"), &["<interface type='user'>", "domains.xml_policy.interface_types"]),
            (dom("<interface type='user'/>"), &["type='user'"]),
            (dom("<interface type='ethernet'><script path='/tmp/x'/></interface>"), &["<interface type='ethernet'>", "interface_types"]),
            (dom("<interface type='network'><source network='default'/></interface>"), &["type='network'"]),
            (dom("<interface type='direct'><source dev='eth0' mode='bridge'/></interface>"), &["type='direct'"]),
            (dom("<interface type='hostdev'/>"), &["type='hostdev'"]),
            (dom("<interface type='vhostuser'><source type='unix' path='/tmp/s' mode='client'/></interface>"), &["type='vhostuser'"]),
            (dom(&bridge("dvbr1").replace("</interface>", "<script path='/tmp/x'/></interface>")), &["<script> runs a host program as root (domains.xml_policy.allow_interface_scripts)"]),
            (dom(&bridge("dvbr1").replace("</interface>", "<downscript path='/tmp/x'/></interface>")), &["<downscript>"]),
            (dom(&bridge("dvbr1").replace("</interface>", "<backend tap='/dev/net/tun'/></interface>")), &["<backend tap=…> opens a host device", "allow_host_devices"]),
            (dom(&bridge("dvbr1").replace("</interface>", "<rom file='/etc/shadow'/></interface>")), &["<rom> file /etc/shadow is not under"]),
        ]);
        let p = XmlPolicy {
            interface_types: vec!["ethernet".into(), "bridge".into(), "network".into()],
            bridges: vec!["br0".into(), "vm*".into()],
            allow_interface_scripts: true,
            ..XmlPolicy::default()
        };
        for ok in [
            dom("<interface type='ethernet'><script path='/etc/qemu-ifup'/></interface>"),
            dom(&bridge("br0")),
            dom(&bridge("vmnet7")),
            dom("<interface type='network'><source network='default'/></interface>"),
        ] {
            check_policy(&ok, &p).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert!(refused_by(&dom(&bridge("dvbr1")), &p).contains("bridges"));
        assert!(refused_by(&dom(&bridge("br01")), &p).contains("bridges"));
    }

    #[test]
    fn host_devices_filesystems_and_chardevs() {
        all_refused(&[
            (dom("<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='3' slot='0' function='0'/></source></hostdev>"), &["<hostdev type='pci' mode='subsystem'>", "allow_host_devices"]),
            (dom("<shmem name='x'><server path='/tmp/s'/></shmem>"), &["<shmem>", "allow_host_devices"]),
            (dom("<filesystem type='mount'><driver type='virtiofs'/><source dir='/'/><target dir='root'/></filesystem>"), &["<filesystem type='mount'>", "allow_host_filesystems"]),
            (dom("<filesystem type='mount'><binary path='/tmp/evil'/></filesystem>"), &["allow_host_filesystems"]),
            (dom("<serial type='file'><source path='/etc/shadow'/></serial>"), &["<serial type='file'> uses a host file, pipe or device (domains.xml_policy.allow_host_chardevs)"]),
            (dom("<serial type='dev'><source path='/dev/ttyS0'/></serial>"), &["<serial type='dev'>"]),
            (dom("<serial type='pipe'><source path='/tmp/p'/></serial>"), &["<serial type='pipe'>"]),
            (dom("<serial type='tcp'><source mode='bind' host='0.0.0.0' service='2445'/></serial>"), &["opens a socket on the host"]),
            (dom("<serial type='udp'><source mode='connect' host='10.0.0.1' service='53'/></serial>"), &["<serial type='udp'>"]),
            (dom("<console type='file'><source path='/tmp/c'/></console>"), &["<console type='file'>"]),
            (dom("<parallel type='file'><source path='/tmp/c'/></parallel>"), &["<parallel type='file'>"]),
            (dom("<channel type='unix'><source mode='connect' path='/var/lib/libvirt/qemu/channel/target/other/org.qemu.guest_agent.0'/><target type='virtio' name='x'/></channel>"), &["<channel type='unix'> uses a host socket path"]),
            (dom("<serial type='pty'><log file='/etc/shadow' append='on'/></serial>"), &["<log> writes to a host file", "allow_host_chardevs"]),
            (dom("<serial type='nmdm'/>"), &["does not know"]),
            (dom("<redirdev bus='usb' type='tcp'><source mode='connect' host='10.0.0.1' service='4000'/></redirdev>"), &["<redirdev type='tcp'>"]),
            (dom("<smartcard mode='host'/>"), &["<smartcard mode='host'>", "allow_host_devices"]),
            (dom("<smartcard mode='host-certificates'><certificate>c</certificate><database>/etc/pki/nssdb/</database></smartcard>"), &["allow_host_devices"]),
            (dom("<smartcard mode='passthrough' type='tcp'><source mode='connect' host='1.2.3.4' service='2001'/></smartcard>"), &["allow_host_chardevs"]),
            (dom("<rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>"), &["/dev/hwrng is not /dev/urandom", "allow_host_devices"]),
            (dom("<rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' host='1.2.3.4' service='708'/></backend></rng>"), &["<backend type='tcp' model='egd'>", "allow_host_chardevs"]),
            (dom("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"), &["passes the host's TPM", "allow_host_devices"]),
            (dom("<tpm model='tpm-tis'><backend type='external'><source type='unix' mode='connect' path='/tmp/swtpm'/></backend></tpm>"), &["allow_host_chardevs"]),
            (dom("<input type='evdev'><source dev='/dev/input/event0'/></input>"), &["<input type='evdev'>", "allow_host_devices"]),
            (dom("<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>"), &["allow_host_devices"]),
            (dom("<graphics type='vnc' socket='/run/other.sock'/>"), &["<graphics type='vnc'>", "host socket", "allow_host_chardevs"]),
            (dom("<graphics type='vnc'><listen type='socket' socket='/tmp/v.sock'/></graphics>"), &["allow_host_chardevs"]),
            (dom("<graphics type='dbus' address='unix:path=/run/dbus/system_bus_socket'/>"), &["allow_host_chardevs"]),
            (dom("<graphics type='spice'><gl enable='yes' rendernode='/dev/dri/renderD128'/></graphics>"), &["render node", "allow_host_devices"]),
            (dom("<graphics type='sdl'/>"), &["<graphics type='sdl'>", "allow_host_devices"]),
            (dom("<graphics type='egl-headless'/>"), &["allow_host_devices"]),
            (dom("<audio id='1' type='file' path='/etc/shadow'/>"), &["<audio type='file'>", "allow_host_chardevs"]),
            (dom("<audio id='1' type='alsa'><input dev='/dev/snd'/></audio>"), &["<audio type='alsa'>", "allow_host_devices"]),
            (dom("<audio id='1' type='pulseaudio' serverName='/run/pulse/native'/>"), &["allow_host_devices"]),
        ]);
        let p = XmlPolicy {
            allow_host_devices: true,
            allow_host_chardevs: true,
            allow_host_filesystems: true,
            ..XmlPolicy::default()
        };
        for ok in [
            dom("<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='3' slot='0' function='0'/></source></hostdev>"),
            dom("<hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1</block></source></hostdev>"),
            dom("<filesystem type='mount'><driver type='virtiofs'/><binary path='/usr/lib/qemu/virtiofsd'/><source dir='/srv/share'/><target dir='share'/></filesystem>"),
            dom("<serial type='file'><source path='/var/log/guest.log'/><log file='/var/log/g2.log'/></serial>"),
            dom("<channel type='unix'><source mode='bind' path='/run/x.sock'/><target type='virtio' name='x'/></channel>"),
            dom("<graphics type='spice'><gl enable='yes' rendernode='/dev/dri/renderD128'/></graphics>"),
            dom("<rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>"),
            dom("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"),
            dom("<audio id='1' type='file' path='/tmp/a.wav'/>"),
        ] {
            check_policy(&ok, &p).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn seclabels_boot_files_and_the_path_net() {
        let sec = |s: &str| dom_with("", "", s);
        allowed(&sec(
            "<seclabel type='dynamic' model='selinux' relabel='yes'/>",
        ));
        allowed(&sec("<seclabel model='dac'/>"));
        allowed(&dom("<disk type='file'><source file='/var/lib/debvisor/images/a.img'><seclabel model='dac' relabel='no'/></source><target dev='vda'/></disk>"));
        all_refused(&[
            (sec("<seclabel type='none'/>"), &["<seclabel type='none'> turns the guest's confinement off (domains.xml_policy.allow_custom_seclabels)"]),
            (sec("<seclabel type='static' model='dac' relabel='yes'><label>+0:+0</label></seclabel>"), &["<seclabel type='static' model='dac'>", "allow_custom_seclabels"]),
            (sec("<seclabel type='dynamic' model='selinux'><baselabel>system_u:system_r:unconfined_t:s0</baselabel></seclabel>"), &["allow_custom_seclabels"]),
            (sec("<seclabel type='dynamic' model='dac' relabel='no'/>"), &["relabelling off"]),
            (dom("<disk type='file'><source file='/var/lib/debvisor/images/a.img'><seclabel model='dac' relabel='yes'><label>+0:+0</label></seclabel></source></disk>"), &["sets a device's security label"]),
            (dom_with("<kernel>/etc/shadow</kernel>", "", ""), &["<kernel> /etc/shadow is not under domains.xml_policy.disk_dirs or domains.xml_policy.firmware_dirs"]),
            (dom_with("<initrd>/boot/../etc/shadow</initrd>", "", ""), &["<initrd>", "'..'"]),
            (dom_with("<dtb>/root/x.dtb</dtb>", "", ""), &["<dtb> /root/x.dtb"]),
            (dom_with("<loader readonly='yes' type='pflash'>/tmp/OVMF_CODE.fd</loader>", "", ""), &["<loader type='pflash'> /tmp/OVMF_CODE.fd"]),
            (dom_with("<nvram>/etc/shadow</nvram>", "", ""), &["<nvram> /etc/shadow"]),
            (dom_with("<nvram template='/etc/shadow'/>", "", ""), &["<nvram> template /etc/shadow"]),
            (dom_with("<nvram type='file'><source file='/etc/shadow'/></nvram>", "", ""), &["<source> file /etc/shadow"]),
            (dom_with("<acpi><table type='slic'>/etc/shadow</table></acpi>", "", ""), &["<table type='slic'> /etc/shadow"]),
            (dom_with("", "", "<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>"), &["<entry> file /etc/shadow"]),
            (dom("<memory model='nvdimm'><source><path>/etc/shadow</path></source><target><size unit='KiB'>524288</size><node>0</node></target></memory>"), &["<memory model='nvdimm'> source path /etc/shadow is not under domains.xml_policy.disk_dirs"]),
            // The net: an absolute path anywhere else.
            (dom("<video><model type='virtio'/><driver name='vhostuser'/><rom file='/etc/shadow'/></video>"), &["<rom> file /etc/shadow"]),
            (dom("<serial type='pty'><source path='/dev/pts/3'/></serial>"), &["<source> path /dev/pts/3"]),
            (dom("<made-up>/etc/shadow</made-up>"), &["<made-up> /etc/shadow is not under"]),
        ]);
        for ok in [
            dom_with("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/t_VARS.fd</nvram>", "", ""),
            dom_with("<kernel>/var/lib/debvisor/images/vmlinuz</kernel><initrd>/var/lib/debvisor/images/initrd.img</initrd><cmdline>root=/dev/vda console=ttyS0</cmdline>", "", ""),
            dom("<memory model='nvdimm'><source><path>/var/lib/debvisor/images/nv0</path></source><target><size unit='KiB'>524288</size></target></memory>"),
            dom_with("", "", "<description>/srv web server</description><title>/x</title><resource><partition>/machine</partition></resource>"),
            dom("<disk type='file' device='disk'><source file='/var/lib/debvisor/images/a.img'/><target dev='vda'/><serial>/x</serial></disk>"),
        ] {
            allowed(&ok);
        }
        let p = XmlPolicy {
            allow_custom_seclabels: true,
            ..XmlPolicy::default()
        };
        check_policy(&sec("<seclabel type='none'/>"), &p).expect("switch");
        check_policy(
            &sec(
                "<seclabel type='static' model='dac' relabel='yes'><label>+0:+0</label></seclabel>",
            ),
            &p,
        )
        .expect("switch");
    }

    /// The guests the integration tests define, and a full `virsh dumpxml --inactive` of a
    /// typical guest, pass the default policy.
    #[test]
    fn real_guests_pass_the_default_policy() {
        let tiny = format!("<domain type='kvm'>\n  <name>dvtest-1-tiny</name>\n  <uuid>{UUID}</uuid>\n  <memory unit='MiB'>64</memory>\n  <currentMemory unit='MiB'>64</currentMemory>\n  <vcpu>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <boot dev='network'/>\n  </os>\n  <features><acpi/></features>\n  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n");
        allowed(&tiny);
        allowed(&format!("<domain type='test'>\n  <name>x</name>\n  <uuid>{UUID}</uuid>\n  <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n  <os><type arch='x86_64'>hvm</type></os>\n</domain>\n"));
        let rbd = "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>\
             <source protocol='rbd' name='dvtest/disk1'><host name='127.0.0.1' port='6789'/></source>\
             <auth username='admin'><secret type='ceph' uuid='3e2a0f6c-2a7b-4c1d-9e55-0f0d2e9a7b11'/></auth>\
             <target dev='vdb' bus='virtio'/></disk>";
        allowed(&tiny.replacen("</devices>", &format!("{rbd}</devices>"), 1));
        let full = format!(
            r#"<domain type='kvm'>
  <name>web</name>
  <uuid>{UUID}</uuid>
  <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0"><libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo></metadata>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>2</vcpu>
  <resource><partition>/machine</partition></resource>
  <os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/><vmport state='off'/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/></clock>
  <on_poweroff>destroy</on_poweroff>
  <pm><suspend-to-mem enabled='no'/></pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/></disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'/>
    <interface type='bridge'><mac address='52:54:00:6b:3c:58'/><source bridge='dvbr100'/><model type='virtio'/></interface>
    <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <input type='tablet' bus='usb'/>
    <input type='mouse' bus='ps2'/>
    <graphics type='spice' autoport='yes'><listen type='address'/><image compression='off'/></graphics>
    <sound model='ich9'/>
    <audio id='1' type='spice'/>
    <video><model type='virtio' heads='1' primary='yes'/></video>
    <redirdev bus='usb' type='spicevmc'/>
    <watchdog model='itco' action='reset'/>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>"#
        );
        allowed(&full);
    }

    #[test]
    fn policy_validation_names_the_entry() {
        let p = XmlPolicy {
            emulators: vec!["qemu".into()],
            disk_dirs: vec!["/ok".into(), "/a/../b".into()],
            firmware_dirs: vec!["".into()],
            disk_protocols: vec!["rbd".into(), "smb".into()],
            rbd_pools: vec!["a/b".into()],
            libvirt_pools: vec!["".into()],
            interface_types: vec!["bridge".into(), "wifi".into()],
            bridges: vec![
                "dvbr*".into(),
                "a*b".into(),
                "averyveryverylongname".into(),
                "*".into(),
            ],
            ..XmlPolicy::default()
        };
        let got: Vec<String> = p
            .validate("domains.xml_policy")
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        assert_eq!(
            got,
            [
                "domains.xml_policy.emulators[0]",
                "domains.xml_policy.disk_dirs[1]",
                "domains.xml_policy.firmware_dirs[0]",
                "domains.xml_policy.disk_protocols[1]",
                "domains.xml_policy.rbd_pools[0]",
                "domains.xml_policy.libvirt_pools[0]",
                "domains.xml_policy.interface_types[1]",
                "domains.xml_policy.bridges[1]",
                "domains.xml_policy.bridges[2]",
            ]
        );
        assert!(XmlPolicy::default().validate("x").is_empty());
        let any = XmlPolicy {
            bridges: vec!["*".into()],
            ..XmlPolicy::default()
        };
        assert!(any.bridge_allowed("brcluster"));
    }
}
