//! `debvisorctl network …`: operate client networks under `networks/<vni>/…`.
//!
//! Every write follows one pattern: read the network's keys at revision R, plan the change
//! (pure), validate the *would-be* key set with [`parse_network`] (the same function the
//! nodes use, so the CLI refuses exactly what the nodes would mark in error, with the field
//! named), and commit in one etcd transaction guarded by "no operator key of this network
//! (`spec`, `reservations/…`, `acl/…`) changed after R". A lost race is retried once from
//! a fresh read; a second loss is reported. Status (`status/<node>`) and lease (`leases/<mac>`)
//! keys are reports written by nodes; they never take part in a guard, so a busy DHCP server
//! cannot make operator commands fail.
//!
//! `network remove` deletes *everything* under `networks/<vni>/` (spec, reservations, ACL
//! rules, and the nodes' status and lease reports) with one ranged delete in one
//! transaction. The nodes see the spec vanish and tear the network down; leaving their
//! reports behind would leave keys that no live object owns (a node that is down at removal
//! time would never clean its own), and a later `network add` of the same VNI would show
//! stale status and leases.
//!
//! Known limit: the overlap check against *other* networks reads them at R but does not
//! guard them in the transaction (etcd cannot compare "no new spec anywhere under
//! `networks/`" without also tripping on every status write). Two concurrent `add`s of
//! overlapping prefixes can both pass; the nodes' reconciler applies
//! [`network::overlapping`] again and marks the later network in error.

use std::collections::BTreeMap;
use std::net::IpAddr;

use debvisor_objects::network::{
    self, acl_key, parse_mac, parse_network, reservation_key, spec_key, AclAction, AclProto,
    AclRaw, DhcpSpec, Direction, FamilySpec, Network, NetworkSpecRaw, NetworkType, ReservationRaw,
    NETWORKS_PREFIX, VNI_MAX,
};
use debvisor_objects::{KeyEntry, Kv, ObjectError, Store};
use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use serde_json::{json, Map, Value};

use crate::ctl::output::{self, json_or_string, str_of, Output};
use debvisor_objects::reactor::ObjectKeys as Keys;

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

/// Network type argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TypeArg {
    /// VXLAN over the cluster network, gateway and DHCP on the primary.
    Managed,
    /// VLAN on the bridge device; no gateway, no DHCP.
    Bridged,
}

impl From<TypeArg> for NetworkType {
    fn from(t: TypeArg) -> Self {
        match t {
            TypeArg::Managed => NetworkType::Managed,
            TypeArg::Bridged => NetworkType::Bridged,
        }
    }
}

/// ACL direction argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DirArg {
    /// Towards the guests.
    In,
    /// From the guests.
    Out,
}

impl From<DirArg> for Direction {
    fn from(d: DirArg) -> Self {
        match d {
            DirArg::In => Direction::In,
            DirArg::Out => Direction::Out,
        }
    }
}

/// ACL action argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ActionArg {
    Accept,
    Drop,
    Reject,
}

/// ACL protocol argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
    Icmp,
}

/// A spec field that `network set --unset` clears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnsetField {
    Description,
    Mtu,
    Domain,
    NameServers,
    /// The whole IPv4 family (network and gateway).
    Ipv4,
    Gateway4,
    /// The whole IPv6 family (network and gateway).
    Ipv6,
    Gateway6,
}

impl UnsetField {
    fn flag(self) -> &'static str {
        match self {
            UnsetField::Description => "--description",
            UnsetField::Mtu => "--mtu",
            UnsetField::Domain => "--domain",
            UnsetField::NameServers => "--name-server",
            UnsetField::Ipv4 => "--ipv4",
            UnsetField::Gateway4 => "--gateway4",
            UnsetField::Ipv6 => "--ipv6",
            UnsetField::Gateway6 => "--gateway6",
        }
    }
}

/// Spec fields shared by `network add` and `network set`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SpecArgs {
    /// Free text (at most 256 characters).
    #[arg(long)]
    pub description: Option<String>,
    /// Requested MTU, 576..=9216 (managed networks are clamped to the cluster MTU − 50).
    #[arg(long, value_name = "N")]
    pub mtu: Option<u32>,
    /// DNS domain served by dnsmasq.
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Name server handed out by DHCP (repeat for several; on `set` replaces the list).
    #[arg(long = "name-server", value_name = "IP")]
    pub name_servers: Vec<String>,
    /// IPv4 network, e.g. 10.1.0.0/24.
    #[arg(long, value_name = "CIDR")]
    pub ipv4: Option<String>,
    /// IPv4 gateway inside --ipv4 (managed only), held by the primary.
    #[arg(long, value_name = "IP")]
    pub gateway4: Option<String>,
    /// IPv6 network, e.g. fd00:1::/64.
    #[arg(long, value_name = "CIDR")]
    pub ipv6: Option<String>,
    /// IPv6 gateway inside --ipv6 (managed only).
    #[arg(long, value_name = "IP")]
    pub gateway6: Option<String>,
    /// Serve DHCPv4 (managed only; needs --gateway4, --dhcp4-start and --dhcp4-end).
    #[arg(long)]
    pub dhcp4: bool,
    /// First address of the DHCPv4 dynamic range.
    #[arg(long, value_name = "IP")]
    pub dhcp4_start: Option<String>,
    /// Last address of the DHCPv4 dynamic range.
    #[arg(long, value_name = "IP")]
    pub dhcp4_end: Option<String>,
}

/// `network add`.
#[derive(Debug, Clone, clap::Args)]
pub struct AddArgs {
    /// VXLAN id (managed, 1..=16777215) or VLAN id (bridged, 1..=4094).
    pub vni: String,
    /// Network type.
    #[arg(long = "type", value_enum)]
    pub kind: TypeArg,
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// `network set`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetArgs {
    /// The network.
    pub vni: String,
    /// Change the network type.
    #[arg(long = "type", value_enum)]
    pub kind: Option<TypeArg>,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Stop serving DHCPv4 (the range is kept for a later --dhcp4).
    #[arg(long, conflicts_with = "dhcp4")]
    pub no_dhcp4: bool,
    /// Clear a field (repeatable).
    #[arg(long, value_enum, value_name = "FIELD")]
    pub unset: Vec<UnsetField>,
}

/// `network acl add`.
#[derive(Debug, Clone, clap::Args)]
pub struct AclAddArgs {
    /// The network.
    pub vni: String,
    /// Direction: in (towards guests) or out (from guests).
    #[arg(value_enum)]
    pub direction: DirArg,
    /// Position of the rule; rules apply in numeric order.
    #[arg(long, value_name = "N")]
    pub order: u32,
    /// What to do with a match.
    #[arg(long, value_enum)]
    pub action: ActionArg,
    /// Protocol (needed for --port).
    #[arg(long, value_enum)]
    pub proto: Option<ProtoArg>,
    /// Source prefix.
    #[arg(long, value_name = "CIDR")]
    pub source: Option<String>,
    /// Destination prefix.
    #[arg(long, value_name = "CIDR")]
    pub destination: Option<String>,
    /// Destination port or range a-b (tcp/udp).
    #[arg(long, value_name = "P")]
    pub port: Option<String>,
    /// Free text (at most 128 printable characters, no quotes).
    #[arg(long)]
    pub description: Option<String>,
}

/// `network dhcp …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DhcpCommand {
    /// Reserve IP for MAC.
    Add {
        vni: String,
        mac: String,
        ip: String,
        /// Host name handed out with the address (one DNS label).
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Remove the reservation of MAC.
    Remove { vni: String, mac: String },
    /// Reservations and current leases.
    List { vni: String },
}

/// `network acl …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AclCommand {
    /// Add a rule at a free order.
    Add(AclAddArgs),
    /// Remove the rule at ORDER.
    Remove {
        vni: String,
        #[arg(value_enum)]
        direction: DirArg,
        order: u32,
    },
    /// Rules in numeric order (both directions unless one is given).
    List {
        vni: String,
        #[arg(value_enum)]
        direction: Option<DirArg>,
    },
}

/// `network …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NetworkCommand {
    /// Define a new network (refused if the VNI exists or a prefix overlaps another network).
    Add(AddArgs),
    /// Change fields of a network's spec.
    Set(SetArgs),
    /// Delete a network and everything under networks/<vni>/ (nodes tear it down).
    Remove { vni: String },
    /// Every network with a per-node status summary.
    List,
    /// Everything about one network: spec, reservations, ACLs, node status, leases.
    Show { vni: String },
    /// DHCP reservations and leases.
    Dhcp {
        #[command(subcommand)]
        command: DhcpCommand,
    },
    /// Per-network firewall rules.
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
}

/// Run one `network` command; returns what to print on stdout.
pub async fn run(store: &Store, cmd: NetworkCommand, output: Output) -> Result<String, String> {
    Ok(match cmd {
        NetworkCommand::Add(a) => {
            let v = add(store, &a).await?;
            let text = format!("network {} added\n", v["vni"]);
            output.render(&v, text)
        }
        NetworkCommand::Set(a) => {
            let v = set(store, &a).await?;
            let text = format!("network {} updated\n", v["vni"]);
            output.render(&v, text)
        }
        NetworkCommand::Remove { vni } => {
            let v = remove(store, &vni).await?;
            let n = v["deleted"].as_u64().unwrap_or(0);
            let text = format!(
                "network {} removed ({n} key{} deleted)\n",
                v["vni"],
                if n == 1 { "" } else { "s" }
            );
            output.render(&v, text)
        }
        NetworkCommand::List => {
            let v = list(store).await?;
            let text = list_table(&v);
            output.render(&v, text)
        }
        NetworkCommand::Show { vni } => {
            let v = show(store, &vni).await?;
            let text = show_text(&v);
            output.render(&v, text)
        }
        NetworkCommand::Dhcp { command } => match command {
            DhcpCommand::Add {
                vni,
                mac,
                ip,
                hostname,
            } => {
                let v = dhcp_add(store, &vni, &mac, &ip, hostname.as_deref()).await?;
                let text = format!(
                    "network {}: {} reserved for {}\n",
                    v["vni"],
                    str_of(&v["ip"]),
                    str_of(&v["mac"])
                );
                output.render(&v, text)
            }
            DhcpCommand::Remove { vni, mac } => {
                let v = dhcp_remove(store, &vni, &mac).await?;
                let text = format!(
                    "network {}: reservation of {} removed\n",
                    v["vni"],
                    str_of(&v["mac"])
                );
                output.render(&v, text)
            }
            DhcpCommand::List { vni } => {
                let v = dhcp_list(store, &vni).await?;
                let text = dhcp_table(&v);
                output.render(&v, text)
            }
        },
        NetworkCommand::Acl { command } => match command {
            AclCommand::Add(a) => {
                let v = acl_add(store, &a).await?;
                let text = format!(
                    "network {}: acl {} {} added\n",
                    v["vni"],
                    str_of(&v["direction"]),
                    v["order"]
                );
                output.render(&v, text)
            }
            AclCommand::Remove {
                vni,
                direction,
                order,
            } => {
                let v = acl_remove(store, &vni, direction.into(), order).await?;
                let text = format!(
                    "network {}: acl {} {} removed\n",
                    v["vni"],
                    str_of(&v["direction"]),
                    v["order"]
                );
                output.render(&v, text)
            }
            AclCommand::List { vni, direction } => {
                let v = acl_list(store, &vni, direction.map(Into::into)).await?;
                let text = acl_table(&v);
                output.render(&v, text)
            }
        },
    })
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// Check a VNI argument: a number in 1..=16777215 (the bridged limit of 4094 is checked
/// with the spec, where the type is known).
pub fn parse_vni(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("vni: {s:?} is not a number in 1..={VNI_MAX}"))?;
    if v == 0 || v > VNI_MAX {
        return Err(format!("vni: {v} is outside 1..={VNI_MAX}"));
    }
    Ok(v)
}

/// `networks/<vni>/`.
fn net_prefix(vni: u32) -> String {
    format!("{NETWORKS_PREFIX}{vni}/")
}

/// A key of the schema's helpers, relative to `networks/<vni>/`.
fn sub_key(vni: u32, full: &str) -> String {
    let p = net_prefix(vni);
    full.strip_prefix(p.as_str()).unwrap_or(full).to_string()
}

/// Group keys under `networks/` by network id; sub-keys are relative to `networks/<id>/`.
fn group(kvs: Vec<Kv>) -> BTreeMap<String, Keys> {
    debvisor_objects::reactor::group_keys(NETWORKS_PREFIX, kvs, |_| true)
}

/// Sort key of network ids: numbers numerically, then anything else.
fn id_order(id: &str) -> (u8, u64, String) {
    match id.parse::<u64>() {
        Ok(n) => (0, n, String::new()),
        Err(_) => (1, 0, id.to_string()),
    }
}

async fn read_network(store: &Store, vni: u32) -> Result<(Keys, i64), String> {
    let (kvs, rev) = store
        .list(&net_prefix(vni))
        .await
        .map_err(crate::ctl::etcd_error)?;
    let mut g = group(kvs);
    Ok((g.remove(&vni.to_string()).unwrap_or_default(), rev))
}

fn not_found(vni: u32) -> String {
    format!("network {vni} not found (no {})", spec_key(vni))
}

/// Sub-keys under `<kind>/` (e.g. `reservations/`), with the rest of the key.
fn under<'a>(keys: &'a Keys, kind: &'a str) -> impl Iterator<Item = (&'a str, &'a KeyEntry)> {
    keys.iter()
        .filter_map(move |(k, e)| k.strip_prefix(kind).map(|r| (r, e)))
}

// ---------------------------------------------------------------------------------------
// Validation messages
// ---------------------------------------------------------------------------------------

/// The command-line argument that sets a validated field.
fn flag_of(field: &str) -> Option<&'static str> {
    let tail = field.rsplit('.').next().unwrap_or(field);
    if field == "vni" {
        return Some("VNI");
    }
    if let Some(spec) = field.strip_prefix("spec") {
        return Some(match spec {
            ".description" => "--description",
            ".mtu" => "--mtu",
            ".domain" => "--domain",
            ".type" => "--type",
            ".ipv4.network" => "--ipv4",
            ".ipv4.gateway" => "--gateway4",
            ".ipv6.network" => "--ipv6",
            ".ipv6.gateway" => "--gateway6",
            ".dhcp4.enabled" => "--dhcp4",
            ".dhcp4.start" => "--dhcp4-start",
            ".dhcp4.end" => "--dhcp4-end",
            s if s.starts_with(".name_servers") => "--name-server",
            _ => return None,
        });
    }
    if field.starts_with("reservations/") {
        return Some(match tail {
            "ip" => "IP",
            "hostname" => "--hostname",
            _ if !field.contains('.') => "MAC",
            _ => return None,
        });
    }
    if field.starts_with("acl/") && field.contains('.') {
        return Some(match tail {
            "port" => "--port",
            "source" => "--source",
            "destination" => "--destination",
            "description" => "--description",
            _ => return None,
        });
    }
    None
}

/// The key a validation field belongs to (`spec`, `reservations/<mac>`, `acl/in/10`).
fn key_of(field: &str) -> &str {
    if field.starts_with("spec") {
        return "spec";
    }
    field.split_once('.').map(|(k, _)| k).unwrap_or(field)
}

/// An operator-facing validation error: the field, the argument that sets it, the reason;
/// and a hint when the culprit is an existing key this command did not touch.
fn invalid(vni: u32, e: &ObjectError, touched: &[String]) -> String {
    let key = key_of(&e.field);
    if e.field != "vni" && !touched.iter().any(|t| t == key) {
        return format!(
            "network {vni} would be invalid: {}: {} (existing key {}{key}; fix or remove it first)",
            e.field,
            e.reason,
            net_prefix(vni)
        );
    }
    match flag_of(&e.field) {
        Some(flag) => format!("invalid {} ({flag}): {}", e.field, e.reason),
        None => format!("invalid {}: {}", e.field, e.reason),
    }
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// A planned change of one network (sub-keys relative to `networks/<vni>/`).
#[derive(Debug, Default)]
struct Change {
    puts: Vec<(String, Vec<u8>)>,
    deletes: Vec<String>,
    /// Keys that must not exist when the transaction runs.
    absent: Vec<String>,
    /// Delete everything under `networks/<vni>/`.
    delete_all: bool,
    /// Check prefix overlaps with every other valid network.
    check_overlap: bool,
}

impl Change {
    fn touched(&self) -> Vec<String> {
        self.puts.iter().map(|(k, _)| k.clone()).collect()
    }
}

/// What a committed change saw and did.
struct Committed {
    /// The network's keys as read just before the committed transaction.
    before: Keys,
    /// The change that was committed.
    change: Change,
}

/// Read, plan, validate, commit; retry once on a lost race.
async fn commit(
    store: &Store,
    vni: u32,
    plan: impl Fn(&Keys) -> Result<Change, String>,
    needs_all: bool,
) -> Result<Committed, String> {
    let id = vni.to_string();
    for _ in 0..2 {
        let read_prefix = if needs_all {
            NETWORKS_PREFIX.to_string()
        } else {
            net_prefix(vni)
        };
        let (kvs, rev) = store
            .list(&read_prefix)
            .await
            .map_err(crate::ctl::etcd_error)?;
        let mut groups = group(kvs);
        let mine = groups.remove(&id).unwrap_or_default();
        let change = plan(&mine)?;
        if !change.delete_all {
            let mut after = mine.clone();
            for k in &change.deletes {
                after.remove(k);
            }
            for (k, v) in &change.puts {
                after.insert(
                    k.clone(),
                    KeyEntry {
                        value: v.clone(),
                        mod_revision: rev + 1,
                        lease: 0,
                    },
                );
            }
            if after.contains_key("spec") && !change.puts.is_empty() {
                let net = parse_network(&id, &after)
                    .and_then(|n| check_reservations(&n).map(|()| n))
                    .map_err(|e| invalid(vni, &e, &change.touched()))?;
                if change.check_overlap {
                    check_overlap(&net, &groups)?;
                }
            }
        }
        if transact(store, vni, rev, &change).await? {
            return Ok(Committed {
                before: mine,
                change,
            });
        }
    }
    Err(format!(
        "network {vni} was changed by someone else while this command ran (twice); run it again"
    ))
}

/// Reservations must not take the gateway or the network address (dnsmasq would hand out
/// an address that is in use or not a host).
/// (A check `parse_network` does not make yet; kept here so the CLI refuses it.)
fn check_reservations(net: &Network) -> Result<(), ObjectError> {
    for r in &net.reservations {
        let field = format!("reservations/{}.ip", r.mac);
        for f in [&net.ipv4, &net.ipv6].into_iter().flatten() {
            if f.gateway == Some(r.ip) {
                return Err(ObjectError::new(
                    &field,
                    format!("{} is the network's gateway", r.ip),
                ));
            }
            if f.network.addr == r.ip {
                return Err(ObjectError::new(
                    &field,
                    format!("{} is the network address of {}", r.ip, f.network),
                ));
            }
        }
    }
    Ok(())
}

/// Refuse a prefix that overlaps one of another valid network.
fn check_overlap(net: &Network, others: &BTreeMap<String, Keys>) -> Result<(), String> {
    for (id, keys) in others {
        let Ok(other) = parse_network(id, keys) else {
            continue;
        };
        if network::overlapping([net, &other]).is_empty() {
            continue;
        }
        for (field, mine) in [("ipv4", &net.ipv4), ("ipv6", &net.ipv6)] {
            let Some(mine) = mine else { continue };
            for theirs in [&other.ipv4, &other.ipv6].into_iter().flatten() {
                if mine.network.overlaps(&theirs.network) {
                    return Err(format!(
                        "invalid spec.{field}.network (--{field}): {} overlaps {} of network {}",
                        mine.network, theirs.network, other.vni
                    ));
                }
            }
        }
    }
    Ok(())
}

/// One transaction: guard "no operator key of the network changed after `rev`" (plus the
/// change's own absence requirements), then the change. Returns whether it committed.
async fn transact(store: &Store, vni: u32, rev: i64, change: &Change) -> Result<bool, String> {
    let base = net_prefix(vni);
    // Guard only the operator's keys: `status/` and `leases/` are node reports.
    let mut compares = vec![
        Compare::mod_revision(store.abs(&spec_key(vni)), CompareOp::Less, rev + 1),
        Compare::mod_revision(
            store.abs(&format!("{base}reservations/")),
            CompareOp::Less,
            rev + 1,
        )
        .with_prefix(),
        Compare::mod_revision(store.abs(&format!("{base}acl/")), CompareOp::Less, rev + 1)
            .with_prefix(),
    ];
    for k in &change.absent {
        compares.push(Compare::create_revision(
            store.abs(&format!("{base}{k}")),
            CompareOp::Equal,
            0,
        ));
    }
    let mut ops = Vec::new();
    if change.delete_all {
        ops.push(TxnOp::delete(
            store.abs(&base),
            Some(DeleteOptions::new().with_prefix()),
        ));
    }
    for k in &change.deletes {
        ops.push(TxnOp::delete(store.abs(&format!("{base}{k}")), None));
    }
    for (k, v) in &change.puts {
        ops.push(TxnOp::put(
            store.abs(&format!("{base}{k}")),
            v.clone(),
            None,
        ));
    }
    let txn = Txn::new().when(compares).and_then(ops);
    let mut client = store.client();
    let timeout = store.request_timeout();
    match tokio::time::timeout(timeout, client.txn(txn)).await {
        Ok(Ok(r)) => Ok(r.succeeded()),
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

/// Serialize a spec without null fields.
fn spec_json(raw: &NetworkSpecRaw) -> Result<Value, String> {
    fn strip(v: &mut Value) {
        if let Value::Object(m) = v {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip);
        }
    }
    let mut v = serde_json::to_value(raw).map_err(|e| format!("encoding the spec: {e}"))?;
    strip(&mut v);
    Ok(v)
}

fn family_mut<'a>(
    fam: &'a mut Option<FamilySpec>,
    flag: &str,
    net_flag: &str,
) -> Result<&'a mut FamilySpec, String> {
    fam.as_mut()
        .ok_or_else(|| format!("{flag}: needs {net_flag} (the network has no such family)"))
}

/// Apply `--unset`, then the given fields, to a spec.
fn apply(
    raw: &mut NetworkSpecRaw,
    s: &SpecArgs,
    unset: &[UnsetField],
    no_dhcp4: bool,
) -> Result<(), String> {
    let given = |u: UnsetField| match u {
        UnsetField::Description => s.description.is_some(),
        UnsetField::Mtu => s.mtu.is_some(),
        UnsetField::Domain => s.domain.is_some(),
        UnsetField::NameServers => !s.name_servers.is_empty(),
        UnsetField::Ipv4 => s.ipv4.is_some() || s.gateway4.is_some(),
        UnsetField::Gateway4 => s.gateway4.is_some(),
        UnsetField::Ipv6 => s.ipv6.is_some() || s.gateway6.is_some(),
        UnsetField::Gateway6 => s.gateway6.is_some(),
    };
    for &u in unset {
        if given(u) {
            return Err(format!(
                "--unset {}: conflicts with {} in the same command",
                u.flag().trim_start_matches("--"),
                u.flag()
            ));
        }
        match u {
            UnsetField::Description => raw.description.clear(),
            UnsetField::Mtu => raw.mtu = None,
            UnsetField::Domain => raw.domain = None,
            UnsetField::NameServers => raw.name_servers.clear(),
            UnsetField::Ipv4 => raw.ipv4 = None,
            UnsetField::Ipv6 => raw.ipv6 = None,
            UnsetField::Gateway4 => {
                if let Some(f) = raw.ipv4.as_mut() {
                    f.gateway = None;
                }
            }
            UnsetField::Gateway6 => {
                if let Some(f) = raw.ipv6.as_mut() {
                    f.gateway = None;
                }
            }
        }
    }
    if let Some(d) = &s.description {
        raw.description = d.clone();
    }
    if let Some(m) = s.mtu {
        raw.mtu = Some(m);
    }
    if let Some(d) = &s.domain {
        raw.domain = Some(d.clone());
    }
    if !s.name_servers.is_empty() {
        raw.name_servers = s.name_servers.clone();
    }
    for (net, gw, fam, net_flag, gw_flag) in [
        (&s.ipv4, &s.gateway4, &mut raw.ipv4, "--ipv4", "--gateway4"),
        (&s.ipv6, &s.gateway6, &mut raw.ipv6, "--ipv6", "--gateway6"),
    ] {
        if let Some(n) = net {
            match fam.as_mut() {
                Some(f) => f.network = n.clone(),
                None => {
                    *fam = Some(FamilySpec {
                        network: n.clone(),
                        gateway: None,
                    })
                }
            }
        }
        if let Some(g) = gw {
            family_mut(fam, gw_flag, net_flag)?.gateway = Some(g.clone());
        }
    }
    if s.dhcp4 {
        raw.dhcp4.enabled = true;
    }
    if no_dhcp4 {
        raw.dhcp4.enabled = false;
    }
    if let Some(v) = &s.dhcp4_start {
        raw.dhcp4.start = Some(v.clone());
    }
    if let Some(v) = &s.dhcp4_end {
        raw.dhcp4.end = Some(v.clone());
    }
    Ok(())
}

/// `network add`: returns `{vni, spec}`.
pub async fn add(store: &Store, a: &AddArgs) -> Result<Value, String> {
    let vni = parse_vni(&a.vni)?;
    if !a.spec.dhcp4 {
        for (flag, v) in [
            ("--dhcp4-start", &a.spec.dhcp4_start),
            ("--dhcp4-end", &a.spec.dhcp4_end),
        ] {
            if v.is_some() {
                return Err(format!("{flag}: needs --dhcp4"));
            }
        }
    }
    let mut raw = NetworkSpecRaw {
        description: String::new(),
        kind: a.kind.into(),
        mtu: None,
        domain: None,
        name_servers: Vec::new(),
        ipv4: None,
        ipv6: None,
        dhcp4: DhcpSpec::default(),
    };
    apply(&mut raw, &a.spec, &[], false)?;
    let spec = spec_json(&raw)?;
    let bytes = spec.to_string().into_bytes();
    commit(
        store,
        vni,
        |keys| {
            if keys.contains_key("spec") {
                return Err(format!(
                    "network {vni} already exists (use `network set {vni}` to change it)"
                ));
            }
            Ok(Change {
                puts: vec![("spec".into(), bytes.clone())],
                absent: vec!["spec".into()],
                check_overlap: true,
                ..Change::default()
            })
        },
        true,
    )
    .await?;
    Ok(json!({ "vni": vni, "spec": spec }))
}

/// `network set`: returns `{vni, spec}` (the new spec).
pub async fn set(store: &Store, a: &SetArgs) -> Result<Value, String> {
    let vni = parse_vni(&a.vni)?;
    let nothing = a.kind.is_none()
        && !a.no_dhcp4
        && a.unset.is_empty()
        && a.spec.description.is_none()
        && a.spec.mtu.is_none()
        && a.spec.domain.is_none()
        && a.spec.name_servers.is_empty()
        && a.spec.ipv4.is_none()
        && a.spec.gateway4.is_none()
        && a.spec.ipv6.is_none()
        && a.spec.gateway6.is_none()
        && !a.spec.dhcp4
        && a.spec.dhcp4_start.is_none()
        && a.spec.dhcp4_end.is_none();
    if nothing {
        return Err("network set: nothing to change (give at least one field)".into());
    }
    let c = commit(
        store,
        vni,
        |keys| {
            let cur = keys.get("spec").ok_or_else(|| not_found(vni))?;
            let mut raw: NetworkSpecRaw = serde_json::from_slice(&cur.value).map_err(|e| {
                format!(
                    "{} holds no valid spec ({e}); `network remove {vni}` and add it again",
                    spec_key(vni)
                )
            })?;
            if let Some(k) = a.kind {
                raw.kind = k.into();
            }
            apply(&mut raw, &a.spec, &a.unset, a.no_dhcp4)?;
            let bytes = spec_json(&raw)?.to_string().into_bytes();
            Ok(Change {
                puts: vec![("spec".into(), bytes)],
                check_overlap: true,
                ..Change::default()
            })
        },
        true,
    )
    .await?;
    let spec = c
        .change
        .puts
        .first()
        .map(|(_, v)| json_or_string(v))
        .unwrap_or(Value::Null);
    Ok(json!({ "vni": vni, "spec": spec }))
}

fn count_kinds(keys: &Keys) -> Value {
    let n = |p: &str| keys.keys().filter(|k| k.starts_with(p)).count();
    json!({
        "spec": n("spec"),
        "reservations": n("reservations/"),
        "acl": n("acl/"),
        "status": n("status/"),
        "leases": n("leases/"),
    })
}

/// `network remove`: deletes everything under `networks/<vni>/` (see the module docs).
pub async fn remove(store: &Store, vni: &str) -> Result<Value, String> {
    let vni = parse_vni(vni)?;
    let c = commit(
        store,
        vni,
        |keys| {
            if keys.is_empty() {
                return Err(not_found(vni));
            }
            Ok(Change {
                delete_all: true,
                ..Change::default()
            })
        },
        false,
    )
    .await?;
    Ok(json!({ "vni": vni, "deleted": c.before.len(), "keys": count_kinds(&c.before) }))
}

/// `network dhcp add`: returns `{vni, mac, ip, hostname}`.
pub async fn dhcp_add(
    store: &Store,
    vni: &str,
    mac: &str,
    ip: &str,
    hostname: Option<&str>,
) -> Result<Value, String> {
    let vni = parse_vni(vni)?;
    let mac = parse_mac(mac).map_err(|e| format!("MAC: {e}"))?;
    let ip_addr: IpAddr = ip
        .parse()
        .map_err(|_| format!("IP: {ip:?} is not an IP address"))?;
    let raw = ReservationRaw {
        ip: ip_addr.to_string(),
        hostname: hostname.map(str::to_string),
    };
    let value = serde_json::to_value(&raw).map_err(|e| e.to_string())?;
    let sub = sub_key(vni, &reservation_key(vni, &mac));
    let bytes = value.to_string().into_bytes();
    commit(
        store,
        vni,
        |keys| {
            if !keys.contains_key("spec") {
                return Err(not_found(vni));
            }
            if let Some(e) = keys.get(&sub) {
                return Err(format!(
                    "MAC: {mac} already has a reservation in network {vni} ({}); remove it first",
                    json_or_string(&e.value)
                ));
            }
            Ok(Change {
                puts: vec![(sub.clone(), bytes.clone())],
                absent: vec![sub.clone()],
                ..Change::default()
            })
        },
        false,
    )
    .await?;
    Ok(json!({ "vni": vni, "mac": mac, "ip": raw.ip, "hostname": raw.hostname }))
}

/// `network dhcp remove`.
pub async fn dhcp_remove(store: &Store, vni: &str, mac: &str) -> Result<Value, String> {
    let vni = parse_vni(vni)?;
    let mac = parse_mac(mac).map_err(|e| format!("MAC: {e}"))?;
    let sub = sub_key(vni, &reservation_key(vni, &mac));
    commit(
        store,
        vni,
        |keys| {
            if !keys.contains_key(&sub) {
                return Err(format!(
                    "MAC: no reservation for {mac} in network {vni} ({} does not exist)",
                    reservation_key(vni, &mac)
                ));
            }
            Ok(Change {
                deletes: vec![sub.clone()],
                ..Change::default()
            })
        },
        false,
    )
    .await?;
    Ok(json!({ "vni": vni, "mac": mac }))
}

/// `network acl add`: returns the rule with `vni`, `direction`, `order`.
pub async fn acl_add(store: &Store, a: &AclAddArgs) -> Result<Value, String> {
    let vni = parse_vni(&a.vni)?;
    let dir: Direction = a.direction.into();
    let rule = AclRaw {
        action: match a.action {
            ActionArg::Accept => AclAction::Accept,
            ActionArg::Drop => AclAction::Drop,
            ActionArg::Reject => AclAction::Reject,
        },
        proto: a.proto.map(|p| match p {
            ProtoArg::Tcp => AclProto::Tcp,
            ProtoArg::Udp => AclProto::Udp,
            ProtoArg::Icmp => AclProto::Icmp,
        }),
        source: a.source.clone(),
        destination: a.destination.clone(),
        port: a.port.clone(),
        description: a.description.clone(),
    };
    let value = spec_json_acl(&rule)?;
    let sub = sub_key(vni, &acl_key(vni, dir, a.order));
    let bytes = value.to_string().into_bytes();
    commit(
        store,
        vni,
        |keys| {
            if !keys.contains_key("spec") {
                return Err(not_found(vni));
            }
            if let Some(e) = keys.get(&sub) {
                return Err(format!(
                    "--order: network {vni} already has acl {dir} rule {} ({}); remove it or choose another order",
                    a.order,
                    json_or_string(&e.value)
                ));
            }
            Ok(Change {
                puts: vec![(sub.clone(), bytes.clone())],
                absent: vec![sub.clone()],
                ..Change::default()
            })
        },
        false,
    )
    .await?;
    let mut out = json!({ "vni": vni, "direction": dir.to_string(), "order": a.order });
    if let (Value::Object(o), Value::Object(r)) = (&mut out, value) {
        o.extend(r);
    }
    Ok(out)
}

fn spec_json_acl(rule: &AclRaw) -> Result<Value, String> {
    let mut v = serde_json::to_value(rule).map_err(|e| format!("encoding the rule: {e}"))?;
    if let Value::Object(m) = &mut v {
        m.retain(|_, x| !x.is_null());
    }
    Ok(v)
}

/// `network acl remove`.
pub async fn acl_remove(
    store: &Store,
    vni: &str,
    dir: Direction,
    order: u32,
) -> Result<Value, String> {
    let vni = parse_vni(vni)?;
    let sub = sub_key(vni, &acl_key(vni, dir, order));
    commit(
        store,
        vni,
        |keys| {
            if !keys.contains_key(&sub) {
                return Err(format!(
                    "ORDER: network {vni} has no acl {dir} rule {order} ({} does not exist)",
                    acl_key(vni, dir, order)
                ));
            }
            Ok(Change {
                deletes: vec![sub.clone()],
                ..Change::default()
            })
        },
        false,
    )
    .await?;
    Ok(json!({ "vni": vni, "direction": dir.to_string(), "order": order }))
}

// ---------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------

/// Per-node status reports, by node.
fn statuses(keys: &Keys) -> Map<String, Value> {
    under(keys, "status/")
        .map(|(node, e)| (node.to_string(), json_or_string(&e.value)))
        .collect()
}

/// "2/2 ready", "1/2 ready (n2: pending)", "error on n1: spec.mtu: …", "no reports".
pub fn status_summary(status: &Map<String, Value>) -> String {
    if status.is_empty() {
        return "no reports".into();
    }
    let state = |v: &Value| -> String {
        v.get("state")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string()
    };
    let errors: Vec<(&String, &Value)> =
        status.iter().filter(|(_, v)| state(v) == "error").collect();
    if let Some((node, v)) = errors.first() {
        let reason = match v.get("error") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => "(no reason given)".into(),
            Some(other) => other.to_string(),
        };
        let more = if errors.len() > 1 {
            format!(" (+{} more)", errors.len() - 1)
        } else {
            String::new()
        };
        return format!("error on {node}: {reason}{more}");
    }
    let ready = status.values().filter(|v| state(v) == "ready").count();
    let mut s = format!("{ready}/{} ready", status.len());
    let others: Vec<String> = status
        .iter()
        .filter(|(_, v)| state(v) != "ready")
        .map(|(n, v)| format!("{n}: {}", state(v)))
        .collect();
    if !others.is_empty() {
        s.push_str(&format!(" ({})", others.join(", ")));
    }
    s
}

fn vni_value(id: &str) -> Value {
    id.parse::<u64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::String(id.to_string()))
}

fn validity(id: &str, keys: &Keys) -> (bool, Value) {
    match parse_network(id, keys) {
        Ok(n) => match check_reservations(&n) {
            Ok(()) => (true, Value::Null),
            Err(e) => (false, Value::String(e.to_string())),
        },
        Err(e) => (false, Value::String(e.to_string())),
    }
}

/// `network list`: one JSON object per network.
pub async fn list(store: &Store) -> Result<Value, String> {
    let (kvs, _) = store
        .list(NETWORKS_PREFIX)
        .await
        .map_err(crate::ctl::etcd_error)?;
    let groups = group(kvs);
    let mut ids: Vec<&String> = groups.keys().collect();
    ids.sort_by_key(|id| id_order(id));
    let mut out = Vec::new();
    for id in ids {
        let keys = &groups[id];
        let spec = keys
            .get("spec")
            .map(|e| json_or_string(&e.value))
            .unwrap_or(Value::Null);
        let (valid, error) = validity(id, keys);
        let status = statuses(keys);
        let n = |p: &str| keys.keys().filter(|k| k.starts_with(p)).count();
        out.push(json!({
            "vni": vni_value(id),
            "valid": valid,
            "error": error,
            "type": spec.get("type").cloned().unwrap_or(Value::Null),
            "description": spec.get("description").cloned().unwrap_or(Value::Null),
            "mtu": spec.get("mtu").cloned().unwrap_or(Value::Null),
            "ipv4": spec.pointer("/ipv4/network").cloned().unwrap_or(Value::Null),
            "gateway4": spec.pointer("/ipv4/gateway").cloned().unwrap_or(Value::Null),
            "ipv6": spec.pointer("/ipv6/network").cloned().unwrap_or(Value::Null),
            "gateway6": spec.pointer("/ipv6/gateway").cloned().unwrap_or(Value::Null),
            "dhcp4": spec.get("dhcp4").cloned().unwrap_or(Value::Null),
            "reservations": n("reservations/"),
            "acl_rules": n("acl/"),
            "leases": n("leases/"),
            "status_summary": status_summary(&status),
            "status": status,
        }));
    }
    Ok(Value::Array(out))
}

fn dhcp_cell(d: &Value) -> String {
    if d.get("enabled").and_then(Value::as_bool) == Some(true) {
        format!("{}-{}", str_of(&d["start"]), str_of(&d["end"]))
    } else {
        "off".into()
    }
}

/// The `network list` table.
pub fn list_table(v: &Value) -> String {
    let mut rows = vec![[
        "VNI",
        "TYPE",
        "IPV4",
        "IPV6",
        "DHCP",
        "MTU",
        "STATUS",
        "DESCRIPTION",
    ]
    .map(String::from)
    .to_vec()];
    for n in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let status = if n["valid"] == Value::Bool(true) {
            str_of(&n["status_summary"])
        } else {
            format!("INVALID: {}", str_of(&n["error"]))
        };
        // Long reasons would push DESCRIPTION off screen; `show` has them in full.
        let status = clip(&status, 72);
        rows.push(vec![
            str_of(&n["vni"]),
            str_of(&n["type"]),
            str_of(&n["ipv4"]),
            str_of(&n["ipv6"]),
            dhcp_cell(&n["dhcp4"]),
            if n["mtu"].is_null() {
                "auto".into()
            } else {
                str_of(&n["mtu"])
            },
            status,
            str_of(&n["description"]),
        ]);
    }
    output::table(&rows)
}

/// Sorted ACL rules of a network as JSON (direction, numeric order).
fn acl_rules(keys: &Keys, only: Option<Direction>) -> Vec<Value> {
    let mut rules: Vec<(String, (u8, u64, String), Value)> = Vec::new();
    for (rest, e) in under(keys, "acl/") {
        let (dir, order) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some(d) = only {
            if dir != d.to_string() {
                continue;
            }
        }
        let mut item = Map::new();
        item.insert("direction".into(), Value::String(dir.to_string()));
        item.insert("order".into(), vni_value(order));
        match json_or_string(&e.value) {
            Value::Object(r) => item.extend(r),
            other => {
                item.insert("raw".into(), other);
            }
        }
        rules.push((dir.to_string(), id_order(order), Value::Object(item)));
    }
    rules.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    rules.into_iter().map(|(_, _, v)| v).collect()
}

fn reservations(keys: &Keys) -> Vec<Value> {
    under(keys, "reservations/")
        .map(|(mac, e)| {
            let mut item = Map::new();
            item.insert("mac".into(), Value::String(mac.to_string()));
            match json_or_string(&e.value) {
                Value::Object(r) => item.extend(r),
                other => {
                    item.insert("raw".into(), other);
                }
            }
            Value::Object(item)
        })
        .collect()
}

fn leases(keys: &Keys, reservations: &[Value]) -> Vec<Value> {
    under(keys, "leases/")
        .map(|(mac, e)| {
            let mut item = Map::new();
            item.insert("mac".into(), Value::String(mac.to_string()));
            match json_or_string(&e.value) {
                Value::Object(r) => {
                    for (k, v) in r {
                        if k != "mac" {
                            item.insert(k, v);
                        }
                    }
                }
                other => {
                    item.insert("raw".into(), other);
                }
            }
            let norm = parse_mac(mac).unwrap_or_else(|_| mac.to_string());
            let res = reservations.iter().find(|r| r["mac"] == norm.as_str());
            item.insert("reserved".into(), Value::Bool(res.is_some()));
            if let Some(r) = res {
                item.insert("reserved_ip".into(), r["ip"].clone());
            }
            Value::Object(item)
        })
        .collect()
}

/// `network show`.
pub async fn show(store: &Store, vni: &str) -> Result<Value, String> {
    let vni = parse_vni(vni)?;
    let (keys, _) = read_network(store, vni).await?;
    if keys.is_empty() {
        return Err(not_found(vni));
    }
    let id = vni.to_string();
    let (valid, error) = validity(&id, &keys);
    let res = reservations(&keys);
    let status = statuses(&keys);
    Ok(json!({
        "vni": vni,
        "valid": valid,
        "error": error,
        "spec": keys.get("spec").map(|e| json_or_string(&e.value)).unwrap_or(Value::Null),
        "reservations": res,
        "acl": {
            "in": acl_rules(&keys, Some(Direction::In)),
            "out": acl_rules(&keys, Some(Direction::Out)),
        },
        "status_summary": status_summary(&status),
        "status": status,
        "leases": leases(&keys, &res),
    }))
}

fn family_text(f: &Value) -> String {
    if f.is_null() {
        return "-".into();
    }
    match f.get("gateway") {
        Some(g) if !g.is_null() => format!("{} gateway {}", str_of(&f["network"]), str_of(g)),
        _ => str_of(&f["network"]),
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

/// A table section of `show`/`dhcp list`: "(none)" instead of a lone header.
fn section(title: &str, rows: &Value, render: impl Fn(&Value) -> String) -> String {
    if rows.as_array().is_none_or(Vec::is_empty) {
        format!("{title}: (none)\n")
    } else {
        format!("{title}:\n{}", indent(&render(rows)))
    }
}

/// `network show` as text.
pub fn show_text(v: &Value) -> String {
    let spec = &v["spec"];
    let mut out = format!("network {}\n", v["vni"]);
    let valid = if v["valid"] == Value::Bool(true) {
        "yes".to_string()
    } else {
        format!("NO: {}", str_of(&v["error"]))
    };
    let ns = spec["name_servers"]
        .as_array()
        .map(|a| a.iter().map(str_of).collect::<Vec<_>>().join(", "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into());
    for (k, val) in [
        ("type", str_of(&spec["type"])),
        ("description", str_of(&spec["description"])),
        ("valid", valid),
        ("status", str_of(&v["status_summary"])),
        (
            "mtu",
            if spec["mtu"].is_null() {
                "auto".into()
            } else {
                str_of(&spec["mtu"])
            },
        ),
        ("domain", str_of(&spec["domain"])),
        ("name servers", ns),
        ("ipv4", family_text(&spec["ipv4"])),
        ("ipv6", family_text(&spec["ipv6"])),
        ("dhcp4", dhcp_cell(&spec["dhcp4"])),
    ] {
        out.push_str(&format!("  {:<13} {val}\n", format!("{k}:")));
    }
    out.push('\n');
    out.push_str(&section(
        "reservations",
        &v["reservations"],
        reservation_table,
    ));
    let mut all = Vec::new();
    for d in ["in", "out"] {
        all.extend(v["acl"][d].as_array().cloned().unwrap_or_default());
    }
    out.push_str(&section("acl", &Value::Array(all), acl_table));
    let status: Vec<Value> = v["status"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(node, s)| json!({ "node": node, "report": s }))
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&section("node status", &Value::Array(status), |rows| {
        let mut t = vec![vec!["NODE".to_string(), "STATE".into(), "REPORT".into()]];
        for r in rows.as_array().map(Vec::as_slice).unwrap_or_default() {
            t.push(vec![
                str_of(&r["node"]),
                str_of(r["report"].get("state").unwrap_or(&Value::Null)),
                r["report"].to_string(),
            ]);
        }
        output::table(&t)
    }));
    out.push_str(&section("leases", &v["leases"], lease_table));
    out
}

/// `network dhcp list`: `{vni, reservations, leases}`.
pub async fn dhcp_list(store: &Store, vni: &str) -> Result<Value, String> {
    let vni = parse_vni(vni)?;
    let (keys, _) = read_network(store, vni).await?;
    if !keys.contains_key("spec") {
        return Err(not_found(vni));
    }
    let res = reservations(&keys);
    Ok(json!({ "vni": vni, "reservations": res, "leases": leases(&keys, &res) }))
}

fn reservation_table(v: &Value) -> String {
    let mut rows = vec![["MAC", "IP", "HOSTNAME"].map(String::from).to_vec()];
    for r in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        rows.push(vec![
            str_of(&r["mac"]),
            if r["ip"].is_null() {
                format!("INVALID: {}", str_of(&r["raw"]))
            } else {
                str_of(&r["ip"])
            },
            str_of(&r["hostname"]),
        ]);
    }
    output::table(&rows)
}

fn lease_table(v: &Value) -> String {
    let mut rows = vec![["MAC", "IP", "HOSTNAME", "EXPIRES", "RESERVED"]
        .map(String::from)
        .to_vec()];
    for l in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let reserved = match (&l["reserved"], &l["reserved_ip"]) {
            (Value::Bool(true), rip) if rip.is_null() || *rip == l["ip"] => "yes".to_string(),
            (Value::Bool(true), rip) => format!("yes (reserved {})", str_of(rip)),
            _ => "no".into(),
        };
        rows.push(vec![
            str_of(&l["mac"]),
            str_of(&l["ip"]),
            str_of(&l["hostname"]),
            str_of(&l["expires"]),
            reserved,
        ]);
    }
    output::table(&rows)
}

/// The `network dhcp list` tables.
pub fn dhcp_table(v: &Value) -> String {
    format!(
        "{}{}",
        section("reservations", &v["reservations"], reservation_table),
        section("leases", &v["leases"], lease_table)
    )
}

/// `network acl list`: an array of rules (direction, then numeric order).
pub async fn acl_list(store: &Store, vni: &str, dir: Option<Direction>) -> Result<Value, String> {
    let vni = parse_vni(vni)?;
    let (keys, _) = read_network(store, vni).await?;
    if !keys.contains_key("spec") {
        return Err(not_found(vni));
    }
    Ok(Value::Array(acl_rules(&keys, dir)))
}

/// The ACL table.
pub fn acl_table(v: &Value) -> String {
    let mut rows = vec![[
        "DIR",
        "ORDER",
        "ACTION",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "PORT",
        "DESCRIPTION",
    ]
    .map(String::from)
    .to_vec()];
    for r in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let action = if r["action"].is_null() {
            format!("INVALID: {}", str_of(&r["raw"]))
        } else {
            str_of(&r["action"])
        };
        rows.push(vec![
            str_of(&r["direction"]),
            str_of(&r["order"]),
            action,
            str_of(&r["proto"]),
            str_of(&r["source"]),
            str_of(&r["destination"]),
            str_of(&r["port"]),
            str_of(&r["description"]),
        ]);
    }
    output::table(&rows)
}

/// At most `n` characters, with "…" when cut.
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(n.saturating_sub(1)).collect();
        c.push('…');
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vni_bounds() {
        assert_eq!(parse_vni("1"), Ok(1));
        assert_eq!(parse_vni("16777215"), Ok(VNI_MAX));
        for bad in ["0", "16777216", "abc", "-1", ""] {
            let e = parse_vni(bad).expect_err(bad);
            assert!(e.starts_with("vni: "), "{e}");
        }
    }

    #[test]
    fn fields_map_to_flags_and_keys() {
        assert_eq!(flag_of("spec.ipv4.gateway"), Some("--gateway4"));
        assert_eq!(flag_of("spec.name_servers[1]"), Some("--name-server"));
        assert_eq!(flag_of("acl/in/10.port"), Some("--port"));
        assert_eq!(flag_of("reservations/52:54:00:00:00:01.ip"), Some("IP"));
        assert_eq!(flag_of("reservations/zz"), Some("MAC"));
        assert_eq!(key_of("spec.dhcp4.start"), "spec");
        assert_eq!(key_of("acl/in/10.port"), "acl/in/10");
        assert_eq!(
            key_of("reservations/52:54:00:00:00:01.ip"),
            "reservations/52:54:00:00:00:01"
        );
    }

    #[test]
    fn apply_sets_and_unsets() {
        let mut raw = NetworkSpecRaw {
            description: "x".into(),
            kind: NetworkType::Managed,
            mtu: Some(1400),
            domain: None,
            name_servers: vec![],
            ipv4: Some(FamilySpec {
                network: "10.0.0.0/24".into(),
                gateway: Some("10.0.0.1".into()),
            }),
            ipv6: None,
            dhcp4: DhcpSpec::default(),
        };
        let s = SpecArgs {
            gateway4: Some("10.0.0.254".into()),
            ..SpecArgs::default()
        };
        apply(&mut raw, &s, &[UnsetField::Mtu], false).expect("apply");
        assert_eq!(raw.mtu, None);
        assert_eq!(
            raw.ipv4.as_ref().and_then(|f| f.gateway.clone()),
            Some("10.0.0.254".into())
        );
        let e = apply(
            &mut raw,
            &SpecArgs {
                gateway6: Some("fd00::1".into()),
                ..SpecArgs::default()
            },
            &[],
            false,
        )
        .expect_err("no ipv6");
        assert!(e.starts_with("--gateway6"), "{e}");
        let e = apply(
            &mut raw,
            &SpecArgs {
                mtu: Some(1500),
                ..SpecArgs::default()
            },
            &[UnsetField::Mtu],
            false,
        )
        .expect_err("conflict");
        assert!(e.contains("--unset mtu"), "{e}");
        let v = spec_json(&raw).expect("json");
        assert!(v.get("mtu").is_none() && v.get("domain").is_none(), "{v}");
    }

    #[test]
    fn summary_of_node_reports() {
        let m = |pairs: &[(&str, Value)]| -> Map<String, Value> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        assert_eq!(status_summary(&Map::new()), "no reports");
        assert_eq!(
            status_summary(&m(&[
                ("n1", json!({"state":"ready"})),
                ("n2", json!({"state":"ready"}))
            ])),
            "2/2 ready"
        );
        assert_eq!(
            status_summary(&m(&[
                ("n1", json!({"state":"ready"})),
                ("n2", json!({"state":"pending"}))
            ])),
            "1/2 ready (n2: pending)"
        );
        assert_eq!(
            status_summary(&m(&[
                ("n1", json!({"state":"error","error":"spec.mtu: too big"})),
                ("n2", json!({"state":"ready"}))
            ])),
            "error on n1: spec.mtu: too big"
        );
    }

    #[test]
    fn tables_align() {
        let t = output::table(&[
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["aaa".into(), "b".into(), "c".into()],
        ]);
        assert_eq!(t, "A    BB  C\naaa  b   c\n");
    }
}
