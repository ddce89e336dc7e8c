//! `debvisorctl status` and `debvisorctl node …`: read nodes, show them, and request a drain.

use std::time::Duration;

use debvisor_objects::drain::DrainReport;
use debvisor_objects::node::{parse_node, CoordinatorState, DaemonState, DomainState, NodeRecord};
use debvisor_objects::schema::{self, NodeField, NODES_PREFIX};
use debvisor_objects::{Store, TxnBuilder};
use serde_json::{json, Value};

use crate::ctl::output::{self, str_of, Output};
use crate::ctl::wait::{follow, humantime, Failure, Followed, Progress, WaitArgs};
use debvisor_objects::reactor::ObjectKeys as Keys;

/// `node …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NodeCommand {
    /// Everything known about one node.
    Show { name: String },
    /// Drain a node: its daemon moves its VMs away and reports `flushed`.
    Flush {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Undrain a node: its daemon takes its VMs back and reports `ready`.
    Unflush {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Let a node carry out the removals it holds (guests of VMs that vanished from etcd
    /// in a mass removal, or while the store was found replaced) and accept the store as it
    /// is now. `node show` lists what it holds (health.removals_held).
    ConfirmRemovals { name: String },
    /// Let a fenced node back in: it runs guests again (its VMs that were recovered
    /// elsewhere stay where they are).
    Readmit { name: String },
    /// Move the primary role to NAME (a live coordinator in `run`): the current primary
    /// relinquishes in its favour.
    Primary {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// `node confirm-removals NAME`: write the request the node acts on (it must be alive to
/// carry it out); returns what the node held when the request was written.
pub async fn confirm_removals(store: &Store, name: &str) -> Result<Value, Failure> {
    check_node_name(name)?;
    let rows = nodes(store).await?;
    let Some(row) = rows.iter().find(|r| r.name == name) else {
        return Err(not_found(store, name, &rows).into());
    };
    let alive = row.node.as_ref().map(|n| n.alive).unwrap_or(false);
    if !alive {
        return Err(format!(
            "node {name} is not alive (no {}): nobody would carry out the confirmation",
            schema::node_key(name, NodeField::Alive)
        )
        .into());
    }
    let held = row
        .node
        .as_ref()
        .ok()
        .and_then(|n| n.health.as_ref())
        .and_then(|h| h.removals_held.clone());
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| e.to_string())?;
    store
        .put(&schema::node_key(name, NodeField::ConfirmRemovals), now)
        .await
        .map_err(crate::ctl::etcd_error)?;
    Ok(json!({ "node": name, "held": held }))
}

/// `node readmit NAME`: lift `fenced` (guarded on it still being `fenced`), clear the fence
/// record and the fence-flush. The node's own daemon writes its real state again.
pub async fn readmit(store: &Store, name: &str) -> Result<Value, Failure> {
    check_node_name(name)?;
    let rows = nodes(store).await?;
    let Some(row) = rows.iter().find(|r| r.name == name) else {
        return Err(format!("node {name:?} not found under {}/nodes/", store.prefix()).into());
    };
    let Ok(n) = row.node.as_ref() else {
        return Err(format!("node {name}: its record is invalid (see `node show {name}`)").into());
    };
    if n.daemon_state != Some(DaemonState::Fenced) {
        return Err(format!(
            "node {name} is not fenced (daemon_state {}): nothing to readmit",
            n.daemon_state.map(|s| s.as_str()).unwrap_or("missing")
        )
        .into());
    }
    let state = schema::node_key(name, NodeField::DaemonState);
    let to = if n.alive {
        DaemonState::Run
    } else {
        DaemonState::Stop
    };
    let t = TxnBuilder::new()
        .value_is(&state, DaemonState::Fenced.as_str())
        .put(&state, to.as_str())
        .put(
            &schema::node_key(name, NodeField::DomainState),
            DomainState::Ready.as_str(),
        )
        .delete(&schema::node_key(name, NodeField::Fence));
    let resp = store.txn(t).await.map_err(|e| e.to_string())?;
    if !resp.succeeded() {
        return Err(format!("node {name}: its state changed meanwhile; look again").into());
    }
    Ok(json!({ "node": name, "daemon_state": to.as_str(), "alive": n.alive }))
}

/// `node primary NAME`: check NAME can be primary, write `election/request`, and with
/// `--wait` follow the nodes until NAME is.
pub async fn make_primary(
    store: &Store,
    name: &str,
    wait: &WaitArgs,
    json_out: bool,
) -> Result<String, Failure> {
    check_node_name(name)?;
    let rows = nodes(store).await?;
    let valid: Vec<&NodeRecord> = rows.iter().filter_map(|r| r.node.as_ref().ok()).collect();
    let Some(target) = valid.iter().find(|n| n.name == name) else {
        return Err(not_found(store, name, &rows).into());
    };
    let primary = valid
        .iter()
        .find(|n| n.alive && n.coordinator_state == Some(CoordinatorState::Primary))
        .map(|n| n.name.clone());
    let refuse = |why: &str| -> Result<String, Failure> {
        Err(format!("node {name} cannot become primary: {why}").into())
    };
    if !target.alive {
        return refuse("it is not alive");
    }
    if target.daemon_state != Some(DaemonState::Run) {
        return refuse(&format!(
            "its daemon_state is {}, not run",
            target.daemon_state.map_or("-", |s| s.as_str())
        ));
    }
    match target.coordinator_state {
        Some(CoordinatorState::Client) | None => {
            return refuse("it is not a coordinator (node.coordinators)")
        }
        _ => {}
    }
    let Some(current) = primary else {
        return refuse("there is no primary to hand over (the election will pick one)");
    };
    let mut v = json!({ "node": name, "primary": current, "requested": false });
    if current == name {
        return Ok(if json_out {
            format!("{v}\n")
        } else {
            format!("node {name} is already the primary\n")
        });
    }
    store
        .put(schema::ELECTION_REQUEST, name)
        .await
        .map_err(crate::ctl::etcd_error)?;
    v["requested"] = Value::from(true);
    if !wait.wait {
        return Ok(if json_out {
            format!("{v}\n")
        } else {
            format!("primary handover from {current} to {name} requested\n")
        });
    }
    let prefix = schema::node_prefix(name);
    let mut progress = Progress::new();
    let r = follow(store, &prefix, wait.timeout, |keys| {
        let n = parse_node(name, keys).ok()?;
        progress.show(format!(
            "node {name}: coordinator_state {}",
            opt(&n.coordinator_state)
        ));
        (n.coordinator_state == Some(CoordinatorState::Primary)).then_some(())
    })
    .await?;
    match r {
        Followed::Done((), _) => {
            v["primary"] = Value::from(name);
            Ok(if json_out {
                format!("{v}\n")
            } else {
                format!("node {name} is the primary\n")
            })
        }
        Followed::TimedOut(keys) => Err(Failure {
            message: format!(
                "timed out after {} waiting for node {name} to be primary; its coordinator_state is {} (a refused request is logged by {current})",
                humantime(wait.timeout),
                keys.get(NodeField::CoordinatorState.suffix())
                    .map(|e| String::from_utf8_lossy(&e.value).into_owned())
                    .unwrap_or_else(|| "-".into())
            ),
            stdout: json_out.then(|| format!("{v}\n")),
        }),
    }
}

/// `debvisorctl status`: every node, as a table or a JSON array.
pub async fn status(store: &Store, output: Output) -> Result<String, Failure> {
    let rows = nodes(store).await?;
    let arr: Vec<Value> = rows.iter().map(node_json).collect();
    Ok(output.render(&Value::Array(arr), status_table(&rows)))
}

/// Run one `node` command; returns what to print on stdout.
pub async fn run(store: &Store, cmd: NodeCommand, output: Output) -> Result<String, Failure> {
    let json_out = output == Output::Json;
    match cmd {
        NodeCommand::Show { name } => {
            check_node_name(&name)?;
            let rows = nodes(store).await?;
            let Some(row) = rows.iter().find(|r| r.name == name) else {
                return Err(not_found(store, &name, &rows).into());
            };
            Ok(output.render(&node_json(row), node_text(row)))
        }
        NodeCommand::Flush { name, wait } => {
            node_drain(store, &name, Drain::Flush, &wait, json_out).await
        }
        NodeCommand::Unflush { name, wait } => {
            node_drain(store, &name, Drain::Unflush, &wait, json_out).await
        }
        NodeCommand::Primary { name, wait } => make_primary(store, &name, &wait, json_out).await,
        NodeCommand::Readmit { name } => {
            let v = readmit(store, &name).await?;
            let text = if v["alive"] == json!(true) {
                format!("node {name}: readmitted; guests may run there again\n")
            } else {
                format!("node {name}: readmitted; it runs guests again once its daemon is back\n")
            };
            Ok(output.render(&v, text))
        }
        NodeCommand::ConfirmRemovals { name } => {
            let v = confirm_removals(store, &name).await?;
            let held = &v["held"];
            let text = if held.is_null() {
                format!("node {name}: confirmation recorded; it holds no removals now\n")
            } else {
                format!(
                    "node {name}: confirmed; it carries out {} held removal(s) ({})\n",
                    held["count"],
                    str_of(&held["reason"])
                )
            };
            Ok(output.render(&v, text))
        }
    }
}

/// "node X not found", listing the nodes that exist.
pub fn not_found(store: &Store, name: &str, rows: &[NodeRow]) -> String {
    let known: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    format!(
        "node {name:?} not found under {}/nodes/; known nodes: {}",
        store.prefix(),
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )
}

/// A node as `debvisorctl` shows it: parsed, or why it is invalid, and its raw keys (for
/// the reports the record does not parse: drain progress, config sync).
pub struct NodeRow {
    /// The node's name (`nodes/<name>/`).
    pub name: String,
    /// Parsed, or why not.
    pub node: Result<NodeRecord, String>,
    /// Its keys, relative to `nodes/<name>/`.
    pub keys: Keys,
}

impl NodeRow {
    /// A key's value as text (trimmed), if present.
    pub fn raw(&self, f: NodeField) -> Option<String> {
        self.keys
            .get(f.suffix())
            .map(|e| String::from_utf8_lossy(&e.value).trim().to_string())
    }

    /// The node's drain report (`nodes/<node>/drain`), if it wrote one.
    pub fn drain(&self) -> Option<DrainReport> {
        self.keys
            .get(NodeField::Drain.suffix())
            .and_then(|e| DrainReport::parse(&e.value).ok())
    }
}

/// Every node under `nodes/`.
pub async fn nodes(store: &Store) -> Result<Vec<NodeRow>, String> {
    let (kvs, _) = store
        .list(NODES_PREFIX)
        .await
        .map_err(crate::ctl::etcd_error)?;
    let grouped = debvisor_objects::reactor::group_keys(NODES_PREFIX, kvs, |_| true);
    Ok(grouped
        .into_iter()
        .map(|(name, keys)| NodeRow {
            node: parse_node(&name, &keys).map_err(|e| e.to_string()),
            name,
            keys,
        })
        .collect())
}

fn age(last_seen: &Option<String>) -> Option<Duration> {
    let s = last_seen.as_ref()?;
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let d = time::OffsetDateTime::now_utc() - t;
    Some(Duration::from_secs_f64(d.as_seconds_f64().max(0.0)))
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

/// JSON of one node (for `status --output json` and `node show`).
pub fn node_json(row: &NodeRow) -> Value {
    match &row.node {
        Err(e) => json!({ "name": row.name, "valid": false, "error": e, "alive": Value::Null,
            "daemon_state": Value::Null, "coordinator_state": Value::Null, "domain_state": Value::Null }),
        Ok(n) => json!({
            "name": n.name,
            "valid": true,
            "daemon_state": n.daemon_state.map(|s| s.as_str()),
            "coordinator_state": n.coordinator_state.map(|s| s.as_str()),
            "domain_state": n.domain_state.map(|s| s.as_str()),
            "mode": n.mode.map(|s| s.as_str()),
            "status": n.status.map(|s| s.as_str()),
            "status_reason": n.status_reason,
            "alive": n.alive,
            "lease": if n.alive { Value::from(format!("{:x}", n.alive_lease)) } else { Value::Null },
            "last_seen": n.last_seen,
            "last_seen_age_s": age(&n.last_seen).map(|d| d.as_secs_f64()),
            "fqdn": n.fqdn,
            "info": n.info,
            "health": n.health,
            "holder": n.alive_record,
            "drain": row.drain(),
            "config": config_json(row),
            "bmc": n.bmc,
            "fence": n.fence,
        }),
    }
}

/// The node's config sync report (`nodes/<node>/config/…`), `null` when it wrote none.
pub fn config_json(row: &NodeRow) -> Value {
    let version = row.raw(NodeField::ConfigVersion);
    let status = row.raw(NodeField::ConfigStatus);
    if version.is_none() && status.is_none() {
        return Value::Null;
    }
    json!({
        "version": version,
        "last_applied_at": row.raw(NodeField::ConfigLastAppliedAt),
        "status": status,
    })
}

/// The STATUS cell: the primary's status and reason, and the fence record of a dead node.
fn status_cell(n: &NodeRecord) -> String {
    let mut cell = match (&n.status, &n.status_reason) {
        // Without a lease the node is down whatever verdict the primary left.
        _ if !n.alive => "DOWN: no lease".into(),
        (Some(st), Some(why)) => format!("{st}: {why}"),
        (Some(st), None) => st.to_string(),
        (None, _) => "-".into(),
    };
    if let Some(f) = &n.fence {
        cell.push_str(&format!("; fence {}", f.state));
        if let Some(why) = f.reason.as_ref().or(f.by.as_ref()) {
            cell.push_str(&format!(" ({why})"));
        }
    }
    cell
}

/// The `status` table.
pub fn status_table(rows: &[NodeRow]) -> String {
    let mut lines = vec![[
        "NODE",
        "DAEMON",
        "COORDINATOR",
        "DOMAIN",
        "ALIVE",
        "LAST_SEEN",
        "LOAD",
        "MEMORY",
        "VMS",
        "STATUS",
    ]
    .map(String::from)
    .to_vec()];
    for r in rows {
        lines.push(match &r.node {
            Err(e) => vec![r.name.clone(), format!("INVALID: {e}")],
            Ok(n) => vec![
                n.name.clone(),
                opt(&n.daemon_state),
                opt(&n.coordinator_state),
                opt(&n.domain_state),
                if n.alive { "yes".into() } else { "no".into() },
                age(&n.last_seen)
                    .map(|d| format!("{}s ago", d.as_secs()))
                    .unwrap_or_else(|| "-".into()),
                n.health
                    .as_ref()
                    .map(|h| format!("{:.2}", h.load[0]))
                    .unwrap_or_else(|| "-".into()),
                n.health
                    .as_ref()
                    .map(|h| {
                        format!(
                            "{}/{}",
                            output::mib(h.memory.used_mib),
                            output::mib(h.memory.total_mib)
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
                n.health
                    .as_ref()
                    .map(|h| h.vms.running.to_string())
                    .unwrap_or_else(|| "-".into()),
                status_cell(n),
            ],
        });
    }
    output::table(&lines)
}

/// `debvisorctl node show NAME` for a person: the node's role and verdict first, then
/// memory in MiB/GiB, durations, peers, Ceph, held removals, drain and config sync as fields
/// (`-o json` has everything raw).
pub fn node_text(row: &NodeRow) -> String {
    let n = match &row.node {
        Err(e) => return format!("Node {}: INVALID: {e}\n", row.name),
        Ok(n) => n,
    };
    let mut head = format!(
        "Node {} ({}, {}, {})",
        n.name,
        opt(&n.coordinator_state),
        opt(&n.daemon_state),
        opt(&n.domain_state)
    );
    match (&n.status, &n.status_reason) {
        (Some(st), Some(why)) => head.push_str(&format!(": {st}: {why}")),
        (Some(st), None) => head.push_str(&format!(": {st}")),
        (None, _) => {}
    }
    let mut f: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, v: String| f.push((k.to_string(), v));
    add(
        "alive",
        match (&n.alive, &n.alive_record) {
            (true, Some(h)) => format!(
                "yes (lease {:x}; pid {} on {}{})",
                n.alive_lease,
                h.pid,
                h.hostname,
                if h.since.is_empty() {
                    String::new()
                } else {
                    format!(", since {}", h.since)
                }
            ),
            (true, None) => format!("yes (lease {:x})", n.alive_lease),
            (false, _) => "no (no lease: the node is down or stopped)".into(),
        },
    );
    add("mode", opt(&n.mode));
    add(
        "last seen",
        n.last_seen
            .as_deref()
            .map(|s| match output::ago(s) {
                Some(a) => format!("{a} ({s})"),
                None => s.to_string(),
            })
            .unwrap_or_else(|| "-".into()),
    );
    if let Some(fq) = &n.fqdn {
        add("fqdn", fq.clone());
    }
    if let Some(i) = &n.info {
        add(
            "host",
            format!(
                "{}, {} CPUs, {}, kernel {}",
                i.hostname,
                i.cpus,
                output::mib(i.memory_mib),
                if i.kernel.is_empty() { "-" } else { &i.kernel }
            ),
        );
        add(
            "versions",
            format!(
                "debvisord {}, libvirt {}",
                i.version,
                i.libvirt_version.as_deref().unwrap_or("-")
            ),
        );
        if !i.addresses.is_empty() {
            add("addresses", i.addresses.join(", "));
        }
        if let Some(r) = &i.rack {
            add("rack", r.clone());
        }
    }
    if let Some(h) = &n.health {
        add(
            "load",
            format!("{:.2} {:.2} {:.2}", h.load[0], h.load[1], h.load[2]),
        );
        let pct = (h.memory.used_mib * 100)
            .checked_div(h.memory.total_mib)
            .unwrap_or(0);
        add(
            "memory",
            format!(
                "{} used of {} ({pct}%), {} free",
                output::mib(h.memory.used_mib),
                output::mib(h.memory.total_mib),
                output::mib(h.memory.free_mib)
            ),
        );
        add(
            "VMs",
            format!(
                "{} running of {} defined; {} ({} provisioned), {} vCPUs ({} provisioned)",
                h.vms.running,
                h.vms.total,
                output::mib(h.alloc.memory_mib),
                output::mib(h.alloc.memory_provisioned_mib),
                h.alloc.vcpus,
                h.alloc.vcpus_provisioned
            ),
        );
        add(
            "libvirt",
            if h.libvirt { "answers" } else { "UNREACHABLE" }.into(),
        );
        add(
            "uptime",
            format!(
                "host {}, daemon {}",
                output::human_duration(Duration::from_secs(h.uptime_s)),
                output::human_duration(Duration::from_secs(h.daemon_uptime_s))
            ),
        );
        if !h.peers.is_empty() {
            let p: Vec<String> = h
                .peers
                .iter()
                .map(|p| match p.rtt_ms {
                    Some(ms) => format!("{} {ms:.1} ms", p.node),
                    None => format!("{} no answer", p.node),
                })
                .collect();
            add("peers (RTT)", p.join(", "));
        }
        if let Some(c) = &h.ceph {
            add(
                "ceph",
                c.problem().unwrap_or_else(|| {
                    format!(
                        "{}, {} local OSD(s) up/in",
                        c.status,
                        c.osds.iter().filter(|o| o.up && o.r#in).count()
                    )
                }),
            );
        }
        if let Some(r) = &h.removals_held {
            add(
                "removals",
                format!(
                    "{} HELD since {}: {}{} — confirm with `debvisorctl node confirm-removals {}`",
                    r.count,
                    r.since,
                    r.reason,
                    if r.names.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", r.names.join(", "))
                    },
                    n.name
                ),
            );
        }
        if !h.foreign.is_empty() {
            add("foreign", h.foreign.join(", "));
        }
        if !h.problems.is_empty() {
            add("problems", h.problems.join("\n"));
        }
    } else {
        add("health", "no report yet".into());
    }
    if let Some(d) = row.drain() {
        if d.remaining > 0 {
            add("drain", d.summary());
        }
    }
    let c = config_json(row);
    if !c.is_null() {
        add(
            "config",
            format!(
                "version {} ({}), applied {}",
                str_of(&c["version"]),
                str_of(&c["status"]),
                str_of(&c["last_applied_at"])
            ),
        );
    }
    for p in &n.problems {
        add("bad key", p.to_string());
    }
    format!("{head}\n{}", output::fields(&f, 2))
}

/// Is `name` a node name that can be looked up?
pub fn check_node_name(name: &str) -> Result<(), String> {
    if schema::valid_node_name(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid node name {name:?}: expected 1-63 characters a-z, 0-9 and '-'"
        ))
    }
}

/// One progress line of a drain wait: the node's `domain_state` and what its drain pass
/// reports (VMs left and why each waits).
pub fn drain_progress(keys: &Keys) -> String {
    let ds = keys
        .get(NodeField::DomainState.suffix())
        .map(|e| String::from_utf8_lossy(&e.value).trim().to_string())
        .unwrap_or_else(|| "ready".into());
    let mut line = format!("domain_state {ds}");
    if let Some(d) = keys
        .get(NodeField::Drain.suffix())
        .and_then(|e| DrainReport::parse(&e.value).ok())
        .filter(|d| d.state == ds && d.remaining > 0)
    {
        line.push_str(&format!("; {}", d.summary()));
    }
    if keys.get(NodeField::Alive.suffix()).is_none() {
        line.push_str("; node not alive");
    }
    line
}

/// Which drain request `node flush|unflush` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Move every VM off the node (`flush` → `flushed`).
    Flush,
    /// Take the VMs back (`unflush` → `ready`).
    Unflush,
}

// ---------------------------------------------------------------------------------------
// Node drain
// ---------------------------------------------------------------------------------------

/// `node flush|unflush NAME`: request the drain state change on a live node and optionally
/// wait for the node to complete it.
pub async fn node_drain(
    store: &Store,
    name: &str,
    drain: Drain,
    wait: &WaitArgs,
    json_out: bool,
) -> Result<String, Failure> {
    check_node_name(name)?;
    let prefix = schema::node_prefix(name);
    let (kvs, _) = store.list(&prefix).await.map_err(crate::ctl::etcd_error)?;
    let keys: Keys = debvisor_objects::reactor::group_keys(schema::NODES_PREFIX, kvs, |_| true)
        .remove(name)
        .unwrap_or_default();
    if keys.is_empty() {
        let rows = nodes(store).await?;
        return Err(not_found(store, name, &rows).into());
    }
    let rec = parse_node(name, &keys).map_err(|e| format!("node {name} is invalid: {e}"))?;
    if !rec.alive {
        return Err(format!(
            "node {name} is not alive (no {}): nobody would carry out the request",
            schema::node_key(name, NodeField::Alive)
        )
        .into());
    }
    let (request, goal) = match drain {
        Drain::Flush => (DomainState::Flush, DomainState::Flushed),
        Drain::Unflush => (DomainState::Unflush, DomainState::Ready),
    };
    let cur = rec.domain_state;
    if cur == Some(DomainState::FenceFlush) {
        return Err(format!("node {name} is being fence-flushed; nothing to request").into());
    }
    let already = cur == Some(goal) || (goal == DomainState::Ready && cur.is_none());
    let mut rev = 0;
    let mut wrote = false;
    if !already && cur != Some(request) {
        let ds_key = schema::node_key(name, NodeField::DomainState);
        let alive_key = schema::node_key(name, NodeField::Alive);
        let rev_of = |k: &str| keys.get(k).map_or(0, |e| e.mod_revision);
        let t = TxnBuilder::new()
            .mod_revision_is(&ds_key, rev_of(NodeField::DomainState.suffix()))
            .mod_revision_is(&alive_key, rev_of(NodeField::Alive.suffix()))
            .put(&ds_key, request.as_str());
        let r = store.txn(t).await.map_err(crate::ctl::etcd_error)?;
        if !r.succeeded() {
            return Err(format!(
                "node {name}: its domain_state or liveness changed while this command ran; nothing written; run it again"
            )
            .into());
        }
        rev = r.header().map_or(0, |h| h.revision());
        wrote = true;
    }
    let mut v = json!({
        "node": name,
        "requested": request.as_str(),
        "written": wrote,
        "domain_state": if wrote { request.as_str() } else { cur.map_or("ready", |s| s.as_str()) },
        "revision": rev,
    });
    if !wait.wait || already {
        let text = if already {
            format!("node {name} is already {goal}\n")
        } else if wrote {
            format!("node {name}: domain_state {request} requested\n")
        } else {
            format!("node {name}: {request} already in progress\n")
        };
        return Ok(if json_out { format!("{v}\n") } else { text });
    }
    let mut progress = Progress::new();
    let r = follow(store, &prefix, wait.timeout, |keys| {
        progress.show(drain_progress(keys));
        let Ok(n) = parse_node(name, keys) else {
            return None;
        };
        if !n.alive {
            return Some(Err(format!("node {name} lost its lease while draining")));
        }
        (n.domain_state == Some(goal)).then_some(Ok(()))
    })
    .await?;
    let ds = |keys: &Keys| {
        keys.get(NodeField::DomainState.suffix())
            .map(|e| String::from_utf8_lossy(&e.value).trim().to_string())
            .unwrap_or_else(|| "-".into())
    };
    match r {
        Followed::Done(Ok(()), _) => {
            v["domain_state"] = Value::from(goal.as_str());
            Ok(if json_out {
                format!("{v}\n")
            } else {
                format!("node {name} {goal}\n")
            })
        }
        Followed::Done(Err(m), keys) => {
            v["domain_state"] = Value::from(ds(&keys));
            Err(Failure {
                message: m,
                stdout: json_out.then(|| format!("{v}\n")),
            })
        }
        Followed::TimedOut(keys) => {
            v["domain_state"] = Value::from(ds(&keys));
            let drain = keys
                .get(NodeField::Drain.suffix())
                .and_then(|e| DrainReport::parse(&e.value).ok());
            let mut message = format!(
                "timed out after {} waiting for node {name} to be {goal}; domain_state is {}",
                humantime(wait.timeout),
                ds(&keys)
            );
            if let Some(d) = drain.as_ref().filter(|d| d.remaining > 0) {
                message.push_str(&format!("; the node reports {}", d.summary()));
                v["drain"] = serde_json::to_value(d).unwrap_or(Value::Null);
            }
            Err(Failure {
                message,
                stdout: json_out.then(|| format!("{v}\n")),
            })
        }
    }
}
