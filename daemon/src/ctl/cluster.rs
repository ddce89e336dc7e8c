//! The cluster summary (`debvisorctl status` header, `debvisorctl cluster status`): the
//! primary, nodes alive/total with their status, VMs running/total and in error, networks in
//! error, Ceph health, the cluster config's sync, and every problem on its own line. The
//! exit code says whether something needs attention, so scripts and Ansible can use it.

use std::collections::BTreeMap;

use debvisor_objects::ceph::health_key;
use debvisor_objects::network::NETWORKS_PREFIX;
use debvisor_objects::node::{CoordinatorState, NodeStatus};
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::Store;
use serde_json::{json, Value};

use crate::ctl::node::{self, NodeRow};
use crate::ctl::output::{self, json_or_string, str_of, Output};
use crate::ctl::vm::{self, VmRow};
use crate::ctl::wait::Failure;

/// Exit code of `status` and `cluster status` when something needs attention (1 stays "the
/// command failed", 2 "bad usage").
pub const ATTENTION_EXIT: u8 = 3;

/// `cluster …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ClusterCommand {
    /// The cluster at a glance: primary, nodes, VMs, networks, Ceph, config, problems.
    /// Exit code 3 when something needs attention.
    Status,
}

/// One network's reports: per node, its state and error.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkReport {
    /// The VNI.
    pub vni: String,
    /// Whether a spec exists.
    pub spec: bool,
    /// `node → (state, error)`.
    pub status: BTreeMap<String, (String, Option<String>)>,
}

/// Everything the summary is made of (read once).
pub struct Inputs {
    /// Every node.
    pub nodes: Vec<NodeRow>,
    /// Every VM.
    pub vms: Vec<VmRow>,
    /// Every network.
    pub networks: Vec<NetworkReport>,
    /// `ceph/health`, when the primary reports Ceph.
    pub ceph: Option<Value>,
    /// `config/current_version`, when a cluster config is set.
    pub config_version: Option<String>,
}

/// The summary: the JSON document of `cluster status`; `problems` empty means healthy.
pub fn summarize(i: &Inputs) -> Value {
    let mut problems: Vec<String> = Vec::new();
    let valid: Vec<_> = i
        .nodes
        .iter()
        .filter_map(|r| r.node.as_ref().ok())
        .collect();
    let primary: Vec<&str> = valid
        .iter()
        .filter(|n| n.alive && n.coordinator_state == Some(CoordinatorState::Primary))
        .map(|n| n.name.as_str())
        .collect();
    match primary.as_slice() {
        [] if !i.nodes.is_empty() => {
            problems.push("no primary: no live node holds the primary role".into())
        }
        [] | [_] => {}
        many => problems.push(format!("more than one primary: {}", many.join(", "))),
    }
    let (mut ok, mut degraded, mut down, mut alive) = (0, 0, 0, 0);
    let mut node_list = Vec::new();
    let mut down_nodes = Vec::new();
    for r in &i.nodes {
        let n = match &r.node {
            Ok(n) => n,
            Err(e) => {
                problems.push(format!("node {}: invalid keys: {e}", r.name));
                node_list.push(json!({"name": r.name, "status": "INVALID", "reason": e}));
                continue;
            }
        };
        if n.alive {
            alive += 1;
        } else {
            down_nodes.push(n.name.clone());
        }
        // Without the primary's verdict, liveness decides.
        let st = n.status.unwrap_or(if n.alive {
            NodeStatus::Ok
        } else {
            NodeStatus::Down
        });
        let st = if !n.alive { NodeStatus::Down } else { st };
        match st {
            NodeStatus::Ok => ok += 1,
            NodeStatus::Degraded => degraded += 1,
            NodeStatus::Down => down += 1,
        }
        let reason = n
            .status_reason
            .clone()
            .or_else(|| (!n.alive).then(|| "no lease".to_string()));
        if st != NodeStatus::Ok {
            problems.push(format!(
                "node {} is {st}{}",
                n.name,
                reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
        }
        if let Some(h) = n.health.as_ref().and_then(|h| h.removals_held.as_ref()) {
            if st == NodeStatus::Ok {
                problems.push(format!(
                    "node {} holds {} removal(s): {}",
                    n.name, h.count, h.reason
                ));
            }
        }
        if let Some(d) = r.drain().filter(|d| d.remaining > 0) {
            problems.push(format!("node {} drain: {}", n.name, d.summary()));
        }
        let cs = r.raw(NodeField::ConfigStatus);
        if let Some(c) = cs.as_deref().filter(|c| !c.starts_with("OK")) {
            problems.push(format!("node {} config {c}", n.name));
        }
        node_list.push(
            json!({"name": n.name, "status": st.as_str(), "reason": reason, "alive": n.alive}),
        );
    }
    // VMs.
    let (mut running, mut in_error) = (0, 0);
    for r in &i.vms {
        let st = r
            .keys
            .get(debvisor_objects::domain::VmField::Status.suffix())
            .map(|e| json_or_string(&e.value));
        if st
            .as_ref()
            .and_then(|s| s.get("state"))
            .and_then(Value::as_str)
            == Some("running")
        {
            running += 1;
        }
        let p = vm::problem_of(r);
        if !p.is_empty() {
            in_error += 1;
            problems.push(format!("VM {} ({}): {p}", r.label(), short(&r.uuid)));
            continue;
        }
        // A VM meant to run on a node that is down.
        if let Ok(v) = &r.vm {
            if v.state.runs() {
                if let Some(n) = v
                    .node
                    .as_deref()
                    .filter(|n| down_nodes.iter().any(|d| d == n))
                {
                    problems.push(format!(
                        "VM {} ({}) should run on {n}, which is down",
                        r.label(),
                        short(&r.uuid)
                    ));
                }
            }
        }
    }
    // Networks.
    let mut nets_in_error = 0;
    for n in &i.networks {
        let errs: Vec<String> = n
            .status
            .iter()
            .filter(|(_, (st, _))| st != "ready")
            .map(|(node, (st, e))| {
                format!(
                    "{node}: {st}{}",
                    e.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                )
            })
            .collect();
        if !errs.is_empty() {
            nets_in_error += 1;
            problems.push(format!("network {}: {}", n.vni, errs.join("; ")));
        }
    }
    // Ceph.
    let ceph_status = i.ceph.as_ref().map(|h| str_of(&h["status"]));
    if let (Some(st), Some(h)) = (&ceph_status, &i.ceph) {
        if st != "HEALTH_OK" {
            let checks: Vec<String> = h["checks"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let detail = if let Some(e) = h["error"].as_str() {
                format!(": {e}")
            } else if !checks.is_empty() {
                format!(": {}", checks.join(", "))
            } else {
                String::new()
            };
            problems.push(format!("ceph {st}{detail}"));
        }
    }
    // Config sync.
    let mut stale = Vec::new();
    if let Some(v) = &i.config_version {
        for r in i
            .nodes
            .iter()
            .filter(|r| r.node.as_ref().is_ok_and(|n| n.alive))
        {
            if r.raw(NodeField::ConfigVersion).as_deref() != Some(v.as_str()) {
                stale.push(r.name.clone());
            }
        }
        if !stale.is_empty() {
            problems.push(format!(
                "config version {v} not yet in force on: {}",
                stale.join(", ")
            ));
        }
    }
    json!({
        "primary": primary.first(),
        "nodes": {"total": i.nodes.len(), "alive": alive, "ok": ok, "degraded": degraded, "down": down, "list": node_list},
        "vms": {"total": i.vms.len(), "running": running, "in_error": in_error},
        "networks": {"total": i.networks.len(), "in_error": nets_in_error},
        "ceph": ceph_status,
        "config": i.config_version.as_ref().map(|v| json!({"version": v, "stale": stale})),
        "problems": problems,
        "attention": !problems.is_empty(),
    })
}

fn short(uuid: &str) -> &str {
    uuid.get(..8).unwrap_or(uuid)
}

/// The summary as text: a few `KEY  value` lines, then the problems one per line.
pub fn summary_text(v: &Value) -> String {
    let n = &v["nodes"];
    let by_status: Vec<String> = n["list"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| format!("{} {}", str_of(&x["name"]), str_of(&x["status"])))
                .collect()
        })
        .unwrap_or_default();
    let mut rows = vec![
        ("PRIMARY".to_string(), str_of(&v["primary"])),
        (
            "NODES".to_string(),
            format!(
                "{}/{} alive{}",
                n["alive"],
                n["total"],
                if by_status.is_empty() {
                    String::new()
                } else {
                    format!(": {}", by_status.join(", "))
                }
            ),
        ),
        (
            "VMS".to_string(),
            format!(
                "{} running of {}, {} in error",
                v["vms"]["running"], v["vms"]["total"], v["vms"]["in_error"]
            ),
        ),
        (
            "NETWORKS".to_string(),
            format!(
                "{}, {} in error",
                v["networks"]["total"], v["networks"]["in_error"]
            ),
        ),
        (
            "CEPH".to_string(),
            v["ceph"]
                .as_str()
                .map_or("not reported".to_string(), str::to_string),
        ),
    ];
    if let Some(c) = v["config"].as_object() {
        let stale = c["stale"].as_array().map_or(0, Vec::len);
        rows.push((
            "CONFIG".to_string(),
            if stale == 0 {
                format!("version {} in force everywhere", str_of(&c["version"]))
            } else {
                format!(
                    "version {}, {stale} node(s) not in step",
                    str_of(&c["version"])
                )
            },
        ));
    }
    let mut out = output::fields(&rows, 0);
    match v["problems"].as_array() {
        Some(p) if !p.is_empty() => {
            out.push_str(&format!("PROBLEMS ({})\n", p.len()));
            for line in p {
                out.push_str(&format!("  - {}\n", str_of(line)));
            }
        }
        _ => out.push_str("PROBLEMS  none\n"),
    }
    out
}

/// Read everything the summary needs.
pub async fn read(store: &Store) -> Result<Inputs, String> {
    let nodes = node::nodes(store).await?;
    let (vms, _) = vm::read_vms(store).await?;
    let (kvs, _) = store
        .list(NETWORKS_PREFIX)
        .await
        .map_err(crate::ctl::etcd_error)?;
    let mut nets: BTreeMap<String, NetworkReport> = BTreeMap::new();
    for kv in kvs {
        let Some(rest) = kv.key.strip_prefix(NETWORKS_PREFIX) else {
            continue;
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(vni), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let entry = nets
            .entry(vni.to_string())
            .or_insert_with(|| NetworkReport {
                vni: vni.to_string(),
                ..NetworkReport::default()
            });
        match (kind, parts.next()) {
            ("spec", None) => entry.spec = true,
            ("status", Some(node)) => {
                let v = json_or_string(&kv.value);
                let st = v.get("state").map(str_of).unwrap_or_else(|| str_of(&v));
                let err = v.get("error").filter(|e| !e.is_null()).map(|e| {
                    match v.get("field").filter(|f| !f.is_null()) {
                        Some(f) => format!("{}: {}", str_of(f), str_of(e)),
                        None => str_of(e),
                    }
                });
                entry.status.insert(node.to_string(), (st, err));
            }
            _ => {}
        }
    }
    let ceph = store
        .get(&health_key())
        .await
        .map_err(crate::ctl::etcd_error)?
        .map(|kv| json_or_string(&kv.value));
    let config_version = store
        .get(&schema::config_current_version())
        .await
        .map_err(crate::ctl::etcd_error)?
        .map(|kv| String::from_utf8_lossy(&kv.value).trim().to_string())
        .filter(|v| !v.is_empty());
    Ok(Inputs {
        nodes,
        vms,
        networks: nets
            .into_values()
            .filter(|n| n.spec || !n.status.is_empty())
            .collect(),
        ceph,
        config_version,
    })
}

/// `debvisorctl status`: the summary, the node table and the problems (text); the node
/// array (`-o json`, as before). `.1` is whether something needs attention.
pub async fn status(store: &Store, output: Output) -> Result<(String, bool), Failure> {
    let i = read(store).await?;
    let v = summarize(&i);
    let attention = v["attention"] == true;
    let text = format!("{}\n{}", summary_text(&v), node::status_table(&i.nodes));
    let arr: Vec<Value> = i.nodes.iter().map(node::node_json).collect();
    Ok((output.render(&Value::Array(arr), text), attention))
}

/// `debvisorctl cluster status`.
pub async fn run(
    store: &Store,
    cmd: ClusterCommand,
    output: Output,
) -> Result<(String, bool), Failure> {
    match cmd {
        ClusterCommand::Status => {
            let i = read(store).await?;
            let v = summarize(&i);
            let attention = v["attention"] == true;
            Ok((output.render(&v, summary_text(&v)), attention))
        }
    }
}
