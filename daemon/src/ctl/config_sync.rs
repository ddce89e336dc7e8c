//! `debvisorctl config show|set FILE|status`: the cluster-wide settings in `config/blob`
//! with their version `config/current_version` (written together in one transaction), and
//! each node's report of the version in force (`nodes/<node>/config/…`).

use std::path::PathBuf;

use debvisor_objects::cluster_config::{digest_version, ClusterConfig, VmDefaults};
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::{Store, TxnBuilder};
use serde_json::{json, Value};

use crate::ctl::node::{self, NodeRow};
use crate::ctl::output::{self, str_of, Output};
use crate::ctl::wait::{follow, humantime, Failure, Followed, Progress, WaitArgs};

/// `config …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConfigCommand {
    /// The cluster config in force: its version and blob.
    Show,
    /// Validate FILE (YAML or JSON) and make it the cluster config; every node applies it
    /// at runtime and reports back (see `config status`).
    Set {
        /// The settings (log_level, node_status, firewall_allow, sysctl, vm_defaults).
        file: PathBuf,
        /// Its version (default: a digest of the file, `c-…`).
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Per node: the version in force, when it was applied, OK/STALE/ERROR; who is not in
    /// step (exit code 3 when a live node is not).
    Status,
}

/// The cluster config as stored: `(version, blob, blob mod revision)`.
pub async fn read(store: &Store) -> Result<(Option<String>, Option<String>, i64), String> {
    let v = store
        .get(&schema::config_current_version())
        .await
        .map_err(crate::ctl::etcd_error)?
        .map(|kv| String::from_utf8_lossy(&kv.value).trim().to_string());
    let b = store
        .get(&schema::config_blob())
        .await
        .map_err(crate::ctl::etcd_error)?;
    let rev = b.as_ref().map_or(0, |kv| kv.mod_revision);
    Ok((
        v,
        b.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
        rev,
    ))
}

/// The `vm_defaults` of the cluster config, if any (a blob that does not parse gives none
/// and a warning).
pub async fn vm_defaults(store: &Store) -> Result<Option<VmDefaults>, String> {
    let (_, blob, _) = read(store).await?;
    let Some(blob) = blob else { return Ok(None) };
    match ClusterConfig::parse(&blob) {
        Ok(c) => Ok(c.vm_defaults),
        Err(e) => {
            eprintln!("debvisorctl: warning: the cluster config is invalid ({e}); its vm_defaults are not used");
            Ok(None)
        }
    }
}

fn valid_version(v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > 64
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
    {
        return Err(format!(
            "--version {v:?}: 1-64 characters of letters, digits and . _ - +"
        ));
    }
    Ok(())
}

/// One node's line of `config status`.
fn node_entry(r: &NodeRow, current: Option<&str>) -> Value {
    let version = r.raw(NodeField::ConfigVersion);
    let alive = r.node.as_ref().is_ok_and(|n| n.alive);
    let in_step = current.is_none_or(|c| version.as_deref() == Some(c));
    json!({
        "node": r.name,
        "alive": alive,
        "version": version,
        "status": r.raw(NodeField::ConfigStatus),
        "last_applied_at": r.raw(NodeField::ConfigLastAppliedAt),
        "in_step": in_step,
    })
}

/// `config status` as a document; `.1`: a live node is not in step.
pub async fn status(store: &Store) -> Result<(Value, bool), String> {
    let (version, _, _) = read(store).await?;
    let rows = node::nodes(store).await?;
    let nodes: Vec<Value> = rows
        .iter()
        .map(|r| node_entry(r, version.as_deref()))
        .collect();
    let stale: Vec<Value> = nodes
        .iter()
        .filter(|n| {
            n["alive"] == true && (n["in_step"] != true || !str_of(&n["status"]).starts_with("OK"))
        })
        .map(|n| n["node"].clone())
        .collect();
    let attention = !stale.is_empty();
    Ok((
        json!({ "current_version": version, "nodes": nodes, "not_in_step": stale }),
        attention,
    ))
}

fn status_text(v: &Value) -> String {
    let mut out = format!(
        "current version: {}\n",
        v["current_version"]
            .as_str()
            .unwrap_or("none (no cluster config set)")
    );
    let mut t = vec![["NODE", "ALIVE", "VERSION", "APPLIED", "STATUS"]
        .map(String::from)
        .to_vec()];
    for n in v["nodes"].as_array().into_iter().flatten() {
        t.push(vec![
            str_of(&n["node"]),
            if n["alive"] == true { "yes" } else { "no" }.into(),
            str_of(&n["version"]),
            n["last_applied_at"]
                .as_str()
                .and_then(output::ago)
                .unwrap_or_else(|| "-".into()),
            str_of(&n["status"]),
        ]);
    }
    out.push_str(&output::table(&t));
    if let Some(s) = v["not_in_step"].as_array().filter(|s| !s.is_empty()) {
        out.push_str(&format!(
            "not in step: {}\n",
            s.iter().map(str_of).collect::<Vec<_>>().join(", ")
        ));
    }
    out
}

/// Run one `config` command: what to print, and whether something needs attention.
pub async fn run(
    store: &Store,
    cmd: ConfigCommand,
    output: Output,
) -> Result<(String, bool), Failure> {
    match cmd {
        ConfigCommand::Show => {
            let (version, blob, _) = read(store).await?;
            let parsed = blob
                .as_deref()
                .map(|b| match ClusterConfig::parse(b) {
                    Ok(c) => serde_json::to_value(c).unwrap_or(Value::Null),
                    Err(e) => json!({ "invalid": e.to_string() }),
                })
                .unwrap_or(Value::Null);
            let v = json!({ "version": version, "blob": blob, "settings": parsed });
            let text = match (&version, &blob) {
                (_, None) => "no cluster config set (`debvisorctl config set FILE`)\n".to_string(),
                (v, Some(b)) => format!(
                    "version: {}\n---\n{}{}",
                    v.as_deref().unwrap_or("-"),
                    b,
                    if b.ends_with('\n') { "" } else { "\n" }
                ),
            };
            Ok((output.render(&v, text), false))
        }
        ConfigCommand::Status => {
            let (v, attention) = status(store).await?;
            Ok((output.render(&v, status_text(&v)), attention))
        }
        ConfigCommand::Set {
            file,
            version,
            wait,
        } => {
            let v = set(store, &file, version.as_deref()).await?;
            let ver = str_of(&v["version"]);
            if !wait.wait {
                let text = if v["written"] == true {
                    format!("cluster config version {ver} written; nodes apply it now (`debvisorctl config status`)\n")
                } else {
                    format!("cluster config version {ver} is already set\n")
                };
                return Ok((output.render(&v, text), false));
            }
            wait_applied(store, &ver, &wait, output, v).await
        }
    }
}

/// Validate `file` and write it with its version in one transaction guarded on the blob
/// read; returns `{version, written}`.
pub async fn set(
    store: &Store,
    file: &std::path::Path,
    version: Option<&str>,
) -> Result<Value, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("FILE {}: cannot read: {e}", file.display()))?;
    ClusterConfig::parse(&text).map_err(|e| {
        format!(
            "FILE {}: invalid {}: {}; nothing written",
            file.display(),
            e.field,
            e.reason
        )
    })?;
    let version = match version {
        Some(v) => {
            valid_version(v)?;
            v.to_string()
        }
        None => digest_version(&text),
    };
    let (cur_version, cur_blob, rev) = read(store).await?;
    if cur_version.as_deref() == Some(version.as_str()) {
        if cur_blob.as_deref() == Some(text.as_str()) {
            return Ok(json!({ "version": version, "written": false }));
        }
        return Err(format!(
            "version {version} is already in use for another blob; give a new --version"
        ));
    }
    let blob_key = schema::config_blob();
    let t = TxnBuilder::new()
        .mod_revision_is(&blob_key, rev)
        .put(&blob_key, text)
        .put(&schema::config_current_version(), version.clone());
    let r = store.txn(t).await.map_err(crate::ctl::etcd_error)?;
    if !r.succeeded() {
        return Err(
            "the cluster config changed while this command ran; nothing written; run it again"
                .into(),
        );
    }
    Ok(
        json!({ "version": version, "written": true, "revision": r.header().map_or(0, |h| h.revision()) }),
    )
}

/// Follow the nodes until every live node reports `version` OK (or one refuses it).
async fn wait_applied(
    store: &Store,
    version: &str,
    wait: &WaitArgs,
    output: Output,
    mut doc: Value,
) -> Result<(String, bool), Failure> {
    let json_out = output == Output::Json;
    let since_rev = doc["revision"].as_i64().unwrap_or(0);
    let mut progress = Progress::new();
    let verdict = |keys: &debvisor_objects::reactor::ObjectKeys| {
        let rows: Vec<NodeRow> = debvisor_objects::reactor::group_keys(
            "",
            keys.iter()
                .map(|(k, e)| debvisor_objects::Kv {
                    key: k.clone(),
                    value: e.value.clone(),
                    mod_revision: e.mod_revision,
                    lease: e.lease,
                    create_revision: 0,
                })
                .collect(),
            |_| true,
        )
        .into_iter()
        .map(|(name, keys)| NodeRow {
            node: debvisor_objects::node::parse_node(&name, &keys).map_err(|e| e.to_string()),
            name,
            keys,
        })
        .collect();
        rows
    };
    let r = follow(store, schema::NODES_PREFIX, wait.timeout, |keys| {
        let rows = verdict(keys);
        let live: Vec<&NodeRow> = rows
            .iter()
            .filter(|r| r.node.as_ref().is_ok_and(|n| n.alive))
            .collect();
        let mut waiting = Vec::new();
        let mut refused = Vec::new();
        for r in &live {
            let st = r.raw(NodeField::ConfigStatus).unwrap_or_default();
            let ver = r.raw(NodeField::ConfigVersion);
            if ver.as_deref() == Some(version) && st.starts_with("OK") {
                continue;
            }
            // A refusal written after the config was set is about this version.
            let fresh = r
                .keys
                .get(NodeField::ConfigStatus.suffix())
                .is_some_and(|e| e.mod_revision > since_rev);
            if (st.starts_with("ERROR") || st.starts_with("STALE")) && fresh {
                refused.push(format!("{}: {st}", r.name));
            } else {
                waiting.push(r.name.clone());
            }
        }
        progress.show(format!(
            "{} of {} live node(s) have version {version}{}{}",
            live.len() - waiting.len() - refused.len(),
            live.len(),
            if waiting.is_empty() {
                String::new()
            } else {
                format!("; waiting for {}", waiting.join(", "))
            },
            if refused.is_empty() {
                String::new()
            } else {
                format!("; {}", refused.join("; "))
            }
        ));
        if !refused.is_empty() && waiting.is_empty() {
            return Some(Err(refused.join("; ")));
        }
        (waiting.is_empty() && refused.is_empty()).then_some(Ok(()))
    })
    .await?;
    match r {
        Followed::Done(Ok(()), _) => {
            doc["applied"] = Value::Bool(true);
            Ok((
                output.render(&doc, format!("cluster config version {version} in force on every live node\n")),
                false,
            ))
        }
        Followed::Done(Err(why), _) => Err(Failure {
            message: format!("cluster config version {version} was refused: {why} (the previous version stays in force there)"),
            stdout: json_out.then(|| format!("{doc}\n")),
        }),
        Followed::TimedOut(_) => Err(Failure {
            message: format!(
                "timed out after {} waiting for every live node to apply config version {version} (see `debvisorctl config status`)",
                humantime(wait.timeout)
            ),
            stdout: json_out.then(|| format!("{doc}\n")),
        }),
    }
}
