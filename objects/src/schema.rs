//! The etcd schema: every key the cluster uses, its value format and its one writer.
//!
//! Keys are relative to the configured prefix (default `/debvisor`); the store (`Store`)
//! adds the prefix. Nothing outside this module spells a key. `docs/schema.md` is generated
//! from [`KEYS`] (`debvisorctl schema` prints it; a test keeps the file in step).

use std::fmt;

/// Version of this key layout, written to `schema/version` by the first node that registers.
pub const SCHEMA_VERSION: u32 = 1;

/// The role allowed to write a key ("one owner per key", docs/architecture.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// An operator through `debvisorctl` or the API.
    Operator,
    /// The node the key is about (`<node>` in the key).
    OwningNode,
    /// The elected primary coordinator.
    Primary,
    /// Whichever node holds the VM's `owner`/`lock`.
    VmOwner,
    /// Any node, through a compare-and-swap transaction.
    AnyNodeTxn,
}

impl fmt::Display for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Writer::Operator => "operator",
            Writer::OwningNode => "owning node",
            Writer::Primary => "primary",
            Writer::VmOwner => "VM owner node",
            Writer::AnyNodeTxn => "any node (txn)",
        })
    }
}

/// One documented key pattern.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// Pattern relative to the prefix, placeholders in angle brackets.
    pub pattern: &'static str,
    /// Who writes it.
    pub writer: Writer,
    /// Value format.
    pub format: &'static str,
    /// Whether the key is bound to the writer's node lease.
    pub leased: bool,
    /// What it means.
    pub doc: &'static str,
}

/// Every key of the schema, in documentation order.
pub const KEYS: &[KeySpec] = &[
    KeySpec { pattern: "schema/version", writer: Writer::AnyNodeTxn, format: "integer", leased: false, doc: "Version of this key layout; created once if absent." },
    KeySpec { pattern: "nodes/<node>/info", writer: Writer::OwningNode, format: "JSON NodeInfo", leased: false, doc: "Static facts: hostname, fqdn, addresses, version, cpus, memory, kernel, libvirt version, rack, node_id. Rewritten when hostname, addresses or version change." },
    KeySpec { pattern: "nodes/<node>/info/fqdn", writer: Writer::OwningNode, format: "string", leased: false, doc: "Cluster-assigned FQDN (from `node.fqdn`), consumed by hostname-register." },
    KeySpec { pattern: "nodes/<node>/mode", writer: Writer::OwningNode, format: "standalone|clustered", leased: false, doc: "How the node participates in the cluster." },
    KeySpec { pattern: "nodes/<node>/alive", writer: Writer::OwningNode, format: "JSON AliveRecord", leased: true, doc: "Proof of life: exists exactly while the node lease lives. A node is dead when this key vanishes. The record (hostname, pid, boot_id, start_ticks, node_id, since) names the process holding it, so a daemon knows its own registration whatever lease it is bound to." },
    KeySpec { pattern: "nodes/<node>/daemon_state", writer: Writer::OwningNode, format: "stop|init|run|shutdown|dead|fenced", leased: false, doc: "Daemon lifecycle; `dead`/`fenced` are written by the primary." },
    KeySpec { pattern: "nodes/<node>/coordinator_state", writer: Writer::OwningNode, format: "client|secondary|takeover|primary|relinquish", leased: false, doc: "Role in the primary election." },
    KeySpec { pattern: "nodes/<node>/domain_state", writer: Writer::OwningNode, format: "ready|flush|flushed|unflush|fence-flush", leased: false, doc: "VM drain state; `flush`/`unflush` are requested by the operator, the node moves it on." },
    KeySpec { pattern: "nodes/<node>/health", writer: Writer::OwningNode, format: "JSON Health", leased: false, doc: "Latest health snapshot, written with last_seen in one transaction per keepalive tick; with ceph.enabled a `ceph` field {status, checks, osds [{id, up, in}], error, since} from the Ceph monitor (a non-OK status adds a line to problems); `removals_held` {count, reason, since, names} while the node holds removals for an operator." },
    KeySpec { pattern: "nodes/<node>/last_seen", writer: Writer::OwningNode, format: "RFC3339 timestamp", leased: false, doc: "Time of the last keepalive tick (informational; liveness is `alive`)." },
    KeySpec { pattern: "nodes/<node>/status", writer: Writer::Primary, format: "OK|DEGRADED|DOWN", leased: false, doc: "Health verdict derived by the primary." },
    KeySpec { pattern: "nodes/<node>/bmc", writer: Writer::OwningNode, format: "JSON {host, port, user}", leased: false, doc: "The node's BMC (from fencing.ipmi), for the primary to fence it over IPMI; never the password." },
    KeySpec { pattern: "nodes/<node>/fence", writer: Writer::Primary, format: "JSON {state dead|fencing|fenced|failed|skipped|recovering|recovered, by ipmi|self-fence, reason, since, primary, lease}", leased: false, doc: "The primary's record of a dead node: each step of its fencing and recovery, with the reason of a skip or a failure, and `lease` (hex) the node's lease the primary saw expire. The node stops its guests for `daemon_state = fenced` only when this record names a lease it held that is no longer its good current lease (and the store is not found replaced)." },
    KeySpec { pattern: "nodes/<node>/confirm_removals", writer: Writer::Operator, format: "RFC3339 timestamp", leased: false, doc: "Written by `debvisorctl node confirm-removals`: the node carries out the removals it holds (health.removals_held) and accepts a replaced store as it is." },
    KeySpec { pattern: "nodes/<node>/drain", writer: Writer::OwningNode, format: "JSON DrainReport {state, since, remaining, waiting [{uuid, name, reason}]}", leased: false, doc: "Progress of a flush/unflush as the node's drain pass sees it: how many VMs are left and why each waiting one cannot move yet (e.g. no eligible node, with the reason per node); rewritten when it changes, so `debvisorctl node flush --wait` can say why it waits." },
    KeySpec { pattern: "nodes/<node>/config/version", writer: Writer::OwningNode, format: "string", leased: false, doc: "Cluster config version (`config/current_version`) in force on the node: the last one it applied." },
    KeySpec { pattern: "nodes/<node>/config/last_applied_at", writer: Writer::OwningNode, format: "RFC3339 timestamp", leased: false, doc: "When that version was applied." },
    KeySpec { pattern: "nodes/<node>/config/status", writer: Writer::OwningNode, format: "OK|STALE: reason|ERROR: field: reason", leased: false, doc: "Config sync state of the node: `OK` (current version in force), `STALE` (it could not apply the current version at runtime; the previous one stays in force), `ERROR` naming the field it refused (nothing of that version applied)." },
    KeySpec { pattern: "vms/<vm>/xml", writer: Writer::Operator, format: "libvirt domain XML", leased: false, doc: "The domain definition; its <uuid> must equal <vm> (a lower-case canonical UUID). Each node checks it against its domains.xml_policy before defining it (refused: status invalid, element named)." },
    KeySpec { pattern: "vms/<vm>/state", writer: Writer::Operator, format: "start|restart|shutdown|stop|disable|migrate|migrate-live|unmigrate", leased: false, doc: "Desired state (absent: stop)." },
    KeySpec { pattern: "vms/<vm>/node", writer: Writer::Operator, format: "node name", leased: false, doc: "Target node: the node that should run the VM." },
    KeySpec { pattern: "vms/<vm>/owner", writer: Writer::AnyNodeTxn, format: "node name", leased: false, doc: "Current authoritative node of the VM; moved only by transaction." },
    KeySpec { pattern: "vms/<vm>/lock", writer: Writer::VmOwner, format: "node name", leased: true, doc: "Run lock bound to the owner's node lease; its revision is the fencing token." },
    KeySpec { pattern: "vms/<vm>/metadata", writer: Writer::Operator, format: "JSON", leased: false, doc: "Policy flags (autostart, migration_method live|shutdown|none, migration_max_downtime, node_limit, node_selector mem|memprov|load|vcpus|vms, protected, ha_group)." },
    KeySpec { pattern: "vms/<vm>/last_node", writer: Writer::VmOwner, format: "node name", leased: false, doc: "Node the VM ran on before its last migration (for unmigrate and unflush)." },
    KeySpec { pattern: "vms/<vm>/status", writer: Writer::VmOwner, format: "JSON {state, since, reason, error}", leased: false, doc: "Actual state as the owning node sees it (running|starting|stopped|shutting-down|disabled|migrating|fail|invalid), since when, why, and the error naming the field." },
    KeySpec { pattern: "vms/<vm>/flushed_from", writer: Writer::VmOwner, format: "node name", leased: false, doc: "Set when a node drain shut the VM down (migration_method none); that node's unflush starts it again and clears it." },
    KeySpec { pattern: "vmstats/<vm>", writer: Writer::VmOwner, format: "JSON VmStats {node, active, cpu_pct, memory_kib, max_memory_kib, vcpus, at}", leased: false, doc: "What placement and an operator need of a VM, sampled every `domains.stats_sample_interval` by its owner and rewritten only when running state, vCPUs or maximum memory change, or when CPU (±10 points of one core) or memory (±max(64 MiB, 5 %)) moved beyond the deadband and the last write is at least `domains.stats_write_interval` old; an idle VM is written once. Outside `vms/` so no VM watch receives it; deleted with the VM. Full-rate counters are on the owner's `/metrics`. (Earlier versions wrote `vms/<vm>/stats`; the owner deletes that key.)" },
    KeySpec { pattern: "config/current_version", writer: Writer::Operator, format: "string", leased: false, doc: "Version of the cluster-wide settings in `config/blob` (a Git SHA, semver, or the digest `debvisorctl config set` computes); written with the blob in one transaction." },
    KeySpec { pattern: "config/blob", writer: Writer::Operator, format: "YAML or JSON ClusterConfig", leased: false, doc: "Cluster-wide settings every node applies at runtime: log_level, node_status thresholds, firewall_allow, sysctl, vm_defaults (see README, Cluster config). Validated as a whole; a bad blob is never half-applied." },
    KeySpec { pattern: "self/node_id", writer: Writer::OwningNode, format: "node name", leased: false, doc: "Written by a standalone node only: the name it uses under `nodes/` (DebVisor's hostname-register reads it, then `nodes/<id>/mode` and `nodes/<id>/info/fqdn`). A clustered store has no single \"self\": there a node-local consumer reads `node.name` from `/etc/debvisor/debvisord.yaml` (or the short hostname) instead." },
    KeySpec { pattern: "networks/<vni>/spec", writer: Writer::Operator, format: "JSON NetworkSpecRaw", leased: false, doc: "Client network: type bridged|managed, description, mtu, domain, name_servers, ipv4/ipv6 {network, gateway}, dhcp4 {enabled, start, end}." },
    KeySpec { pattern: "networks/<vni>/reservations/<mac>", writer: Writer::Operator, format: "JSON {ip, hostname}", leased: false, doc: "DHCP reservation of a managed network (MAC lower-case, colon-separated)." },
    KeySpec { pattern: "networks/<vni>/acl/<in|out>/<order>", writer: Writer::Operator, format: "JSON {action, proto, source, destination, port, description}", leased: false, doc: "Per-network firewall rule; applied in numeric order of <order>." },
    KeySpec { pattern: "networks/<vni>/status/<node>", writer: Writer::OwningNode, format: "JSON {state ready|error, error, field, bridge, link, mtu, clamped, gateway, dhcp, since}", leased: false, doc: "How the network stands on that node; an invalid spec is reported here with the field named." },
    KeySpec { pattern: "networks/<vni>/leases/<mac>", writer: Writer::Primary, format: "JSON {mac, ip, hostname, expires}", leased: false, doc: "DHCP leases handed out by the primary's dnsmasq." },
    KeySpec { pattern: "ceph/pools/<pool>/spec", writer: Writer::Operator, format: "JSON {pg_num, size, protected, delete}", leased: false, doc: "Desired Ceph pool: pg_num (power of two, at creation), replica size 1-10, protected (refuses delete), delete." },
    KeySpec { pattern: "ceph/pools/<pool>/status", writer: Writer::Primary, format: "JSON CephStatus {state ready|pending|error|deleted, field, error, since}", leased: false, doc: "How the pool stands; an invalid spec is reported here with the field named." },
    KeySpec { pattern: "ceph/volumes/<pool>:<image>/spec", writer: Writer::Operator, format: "JSON {size, clone_from {template}|{pool, image, snapshot}, allow_shrink, delete}", leased: false, doc: "Desired RBD volume: size like 10G/512M (grows; shrinks only with allow_shrink), clone source at creation, delete (snapshots purged first)." },
    KeySpec { pattern: "ceph/volumes/<pool>:<image>/status", writer: Writer::Primary, format: "JSON CephStatus", leased: false, doc: "How the volume stands, with the field named on error." },
    KeySpec { pattern: "ceph/volumes/<pool>:<image>/snapshots/<snap>/spec", writer: Writer::Operator, format: "JSON {rollback, delete}", leased: false, doc: "Desired snapshot (labels like auto-YYYYmmdd-HHMMSS); a new rollback token asks for one rollback (refused while a VM uses the volume)." },
    KeySpec { pattern: "ceph/volumes/<pool>:<image>/snapshots/<snap>/status", writer: Writer::Primary, format: "JSON CephStatus {…, rolled_back}", leased: false, doc: "How the snapshot stands; rolled_back is the last rollback token done." },
    KeySpec { pattern: "templates/<name>", writer: Writer::Operator, format: "JSON {backend rbd, pool, image, snapshot}", leased: false, doc: "A clone source for volumes (clone_from.template)." },
    KeySpec { pattern: "ceph/health", writer: Writer::Primary, format: "JSON {status HEALTH_OK|HEALTH_WARN|HEALTH_ERR, checks {name: {severity, message, detail, muted}}} or {status unreachable, error, since}", leased: false, doc: "Cluster health from `ceph health detail`, written when it changes; `unreachable` (with the first error and since when) while Ceph does not answer within ceph.timeout, the observed keys then stay as they were." },
    KeySpec { pattern: "ceph/usage", writer: Writer::Primary, format: "JSON", leased: false, doc: "Cluster capacity and usage (`ceph df` totals)." },
    KeySpec { pattern: "ceph/observed/pools/<pool>", writer: Writer::Primary, format: "JSON", leased: false, doc: "Observed pool: id, size, pg_num, stored, objects, bytes used, max_avail." },
    KeySpec { pattern: "ceph/observed/osds/<id>", writer: Writer::Primary, format: "JSON", leased: false, doc: "Observed OSD: up, in, node (from OSD metadata), utilisation, capacity, PGs." },
    KeySpec { pattern: "ceph/observed/volumes/<pool>:<image>", writer: Writer::Primary, format: "JSON", leased: false, doc: "Observed volume: size, used bytes, parent, snapshots (name, size, protected, time)." },
    KeySpec { pattern: "election/primary", writer: Writer::AnyNodeTxn, format: "etcd election", leased: true, doc: "Primary coordinator election (etcd election API): one key per campaigning coordinator, `election/primary/<lease>` = node name, bound to its node lease; the lowest revision leads." },
    KeySpec { pattern: "election/request", writer: Writer::Operator, format: "node name", leased: false, doc: "Written by `debvisorctl node primary NAME`: the primary hands over to NAME (a live coordinator in run), which deletes the key once it is primary; refused requests are deleted with the reason logged. Coordinators stay out of the election for it only while NAME could still take over: a request naming a node that died first is ignored, and refused by the next primary." },
];

/// Keys (or values of keys) that the schema reserves but nothing writes yet, with what will
/// write them: `docs/schema.md` marks them *planned* so a reader does not wait for them.
pub const PLANNED: &[(&str, &str)] = &[(
    "vms/<vm>/metadata",
    "`ha_group` is stored and shown but nothing acts on it yet",
)];

/// The primary election's name (campaign keys live below it).
pub const ELECTION_PRIMARY: &str = "election/primary";

/// The operator's request to move the primary role (a node name).
pub const ELECTION_REQUEST: &str = "election/request";

/// Key of the schema version.
pub fn schema_version() -> String {
    "schema/version".into()
}

/// Prefix of all node keys (`nodes/`).
pub const NODES_PREFIX: &str = "nodes/";

/// Prefix of one node's keys (`nodes/<node>/`).
pub fn node_prefix(node: &str) -> String {
    format!("{NODES_PREFIX}{node}/")
}

/// One field of a node, i.e. the part of a node key after `nodes/<node>/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeField {
    Info,
    Fqdn,
    Mode,
    Alive,
    DaemonState,
    CoordinatorState,
    DomainState,
    Health,
    LastSeen,
    Status,
    ConfigVersion,
    ConfigLastAppliedAt,
    ConfigStatus,
    ConfirmRemovals,
    Drain,
    Bmc,
    Fence,
}

impl NodeField {
    /// Every field, for exhaustive iteration.
    pub const ALL: [NodeField; 17] = [
        NodeField::Info,
        NodeField::Fqdn,
        NodeField::Mode,
        NodeField::Alive,
        NodeField::DaemonState,
        NodeField::CoordinatorState,
        NodeField::DomainState,
        NodeField::Health,
        NodeField::LastSeen,
        NodeField::Status,
        NodeField::ConfigVersion,
        NodeField::ConfigLastAppliedAt,
        NodeField::ConfigStatus,
        NodeField::ConfirmRemovals,
        NodeField::Drain,
        NodeField::Bmc,
        NodeField::Fence,
    ];

    /// Path of the field below `nodes/<node>/`.
    pub fn suffix(self) -> &'static str {
        match self {
            NodeField::Info => "info",
            NodeField::Fqdn => "info/fqdn",
            NodeField::Mode => "mode",
            NodeField::Alive => "alive",
            NodeField::DaemonState => "daemon_state",
            NodeField::CoordinatorState => "coordinator_state",
            NodeField::DomainState => "domain_state",
            NodeField::Health => "health",
            NodeField::LastSeen => "last_seen",
            NodeField::Status => "status",
            NodeField::ConfigVersion => "config/version",
            NodeField::ConfigLastAppliedAt => "config/last_applied_at",
            NodeField::ConfigStatus => "config/status",
            NodeField::ConfirmRemovals => "confirm_removals",
            NodeField::Drain => "drain",
            NodeField::Bmc => "bmc",
            NodeField::Fence => "fence",
        }
    }

    /// Inverse of [`NodeField::suffix`].
    pub fn from_suffix(s: &str) -> Option<NodeField> {
        NodeField::ALL.into_iter().find(|f| f.suffix() == s)
    }
}

/// Key of one node field (`nodes/<node>/<field>`).
pub fn node_key(node: &str, field: NodeField) -> String {
    format!("{NODES_PREFIX}{node}/{}", field.suffix())
}

/// Split a key relative to `nodes/` into node name and field; `None` for keys we do not know
/// (kept in the cache, ignored by the parser).
pub fn split_node_key(rel: &str) -> Option<(&str, Option<NodeField>)> {
    let (node, rest) = rel.split_once('/')?;
    Some((node, NodeField::from_suffix(rest)))
}

/// Key of the desired config version.
pub fn config_current_version() -> String {
    "config/current_version".into()
}

/// Key of the rendered config blob.
pub fn config_blob() -> String {
    "config/blob".into()
}

/// Key a standalone node writes with its own name (`self/node_id`).
pub const SELF_NODE_ID: &str = "self/node_id";

/// Prefix of the cluster config keys (`config/`).
pub const CONFIG_PREFIX: &str = "config/";

/// Name of the primary election.
pub fn election_primary() -> String {
    "election/primary".into()
}

/// Is `name` usable as a `<node>` path segment (a DNS label)?
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Render [`KEYS`] as the markdown of `docs/schema.md`.
pub fn render_markdown(prefix: &str) -> String {
    let mut out = String::new();
    out.push_str("# etcd schema\n\n");
    out.push_str("Generated from `objects/src/schema.rs` (`debvisorctl schema`); a test keeps this file in step.\n\n");
    out.push_str(&format!(
        "All keys live under the configured prefix (default `{prefix}`). Schema version: {SCHEMA_VERSION}.\n\n"
    ));
    out.push_str("Every key listed is written today; *planned* names what the schema reserves and nothing writes yet.\n\n");
    out.push_str("| key | writer | value | lease-bound | meaning |\n|---|---|---|---|---|\n");
    for k in KEYS {
        let mut doc = k.doc.to_string();
        if let Some((_, what)) = PLANNED.iter().find(|(p, _)| *p == k.pattern) {
            doc.push_str(&format!(" *Planned:* {what}."));
        }
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            cell(&format!("`{}`", k.pattern)),
            cell(&k.writer.to_string()),
            cell(k.format),
            if k.leased { "yes" } else { "no" },
            cell(&doc)
        ));
    }
    out.push_str("\nThe node id of this machine is local (`<state_dir>/node_id`); only a standalone node also publishes its name as `self/node_id` (a shared store cannot hold one \"self\").\n");
    out
}

/// One markdown table cell: `|` escaped (also inside code spans, as GitHub's tables need),
/// `<` and `>` outside code spans written as entities so `<uuid>` is text, not an HTML tag,
/// line breaks folded.
pub fn cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut code = false;
    for c in text.chars() {
        match c {
            '`' => {
                code = !code;
                out.push(c);
            }
            '|' => out.push_str("\\|"),
            '<' if !code => out.push_str("&lt;"),
            '>' if !code => out.push_str("&gt;"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_fields_round_trip() {
        for f in NodeField::ALL {
            assert_eq!(NodeField::from_suffix(f.suffix()), Some(f));
            let key = node_key("n1", f);
            let rel = key.strip_prefix(NODES_PREFIX).unwrap_or_default();
            assert_eq!(split_node_key(rel), Some(("n1", Some(f))));
        }
        assert_eq!(split_node_key("n1/unknown"), Some(("n1", None)));
        assert_eq!(split_node_key("n1"), None);
    }

    #[test]
    fn every_node_field_is_documented() {
        for f in NodeField::ALL {
            let pattern = format!("nodes/<node>/{}", f.suffix());
            assert!(
                KEYS.iter().any(|k| k.pattern == pattern),
                "{pattern} missing from KEYS"
            );
        }
    }

    #[test]
    fn table_cells_are_escaped() {
        assert_eq!(cell("a|b"), "a\\|b");
        assert_eq!(cell("its <uuid> and `<vm>`"), "its &lt;uuid&gt; and `<vm>`");
        assert_eq!(cell("`x|y`"), "`x\\|y`");
        let md = render_markdown("/debvisor");
        for line in md.lines().filter(|l| l.starts_with("| `")) {
            // Five cells: six unescaped pipes.
            let pipes = line
                .match_indices('|')
                .filter(|(i, _)| *i == 0 || !line[..*i].ends_with('\\'))
                .count();
            assert_eq!(pipes, 6, "{line}");
        }
        for (p, _) in PLANNED {
            assert!(
                KEYS.iter().any(|k| k.pattern == *p),
                "planned {p} is not a key"
            );
        }
    }

    #[test]
    fn node_names() {
        assert!(valid_node_name("hv-01"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name("-a"));
        assert!(!valid_node_name("a/b"));
        assert!(!valid_node_name("UPPER"));
        assert!(!valid_node_name(&"a".repeat(64)));
    }

    #[test]
    fn docs_schema_md_is_in_step() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/schema.md");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            on_disk,
            render_markdown("/debvisor"),
            "docs/schema.md is stale: run `debvisorctl schema > docs/schema.md`"
        );
    }
}
