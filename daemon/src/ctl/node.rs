//! `debvisorctl status` and `debvisorctl node …`: read nodes, show them, and request a drain.

use std::time::Duration;

use debvisor_objects::node::{parse_node, CoordinatorState, DaemonState, DomainState, NodeRecord};
use debvisor_objects::schema::{self, NodeField, NODES_PREFIX};
use debvisor_objects::{Store, TxnBuilder};
use serde_json::{json, Value};

use crate::ctl::output::{str_of, Output};
use crate::ctl::wait::{follow, humantime, Failure, Followed, WaitArgs};
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
        return Err(format!("node {name:?} not found under {}/nodes/", store.prefix()).into());
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
        .map_err(|e| e.to_string())?;
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
        return Err(format!("node {name:?} not found under {}/nodes/", store.prefix()).into());
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
        .map_err(|e| e.to_string())?;
    v["requested"] = Value::from(true);
    if !wait.wait {
        return Ok(if json_out {
            format!("{v}\n")
        } else {
            format!("primary handover from {current} to {name} requested\n")
        });
    }
    let prefix = schema::node_prefix(name);
    let r = follow(store, &prefix, wait.timeout, |keys| {
        let n = parse_node(name, keys).ok()?;
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
                return Err(
                    format!("node {name:?} not found under {}/nodes/", store.prefix()).into(),
                );
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

/// A node as `debvisorctl` shows it: parsed, or why it is invalid.
pub struct NodeRow {
    pub name: String,
    pub node: Result<NodeRecord, String>,
}

/// Every node under `nodes/`.
pub async fn nodes(store: &Store) -> Result<Vec<NodeRow>, String> {
    let (kvs, _) = store.list(NODES_PREFIX).await.map_err(|e| e.to_string())?;
    let grouped = debvisor_objects::reactor::group_keys(NODES_PREFIX, kvs, |_| true);
    Ok(grouped
        .into_iter()
        .map(|(name, keys)| NodeRow {
            node: parse_node(&name, &keys).map_err(|e| e.to_string()),
            name,
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
            "bmc": n.bmc,
            "fence": n.fence,
        }),
    }
}

/// The STATUS cell: the primary's status and reason, and the fence record of a dead node.
fn status_cell(n: &NodeRecord) -> String {
    let mut cell = match (&n.status, &n.status_reason) {
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
        "MEMORY(MiB)",
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
                    .map(|h| format!("{}/{}", h.memory.used_mib, h.memory.total_mib))
                    .unwrap_or_else(|| "-".into()),
                n.health
                    .as_ref()
                    .map(|h| h.vms.running.to_string())
                    .unwrap_or_else(|| "-".into()),
                status_cell(n),
            ],
        });
    }
    let ncol = lines[0].len();
    let widths: Vec<usize> = (0..ncol)
        .map(|i| {
            lines
                .iter()
                .filter(|l| l.len() == ncol)
                .filter_map(|l| l.get(i))
                .map(|c| c.len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 < l.len() {
                    format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0))
                } else {
                    c.clone()
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `debvisorctl node show NAME` in table form.
pub fn node_text(row: &NodeRow) -> String {
    let v = node_json(row);
    serde_json::to_string_pretty(&v).unwrap_or_default()
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
    let (kvs, _) = store.list(&prefix).await.map_err(|e| e.to_string())?;
    let keys: Keys = debvisor_objects::reactor::group_keys(schema::NODES_PREFIX, kvs, |_| true)
        .remove(name)
        .unwrap_or_default();
    if keys.is_empty() {
        return Err(format!("node {name:?} not found under {}/{prefix}", store.prefix()).into());
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
        let r = store.txn(t).await.map_err(|e| e.to_string())?;
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
    let r = follow(store, &prefix, wait.timeout, |keys| {
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
            Err(Failure {
                message: format!(
                    "timed out after {} waiting for node {name} to be {goal}; domain_state is {}",
                    humantime(wait.timeout),
                    ds(&keys)
                ),
                stdout: json_out.then(|| format!("{v}\n")),
            })
        }
    }
}
