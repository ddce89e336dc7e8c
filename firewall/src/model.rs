//! The ruleset model: table `inet debvisor`, its base chains and the per-network ACL chains,
//! built from the `firewall:` config and rendered to one atomic nft JSON batch.

use std::borrow::Cow;
use std::collections::HashSet;

use nftables::batch::Batch;
use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, Range, SetItem,
    Verdict, CT,
};
use nftables::schema::{self, NfCmd, NfListObject, Nftables};
use nftables::stmt::{self, JumpTarget, Match, Operator, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::config::{FirewallConfig, PortRange, Proto};
use crate::error::{FirewallError, Location, Problem};
use crate::table::TABLE;

/// libvirt's TLS port (`libvirtd --listen`), allowed from the cluster networks for migration.
pub const LIBVIRT_TLS_PORT: u16 = 16514;

/// Longest description kept in a rule comment (bytes); the kernel caps a rule's user data.
const MAX_DESCRIPTION_BYTES: usize = 200;

/// What an ACL (or a network's default) does with a matching packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclAction {
    /// Let it through this network's ACL (the other network's ACL, if any, still applies).
    #[default]
    Accept,
    /// Drop silently.
    Drop,
    /// Refuse: TCP reset for TCP ACLs, ICMP port-unreachable otherwise.
    Reject,
}

/// Protocol an ACL matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP and ICMPv6 (whichever fits the addresses, both when there are none).
    Icmp,
}

/// One ordered rule of a client network's ACL (PVC's per-network `in`/`out` firewall rules).
///
/// ACLs are evaluated in numeric `order` (not in list order, and not as text: 9 comes before 10);
/// every field left empty matches anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    /// Position among the direction's ACLs; unique per direction.
    pub order: u32,
    /// What to do with a matching packet.
    pub action: AclAction,
    /// Protocol; required when `ports` is set.
    #[serde(default)]
    pub proto: Option<AclProto>,
    /// Source network.
    #[serde(default)]
    pub source: Option<Cidr>,
    /// Destination network (same family as `source` when both are set).
    #[serde(default)]
    pub dest: Option<Cidr>,
    /// Destination ports (TCP/UDP only); empty means any.
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// Shown in the nft rule comment.
    #[serde(default)]
    pub description: Option<String>,
}

/// The firewall view of one client network: its bridge and its inbound/outbound ACLs.
///
/// `in` is traffic forwarded *into* the network (leaving the node through `bridge`), `out` is
/// traffic forwarded *out of* it (arriving through `bridge`). A packet routed between two client
/// networks passes the first network's `out` ACL and then the second's `in` ACL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRules {
    /// The network's VNI (or VLAN id for bridged networks); names the chains `net<vni>-in/out`.
    pub vni: u32,
    /// The network's bridge interface on this node (at most 15 characters).
    pub bridge: String,
    /// ACLs for traffic into the network.
    #[serde(default)]
    pub acls_in: Vec<Acl>,
    /// ACLs for traffic out of the network.
    #[serde(default)]
    pub acls_out: Vec<Acl>,
    /// What happens to inbound traffic no ACL matched.
    #[serde(default)]
    pub default_in: AclAction,
    /// What happens to outbound traffic no ACL matched.
    #[serde(default)]
    pub default_out: AclAction,
    /// Managed networks: let the network's guests reach this node's DHCP (67, DHCPv6 547) and
    /// DNS (53) servers on the bridge; the input chain drops them otherwise.
    #[serde(default)]
    pub dhcp_dns: bool,
}

/// Netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets for this host.
    Input,
    /// Packets routed through this host.
    Forward,
    /// Packets from this host.
    Output,
}

impl Hook {
    /// nft's name of the hook.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
        }
    }
}

/// Base chain policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Accept what no rule decided.
    Accept,
    /// Drop what no rule decided.
    Drop,
}

impl Policy {
    /// nft's name of the policy.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Accept => "accept",
            Policy::Drop => "drop",
        }
    }
}

/// What makes a chain a base chain (type is always `filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    /// Hook.
    pub hook: Hook,
    /// Priority (0 = `filter`).
    pub priority: i32,
    /// Policy.
    pub policy: Policy,
}

/// One rule: its statements plus a description; the comment nft stores carries a content id.
///
/// The id (16 hex digits of a hash of chain, description and statements) is how read-back
/// recognises our rules: nft rewrites expressions when it lists them (merges port ranges, turns
/// `/32` prefixes into addresses…), but keeps comments verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    description: String,
    expr: Vec<Statement<'static>>,
    id: String,
}

impl RuleSpec {
    fn new(chain: &str, description: &str, expr: Vec<Statement<'static>>) -> RuleSpec {
        let description = truncate(description, MAX_DESCRIPTION_BYTES).to_owned();
        let json = serde_json::to_string(&expr).unwrap_or_default();
        let mut h = Fnv::new();
        h.write(chain.as_bytes());
        h.write(&[0]);
        h.write(description.as_bytes());
        h.write(&[0]);
        h.write(json.as_bytes());
        RuleSpec {
            description,
            expr,
            id: format!("{:016x}", h.finish()),
        }
    }

    /// What the rule is for (first part of its nft comment).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Content id (last part of its nft comment).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The nft comment: `"<description> #<id>"`.
    pub fn comment(&self) -> String {
        format!("{} #{}", self.description, self.id)
    }

    /// The rule's statements.
    pub fn expr(&self) -> &[Statement<'static>] {
        &self.expr
    }
}

/// Split a rule comment into (description, id) when it carries one of our ids.
pub(crate) fn parse_comment(comment: &str) -> Option<(&str, &str)> {
    let (desc, id) = comment.rsplit_once(" #")?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some((desc, id))
}

/// A chain of our table, with its rules in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    name: String,
    base: Option<BaseChain>,
    rules: Vec<RuleSpec>,
}

impl ChainSpec {
    fn base(name: &str, hook: Hook, policy: Policy) -> ChainSpec {
        ChainSpec {
            name: name.into(),
            base: Some(BaseChain {
                hook,
                priority: 0,
                policy,
            }),
            rules: Vec::new(),
        }
    }

    fn regular(name: String) -> ChainSpec {
        ChainSpec {
            name,
            base: None,
            rules: Vec::new(),
        }
    }

    fn push(&mut self, description: &str, expr: Vec<Statement<'static>>) {
        let rule = RuleSpec::new(&self.name, description, expr);
        self.rules.push(rule);
    }

    /// Chain name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hook, priority and policy for base chains; `None` for jump targets.
    pub fn base_chain(&self) -> Option<&BaseChain> {
        self.base.as_ref()
    }

    /// The rules, in evaluation order.
    pub fn rules(&self) -> &[RuleSpec] {
        &self.rules
    }
}

/// The whole content of table `inet debvisor`: what one apply installs, atomically.
///
/// Built by [`Ruleset::from_config`], which validates everything first; a `Ruleset` therefore
/// always renders. Pure data: applying it is the job of a [`crate::Firewall`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    chains: Vec<ChainSpec>,
}

impl Ruleset {
    /// Build the node ruleset.
    ///
    /// - `cfg`: the `firewall:` section (validated here again; `enabled` is the caller's
    ///   business: a disabled firewall means [`crate::Firewall::remove`], not an empty ruleset);
    /// - `cluster_cidrs`: the networks other cluster nodes talk from (etcd, migration, libvirt
    ///   TLS and RPC are allowed from these only); empty means a standalone node;
    /// - `networks`: the client networks present on this node.
    pub fn from_config(
        cfg: &FirewallConfig,
        cluster_cidrs: &[Cidr],
        networks: &[NetworkRules],
    ) -> Result<Ruleset, FirewallError> {
        let mut problems: Vec<Problem> = cfg
            .validate("firewall")
            .into_iter()
            .map(|(path, reason)| Problem { path, reason })
            .collect();
        validate_networks(networks, &mut problems);
        let (Some(migration), Some((rate, per))) = (cfg.migration_range(), log_rate(&cfg.log_rate))
        else {
            return Err(FirewallError::Invalid(problems));
        };
        if !problems.is_empty() {
            return Err(FirewallError::Invalid(problems));
        }

        let mut input = ChainSpec::base("input", Hook::Input, Policy::Drop);
        input.push(
            "loopback",
            vec![eq(meta(MetaKey::Iifname), s("lo")), accept()],
        );
        input.push(
            "established and related",
            vec![ct_state_established(), accept()],
        );
        input.push(
            "invalid state",
            vec![ct_state("invalid"), counter(), drop()],
        );
        input.push(
            "icmp and icmpv6 (neighbour discovery)",
            vec![
                eq(meta(MetaKey::L4proto), set(vec![s("icmp"), s("ipv6-icmp")])),
                accept(),
            ],
        );
        input.push(
            "ssh",
            vec![dport("tcp", &[PortRange::single(cfg.ssh_port)]), accept()],
        );

        let mut services = vec![
            ("etcd client", PortRange::single(cfg.etcd_client_port)),
            ("etcd peer", PortRange::single(cfg.etcd_peer_port)),
            ("libvirt tls", PortRange::single(LIBVIRT_TLS_PORT)),
            ("libvirt migration", migration),
        ];
        if cfg.rpc_enabled {
            services.push(("debvisor rpc", PortRange::single(cfg.rpc_port)));
        }
        let cluster = normalize_cidrs(cluster_cidrs);
        for v4 in [true, false] {
            let fam: Vec<Cidr> = cluster
                .iter()
                .copied()
                .filter(|c| c.is_ipv4() == v4)
                .collect();
            if fam.is_empty() {
                continue;
            }
            for (what, ports) in &services {
                let family = if v4 { "ipv4" } else { "ipv6" };
                input.push(
                    &format!("{what} from cluster ({family})"),
                    vec![
                        addr_match(&fam, Dir::Src),
                        dport("tcp", &[*ports]),
                        accept(),
                    ],
                );
            }
        }

        for n in networks {
            if !n.dhcp_dns {
                continue;
            }
            let from_bridge = eq(meta(MetaKey::Iifname), s(&n.bridge));
            input.push(
                &format!("net{} dhcp and dns (udp)", n.vni),
                vec![
                    from_bridge.clone(),
                    dport(
                        "udp",
                        &[
                            PortRange::single(53),
                            PortRange::single(67),
                            PortRange::single(547),
                        ],
                    ),
                    accept(),
                ],
            );
            input.push(
                &format!("net{} dns (tcp)", n.vni),
                vec![
                    from_bridge,
                    dport("tcp", &[PortRange::single(53)]),
                    accept(),
                ],
            );
        }

        for (i, a) in cfg.extra_allow.iter().enumerate() {
            let mut expr = Vec::new();
            if let Some(src) = a.source.as_deref() {
                // Validated above by FirewallConfig::validate.
                let src: Cidr = src.parse().map_err(|reason| {
                    FirewallError::Invalid(vec![Problem {
                        path: format!("firewall.extra_allow[{i}].source"),
                        reason,
                    }])
                })?;
                expr.push(addr_match(&[src], Dir::Src));
            }
            let proto = match a.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            expr.push(dport(proto, &[a.port]));
            expr.push(accept());
            let desc = match &a.comment {
                Some(c) => c.clone(),
                None => format!("extra_allow[{i}] {proto} {}", a.port),
            };
            input.push(&desc, expr);
        }

        input.push(
            "log dropped",
            vec![
                Statement::Limit(stmt::Limit {
                    rate,
                    rate_unit: None,
                    per: Some(per.to_owned().into()),
                    burst: None,
                    burst_unit: None,
                    inv: None,
                }),
                Statement::Log(Some(stmt::Log {
                    prefix: Some(cfg.log_prefix.clone().into()),
                    group: None,
                    snaplen: None,
                    queue_threshold: None,
                    level: None,
                    flags: None,
                })),
            ],
        );
        input.push("drop the rest", vec![counter(), drop()]);

        let mut forward = ChainSpec::base("forward", Hook::Forward, Policy::Drop);
        forward.push(
            "established and related",
            vec![ct_state_established(), accept()],
        );
        forward.push(
            "invalid state",
            vec![ct_state("invalid"), counter(), drop()],
        );
        let mut net_chains = Vec::new();
        if !networks.is_empty() {
            let mut by_vni: Vec<&NetworkRules> = networks.iter().collect();
            by_vni.sort_by_key(|n| n.vni);
            let vmap = |key: MetaKey, suffix: &str| {
                let data = by_vni
                    .iter()
                    .map(|n| {
                        SetItem::Mapping(
                            s(&n.bridge),
                            Expression::Verdict(Verdict::Jump(JumpTarget {
                                target: format!("net{}-{suffix}", n.vni).into(),
                            })),
                        )
                    })
                    .collect();
                Statement::VerdictMap(stmt::VerdictMap {
                    key: meta(key),
                    data: Expression::Named(NamedExpression::Set(data)),
                })
            };
            forward.push(
                "out of a client network: its out acl",
                vec![vmap(MetaKey::Iifname, "out")],
            );
            forward.push(
                "into a client network: its in acl",
                vec![vmap(MetaKey::Oifname, "in")],
            );
            let bridges = || set(by_vni.iter().map(|n| s(&n.bridge)).collect());
            forward.push(
                "passed the client network acls (out)",
                vec![eq(meta(MetaKey::Iifname), bridges()), accept()],
            );
            forward.push(
                "passed the client network acls (in)",
                vec![eq(meta(MetaKey::Oifname), bridges()), accept()],
            );
            for n in by_vni {
                for (dir, acls, default) in [
                    ("in", &n.acls_in, n.default_in),
                    ("out", &n.acls_out, n.default_out),
                ] {
                    let mut chain = ChainSpec::regular(format!("net{}-{dir}", n.vni));
                    let mut ordered: Vec<&Acl> = acls.iter().collect();
                    ordered.sort_by_key(|a| a.order);
                    for a in ordered {
                        let desc = match &a.description {
                            Some(d) => format!("acl {}: {d}", a.order),
                            None => format!("acl {}", a.order),
                        };
                        chain.push(&desc, render_acl(a));
                    }
                    chain.push(
                        &format!("default {}", action_name(default)),
                        vec![counter(), verdict(default, None)],
                    );
                    net_chains.push(chain);
                }
            }
        }

        let output = ChainSpec::base("output", Hook::Output, Policy::Accept);
        let mut chains = vec![input, forward, output];
        chains.extend(net_chains);
        Ok(Ruleset { chains })
    }

    /// Append a rule the model does not express to the end of `chain`.
    ///
    /// An escape hatch for site-specific needs, and how the integration tests make nft reject a
    /// batch (nft, not this crate, judges the statements).
    pub fn add_custom_rule(
        &mut self,
        chain: &str,
        description: &str,
        expr: Vec<Statement<'static>>,
    ) -> Result<(), FirewallError> {
        let mut problems = Vec::new();
        if let Err(reason) = check_text(description, 128) {
            problems.push(Problem {
                path: "custom rule description".into(),
                reason,
            });
        }
        if expr.is_empty() {
            problems.push(Problem {
                path: "custom rule".into(),
                reason: "has no statements".into(),
            });
        }
        let Some(c) = self.chains.iter_mut().find(|c| c.name == chain) else {
            problems.push(Problem {
                path: "custom rule chain".into(),
                reason: format!("no chain named {chain:?}"),
            });
            return Err(FirewallError::Invalid(problems));
        };
        if !problems.is_empty() {
            return Err(FirewallError::Invalid(problems));
        }
        c.push(description, expr);
        Ok(())
    }

    /// The chains (base chains `input`, `forward`, `output` first, then `net<vni>-in/out`).
    pub fn chains(&self) -> &[ChainSpec] {
        &self.chains
    }

    /// The chain named `name`.
    pub fn chain(&self, name: &str) -> Option<&ChainSpec> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Total number of rules.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    /// The apply batch as (command, what it creates) pairs: make sure the table exists, delete
    /// it with all its content, re-add it, every chain, then every rule. nft runs the batch as
    /// one transaction, so the old table stays in force until the new one is complete.
    pub(crate) fn commands(&self) -> Vec<(NfCmd<'static>, Location)> {
        let mut out = vec![
            (NfCmd::Add(NfListObject::Table(table())), Location::Table),
            (NfCmd::Delete(NfListObject::Table(table())), Location::Table),
            (NfCmd::Add(NfListObject::Table(table())), Location::Table),
        ];
        for c in &self.chains {
            let mut chain = schema::Chain {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: c.name.clone().into(),
                ..Default::default()
            };
            if let Some(b) = c.base {
                chain._type = Some(NfChainType::Filter);
                chain.hook = Some(match b.hook {
                    Hook::Input => NfHook::Input,
                    Hook::Forward => NfHook::Forward,
                    Hook::Output => NfHook::Output,
                });
                chain.prio = Some(b.priority);
                chain.policy = Some(match b.policy {
                    Policy::Accept => NfChainPolicy::Accept,
                    Policy::Drop => NfChainPolicy::Drop,
                });
            }
            out.push((
                NfCmd::Add(NfListObject::Chain(chain)),
                Location::Chain {
                    chain: c.name.clone(),
                },
            ));
        }
        for c in &self.chains {
            for (index, r) in c.rules.iter().enumerate() {
                let rule = schema::Rule {
                    family: NfFamily::INet,
                    table: TABLE.into(),
                    chain: c.name.clone().into(),
                    expr: r.expr.clone().into(),
                    handle: None,
                    index: None,
                    comment: Some(r.comment().into()),
                };
                out.push((
                    NfCmd::Add(NfListObject::Rule(rule)),
                    Location::Rule {
                        chain: c.name.clone(),
                        index,
                        description: r.description.clone(),
                    },
                ));
            }
        }
        out
    }

    /// The apply batch (see [`Ruleset::to_json`]).
    pub fn to_batch(&self) -> Nftables<'static> {
        batch_of(self.commands().into_iter().map(|(c, _)| c))
    }

    /// The apply batch as nft JSON, for `nft -j -f -`.
    pub fn to_json(&self) -> Result<String, FirewallError> {
        serde_json::to_string(&self.to_batch()).map_err(|e| FirewallError::Render(e.to_string()))
    }
}

/// The batch removing our table (a no-op when it is absent): `add table` + `delete table`.
pub fn removal_batch() -> Nftables<'static> {
    batch_of([
        NfCmd::Add(NfListObject::Table(table())),
        NfCmd::Delete(NfListObject::Table(table())),
    ])
}

pub(crate) fn batch_of(cmds: impl IntoIterator<Item = NfCmd<'static>>) -> Nftables<'static> {
    let mut b = Batch::new();
    for c in cmds {
        b.add_cmd(c);
    }
    b.to_nftables()
}

fn table() -> schema::Table<'static> {
    schema::Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

fn check_text(s: &str, max: usize) -> Result<(), String> {
    if s.chars().count() > max {
        Err(format!("is longer than {max} characters"))
    } else if s.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        Err(format!("{s:?} contains '\"', '\\' or control characters"))
    } else {
        Ok(())
    }
}

/// Check a Linux interface name as nft will match it (`iifname "…"`): 1–15 bytes, no `/`, `:`,
/// whitespace, quotes, backslashes, and no `*` (nft would read it as a wildcard).
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?}: an interface name has 1 to 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | ':' | '*' | '"' | '\\') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{name:?}: {c:?} is not allowed in an interface name"
        ));
    }
    Ok(())
}

fn validate_networks(networks: &[NetworkRules], problems: &mut Vec<Problem>) {
    let mut vnis = HashSet::new();
    let mut bridges = HashSet::new();
    for (i, n) in networks.iter().enumerate() {
        let mut push = |field: &str, reason: String| {
            problems.push(Problem {
                path: format!("networks[{i}]{field}"),
                reason,
            })
        };
        if !vnis.insert(n.vni) {
            push(".vni", format!("vni {} appears more than once", n.vni));
        }
        match check_ifname(&n.bridge) {
            Err(e) => push(".bridge", e),
            Ok(()) if !bridges.insert(n.bridge.as_str()) => push(
                ".bridge",
                format!("bridge {:?} is used by more than one network", n.bridge),
            ),
            Ok(()) => {}
        }
        for (dir, acls) in [("acls_in", &n.acls_in), ("acls_out", &n.acls_out)] {
            let mut orders = HashSet::new();
            for (j, a) in acls.iter().enumerate() {
                let at = format!(".{dir}[{j}]");
                if !orders.insert(a.order) {
                    push(
                        &format!("{at}.order"),
                        format!("order {} appears more than once", a.order),
                    );
                }
                if !a.ports.is_empty() && !matches!(a.proto, Some(AclProto::Tcp | AclProto::Udp)) {
                    push(&format!("{at}.ports"), "ports need proto tcp or udp".into());
                }
                for p in &a.ports {
                    if p.start == 0 || p.start > p.end {
                        push(
                            &format!("{at}.ports"),
                            format!("{p} is not a valid port range"),
                        );
                    }
                }
                if let (Some(s), Some(d)) = (a.source, a.dest) {
                    if s.is_ipv4() != d.is_ipv4() {
                        push(
                            &at,
                            format!("source {s} and dest {d} are of different families"),
                        );
                    }
                }
                if let Some(Err(e)) = a.description.as_deref().map(|d| check_text(d, 128)) {
                    push(&format!("{at}.description"), e);
                }
            }
        }
    }
}

/// `n/unit` → (n, unit), as validated by `FirewallConfig::validate`.
fn log_rate(s: &str) -> Option<(u32, &str)> {
    let (n, unit) = s.split_once('/')?;
    let n: u32 = n.parse().ok().filter(|n| *n > 0)?;
    ["second", "minute", "hour", "day"]
        .contains(&unit)
        .then_some((n, unit))
}

/// Sorted, deduplicated, without networks contained in another one of the list (nft refuses
/// overlapping intervals in an anonymous set).
fn normalize_cidrs(cidrs: &[Cidr]) -> Vec<Cidr> {
    let mut v: Vec<Cidr> = cidrs.to_vec();
    v.sort();
    v.dedup();
    let all = v.clone();
    v.retain(|c| !all.iter().any(|o| o != c && o.contains(c)));
    v
}

/// Sorted, with overlapping and adjacent ranges merged (same reason as [`normalize_cidrs`]).
fn merge_ports(ports: &[PortRange]) -> Vec<PortRange> {
    let mut v = ports.to_vec();
    v.sort_by_key(|p| (p.start, p.end));
    let mut out: Vec<PortRange> = Vec::new();
    for p in v {
        match out.last_mut() {
            Some(last) if u32::from(p.start) <= u32::from(last.end) + 1 => {
                last.end = last.end.max(p.end)
            }
            _ => out.push(p),
        }
    }
    out
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn action_name(a: AclAction) -> &'static str {
    match a {
        AclAction::Accept => "accept",
        AclAction::Drop => "drop",
        AclAction::Reject => "reject",
    }
}

// ---------------------------------------------------------------------------------------------
// Expression helpers

#[derive(Clone, Copy)]
enum Dir {
    Src,
    Dst,
}

fn s(v: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_owned()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

fn matches(
    left: Expression<'static>,
    right: Expression<'static>,
    op: Operator,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    matches(left, right, Operator::EQ)
}

fn ct_state(state: &str) -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        s(state),
        Operator::IN,
    )
}

fn ct_state_established() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Expression::List(vec![s("established"), s("related")]),
        Operator::IN,
    )
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

fn counter() -> Statement<'static> {
    Statement::Counter(stmt::Counter::Anonymous(None))
}

fn port_expr(p: PortRange) -> Expression<'static> {
    if p.start == p.end {
        Expression::Number(p.start.into())
    } else {
        Expression::Range(Box::new(Range {
            range: [
                Expression::Number(p.start.into()),
                Expression::Number(p.end.into()),
            ],
        }))
    }
}

/// `<proto> dport <port | range | { … }>` (nft adds the `meta l4proto` dependency itself).
fn dport(proto: &'static str, ports: &[PortRange]) -> Statement<'static> {
    let merged = merge_ports(ports);
    let right = match merged.as_slice() {
        [one] => port_expr(*one),
        many => set(many.iter().copied().map(port_expr).collect()),
    };
    eq(payload(proto, "dport"), right)
}

fn prefix(c: &Cidr) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(&c.addr().to_string())),
        len: c.prefix_len().into(),
    }))
}

/// `ip[6] saddr|daddr <prefix | { prefixes }>` for a non-empty list of one family; a `/0` in the
/// list becomes `meta nfproto ipv4|ipv6` (the whole family).
fn addr_match(cidrs: &[Cidr], dir: Dir) -> Statement<'static> {
    let v4 = cidrs.first().is_none_or(Cidr::is_ipv4);
    if cidrs.iter().any(|c| c.prefix_len() == 0) {
        return eq(meta(MetaKey::Nfproto), s(if v4 { "ipv4" } else { "ipv6" }));
    }
    let field = match dir {
        Dir::Src => "saddr",
        Dir::Dst => "daddr",
    };
    let right = match cidrs {
        [one] => prefix(one),
        many => set(many.iter().map(prefix).collect()),
    };
    eq(payload(if v4 { "ip" } else { "ip6" }, field), right)
}

/// The verdict of an ACL or default: accept is `return` (the packet passed *this* network's
/// ACL; the forward chain accepts it once every ACL on its way has passed).
fn verdict(action: AclAction, proto: Option<AclProto>) -> Statement<'static> {
    match action {
        AclAction::Accept => Statement::Return(None),
        AclAction::Drop => drop(),
        AclAction::Reject if proto == Some(AclProto::Tcp) => {
            Statement::Reject(Some(stmt::Reject::new(Some(RejectType::TCPReset), None)))
        }
        AclAction::Reject => Statement::Reject(None),
    }
}

fn render_acl(a: &Acl) -> Vec<Statement<'static>> {
    let mut e = Vec::new();
    let v4 = a.source.or(a.dest).map(|c| c.is_ipv4());
    if let Some(src) = &a.source {
        e.push(addr_match(std::slice::from_ref(src), Dir::Src));
    }
    if let Some(dst) = &a.dest {
        e.push(addr_match(std::slice::from_ref(dst), Dir::Dst));
    }
    match a.proto {
        Some(p @ (AclProto::Tcp | AclProto::Udp)) => {
            let name = if p == AclProto::Tcp { "tcp" } else { "udp" };
            if a.ports.is_empty() {
                e.push(eq(meta(MetaKey::L4proto), s(name)));
            } else {
                e.push(dport(name, &a.ports));
            }
        }
        Some(AclProto::Icmp) => e.push(eq(
            meta(MetaKey::L4proto),
            match v4 {
                Some(true) => s("icmp"),
                Some(false) => s("ipv6-icmp"),
                None => set(vec![s("icmp"), s("ipv6-icmp")]),
            },
        )),
        None => {}
    }
    e.push(counter());
    e.push(verdict(a.action, a.proto));
    e
}

/// FNV-1a, 64 bit: a stable hash for rule ids (std's hasher is not stable across releases).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
pub(crate) mod tests;
