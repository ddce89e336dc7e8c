//! `debvisorctl`: read the cluster state from etcd with the daemon's own config.

use std::time::Duration;

use debvisor_objects::node::{parse_node, NodeRecord};
use debvisor_objects::schema::{self, NODES_PREFIX};
use debvisor_objects::Store;
use serde_json::{json, Value};

use crate::config::Config;

/// Output format of the printing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

impl Output {
    /// What a command prints: the JSON document on one line with `--output json`, else
    /// `text` (one place for the choice every `run` of a command group makes).
    pub fn render(self, doc: &Value, text: String) -> String {
        match self {
            Output::Json => format!("{doc}\n"),
            Output::Table => text,
        }
    }
}

/// A node as `debvisorctl` shows it: parsed, or why it is invalid.
pub struct NodeRow {
    pub name: String,
    pub node: Result<NodeRecord, String>,
}

/// Connect once (no retry: an operator wants the error now).
pub async fn connect(cfg: &Config) -> Result<Store, String> {
    let store = Store::connect(&crate::daemon::store_options(cfg))
        .await
        .map_err(|e| e.to_string())?;
    store.probe().await.map_err(|e| {
        format!(
            "cannot reach etcd at {}: {e}",
            cfg.store.endpoints.join(",")
        )
    })?;
    Ok(store)
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
            "alive": n.alive,
            "lease": if n.alive { Value::from(format!("{:x}", n.alive_lease)) } else { Value::Null },
            "last_seen": n.last_seen,
            "last_seen_age_s": age(&n.last_seen).map(|d| d.as_secs_f64()),
            "fqdn": n.fqdn,
            "info": n.info,
            "health": n.health,
            "holder": n.alive_record,
        }),
    }
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

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let ncol = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..ncol)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            if i + 1 < r.len() {
                let w = widths.get(i).copied().unwrap_or(0);
                line.push_str(&" ".repeat(w.saturating_sub(c.chars().count())));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A stored value as JSON, or as a string when it is not JSON (what `show` prints of a key
/// an operator may have written by hand).
pub(crate) fn json_or_string(v: &[u8]) -> Value {
    serde_json::from_slice(v).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(v).into()))
}

/// One table cell from a JSON value: `-` for null or empty, strings unquoted.
pub(crate) fn str_of(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
