//! `debvisorctl vm …` and `debvisorctl node flush|unflush`: operate VMs under
//! `vms/<uuid>/…` and the drain state of nodes.
//!
//! The CLI writes only operator keys (`xml`, `state`, `node`, `metadata`, and a node's
//! `domain_state` request); the nodes do the work and report in `owner`, `status`,
//! `last_node` and `domain_state`. Every write is validated locally first with the same
//! parser the nodes use ([`parse_vm`]), so the CLI refuses what a node would mark invalid,
//! naming the field, and writes nothing. The domain-XML policy is the exception: each node
//! judges a VM's XML by its own `domains.xml_policy`, so `vm define` only warns (stderr, and
//! `policy_warning` in JSON) when the policy of the configuration it read refuses the XML.
//! Every write is one etcd transaction guarded on the
//! mod revisions it read: a concurrent change makes it fail instead of being overwritten.
//!
//! `--wait` follows the object with an etcd watch (plus a relist every few seconds in case
//! the watch breaks) until the node reports the outcome, a `fail`/`invalid` status written
//! after the request (exit 1 at once), or the timeout (exit 1 with the current status).
//!
//! Known limit: a VM's name is unique only by a check at define time, guarded by "no key
//! created under `vms/` since the read"; etcd has no unique index, so the guard is coarse
//! and a busy cluster can make a define retry (three times) before it commits.

use std::path::PathBuf;
use std::time::Duration;

use debvisor_objects::domain::{
    parse_vm, valid_uuid, vm_key, vm_stats_key, xml_identity, DesiredState, Metadata,
    MigrationMethod, NodeSelector, Vm, VmField, VMSTATS_PREFIX, VMS_PREFIX,
};
use debvisor_objects::node::{DaemonState, NodeRecord};
use debvisor_objects::placement;
use debvisor_objects::schema;
use debvisor_objects::xml_policy::{check_policy, XmlPolicy};
use debvisor_objects::{KeyEntry, ObjectError, Store, TxnBuilder};
use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::ctl::node::{self, check_node_name};
use crate::ctl::output::{self, json_or_string, str_of, Output};
use crate::ctl::wait::{follow, humantime, Failure, Followed, WaitArgs};
use debvisor_objects::reactor::ObjectKeys as Keys;

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

/// `--method`: `metadata.migration_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// Live migration.
    Live,
    /// Shut down, move, start.
    Shutdown,
    /// No migration method preference.
    None,
}

impl From<MethodArg> for MigrationMethod {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Live => MigrationMethod::Live,
            MethodArg::Shutdown => MigrationMethod::Shutdown,
            MethodArg::None => MigrationMethod::None,
        }
    }
}

/// `--selector`: `metadata.node_selector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SelectorArg {
    /// Most free memory.
    Mem,
    /// Least memory provisioned to domains.
    Memprov,
    /// Lowest 1-minute load.
    Load,
    /// Fewest vCPUs of running domains.
    Vcpus,
    /// Fewest domains.
    Vms,
}

impl From<SelectorArg> for NodeSelector {
    fn from(s: SelectorArg) -> Self {
        match s {
            SelectorArg::Mem => NodeSelector::Mem,
            SelectorArg::Memprov => NodeSelector::Memprov,
            SelectorArg::Load => NodeSelector::Load,
            SelectorArg::Vcpus => NodeSelector::Vcpus,
            SelectorArg::Vms => NodeSelector::Vms,
        }
    }
}

/// `vm define`.
#[derive(Debug, Clone, clap::Args)]
pub struct DefineArgs {
    /// libvirt domain XML; a missing <uuid> is generated and inserted.
    pub file: PathBuf,
    /// Node to run it on (default: chosen by --selector among eligible nodes).
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Start it when its node boots or recovers it.
    #[arg(long)]
    pub autostart: bool,
    /// Migration method.
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
    /// How a target node is chosen (define without --node, migrate, recovery).
    #[arg(long, value_enum)]
    pub selector: Option<SelectorArg>,
    /// Node the VM may run on (repeatable; none: any).
    #[arg(long = "limit", value_name = "NODE")]
    pub limit: Vec<String>,
    /// Define it with state stop instead of start.
    #[arg(long)]
    pub stopped: bool,
    /// Replace the XML of an existing VM (found by the XML's <uuid>, or by its <name> when
    /// the XML has no <uuid>); nothing else changes.
    #[arg(long, conflicts_with_all = ["node", "autostart", "method", "selector", "limit", "stopped"])]
    pub replace: bool,
}

/// `vm list` filters.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ListArgs {
    /// Only VMs whose node or owner is NODE.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Only VMs whose desired state or reported status is STATE (start, running, fail, …).
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Only VMs with a problem (invalid keys, status fail/invalid, an error reported).
    #[arg(long)]
    pub problem: bool,
}

/// `vm meta`: the metadata fields to change (unset options stay as they are).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetaArgs {
    /// Name, UUID or unambiguous UUID prefix.
    pub vm: String,
    /// Start it when its node boots or recovers it.
    #[arg(long, value_name = "BOOL")]
    pub autostart: Option<bool>,
    /// Migration method.
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
    /// Maximum downtime of a live migration in milliseconds (1-60000), or `default`.
    #[arg(long, value_name = "MS|default")]
    pub max_downtime: Option<String>,
    /// How a target node is chosen.
    #[arg(long, value_enum)]
    pub selector: Option<SelectorArg>,
    /// Nodes the VM may run on (repeatable; replaces the list).
    #[arg(long = "limit", value_name = "NODE", conflicts_with = "no_limit")]
    pub limit: Vec<String>,
    /// Let the VM run on any node (clears the limit).
    #[arg(long)]
    pub no_limit: bool,
    /// Never recover or migrate it automatically.
    #[arg(long, value_name = "BOOL")]
    pub protected: Option<bool>,
    /// HA group name (empty: none).
    #[arg(long, value_name = "NAME")]
    pub ha_group: Option<String>,
}

impl MetaArgs {
    fn is_empty(&self) -> bool {
        self.autostart.is_none()
            && self.method.is_none()
            && self.max_downtime.is_none()
            && self.selector.is_none()
            && self.limit.is_empty()
            && !self.no_limit
            && self.protected.is_none()
            && self.ha_group.is_none()
    }
}

/// `vm …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum VmCommand {
    /// Define a VM from a libvirt domain XML (refused if it exists; see --replace).
    Define(DefineArgs),
    /// Every VM: desired state, reported status, node, owner, problems.
    List(ListArgs),
    /// Change a VM's metadata (only the options given), validated like define and written
    /// as a compare-and-swap on the metadata key.
    Meta(MetaArgs),
    /// Everything about one VM.
    Show {
        /// Name or UUID.
        vm: String,
    },
    /// Desired state start (on its node).
    Start {
        vm: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Desired state stop (power off).
    Stop {
        vm: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Desired state shutdown (ACPI shutdown, then stopped).
    Shutdown {
        vm: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Reboot a VM that is meant to run; the node sets state back to start.
    Restart {
        vm: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stop it and keep it off (no autostart, no recovery).
    Disable {
        vm: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Move a running VM to another node.
    Migrate {
        vm: String,
        /// Force a live migration (state migrate-live).
        #[arg(long)]
        live: bool,
        /// Target node (default: chosen by the VM's node_selector).
        #[arg(long, value_name = "NODE")]
        target: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Move a migrated VM back to its last_node.
    Unmigrate {
        vm: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Delete the VM's keys; its node destroys and undefines it.
    Undefine {
        vm: String,
        /// Even while it is running.
        #[arg(long)]
        force: bool,
    },
}

/// Run one `vm` command; returns what to print on stdout. `policy` is this configuration's
/// `domains.xml_policy`: `vm define` warns (on stderr) about XML it refuses.
pub async fn run(
    store: &Store,
    cmd: VmCommand,
    output: Output,
    policy: &XmlPolicy,
) -> Result<String, Failure> {
    let json_out = output == Output::Json;
    match cmd {
        VmCommand::Define(a) => {
            let v = define(store, &a, policy).await?;
            if let Some(w) = v["policy_warning"].as_str() {
                eprintln!("debvisorctl: warning: {w}");
            }
            let text = if a.replace {
                format!(
                    "VM {} ({}): xml replaced\n",
                    str_of(&v["name"]),
                    str_of(&v["uuid"])
                )
            } else {
                format!(
                    "VM {} defined: uuid {}{}, node {}, state {}\n",
                    str_of(&v["name"]),
                    str_of(&v["uuid"]),
                    if v["uuid_generated"] == true {
                        " (generated)"
                    } else {
                        ""
                    },
                    str_of(&v["node"]),
                    str_of(&v["state"])
                )
            };
            Ok(output.render(&v, text))
        }
        VmCommand::Meta(a) => {
            let v = set_meta(store, &a).await?;
            let text = format!(
                "VM {} ({}): metadata {}\n{}",
                str_of(&v["name"]),
                str_of(&v["uuid"]),
                if v["changed"] == true {
                    "changed"
                } else {
                    "unchanged"
                },
                meta_text(&v["metadata"])
            );
            Ok(output.render(&v, text))
        }
        VmCommand::List(f) => {
            let (rows, _) = read_vms(store).await?;
            let rows: Vec<VmRow> = rows.into_iter().filter(|r| f.matches(r)).collect();
            // The XML stays in `vm show`: a list of many VMs would be mostly XML.
            let v = Value::Array(
                rows.iter()
                    .map(|r| {
                        let mut v = vm_json(r);
                        if let Value::Object(m) = &mut v {
                            m.remove("xml");
                        }
                        v
                    })
                    .collect(),
            );
            Ok(output.render(&v, list_table(&rows)))
        }
        VmCommand::Show { vm } => {
            let (rows, _) = read_vms(store).await?;
            let row = resolve(&rows, &vm)?;
            let v = vm_json(row);
            let text = show_text(&v);
            Ok(output.render(&v, text))
        }
        VmCommand::Start { vm, wait } => set_state(store, &vm, Verb::Start, &wait, json_out).await,
        VmCommand::Stop { vm, wait } => set_state(store, &vm, Verb::Stop, &wait, json_out).await,
        VmCommand::Shutdown { vm, wait } => {
            set_state(store, &vm, Verb::Shutdown, &wait, json_out).await
        }
        VmCommand::Restart { vm, wait } => {
            set_state(store, &vm, Verb::Restart, &wait, json_out).await
        }
        VmCommand::Disable { vm, wait } => {
            set_state(store, &vm, Verb::Disable, &wait, json_out).await
        }
        VmCommand::Migrate {
            vm,
            live,
            target,
            wait,
        } => migrate(store, &vm, live, target.as_deref(), &wait, json_out).await,
        VmCommand::Unmigrate { vm, wait } => unmigrate(store, &vm, &wait, json_out).await,
        VmCommand::Undefine { vm, force } => {
            let v = undefine(store, &vm, force).await?;
            let text = format!(
                "VM {} ({}) undefined ({} keys deleted)\n",
                str_of(&v["name"]),
                str_of(&v["uuid"]),
                v["deleted"]
            );
            Ok(output.render(&v, text))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// One VM as the CLI sees it: its raw keys, parsed or why not, and its name when the XML
/// at least declares one.
#[derive(Debug, Clone)]
pub struct VmRow {
    /// Key id (`vms/<uuid>/`).
    pub uuid: String,
    /// Raw keys.
    pub keys: Keys,
    /// Parsed, or the field that is wrong.
    pub vm: Result<Vm, ObjectError>,
    /// Domain name from the XML, also for an invalid VM when the XML names one.
    pub name: Option<String>,
    /// The owner's stats record (`vmstats/<uuid>`), raw.
    pub stats: Option<Vec<u8>>,
}

impl VmRow {
    fn new(uuid: String, keys: Keys) -> VmRow {
        let vm = parse_vm(&uuid, &keys);
        let name = match &vm {
            Ok(v) => Some(v.name.clone()),
            Err(_) => keys
                .get(VmField::Xml.suffix())
                .and_then(|e| std::str::from_utf8(&e.value).ok())
                .and_then(|x| xml_identity(x).ok())
                .map(|(_, n)| n),
        };
        VmRow {
            uuid,
            keys,
            vm,
            name,
            stats: None,
        }
    }

    /// Name for messages: the domain name, or the UUID.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.uuid.clone())
    }

    fn raw(&self, f: VmField) -> Option<String> {
        self.keys
            .get(f.suffix())
            .map(|e| String::from_utf8_lossy(&e.value).trim().to_string())
    }

    fn rev(&self, f: VmField) -> i64 {
        self.keys.get(f.suffix()).map_or(0, |e| e.mod_revision)
    }

    fn status(&self) -> Option<Value> {
        status_of(&self.keys)
    }
}

fn status_of(keys: &Keys) -> Option<Value> {
    keys.get(VmField::Status.suffix())
        .map(|e| json_or_string(&e.value))
}

/// Every VM under `vms/` with its stats record (`vmstats/`), sorted by name then UUID,
/// with the revision of the VMs' read.
pub async fn read_vms(store: &Store) -> Result<(Vec<VmRow>, i64), String> {
    let (kvs, rev) = store
        .list(VMS_PREFIX)
        .await
        .map_err(crate::ctl::etcd_error)?;
    let (stats, _) = store
        .list(VMSTATS_PREFIX)
        .await
        .map_err(crate::ctl::etcd_error)?;
    let mut stats: std::collections::HashMap<String, Vec<u8>> = stats
        .into_iter()
        .filter_map(|kv| {
            let uuid = kv.key.strip_prefix(VMSTATS_PREFIX)?.to_string();
            Some((uuid, kv.value))
        })
        .collect();
    let grouped = debvisor_objects::reactor::group_keys(VMS_PREFIX, kvs, |_| true);
    let mut rows: Vec<VmRow> = grouped
        .into_iter()
        .map(|(uuid, keys)| {
            let mut row = VmRow::new(uuid, keys);
            row.stats = stats.remove(&row.uuid);
            row
        })
        .collect();
    rows.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
    Ok((rows, rev))
}

/// Find a VM by UUID (any case), by name, or by a UUID prefix that only one VM has; an
/// ambiguous name or prefix lists the candidates.
pub fn resolve<'a>(rows: &'a [VmRow], arg: &str) -> Result<&'a VmRow, String> {
    let lower = arg.trim().to_ascii_lowercase();
    if let Some(r) = rows.iter().find(|r| r.uuid == lower) {
        return Ok(r);
    }
    let named: Vec<&VmRow> = rows
        .iter()
        .filter(|r| r.name.as_deref() == Some(arg))
        .collect();
    let list = |m: &[&VmRow]| {
        m.iter()
            .map(|r| match &r.name {
                Some(n) => format!("{} ({n})", r.uuid),
                None => r.uuid.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match named.as_slice() {
        [one] => return Ok(one),
        [] => {}
        many => {
            return Err(format!(
                "VM name {arg:?} is ambiguous: used by {}; give the UUID",
                many.iter()
                    .map(|r| r.uuid.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
    let hexish = !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if hexish {
        let by_prefix: Vec<&VmRow> = rows.iter().filter(|r| r.uuid.starts_with(&lower)).collect();
        match by_prefix.as_slice() {
            [one] => return Ok(one),
            [] => {}
            many => {
                return Err(format!(
                    "UUID prefix {arg:?} is ambiguous: it matches {}; give more of the UUID",
                    list(many)
                ))
            }
        }
    }
    Err(format!(
        "VM {arg:?} not found (no VM with that name, UUID or UUID prefix under {VMS_PREFIX})"
    ))
}

impl ListArgs {
    /// Does the VM pass the filters?
    pub fn matches(&self, r: &VmRow) -> bool {
        let status = r.status();
        let st = |k: &str| {
            status
                .as_ref()
                .and_then(|s| s.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        if let Some(n) = &self.node {
            let on = [r.raw(VmField::Node), r.raw(VmField::Owner)];
            if !on.iter().any(|x| x.as_deref() == Some(n.as_str())) {
                return false;
            }
        }
        if let Some(want) = &self.state {
            let desired = r.raw(VmField::State).unwrap_or_else(|| "stop".into());
            if desired != *want && st("state").as_deref() != Some(want.as_str()) {
                return false;
            }
        }
        if self.problem && problem_of(r).is_empty() {
            return false;
        }
        true
    }
}

/// What is wrong with a VM, for `vm list` and `status` (empty: nothing).
pub fn problem_of(r: &VmRow) -> String {
    if let Err(e) = &r.vm {
        return format!("INVALID {e}");
    }
    let Some(s) = r.status() else {
        return String::new();
    };
    let state = s.get("state").and_then(Value::as_str).unwrap_or("");
    let error = s.get("error").filter(|e| !e.is_null()).map(str_of);
    match (state, error) {
        ("fail" | "invalid", Some(e)) => format!("{state}: {e}"),
        ("fail" | "invalid", None) => format!("{state}: {}", str_of(&s["reason"])),
        (_, Some(e)) => e,
        _ => String::new(),
    }
}

/// The valid nodes (invalid records cannot take VMs) and the names of all nodes.
async fn read_nodes(store: &Store) -> Result<(Vec<NodeRecord>, Vec<String>), String> {
    let rows = node::nodes(store).await?;
    let names = rows.iter().map(|r| r.name.clone()).collect();
    Ok((
        rows.into_iter().filter_map(|r| r.node.ok()).collect(),
        names,
    ))
}

fn opt_str(v: Option<String>) -> Value {
    v.map(Value::String).unwrap_or(Value::Null)
}

/// JSON of one VM (`vm list` items, `vm show`).
pub fn vm_json(row: &VmRow) -> Value {
    let lock = row.keys.get(VmField::Lock.suffix()).map(|e| {
        json!({
            "node": String::from_utf8_lossy(&e.value).trim(),
            "lease": format!("{:x}", e.lease),
            "revision": e.mod_revision,
        })
    });
    let metadata = match &row.vm {
        Ok(v) => serde_json::to_value(&v.metadata).unwrap_or(Value::Null),
        Err(_) => row
            .keys
            .get(VmField::Metadata.suffix())
            .map(|e| json_or_string(&e.value))
            .unwrap_or(Value::Null),
    };
    let (field, reason) = match &row.vm {
        Ok(_) => (Value::Null, Value::Null),
        Err(e) => (Value::from(e.field.clone()), Value::from(e.reason.clone())),
    };
    json!({
        "uuid": row.uuid,
        "name": row.name,
        "valid": row.vm.is_ok(),
        "error": row.vm.as_ref().err().map(|e| e.to_string()),
        "error_field": field,
        "error_reason": reason,
        "state": opt_str(row.raw(VmField::State)),
        "node": opt_str(row.raw(VmField::Node)),
        "owner": opt_str(row.raw(VmField::Owner)),
        "last_node": opt_str(row.raw(VmField::LastNode)),
        "metadata": metadata,
        "lock": lock,
        "status": row.status(),
        "stats": row.stats.as_deref().map(json_or_string),
        "xml": opt_str(row.raw(VmField::Xml)),
    })
}

/// The `vm list` table.
pub fn list_table(rows: &[VmRow]) -> String {
    let mut t = vec![[
        "NAME", "UUID", "STATE", "STATUS", "NODE", "OWNER", "PROBLEM",
    ]
    .map(String::from)
    .to_vec()];
    for r in rows {
        let v = vm_json(r);
        let problem = problem_of(r);
        let status = v["status"]
            .get("state")
            .map(str_of)
            .unwrap_or_else(|| "-".into());
        t.push(vec![
            str_of(&v["name"]),
            r.uuid.clone(),
            str_of(&v["state"]),
            status,
            str_of(&v["node"]),
            str_of(&v["owner"]),
            problem,
        ]);
    }
    output::table(&t)
}

/// A VM's metadata as fields (autostart, migration, placement, protection).
pub fn meta_text(m: &Value) -> String {
    let yes = |v: &Value| if v == &Value::Bool(true) { "yes" } else { "no" }.to_string();
    let limit = match m["node_limit"].as_array() {
        Some(a) if !a.is_empty() => a.iter().map(str_of).collect::<Vec<_>>().join(", "),
        _ => "any node".into(),
    };
    let downtime = match m["migration_max_downtime"].as_u64() {
        Some(ms) => format!("{ms} ms"),
        None => "node default (domains.migration_max_downtime)".into(),
    };
    output::fields(
        &[
            ("autostart".into(), yes(&m["autostart"])),
            (
                "migration".into(),
                format!(
                    "{}, max downtime {downtime}",
                    str_of(&m["migration_method"])
                ),
            ),
            ("node selector".into(), str_of(&m["node_selector"])),
            ("node limit".into(), limit),
            ("protected".into(), yes(&m["protected"])),
            ("ha group".into(), str_of(&m["ha_group"])),
        ],
        4,
    )
}

/// A VM's stats record (`vmstats/<uuid>`) as fields: running, CPU % of one core, memory,
/// vCPUs, and when and by whom it was sampled (it is rewritten only when it moves).
pub fn stats_text(s: &Value) -> String {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let cpu = match s["cpu_pct"].as_u64() {
        Some(p) => format!("{p} % of one core"),
        None => "not sampled yet".into(),
    };
    output::fields(
        &[
            (
                "active".into(),
                if s["active"] == true { "yes" } else { "no" }.into(),
            ),
            ("CPU".into(), cpu),
            (
                "memory".into(),
                format!(
                    "{} of {}",
                    output::mib(n("memory_kib") / 1024),
                    output::mib(n("max_memory_kib") / 1024)
                ),
            ),
            ("vCPUs".into(), n("vcpus").to_string()),
            (
                "sampled".into(),
                format!("{} on {}", str_of(&s["at"]), str_of(&s["node"])),
            ),
        ],
        4,
    )
}

/// `vm show` for a person: state and status first, placement and lock, metadata and stats
/// as fields, then the XML (`-o json` has everything raw).
pub fn show_text(v: &Value) -> String {
    let mut out = format!("VM {} ({})\n", str_of(&v["name"]), str_of(&v["uuid"]));
    let mut f: Vec<(String, String)> = Vec::new();
    if v["valid"] != true {
        f.push(("INVALID".into(), str_of(&v["error"])));
    }
    let status = &v["status"];
    let status_text = match status {
        Value::Object(_) => {
            let mut s = format!(
                "{} on {}",
                str_of(&status["state"]),
                str_of(&status["node"])
            );
            if let Some(since) = status["since"].as_str() {
                match output::ago(since) {
                    Some(a) => s.push_str(&format!(" for {}", a.trim_end_matches(" ago"))),
                    None => s.push_str(&format!(" since {since}")),
                }
            }
            if !status["reason"].is_null() && status["reason"] != "" {
                s.push_str(&format!(" ({})", str_of(&status["reason"])));
            }
            if !status["error"].is_null() {
                s.push_str(&format!("\nerror: {}", str_of(&status["error"])));
            }
            s
        }
        Value::Null => "none reported yet".into(),
        other => str_of(other),
    };
    f.push(("desired".into(), str_of(&v["state"])));
    f.push(("status".into(), status_text));
    f.push(("node".into(), str_of(&v["node"])));
    f.push(("owner".into(), str_of(&v["owner"])));
    f.push((
        "lock".into(),
        if v["lock"].is_null() {
            "none".to_string()
        } else {
            format!(
                "{} (lease {}, fencing token {})",
                str_of(&v["lock"]["node"]),
                str_of(&v["lock"]["lease"]),
                v["lock"]["revision"]
            )
        },
    ));
    f.push(("last node".into(), str_of(&v["last_node"])));
    out.push_str(&output::fields(&f, 2));
    match &v["metadata"] {
        m @ Value::Object(_) => {
            out.push_str("  metadata\n");
            out.push_str(&meta_text(m));
        }
        other => out.push_str(&format!("  metadata  {}\n", str_of(other))),
    }
    match &v["stats"] {
        s @ Value::Object(_) => {
            out.push_str("  stats\n");
            out.push_str(&stats_text(s));
        }
        Value::Null => out.push_str("  stats     none reported yet\n"),
        other => out.push_str(&format!("  stats     {}\n", str_of(other))),
    }
    out.push_str("xml:\n");
    for l in str_of(&v["xml"]).lines() {
        out.push_str(&format!("  {l}\n"));
    }
    out
}

// ---------------------------------------------------------------------------------------
// meta
// ---------------------------------------------------------------------------------------

/// The metadata `a` makes of `m` (pure; validation happens on the VM as a whole).
pub fn apply_meta(m: &Metadata, a: &MetaArgs) -> Result<Metadata, String> {
    let mut m = m.clone();
    if let Some(x) = a.autostart {
        m.autostart = x;
    }
    if let Some(x) = a.method {
        m.migration_method = x.into();
    }
    if let Some(d) = &a.max_downtime {
        m.migration_max_downtime = match d.trim() {
            "default" | "" => None,
            n => Some(n.parse::<u64>().map_err(|_| {
                format!("invalid metadata.migration_max_downtime (--max-downtime): {n:?} is not a number of milliseconds or `default`")
            })?),
        };
    }
    if let Some(x) = a.selector {
        m.node_selector = x.into();
    }
    if a.no_limit {
        m.node_limit.clear();
    } else if !a.limit.is_empty() {
        m.node_limit = a.limit.clone();
    }
    if let Some(x) = a.protected {
        m.protected = x;
    }
    if let Some(g) = &a.ha_group {
        m.ha_group = Some(g.trim().to_string()).filter(|g| !g.is_empty());
    }
    Ok(m)
}

/// `vm meta`: returns `{uuid, name, metadata, changed, revision}`.
pub async fn set_meta(store: &Store, a: &MetaArgs) -> Result<Value, String> {
    if a.is_empty() {
        return Err("nothing to change: give at least one of --autostart, --method, --max-downtime, --selector, --limit/--no-limit, --protected, --ha-group".into());
    }
    for _ in 0..3 {
        let (rows, _) = read_vms(store).await?;
        let row = resolve(&rows, &a.vm)?;
        let vm = require_valid(row, "meta")?;
        let m = apply_meta(&vm.metadata, a)?;
        let json = serde_json::to_string(&m).map_err(|e| e.to_string())?;
        let mut would_be = row.keys.clone();
        would_be.insert(VmField::Metadata.suffix().into(), entry(json.as_bytes()));
        parse_vm(&row.uuid, &would_be).map_err(|e| invalid(&e))?;
        let base = json!({ "uuid": row.uuid, "name": row.name, "metadata": m });
        if m == vm.metadata {
            let mut v = base;
            v["changed"] = Value::Bool(false);
            return Ok(v);
        }
        let key = vm_key(&row.uuid, VmField::Metadata);
        let t = TxnBuilder::new()
            .mod_revision_is(&key, row.rev(VmField::Metadata))
            .mod_revision_is(&vm_key(&row.uuid, VmField::Xml), row.rev(VmField::Xml))
            .put(&key, json);
        let r = store.txn(t).await.map_err(crate::ctl::etcd_error)?;
        if r.succeeded() {
            let mut v = base;
            v["changed"] = Value::Bool(true);
            v["revision"] = Value::from(r.header().map_or(0, |h| h.revision()));
            return Ok(v);
        }
    }
    Err(format!(
        "VM {}: its metadata changed while this command ran (three times); nothing written; run it again",
        a.vm
    ))
}

// ---------------------------------------------------------------------------------------
// define / undefine
// ---------------------------------------------------------------------------------------

/// Does the domain XML declare a `<uuid>`? (Well-formedness and the rest are checked by
/// [`xml_identity`] afterwards.)
fn xml_has_uuid(xml: &str) -> bool {
    roxmltree::Document::parse(xml)
        .map(|d| d.root_element().children().any(|c| c.has_tag_name("uuid")))
        .unwrap_or(true)
}

/// Insert `<uuid>` right after the domain's `<name>` element, indented like it.
pub fn insert_uuid(xml: &str, uuid: &str) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| format!("invalid xml: not well-formed XML: {e}"))?;
    let name = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("name"))
        .ok_or("invalid xml: no <name>")?;
    let indent = name
        .prev_sibling()
        .and_then(|s| s.text())
        .filter(|t| t.trim().is_empty())
        .unwrap_or("");
    let end = name.range().end;
    let mut out = String::with_capacity(xml.len() + 64);
    out.push_str(&xml[..end]);
    out.push_str(indent);
    out.push_str(&format!("<uuid>{uuid}</uuid>"));
    out.push_str(&xml[end..]);
    Ok(out)
}

/// A random (version 4) UUID for a VM whose XML has none, lowercase and hyphenated as
/// libvirt prints it.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// The option that sets a validated VM field.
fn flag_of(field: &str) -> &'static str {
    match field {
        "xml" | "uuid" => "FILE",
        "node" => "--node",
        "state" => "--stopped",
        "metadata.migration_method" => "--method",
        "metadata.migration_max_downtime" => "--max-downtime",
        "metadata.node_selector" => "--selector",
        f if f.starts_with("metadata.node_limit") => "--limit",
        _ => "",
    }
}

/// A VM validation error as the operator reads it.
fn invalid(e: &ObjectError) -> String {
    match flag_of(&e.field) {
        "" => format!("invalid {}: {}", e.field, e.reason),
        flag => format!("invalid {} ({flag}): {}", e.field, e.reason),
    }
}

fn entry(value: &[u8]) -> KeyEntry {
    KeyEntry {
        value: value.to_vec(),
        mod_revision: 0,
        lease: 0,
    }
}

/// What `policy` (the `domains.xml_policy` of the configuration `debvisorctl` read) says of a
/// VM's XML, as a warning: the nodes judge by their own configuration, so the CLI does not
/// refuse, it tells the operator what a node with this policy will report.
pub fn policy_warning(xml: &str, policy: &XmlPolicy) -> Option<String> {
    check_policy(xml, policy).err().map(|e| {
        format!(
            "{}: {} (by this configuration's domains.xml_policy; a node with the same policy \
             marks the VM invalid and does not define it)",
            e.field, e.reason
        )
    })
}

/// `vm define`: returns `{uuid, name, node, state, metadata, uuid_generated}` (or
/// `{uuid, name, replaced}` with `--replace`), plus `policy_warning` when `policy` refuses the
/// XML (written all the same: see [`policy_warning`]).
pub async fn define(store: &Store, a: &DefineArgs, policy: &XmlPolicy) -> Result<Value, String> {
    let text = std::fs::read_to_string(&a.file)
        .map_err(|e| format!("FILE {}: cannot read: {e}", a.file.display()))?;
    let warning = policy_warning(&text, policy);
    let mut v = define_text(store, a, text).await?;
    if let (Some(w), Value::Object(m)) = (warning, &mut v) {
        m.insert("policy_warning".into(), Value::String(w));
    }
    Ok(v)
}

/// `vm define` of the XML `text` read from `a.file`.
async fn define_text(store: &Store, a: &DefineArgs, text: String) -> Result<Value, String> {
    // Without a <uuid> a new one is inserted (`--replace` uses the replaced VM's instead).
    let generated = !xml_has_uuid(&text);
    let xml = if generated {
        insert_uuid(&text, &new_uuid())?
    } else {
        text.clone()
    };
    let (uuid, name) = xml_identity(&xml).map_err(|e| invalid(&e))?;
    if !valid_uuid(&uuid) {
        return Err(format!(
            "invalid xml (FILE): <uuid> {uuid} is not a canonical UUID (8-4-4-4-12 hex digits)"
        ));
    }
    if a.replace {
        return replace(store, &text, generated, &name, &uuid).await;
    }
    // The cluster config's vm_defaults fill in what the flags leave open.
    let defaults = crate::ctl::config_sync::vm_defaults(store)
        .await?
        .unwrap_or_default();
    let mut metadata = Metadata {
        autostart: a.autostart || defaults.autostart.unwrap_or(false),
        node_limit: a.limit.clone(),
        migration_max_downtime: defaults.migration_max_downtime,
        ..Metadata::default()
    };
    if let Some(m) = defaults.migration_method {
        metadata.migration_method = m;
    }
    if let Some(s) = defaults.node_selector {
        metadata.node_selector = s;
    }
    if let Some(m) = a.method {
        metadata.migration_method = m.into();
    }
    if let Some(s) = a.selector {
        metadata.node_selector = s.into();
    }
    for (i, n) in a.limit.iter().enumerate() {
        if !schema::valid_node_name(n) {
            return Err(format!(
                "invalid metadata.node_limit[{i}] (--limit): {n:?} is not a node name"
            ));
        }
    }
    let (nodes, names) = read_nodes(store).await?;
    let node = match &a.node {
        Some(n) => {
            check_node_name(n).map_err(|e| format!("--node: {e}"))?;
            if !names.iter().any(|x| x == n) {
                return Err(format!(
                    "invalid node (--node): node {n:?} not found under {}/{} (known: {})",
                    store.prefix(),
                    schema::NODES_PREFIX,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ));
            }
            if !a.limit.is_empty() && !a.limit.contains(n) {
                return Err(format!(
                    "invalid node (--node): {n} is not in --limit [{}]",
                    a.limit.join(", ")
                ));
            }
            n.clone()
        }
        None => placement::select_target(&metadata, None, &nodes)
            .map_err(|e| format!("no --node given and none can be chosen: {e}"))?,
    };
    let metadata_json = serde_json::to_string(&metadata).map_err(|e| e.to_string())?;
    let state = if a.stopped {
        DesiredState::Stop
    } else {
        DesiredState::Start
    };
    let puts: Vec<(VmField, Vec<u8>)> = vec![
        (VmField::Xml, xml.clone().into_bytes()),
        (VmField::Node, node.clone().into_bytes()),
        (VmField::Metadata, metadata_json.clone().into_bytes()),
        (VmField::State, state.as_str().as_bytes().to_vec()),
    ];
    let would_be: Keys = puts
        .iter()
        .map(|(f, v)| (f.suffix().to_string(), entry(v)))
        .collect();
    parse_vm(&uuid, &would_be).map_err(|e| invalid(&e))?;
    for _ in 0..3 {
        let (rows, rev) = read_vms(store).await?;
        if let Some(r) = rows.iter().find(|r| r.uuid == uuid) {
            return Err(format!(
                "VM {} ({uuid}) already exists; to change its XML use `vm define --replace {}`",
                r.label(),
                a.file.display()
            ));
        }
        if let Some(r) = rows.iter().find(|r| r.name.as_deref() == Some(&name)) {
            return Err(format!(
                "invalid xml (FILE): name {name:?} is already used by VM {}; to change that VM's XML use `vm define --replace {}` (its <uuid> must be {} or absent), else rename the domain",
                r.uuid,
                a.file.display(),
                r.uuid
            ));
        }
        // Guard: the VM does not exist, and no VM key was created since the read (no VM
        // with this name appeared meanwhile).
        let compares = vec![
            Compare::create_revision(store.abs(&vm_key(&uuid, VmField::Xml)), CompareOp::Equal, 0),
            Compare::create_revision(store.abs(VMS_PREFIX), CompareOp::Less, rev + 1).with_prefix(),
        ];
        let ops = puts
            .iter()
            .map(|(f, v)| TxnOp::put(store.abs(&vm_key(&uuid, *f)), v.clone(), None))
            .collect::<Vec<_>>();
        if raw_txn(store, Txn::new().when(compares).and_then(ops))
            .await?
            .is_some()
        {
            return Ok(json!({
                "uuid": uuid,
                "name": name,
                "node": node,
                "state": state.as_str(),
                "metadata": metadata,
                "uuid_generated": generated,
            }));
        }
    }
    Err(
        "VMs were defined by someone else while this command ran (three times); run it again"
            .to_string(),
    )
}

/// `vm define --replace`: only `xml` changes, guarded on its mod revision.
async fn replace(
    store: &Store,
    text: &str,
    generated: bool,
    name: &str,
    uuid: &str,
) -> Result<Value, String> {
    let (rows, _) = read_vms(store).await?;
    let target = if generated {
        resolve(&rows, name).map_err(|e| format!("--replace: {e}"))?
    } else {
        match rows.iter().find(|r| r.uuid == uuid) {
            Some(r) => r,
            None => {
                return Err(match rows.iter().find(|r| r.name.as_deref() == Some(name)) {
                    Some(r) => format!(
                        "invalid xml (FILE): <uuid> {uuid} does not match the UUID {} of VM {name}; a VM's UUID cannot change",
                        r.uuid
                    ),
                    None => format!(
                        "--replace: VM {uuid} does not exist; define it without --replace"
                    ),
                })
            }
        }
    };
    let xml = if generated {
        insert_uuid(text, &target.uuid)?
    } else {
        text.to_string()
    };
    if let Some(other) = rows
        .iter()
        .find(|r| r.uuid != target.uuid && r.name.as_deref() == Some(name))
    {
        return Err(format!(
            "invalid xml (FILE): name {name:?} is already used by VM {}",
            other.uuid
        ));
    }
    let mut would_be = target.keys.clone();
    would_be.insert(VmField::Xml.suffix().into(), entry(xml.as_bytes()));
    if let Err(e) = parse_vm(&target.uuid, &would_be) {
        return Err(if e.field == "xml" || e.field == "uuid" {
            invalid(&e)
        } else {
            let key = e.field.split(['.', '[']).next().unwrap_or(&e.field);
            format!(
                "VM {} would stay invalid: {e} (existing key {VMS_PREFIX}{}/{key}; fix it first)",
                target.label(),
                target.uuid
            )
        });
    }
    let t = TxnBuilder::new()
        .mod_revision_is(
            &vm_key(&target.uuid, VmField::Xml),
            target.rev(VmField::Xml),
        )
        .put(&vm_key(&target.uuid, VmField::Xml), xml.into_bytes());
    let r = store.txn(t).await.map_err(crate::ctl::etcd_error)?;
    if !r.succeeded() {
        return Err(format!(
            "VM {}: its xml was changed or removed by someone else while this command ran; nothing written",
            target.label()
        ));
    }
    Ok(json!({ "uuid": target.uuid, "name": name, "replaced": true }))
}

/// Status states during which a VM counts as running for `undefine`.
const RUNNING: [&str; 4] = ["running", "starting", "migrating", "shutting-down"];

/// `vm undefine`: returns `{uuid, name, deleted}`.
pub async fn undefine(store: &Store, arg: &str, force: bool) -> Result<Value, String> {
    let (rows, _) = read_vms(store).await?;
    let row = resolve(&rows, arg)?;
    let status = row.status();
    let st = status
        .as_ref()
        .and_then(|s| s.get("state"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if !force && RUNNING.contains(&st) {
        return Err(format!(
            "VM {} is {st} on {} (status); stop it first (`vm stop {} --wait`) or use --force",
            row.label(),
            status
                .as_ref()
                .map(|s| str_of(&s["node"]))
                .unwrap_or_default(),
            row.label()
        ));
    }
    if let (false, Some(holder)) = (force, row.raw(VmField::Lock)) {
        return Err(format!(
            "VM {} holds the run lock of {holder} (it may be running there); stop it first (`vm stop {} --wait`) or use --force",
            row.label(),
            row.label()
        ));
    }
    let prefix = format!("{VMS_PREFIX}{}/", row.uuid);
    let mut compares = vec![];
    for f in [VmField::Xml, VmField::Status, VmField::State, VmField::Lock] {
        compares.push(Compare::mod_revision(
            store.abs(&vm_key(&row.uuid, f)),
            CompareOp::Equal,
            row.rev(f),
        ));
    }
    let txn = Txn::new().when(compares).and_then(vec![
        TxnOp::delete(store.abs(&prefix), Some(DeleteOptions::new().with_prefix())),
        TxnOp::delete(store.abs(&vm_stats_key(&row.uuid)), None),
    ]);
    if raw_txn(store, txn).await?.is_none() {
        return Err(format!(
            "VM {} changed while this command ran (xml, state or status); nothing deleted; run it again",
            row.label()
        ));
    }
    Ok(json!({ "uuid": row.uuid, "name": row.name, "deleted": row.keys.len() }))
}

/// Run a raw transaction; the revision it committed at, or `None` when a compare failed.
async fn raw_txn(store: &Store, txn: Txn) -> Result<Option<i64>, String> {
    let mut client = store.client();
    let timeout = store.request_timeout();
    match tokio::time::timeout(timeout, client.txn(txn)).await {
        Ok(Ok(r)) if r.succeeded() => Ok(Some(r.header().map_or(0, |h| h.revision()))),
        Ok(Ok(_)) => Ok(None),
        Ok(Err(e)) => Err(crate::ctl::etcd_error(
            debvisor_objects::StoreError::Request {
                op: "txn",
                message: debvisor_objects::store::error_chain(&e),
            },
        )),
        Err(_) => Err(crate::ctl::etcd_error(
            debvisor_objects::StoreError::Timeout { op: "txn", timeout },
        )),
    }
}

// ---------------------------------------------------------------------------------------
// State changes
// ---------------------------------------------------------------------------------------

/// A desired-state verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Start,
    Stop,
    Shutdown,
    Restart,
    Disable,
}

impl Verb {
    fn state(self) -> DesiredState {
        match self {
            Verb::Start => DesiredState::Start,
            Verb::Stop => DesiredState::Stop,
            Verb::Shutdown => DesiredState::Shutdown,
            Verb::Restart => DesiredState::Restart,
            Verb::Disable => DesiredState::Disable,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Verb::Start => "start",
            Verb::Stop => "stop",
            Verb::Shutdown => "shutdown",
            Verb::Restart => "restart",
            Verb::Disable => "disable",
        }
    }
}

/// What a `--wait` waits for: `status.state` is `state`, written by `node` when given (and
/// `owner` is `node` when `owner` is set), the desired state reads `desired` when given,
/// `status.since` is later than `since_after` when given (restart), and no node holds the
/// run lock when `unlocked` is set (stop: a "stopped" from a node that does not own the VM
/// says nothing about the node that runs it; the owner releases the lock once it is down).
#[derive(Debug, Clone, PartialEq)]
pub struct Goal {
    /// Wanted `status.state`.
    pub state: &'static str,
    /// Node that must have written the status.
    pub node: Option<String>,
    /// `owner` must be `node` too (migrations).
    pub owner: bool,
    /// Wanted desired state (the node rewrites `restart` to `start`).
    pub desired: Option<DesiredState>,
    /// `status.since` must be later than this.
    pub since_after: Option<OffsetDateTime>,
    /// The run lock must be gone.
    pub unlocked: bool,
}

impl Goal {
    fn describe(&self) -> String {
        let state = self.state;
        match (&self.node, self.owner) {
            (Some(n), true) => format!("be {state} on {n} (owner {n})"),
            (Some(n), false) => format!("be {state} on {n}"),
            (None, _) => format!("be {state}"),
        }
    }

    /// Has the VM reached the goal?
    pub fn reached(&self, keys: &Keys) -> bool {
        let Goal {
            state,
            node,
            owner,
            desired,
            since_after,
            unlocked,
        } = self;
        if *unlocked && keys.contains_key(VmField::Lock.suffix()) {
            return false;
        }
        let Some(status) = status_of(keys) else {
            return false;
        };
        if status.get("state").and_then(Value::as_str) != Some(state) {
            return false;
        }
        if let Some(n) = node {
            if status.get("node").and_then(Value::as_str) != Some(n.as_str()) {
                return false;
            }
            if *owner && raw_of(keys, VmField::Owner).as_deref() != Some(n.as_str()) {
                return false;
            }
        }
        if let Some(d) = desired {
            if raw_of(keys, VmField::State).as_deref() != Some(d.as_str()) {
                return false;
            }
        }
        if let Some(t) = since_after {
            match since(&status) {
                Some(s) if s > *t => {}
                _ => return false,
            }
        }
        true
    }
}

fn raw_of(keys: &Keys, f: VmField) -> Option<String> {
    keys.get(f.suffix())
        .map(|e| String::from_utf8_lossy(&e.value).trim().to_string())
}

fn since(status: &Value) -> Option<OffsetDateTime> {
    status
        .get("since")
        .and_then(Value::as_str)
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
}

/// Refuse to ask a node to run an invalid VM: it would only report it invalid.
fn require_valid<'a>(row: &'a VmRow, what: &str) -> Result<&'a Vm, String> {
    row.vm.as_ref().map_err(|e| {
        format!(
            "VM {} is invalid: {e}; fix it before `vm {what}` (`vm define --replace`)",
            row.label()
        )
    })
}

async fn set_state(
    store: &Store,
    arg: &str,
    verb: Verb,
    wait: &WaitArgs,
    json_out: bool,
) -> Result<String, Failure> {
    let mut committed = None;
    for _ in 0..3 {
        let (rows, _) = read_vms(store).await?;
        let row = resolve(&rows, arg)?.clone();
        let mut target = row.raw(VmField::Node).filter(|n| !n.is_empty());
        let mut since_after = None;
        match verb {
            Verb::Start | Verb::Restart => {
                let vm = require_valid(&row, verb.name())?;
                target = vm.node.clone();
                if verb == Verb::Restart {
                    if vm.state != DesiredState::Start {
                        return Err(format!(
                            "VM {} is not meant to run (state {}); use `vm start`",
                            row.label(),
                            vm.state
                        )
                        .into());
                    }
                    since_after = Some(
                        row.status()
                            .as_ref()
                            .and_then(since)
                            .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                    );
                }
                if target.is_none() {
                    return Err(format!(
                        "VM {} has no node to run on ({} is empty)",
                        row.label(),
                        vm_key(&row.uuid, VmField::Node)
                    )
                    .into());
                }
            }
            Verb::Stop | Verb::Shutdown | Verb::Disable => {}
        }
        let state_key = vm_key(&row.uuid, VmField::State);
        let t = TxnBuilder::new()
            .mod_revision_is(&vm_key(&row.uuid, VmField::Xml), row.rev(VmField::Xml))
            .mod_revision_is(&state_key, row.rev(VmField::State))
            .put(&state_key, verb.state().as_str());
        let r = store.txn(t).await.map_err(crate::ctl::etcd_error)?;
        if r.succeeded() {
            let rev = r.header().map_or(0, |h| h.revision());
            let goal = match verb {
                Verb::Start => Goal {
                    state: "running",
                    node: target,
                    owner: false,
                    desired: None,
                    since_after: None,
                    unlocked: false,
                },
                Verb::Restart => Goal {
                    state: "running",
                    node: target,
                    owner: false,
                    desired: Some(DesiredState::Start),
                    since_after,
                    unlocked: false,
                },
                Verb::Stop | Verb::Shutdown => Goal {
                    state: "stopped",
                    node: None,
                    owner: false,
                    desired: None,
                    since_after: None,
                    unlocked: true,
                },
                Verb::Disable => Goal {
                    state: "disabled",
                    node: None,
                    owner: false,
                    desired: None,
                    since_after: None,
                    unlocked: true,
                },
            };
            committed = Some((row, rev, goal));
            break;
        }
    }
    let Some((row, rev, goal)) = committed else {
        return Err(format!(
            "VM {arg}: its xml or state changed while this command ran (three times); run it again"
        )
        .into());
    };
    let requested = json!({
        "uuid": row.uuid,
        "name": row.name,
        "state": verb.state().as_str(),
        "revision": rev,
    });
    finish(
        store,
        &row,
        rev,
        goal,
        wait,
        json_out,
        requested,
        format!("state {} requested", verb.state()),
    )
    .await
}

/// Print the request, or wait for the goal and print the outcome.
#[allow(clippy::too_many_arguments)]
async fn finish(
    store: &Store,
    row: &VmRow,
    rev: i64,
    goal: Goal,
    wait: &WaitArgs,
    json_out: bool,
    requested: Value,
    what: String,
) -> Result<String, Failure> {
    let label = row.label();
    if !wait.wait {
        return Ok(if json_out {
            format!("{requested}\n")
        } else {
            format!("VM {label}: {what}\n")
        });
    }
    let keys = wait_vm(store, &row.uuid, &label, rev, &goal, wait.timeout, json_out).await?;
    let status = status_of(&keys).unwrap_or(Value::Null);
    let mut v = requested;
    v["status"] = status.clone();
    v["owner"] = opt_str(raw_of(&keys, VmField::Owner));
    Ok(if json_out {
        format!("{v}\n")
    } else {
        format!(
            "VM {label}: {} on {}\n",
            str_of(&status["state"]),
            str_of(&status["node"])
        )
    })
}

/// Why a status written after the request ends the wait at once.
fn failed(keys: &Keys, rev: i64) -> Option<String> {
    let e = keys.get(VmField::Status.suffix())?;
    if e.mod_revision <= rev {
        return None;
    }
    let s = json_or_string(&e.value);
    let state = s.get("state").and_then(Value::as_str)?;
    if state != "fail" && state != "invalid" {
        return None;
    }
    let mut msg = format!("status {state} on {}", str_of(&s["node"]));
    if !s["reason"].is_null() && s["reason"] != "" {
        msg.push_str(&format!(": {}", str_of(&s["reason"])));
    }
    if !s["error"].is_null() {
        msg.push_str(&format!(" (error: {})", str_of(&s["error"])));
    }
    Some(msg)
}

/// One progress line of a VM wait: its reported status (state, node, reason, error), owner
/// and lock, as they are now.
pub fn vm_progress(keys: &Keys) -> String {
    let mut line = match status_of(keys) {
        Some(s @ Value::Object(_)) => {
            let mut l = format!("status {} on {}", str_of(&s["state"]), str_of(&s["node"]));
            if !s["reason"].is_null() && s["reason"] != "" {
                l.push_str(&format!(" ({})", str_of(&s["reason"])));
            }
            if !s["error"].is_null() {
                l.push_str(&format!(", error: {}", str_of(&s["error"])));
            }
            l
        }
        Some(other) => format!("status {}", str_of(&other)),
        None => "no status reported yet".into(),
    };
    line.push_str(&format!(
        "; desired {}, owner {}, lock {}",
        raw_of(keys, VmField::State).unwrap_or_else(|| "-".into()),
        raw_of(keys, VmField::Owner).unwrap_or_else(|| "-".into()),
        raw_of(keys, VmField::Lock).unwrap_or_else(|| "none".into())
    ));
    line
}

/// Why the node that should act may not be acting (for a wait that timed out): it is not
/// registered, not alive, not in `run`, or says why it is degraded.
async fn node_context(store: &Store, node: Option<&str>) -> Option<String> {
    let node = node?;
    let rows = node::nodes(store).await.ok()?;
    let Some(row) = rows.iter().find(|r| r.name == node) else {
        return Some(format!("node {node} is not registered"));
    };
    let n = match &row.node {
        Ok(n) => n,
        Err(e) => return Some(format!("node {node}'s keys are invalid: {e}")),
    };
    if !n.alive {
        return Some(format!(
            "node {node} is not alive (no lease{})",
            n.status_reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ));
    }
    if n.daemon_state != Some(debvisor_objects::node::DaemonState::Run) {
        return Some(format!(
            "node {node}'s daemon is {}, not run",
            n.daemon_state.map_or("-", |s| s.as_str())
        ));
    }
    match (&n.status, &n.status_reason) {
        (Some(st), Some(why)) => Some(format!("node {node} is {st}: {why}")),
        _ => None,
    }
}

/// Follow `vms/<uuid>/` until `goal`, a failure written after `rev`, removal, or timeout,
/// printing each change of the VM's status as it happens; a timeout names what the node
/// reported (status reason and error) and why its node may not be acting.
#[allow(clippy::too_many_arguments)]
async fn wait_vm(
    store: &Store,
    uuid: &str,
    label: &str,
    rev: i64,
    goal: &Goal,
    timeout: Duration,
    json_out: bool,
) -> Result<Keys, Failure> {
    let prefix = format!("{VMS_PREFIX}{uuid}/");
    let mut progress = crate::ctl::wait::Progress::new();
    let r = follow(store, &prefix, timeout, |keys| {
        if !keys.contains_key(VmField::Xml.suffix()) {
            return Some(Err(format!(
                "VM {label} was undefined while waiting for it to {}",
                goal.describe()
            )));
        }
        progress.show(vm_progress(keys));
        if goal.reached(keys) {
            return Some(Ok(()));
        }
        failed(keys, rev).map(|m| Err(format!("VM {label} failed: {m}")))
    })
    .await?;
    let report = |keys: &Keys| {
        json!({
            "uuid": uuid,
            "name": label,
            "state": opt_str(raw_of(keys, VmField::State)),
            "owner": opt_str(raw_of(keys, VmField::Owner)),
            "status": status_of(keys),
        })
    };
    match r {
        Followed::Done(Ok(()), keys) => Ok(keys),
        Followed::Done(Err(msg), keys) => Err(Failure {
            message: msg,
            stdout: json_out.then(|| format!("{}\n", report(&keys))),
        }),
        Followed::TimedOut(keys) => {
            let mut v = report(&keys);
            let acting = goal.node.clone().or_else(|| raw_of(&keys, VmField::Node));
            let context = node_context(store, acting.as_deref()).await;
            let mut message = format!(
                "timed out after {} waiting for VM {label} to {}; now: {}",
                humantime(timeout),
                goal.describe(),
                vm_progress(&keys)
            );
            if let Some(c) = &context {
                message.push_str(&format!("; {c}"));
                v["node_problem"] = Value::from(c.clone());
            }
            Err(Failure {
                message,
                stdout: json_out.then(|| format!("{v}\n")),
            })
        }
    }
}

// ---------------------------------------------------------------------------------------
// Migration
// ---------------------------------------------------------------------------------------

/// A migration decided from one read: what to write and what it is guarded on.
#[derive(Debug, Clone, PartialEq)]
pub struct MigratePlan {
    /// The VM.
    pub uuid: String,
    /// Its name.
    pub name: String,
    /// Node it is leaving (its `node` key).
    pub from: Option<String>,
    /// Node it goes to.
    pub target: String,
    /// `migrate` or `migrate-live`.
    pub state: DesiredState,
    /// Mod revision of `node` at the read (0: absent).
    pub node_rev: i64,
    /// Mod revision of `state` at the read.
    pub state_rev: i64,
}

fn check_running_for_move(row: &VmRow, vm: &Vm, what: &str) -> Result<(), String> {
    match vm.state {
        DesiredState::Start => Ok(()),
        DesiredState::Migrate | DesiredState::MigrateLive | DesiredState::Unmigrate => {
            Err(format!(
                "VM {} is already moving (state {}); wait for it to finish",
                row.label(),
                vm.state
            ))
        }
        s => Err(format!(
            "VM {} is not running (state {s}); `vm {what}` moves running VMs",
            row.label()
        )),
    }
}

/// A VM whose node (or owner) is dead but not fenced may still run there: moving it could
/// run it twice. Refused until the primary has fenced the node (and recovers it itself).
fn check_not_on_dead_node(vm: &Vm, nodes: &[NodeRecord], verb: &str) -> Result<(), String> {
    for name in [vm.node.as_deref(), vm.owner.as_deref()]
        .into_iter()
        .flatten()
    {
        let Some(n) = nodes.iter().find(|n| n.name == name) else {
            continue;
        };
        let down = !n.alive
            && !matches!(
                n.daemon_state,
                Some(DaemonState::Fenced) | Some(DaemonState::Stop)
            );
        if down {
            return Err(format!(
                "cannot {verb} VM {}: its node {name} is down (daemon_state {}) and not fenced, so the guest may still run there; the primary fences the node and recovers its VMs (see `debvisorctl status`)",
                vm.name,
                n.daemon_state.map(|s| s.as_str()).unwrap_or("missing")
            ));
        }
    }
    Ok(())
}

/// Decide a migration from a read of the VMs and nodes (pure).
pub fn plan_migrate(
    rows: &[VmRow],
    nodes: &[NodeRecord],
    node_names: &[String],
    arg: &str,
    live: bool,
    target: Option<&str>,
) -> Result<MigratePlan, String> {
    let row = resolve(rows, arg)?;
    let vm = require_valid(row, "migrate")?;
    check_running_for_move(row, vm, "migrate")?;
    check_not_on_dead_node(vm, nodes, "migrate")?;
    let current = vm.node.as_deref().or(vm.owner.as_deref());
    let target = match target {
        Some(t) => {
            check_node_name(t).map_err(|e| format!("--target: {e}"))?;
            let Some(n) = nodes.iter().find(|n| n.name == t) else {
                return Err(if node_names.iter().any(|n| n == t) {
                    format!("--target {t}: the node's record is invalid (see `node show {t}`)")
                } else {
                    format!("--target {t}: no such node")
                });
            };
            placement::check(&vm.metadata, current, n, false)
                .map_err(|e| format!("--target {t}: {e}"))?;
            t.to_string()
        }
        None => placement::select_target(&vm.metadata, current, nodes)
            .map_err(|e| format!("no target node for VM {}: {e}", row.label()))?,
    };
    Ok(MigratePlan {
        uuid: row.uuid.clone(),
        name: row.label(),
        from: current.map(str::to_string),
        target,
        state: if live {
            DesiredState::MigrateLive
        } else {
            DesiredState::Migrate
        },
        node_rev: row.rev(VmField::Node),
        state_rev: row.rev(VmField::State),
    })
}

/// Write `node` = target and `state` = migrate[-live] in one transaction guarded on the
/// revisions the plan read. `Ok(None)`: someone changed `node` or `state` in between.
pub async fn commit_migrate(store: &Store, p: &MigratePlan) -> Result<Option<i64>, String> {
    let node_key = vm_key(&p.uuid, VmField::Node);
    let state_key = vm_key(&p.uuid, VmField::State);
    let t = TxnBuilder::new()
        .mod_revision_is(&node_key, p.node_rev)
        .mod_revision_is(&state_key, p.state_rev)
        .put(&node_key, p.target.as_str())
        .put(&state_key, p.state.as_str());
    let r = store.txn(t).await.map_err(crate::ctl::etcd_error)?;
    Ok(r.succeeded()
        .then(|| r.header().map_or(0, |h| h.revision())))
}

async fn migrate(
    store: &Store,
    arg: &str,
    live: bool,
    target: Option<&str>,
    wait: &WaitArgs,
    json_out: bool,
) -> Result<String, Failure> {
    let (rows, _) = read_vms(store).await?;
    let (nodes, names) = read_nodes(store).await?;
    let plan = plan_migrate(&rows, &nodes, &names, arg, live, target)?;
    let Some(rev) = commit_migrate(store, &plan).await? else {
        return Err(format!(
            "VM {}: its node or state changed while this command ran; nothing written; check `vm show {}` and run it again",
            plan.name, plan.name
        )
        .into());
    };
    let row = resolve(&rows, arg)?;
    let requested = json!({
        "uuid": plan.uuid,
        "name": plan.name,
        "state": plan.state.as_str(),
        "from": plan.from,
        "target": plan.target,
        "revision": rev,
    });
    let goal = Goal {
        state: "running",
        node: Some(plan.target.clone()),
        owner: true,
        desired: None,
        since_after: None,
        unlocked: false,
    };
    let what = format!(
        "{} from {} to {} requested",
        plan.state,
        plan.from.as_deref().unwrap_or("-"),
        plan.target
    );
    finish(store, row, rev, goal, wait, json_out, requested, what).await
}

async fn unmigrate(
    store: &Store,
    arg: &str,
    wait: &WaitArgs,
    json_out: bool,
) -> Result<String, Failure> {
    let (rows, _) = read_vms(store).await?;
    let row = resolve(&rows, arg)?;
    let vm = require_valid(row, "unmigrate")?;
    let Some(back) = vm.last_node.clone() else {
        return Err(format!(
            "VM {} has no last_node: it has not been migrated, there is nowhere to return it to",
            row.label()
        )
        .into());
    };
    check_running_for_move(row, vm, "unmigrate")?;
    if vm.node.as_deref() == Some(back.as_str()) {
        return Err(format!("VM {} is already on its last_node {back}", row.label()).into());
    }
    let (nodes, _) = read_nodes(store).await?;
    let Some(n) = nodes.iter().find(|n| n.name == back) else {
        return Err(format!("VM {}: last_node {back} is not a valid node", row.label()).into());
    };
    placement::check(&vm.metadata, vm.node.as_deref(), n, false)
        .map_err(|e| format!("VM {}: last_node {back}: {e}", row.label()))?;
    let state_key = vm_key(&row.uuid, VmField::State);
    let t = TxnBuilder::new()
        .mod_revision_is(&state_key, row.rev(VmField::State))
        .mod_revision_is(&vm_key(&row.uuid, VmField::Node), row.rev(VmField::Node))
        .mod_revision_is(
            &vm_key(&row.uuid, VmField::LastNode),
            row.rev(VmField::LastNode),
        )
        .put(&state_key, DesiredState::Unmigrate.as_str());
    let r = store.txn(t).await.map_err(crate::ctl::etcd_error)?;
    if !r.succeeded() {
        return Err(format!(
            "VM {}: its state, node or last_node changed while this command ran; nothing written",
            row.label()
        )
        .into());
    }
    let rev = r.header().map_or(0, |h| h.revision());
    let requested = json!({
        "uuid": row.uuid,
        "name": row.name,
        "state": "unmigrate",
        "target": back,
        "revision": rev,
    });
    let goal = Goal {
        state: "running",
        node: Some(back.clone()),
        owner: true,
        desired: None,
        since_after: None,
        unlocked: false,
    };
    let what = format!("unmigrate back to {back} requested");
    finish(store, row, rev, goal, wait, json_out, requested, what).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const U1: &str = "8f3c2a1e-5b7d-4c9a-9e1f-0a2b3c4d5e6f";
    const U2: &str = "00000000-0000-4000-8000-000000000002";

    fn xml(uuid: &str, name: &str) -> String {
        format!("<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid></domain>")
    }

    fn keys(pairs: &[(&str, &str)], rev: i64) -> Keys {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    KeyEntry {
                        value: v.as_bytes().to_vec(),
                        mod_revision: rev,
                        lease: 0,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn uuids_are_generated_v4_and_inserted_after_the_name() {
        let u = new_uuid();
        assert!(valid_uuid(&u), "{u}");
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]), "{u}");
        assert_ne!(u, new_uuid());
        let x = "<domain type='kvm'>\n  <name>web</name>\n  <memory>1</memory>\n</domain>";
        assert!(!xml_has_uuid(x));
        let with = insert_uuid(x, U1).expect("insert");
        assert_eq!(
            with,
            format!(
                "<domain type='kvm'>\n  <name>web</name>\n  <uuid>{U1}</uuid>\n  <memory>1</memory>\n</domain>"
            )
        );
        assert!(xml_has_uuid(&with));
        assert_eq!(
            xml_identity(&with).expect("valid"),
            (U1.to_string(), "web".to_string())
        );
        assert!(insert_uuid("<domain type='kvm'/>", U1)
            .expect_err("no name")
            .contains("<name>"));
        assert!(insert_uuid("<domain", U1)
            .expect_err("broken")
            .contains("well-formed"));
    }

    #[test]
    fn vms_resolve_by_uuid_or_unique_name() {
        let rows = vec![
            VmRow::new(U1.into(), keys(&[("xml", &xml(U1, "web"))], 1)),
            VmRow::new(U2.into(), keys(&[("xml", &xml(U2, "db"))], 1)),
        ];
        assert_eq!(resolve(&rows, "web").map(|r| r.uuid.as_str()), Ok(U1));
        assert_eq!(
            resolve(&rows, &U2.to_ascii_uppercase()).map(|r| r.uuid.as_str()),
            Ok(U2)
        );
        assert!(resolve(&rows, "nope")
            .expect_err("none")
            .contains("not found"));
        // Two VMs with one name (only possible by writing etcd by hand): ambiguous.
        let u3 = "00000000-0000-4000-8000-000000000003";
        let mut rows = rows;
        rows.push(VmRow::new(u3.into(), keys(&[("xml", &xml(u3, "web"))], 1)));
        let e = resolve(&rows, "web").expect_err("ambiguous");
        assert!(
            e.contains("ambiguous") && e.contains(U1) && e.contains(u3),
            "{e}"
        );
        // An invalid VM still has its name when the XML declares one.
        let bad = VmRow::new(
            U1.into(),
            keys(&[("xml", &xml(U1, "web")), ("state", "running")], 1),
        );
        assert_eq!(bad.name.as_deref(), Some("web"));
        assert_eq!(
            bad.vm.as_ref().map_err(|e| e.field.as_str()).err(),
            Some("state")
        );
    }

    #[test]
    fn goals_and_failures() {
        let status = |s: &str, node: &str, since: &str| {
            format!(
                r#"{{"state":"{s}","since":"{since}","reason":"","error":null,"node":"{node}"}}"#
            )
        };
        let goal = Goal {
            state: "running",
            node: Some("hv2".into()),
            owner: true,
            desired: None,
            since_after: None,
            unlocked: false,
        };
        let t0 = "2026-11-23T10:00:00Z";
        assert!(!goal.reached(&keys(&[("status", &status("running", "hv1", t0))], 5)));
        assert!(!goal.reached(&keys(
            &[("status", &status("running", "hv2", t0)), ("owner", "hv1")],
            5
        )));
        assert!(goal.reached(&keys(
            &[("status", &status("running", "hv2", t0)), ("owner", "hv2")],
            5
        )));
        let restart = Goal {
            state: "running",
            node: None,
            owner: false,
            desired: Some(DesiredState::Start),
            since_after: OffsetDateTime::parse(t0, &Rfc3339).ok(),
            unlocked: false,
        };
        let k = |since: &str, state: &str| {
            keys(
                &[
                    ("status", &status("running", "hv1", since)),
                    ("state", state),
                ],
                5,
            )
        };
        assert!(!restart.reached(&k(t0, "start")), "same since");
        assert!(!restart.reached(&k("2026-11-23T10:00:05Z", "restart")));
        assert!(restart.reached(&k("2026-11-23T10:00:05Z", "start")));
        let stop = Goal {
            state: "stopped",
            node: None,
            owner: false,
            desired: None,
            since_after: None,
            unlocked: true,
        };
        let stopped = status("stopped", "hv2", t0);
        assert!(!stop.reached(&keys(&[("status", &stopped), ("lock", "hv1")], 5)));
        assert!(stop.reached(&keys(&[("status", &stopped)], 5)));
        // Fail-fast only on a failure written after the request.
        let f = keys(&[("status", &status("fail", "hv1", t0))], 5);
        assert_eq!(failed(&f, 5), None);
        assert!(failed(&f, 4).is_some_and(|m| m.contains("status fail on hv1")));
        let inv = keys(
            &[(
                "status",
                r#"{"state":"invalid","error":"xml: no <name>","node":"hv1"}"#,
            )],
            9,
        );
        assert!(failed(&inv, 4).is_some_and(|m| m.contains("xml: no <name>")));
        let ok = keys(&[("status", &status("stopped", "hv1", t0))], 9);
        assert_eq!(failed(&ok, 4), None);
    }
}
