//! `debvisorctl ceph …`: the Ceph objects' desired state in etcd (pools, RBD volumes, their
//! snapshots, templates) and what the primary reports back (`…/status`, `ceph/health`,
//! `ceph/usage`, `ceph/observed/…`). The CLI talks to etcd only, never to Ceph: the primary
//! does the work.
//!
//! Every write builds the would-be spec and runs it through the parser the primary uses
//! ([`parse_pool`], [`parse_volume`], [`parse_template`]), so the CLI refuses what the primary
//! would mark in error, naming the argument, and writes nothing. Every write is one etcd
//! transaction guarded on the mod revisions it read (compare-and-swap): a concurrent edit
//! makes it fail, and the command re-reads and re-applies its change (three attempts) rather
//! than overwrite the other edit.
//!
//! `remove` of a pool, volume or snapshot writes `delete: true` into its spec (the primary
//! deletes in Ceph and reports `deleted`); a template has no status and its key is deleted.
//! `--wait` follows the object until its status, written after the request, is `ready`,
//! `error` (exit 1) or `deleted`, or the timeout passes (exit 1 with the current status).
//!
//! Known limit: `pool remove` refuses while declared volumes of the pool remain, but that
//! check is not part of the transaction's guard (a volume added at the same moment is not
//! seen); the primary's own checks remain the last word.

use std::collections::BTreeMap;

use debvisor_objects::ceph::{
    auto_snapshot_name, health_key, parse_pool, parse_size, parse_template, parse_volume,
    pool_spec_key, snapshot_spec_key, template_key, usage_key, validate_image_name,
    validate_pool_name, validate_snapshot_name, volume_id, volume_spec_key, CloneSource,
    DEFAULT_PG_NUM, DEFAULT_POOL_SIZE, OBSERVED_PREFIX, POOLS_PREFIX, TEMPLATES_PREFIX,
    VOLUMES_PREFIX,
};
use debvisor_objects::{KeyEntry, Kv, ObjectError, Store, TxnBuilder};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use crate::ctl::output::{self, json_or_string, str_of, Output};
use crate::ctl::wait::{parse_duration, Failure, Followed};
use debvisor_objects::reactor::ObjectKeys as Keys;

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

/// `--wait` and `--timeout` of the writing verbs.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Block until the primary reports the outcome in the object's status (ready or deleted;
    /// exit 1 on error or timeout).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 90s, 3m.
    #[arg(long, value_parser = parse_duration, default_value = "180s", value_name = "DURATION")]
    pub timeout: std::time::Duration,
}

/// `ceph pool …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PoolCommand {
    /// Every pool: declared spec, primary's status, what Ceph has.
    List,
    /// Everything about one pool.
    Show {
        #[arg(value_name = "POOL")]
        pool: String,
    },
    /// Declare a new pool (refused if its spec exists).
    Add {
        #[arg(value_name = "POOL")]
        pool: String,
        /// Placement groups at creation (a power of two up to 32768).
        #[arg(long, value_name = "N")]
        pg_num: Option<u32>,
        /// Replica count, 1..=10.
        #[arg(long, value_name = "N")]
        size: Option<u32>,
        /// Refuse removal until unprotected.
        #[arg(long)]
        protected: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change the replica count or the protection of a pool.
    Set {
        #[arg(value_name = "POOL")]
        pool: String,
        /// Replica count, 1..=10.
        #[arg(long, value_name = "N")]
        size: Option<u32>,
        /// Protect against removal (true|false).
        #[arg(long, value_name = "BOOL")]
        protected: Option<bool>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Ask the primary to delete the pool (refused while protected or holding volumes).
    Remove {
        #[arg(value_name = "POOL")]
        pool: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// `ceph volume …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum VolumeCommand {
    /// Every volume: spec, status, observed size and usage.
    List {
        /// Only this pool.
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
    },
    /// Everything about one volume, with its snapshots.
    Show {
        /// `<pool>/<image>`.
        #[arg(value_name = "VOLUME")]
        volume: String,
    },
    /// Declare a new RBD volume (refused if its spec exists).
    Add {
        /// `<pool>/<image>`.
        #[arg(value_name = "VOLUME")]
        volume: String,
        /// Size like 10G, 512M (binary units).
        #[arg(long, value_name = "SIZE")]
        size: String,
        /// Clone it from a template (`templates/<name>`).
        #[arg(long, value_name = "TEMPLATE", conflicts_with = "clone_from")]
        from_template: Option<String>,
        /// Clone it from a snapshot `<pool>/<image>@<snap>`.
        #[arg(long, value_name = "POOL/IMAGE@SNAP")]
        clone_from: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change a volume's size (growing; shrinking only with --allow-shrink).
    Resize {
        /// `<pool>/<image>`.
        #[arg(value_name = "VOLUME")]
        volume: String,
        /// New size like 20G.
        #[arg(value_name = "SIZE")]
        size: String,
        /// Allow a size below the current one (data beyond it is lost).
        #[arg(long)]
        allow_shrink: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Ask the primary to delete the volume (its snapshots are purged first).
    Remove {
        /// `<pool>/<image>`.
        #[arg(value_name = "VOLUME")]
        volume: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// `ceph snapshot …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SnapshotCommand {
    /// The snapshots of a volume: declared and observed.
    List {
        /// `<pool>/<image>`.
        #[arg(value_name = "VOLUME")]
        volume: String,
    },
    /// Declare a snapshot (default name auto-YYYYmmdd-HHMMSS, UTC).
    Add {
        /// `<pool>/<image>`.
        #[arg(value_name = "VOLUME")]
        volume: String,
        #[arg(value_name = "SNAPSHOT")]
        snapshot: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Roll the volume back to the snapshot (the primary refuses while a VM uses it).
    Rollback {
        /// `<pool>/<image>`.
        #[arg(value_name = "VOLUME")]
        volume: String,
        #[arg(value_name = "SNAPSHOT")]
        snapshot: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Ask the primary to delete the snapshot.
    Remove {
        /// `<pool>/<image>`.
        #[arg(value_name = "VOLUME")]
        volume: String,
        #[arg(value_name = "SNAPSHOT")]
        snapshot: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// `ceph template …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TemplateCommand {
    /// Every template.
    List,
    /// One template.
    Show {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Declare a template: a snapshot new volumes can be cloned from.
    Add {
        #[arg(value_name = "NAME")]
        name: String,
        /// Pool of the source image.
        #[arg(long, value_name = "POOL")]
        pool: String,
        /// Source image.
        #[arg(long, value_name = "IMAGE")]
        image: String,
        /// Snapshot of the source image to clone from.
        #[arg(long, value_name = "SNAPSHOT")]
        snapshot: String,
    },
    /// Delete a template (volumes already cloned from it are not affected).
    Remove {
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `ceph …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CephCommand {
    /// Cluster health, capacity, OSDs and pools as the primary last reported them.
    Status,
    /// Pools: add, set, remove, list, show.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// RBD volumes: add (optionally cloned), resize, remove, list, show.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Snapshots of a volume: add, rollback, remove, list.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Templates (clone sources): add, remove, list, show.
    Template {
        #[command(subcommand)]
        command: TemplateCommand,
    },
}

// ---------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------

/// A committed write: what to print, the object to follow and the revision written.
struct Written {
    doc: Value,
    text: String,
    revision: i64,
    goal: Option<Goal>,
}

/// Run one `ceph` command; returns what to print on stdout.
pub async fn run(store: &Store, cmd: CephCommand, output: Output) -> Result<String, Failure> {
    let json_out = output == Output::Json;
    let (written, wait) = match cmd {
        CephCommand::Status => {
            let v = status(store).await?;
            let text = status_text(&v);
            return Ok(output.render(&v, text));
        }
        CephCommand::Pool { command } => match command {
            PoolCommand::List => {
                let v = pool_list(store).await?;
                let text = pool_table(&v);
                return Ok(output.render(&v, text));
            }
            PoolCommand::Show { pool } => {
                let v = pool_show(store, &pool).await?;
                let text = pretty(&v);
                return Ok(output.render(&v, text));
            }
            PoolCommand::Add {
                pool,
                pg_num,
                size,
                protected,
                wait,
            } => (pool_add(store, &pool, pg_num, size, protected).await?, wait),
            PoolCommand::Set {
                pool,
                size,
                protected,
                wait,
            } => (pool_set(store, &pool, size, protected).await?, wait),
            PoolCommand::Remove { pool, wait } => (pool_remove(store, &pool).await?, wait),
        },
        CephCommand::Volume { command } => match command {
            VolumeCommand::List { pool } => {
                let v = volume_list(store, pool.as_deref()).await?;
                let text = volume_table(&v);
                return Ok(output.render(&v, text));
            }
            VolumeCommand::Show { volume } => {
                let v = volume_show(store, &volume).await?;
                let text = pretty(&v);
                return Ok(output.render(&v, text));
            }
            VolumeCommand::Add {
                volume,
                size,
                from_template,
                clone_from,
                wait,
            } => {
                let source = clone_source(from_template.as_deref(), clone_from.as_deref())?;
                (volume_add(store, &volume, &size, source).await?, wait)
            }
            VolumeCommand::Resize {
                volume,
                size,
                allow_shrink,
                wait,
            } => (
                volume_resize(store, &volume, &size, allow_shrink).await?,
                wait,
            ),
            VolumeCommand::Remove { volume, wait } => (volume_remove(store, &volume).await?, wait),
        },
        CephCommand::Snapshot { command } => match command {
            SnapshotCommand::List { volume } => {
                let v = snapshot_list(store, &volume).await?;
                let text = snapshot_table(&v);
                return Ok(output.render(&v, text));
            }
            SnapshotCommand::Add {
                volume,
                snapshot,
                wait,
            } => {
                let name =
                    snapshot.unwrap_or_else(|| auto_snapshot_name(OffsetDateTime::now_utc()));
                (snapshot_add(store, &volume, &name).await?, wait)
            }
            SnapshotCommand::Rollback {
                volume,
                snapshot,
                wait,
            } => (snapshot_rollback(store, &volume, &snapshot).await?, wait),
            SnapshotCommand::Remove {
                volume,
                snapshot,
                wait,
            } => (snapshot_remove(store, &volume, &snapshot).await?, wait),
        },
        CephCommand::Template { command } => match command {
            TemplateCommand::List => {
                let v = template_list(store).await?;
                let text = template_table(&v);
                return Ok(output.render(&v, text));
            }
            TemplateCommand::Show { name } => {
                let v = template_show(store, &name).await?;
                let text = pretty(&v);
                return Ok(output.render(&v, text));
            }
            TemplateCommand::Add {
                name,
                pool,
                image,
                snapshot,
            } => {
                let w = template_add(store, &name, &pool, &image, &snapshot).await?;
                return Ok(output.render(&w.doc, w.text));
            }
            TemplateCommand::Remove { name } => {
                let w = template_remove(store, &name).await?;
                return Ok(output.render(&w.doc, w.text));
            }
        },
    };
    finish(store, written, &wait, json_out).await
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

// ---------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------

/// Check a POOL argument.
pub fn check_pool(arg: &str, pool: &str) -> Result<(), String> {
    validate_pool_name(pool).map_err(|r| format!("invalid {arg} {pool:?}: pool name {r}"))
}

/// Split a `<pool>/<image>` argument and validate both names; errors name `arg`.
pub fn parse_volume_arg<'a>(arg: &str, s: &'a str) -> Result<(&'a str, &'a str), String> {
    let (pool, image) = s
        .split_once('/')
        .ok_or_else(|| format!("invalid {arg} {s:?}: expected <pool>/<image>"))?;
    validate_pool_name(pool).map_err(|r| format!("invalid {arg} {s:?}: pool name {r}"))?;
    validate_image_name(image).map_err(|r| format!("invalid {arg} {s:?}: image name {r}"))?;
    Ok((pool, image))
}

/// Parse `--clone-from <pool>/<image>@<snap>` or take `--from-template <name>`.
pub fn clone_source(
    template: Option<&str>,
    snapshot: Option<&str>,
) -> Result<Option<CloneSource>, String> {
    if let Some(t) = template {
        validate_image_name(t)
            .map_err(|r| format!("invalid --from-template {t:?}: template name {r}"))?;
        return Ok(Some(CloneSource::Template(t.to_string())));
    }
    let Some(s) = snapshot else {
        return Ok(None);
    };
    let (vol, snap) = s
        .split_once('@')
        .ok_or_else(|| format!("invalid --clone-from {s:?}: expected <pool>/<image>@<snap>"))?;
    let (pool, image) = parse_volume_arg("--clone-from", vol)?;
    validate_snapshot_name(snap)
        .map_err(|r| format!("invalid --clone-from {s:?}: snapshot name {r}"))?;
    Ok(Some(CloneSource::Snapshot {
        pool: pool.into(),
        image: image.into(),
        snapshot: snap.into(),
    }))
}

/// Map a parser's field to the argument that sets it, for an operator-facing message.
fn invalid(e: &ObjectError, flag: impl Fn(&str) -> Option<&'static str>) -> String {
    match flag(&e.field) {
        Some(f) => format!("invalid {} ({f}): {}", e.field, e.reason),
        None => format!(
            "the spec would be invalid: {}: {} (existing value; fix or remove it first)",
            e.field, e.reason
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

async fn list(store: &Store, prefix: &str) -> Result<Vec<Kv>, String> {
    store
        .list(prefix)
        .await
        .map(|(kvs, _)| kvs)
        .map_err(crate::ctl::etcd_error)
}

async fn get(store: &Store, key: &str) -> Result<Option<KeyEntry>, String> {
    Ok(store
        .get(key)
        .await
        .map_err(crate::ctl::etcd_error)?
        .map(KeyEntry::from))
}

/// Observed values under `ceph/observed/<kind>/`, by id.
async fn observed(store: &Store, kind: &str) -> Result<BTreeMap<String, Value>, String> {
    let prefix = format!("{OBSERVED_PREFIX}{kind}/");
    Ok(list(store, &prefix)
        .await?
        .into_iter()
        .filter_map(|kv| {
            let id = kv.key.strip_prefix(&prefix)?.to_string();
            Some((id, json_or_string(&kv.value)))
        })
        .collect())
}

fn key_json(keys: &Keys, sub: &str) -> Value {
    keys.get(sub)
        .map(|e| json_or_string(&e.value))
        .unwrap_or(Value::Null)
}

fn human_bytes(v: &Value) -> String {
    let Some(mut n) = v.as_f64() else {
        return str_of(v);
    };
    for unit in ["B", "K", "M", "G", "T", "P"] {
        if n < 1024.0 || unit == "P" {
            return if n.fract() == 0.0 {
                format!("{n}{unit}")
            } else {
                format!("{n:.1}{unit}")
            };
        }
        n /= 1024.0;
    }
    str_of(v)
}

fn state_of(status: &Value) -> String {
    match status.get("state") {
        Some(s) => {
            let mut out = str_of(s);
            if let Some(e) = status.get("error").filter(|e| !e.is_null()) {
                let field = status.get("field").map(str_of).unwrap_or_default();
                out.push_str(&format!(" ({field}: {})", str_of(e)));
            }
            out
        }
        None if status.is_null() => "-".into(),
        None => str_of(status),
    }
}

// --- pools ---

fn pool_json(name: &str, keys: Option<&Keys>, observed: Option<&Value>) -> Value {
    let empty = Keys::new();
    let keys = keys.unwrap_or(&empty);
    let declared = keys.contains_key("spec");
    let parsed = declared.then(|| parse_pool(name, keys));
    json!({
        "name": name,
        "declared": declared,
        "valid": parsed.as_ref().map(Result::is_ok),
        "error": parsed.as_ref().and_then(|p| p.as_ref().err()).map(ToString::to_string),
        "spec": key_json(keys, "spec"),
        "status": key_json(keys, "status"),
        "observed": observed.cloned().unwrap_or(Value::Null),
    })
}

/// `ceph pool list`: spec, status and observed state joined by pool name (pools Ceph has
/// but nobody declared are listed with `declared: false`).
pub async fn pool_list(store: &Store) -> Result<Value, String> {
    let groups = debvisor_objects::reactor::group_keys(
        POOLS_PREFIX,
        list(store, POOLS_PREFIX).await?,
        |_| true,
    );
    let obs = observed(store, "pools").await?;
    let mut names: Vec<&String> = groups.keys().chain(obs.keys()).collect();
    names.sort();
    names.dedup();
    Ok(Value::Array(
        names
            .into_iter()
            .map(|n| pool_json(n, groups.get(n), obs.get(n)))
            .collect(),
    ))
}

/// `ceph pool show POOL`.
pub async fn pool_show(store: &Store, pool: &str) -> Result<Value, String> {
    if let Err(e) = check_pool("POOL", pool) {
        // Ceph's own pools (`.mgr`) have names nobody can declare; show them as observed.
        let obs = observed(store, "pools").await?;
        return obs
            .get(pool)
            .map(|o| pool_json(pool, None, Some(o)))
            .ok_or(e);
    }
    let prefix = format!("{POOLS_PREFIX}{pool}/");
    let mut groups =
        debvisor_objects::reactor::group_keys(POOLS_PREFIX, list(store, &prefix).await?, |_| true);
    let keys = groups.remove(pool);
    let obs = get(store, &format!("{OBSERVED_PREFIX}pools/{pool}")).await?;
    if keys.is_none() && obs.is_none() {
        return Err(format!(
            "pool {pool} not found (no {} and not observed in Ceph)",
            pool_spec_key(pool)
        ));
    }
    let obs = obs.map(|e| json_or_string(&e.value));
    Ok(pool_json(pool, keys.as_ref(), obs.as_ref()))
}

fn pool_table(v: &Value) -> String {
    let mut rows = vec![[
        "POOL",
        "PG_NUM",
        "SIZE",
        "PROTECTED",
        "STATE",
        "CEPH",
        "STORED",
        "USED",
        "AVAIL",
    ]
    .map(String::from)
    .to_vec()];
    for p in v.as_array().into_iter().flatten() {
        let spec = &p["spec"];
        let o = &p["observed"];
        let state = if p["valid"] == false {
            format!("INVALID: {}", str_of(&p["error"]))
        } else if p["declared"] == false {
            "undeclared".into()
        } else {
            state_of(&p["status"])
        };
        rows.push(vec![
            str_of(&p["name"]),
            str_of(&spec["pg_num"]),
            str_of(&spec["size"]),
            if spec["protected"] == true {
                "yes".into()
            } else if p["declared"] == true {
                "no".into()
            } else {
                "-".into()
            },
            state,
            if o.is_null() {
                "absent".into()
            } else {
                format!("size {} pg {}", str_of(&o["size"]), str_of(&o["pg_num"]))
            },
            human_bytes(&o["stored"]),
            human_bytes(&o["bytes_used"]),
            human_bytes(&o["max_avail"]),
        ]);
    }
    output::table(&rows)
}

// --- volumes ---

fn snapshots_json(
    keys: &Keys,
    parsed: Option<&Result<debvisor_objects::ceph::Volume, ObjectError>>,
    observed: &Value,
) -> Vec<Value> {
    let mut names: Vec<String> = keys
        .keys()
        .filter_map(|k| k.strip_prefix("snapshots/"))
        .filter_map(|r| r.split_once('/').map(|(n, _)| n.to_string()))
        .collect();
    let obs: BTreeMap<String, Value> = observed["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["name"].as_str()?.to_string(), s.clone())))
        .collect();
    names.extend(obs.keys().cloned());
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|n| {
            let spec_sub = format!("snapshots/{n}/spec");
            let declared = keys.contains_key(&spec_sub);
            let error = match parsed {
                Some(Ok(v)) => v
                    .snapshots
                    .get(&n)
                    .and_then(|r| r.as_ref().err())
                    .map(ToString::to_string),
                _ => None,
            };
            json!({
                "name": n,
                "declared": declared,
                "valid": declared.then_some(error.is_none()),
                "error": error,
                "spec": key_json(keys, &spec_sub),
                "status": key_json(keys, &format!("snapshots/{n}/status")),
                "observed": obs.get(&n).cloned().unwrap_or(Value::Null),
            })
        })
        .collect()
}

fn volume_json(id: &str, keys: Option<&Keys>, observed: Option<&Value>) -> Value {
    let empty = Keys::new();
    let keys = keys.unwrap_or(&empty);
    let (pool, image) = id.split_once(':').unwrap_or((id, ""));
    let declared = keys.contains_key("spec");
    let parsed = declared.then(|| parse_volume(id, keys));
    let observed = observed.cloned().unwrap_or(Value::Null);
    let snapshots = snapshots_json(keys, parsed.as_ref(), &observed);
    json!({
        "volume": format!("{pool}/{image}"),
        "pool": pool,
        "image": image,
        "declared": declared,
        "valid": parsed.as_ref().map(Result::is_ok),
        "error": parsed.as_ref().and_then(|p| p.as_ref().err()).map(ToString::to_string),
        "size_bytes": parsed.as_ref().and_then(|p| p.as_ref().ok()).map(|v| v.spec.size),
        "spec": key_json(keys, "spec"),
        "status": key_json(keys, "status"),
        "observed": observed,
        "snapshots": snapshots,
    })
}

/// `ceph volume list [--pool P]`.
pub async fn volume_list(store: &Store, pool: Option<&str>) -> Result<Value, String> {
    if let Some(p) = pool {
        check_pool("--pool", p)?;
    }
    let groups = debvisor_objects::reactor::group_keys(
        VOLUMES_PREFIX,
        list(store, VOLUMES_PREFIX).await?,
        |_| true,
    );
    let obs = observed(store, "volumes").await?;
    let mut ids: Vec<&String> = groups.keys().chain(obs.keys()).collect();
    ids.sort();
    ids.dedup();
    Ok(Value::Array(
        ids.into_iter()
            .filter(|id| pool.is_none_or(|p| id.split_once(':').map(|(a, _)| a) == Some(p)))
            .map(|id| {
                let mut v = volume_json(id, groups.get(id), obs.get(id));
                // Snapshots stay in `volume show` / `snapshot list`; the list counts them.
                let n = v["snapshots"].as_array().map_or(0, Vec::len);
                v["snapshots"] = Value::from(n);
                v
            })
            .collect(),
    ))
}

async fn read_volume(
    store: &Store,
    pool: &str,
    image: &str,
) -> Result<(Keys, Option<Value>), String> {
    let id = volume_id(pool, image);
    let prefix = format!("{VOLUMES_PREFIX}{id}/");
    let mut g =
        debvisor_objects::reactor::group_keys(VOLUMES_PREFIX, list(store, &prefix).await?, |_| {
            true
        });
    let obs = get(store, &format!("{OBSERVED_PREFIX}volumes/{id}"))
        .await?
        .map(|e| json_or_string(&e.value));
    Ok((g.remove(&id).unwrap_or_default(), obs))
}

/// `ceph volume show POOL/IMAGE`.
pub async fn volume_show(store: &Store, volume: &str) -> Result<Value, String> {
    let (pool, image) = parse_volume_arg("VOLUME", volume)?;
    let (keys, obs) = read_volume(store, pool, image).await?;
    if keys.is_empty() && obs.is_none() {
        return Err(format!(
            "volume {pool}/{image} not found (no {} and not observed in Ceph)",
            volume_spec_key(pool, image)
        ));
    }
    Ok(volume_json(
        &volume_id(pool, image),
        Some(&keys),
        obs.as_ref(),
    ))
}

fn volume_table(v: &Value) -> String {
    let mut rows = vec![[
        "VOLUME",
        "SIZE",
        "STATE",
        "CEPH_SIZE",
        "USED",
        "PARENT",
        "SNAPSHOTS",
    ]
    .map(String::from)
    .to_vec()];
    for x in v.as_array().into_iter().flatten() {
        let o = &x["observed"];
        let state = if x["valid"] == false {
            format!("INVALID: {}", str_of(&x["error"]))
        } else if x["declared"] == false {
            "undeclared".into()
        } else if x["spec"]["delete"] == true && x["status"]["state"] != "deleted" {
            format!("removing ({})", state_of(&x["status"]))
        } else {
            state_of(&x["status"])
        };
        rows.push(vec![
            str_of(&x["volume"]),
            human_bytes(&x["size_bytes"]),
            state,
            if o.is_null() {
                "absent".into()
            } else {
                human_bytes(&o["size"])
            },
            human_bytes(&o["used"]),
            str_of(&o["parent"]),
            str_of(&x["snapshots"]),
        ]);
    }
    output::table(&rows)
}

/// `ceph snapshot list POOL/IMAGE`.
pub async fn snapshot_list(store: &Store, volume: &str) -> Result<Value, String> {
    let (pool, image) = parse_volume_arg("VOLUME", volume)?;
    let (keys, obs) = read_volume(store, pool, image).await?;
    if keys.is_empty() && obs.is_none() {
        return Err(format!(
            "volume {pool}/{image} not found (no {} and not observed in Ceph)",
            volume_spec_key(pool, image)
        ));
    }
    let v = volume_json(&volume_id(pool, image), Some(&keys), obs.as_ref());
    Ok(v["snapshots"].clone())
}

fn snapshot_table(v: &Value) -> String {
    let mut rows = vec![
        ["SNAPSHOT", "STATE", "ROLLBACK", "CEPH", "PROTECTED", "USED"]
            .map(String::from)
            .to_vec(),
    ];
    for s in v.as_array().into_iter().flatten() {
        let o = &s["observed"];
        let state = if s["valid"] == false {
            format!("INVALID: {}", str_of(&s["error"]))
        } else if s["declared"] == false {
            "undeclared".into()
        } else {
            state_of(&s["status"])
        };
        rows.push(vec![
            str_of(&s["name"]),
            state,
            str_of(&s["spec"]["rollback"]),
            if o.is_null() {
                "absent".into()
            } else {
                "present".into()
            },
            str_of(&o["protected"]),
            human_bytes(&o["used"]),
        ]);
    }
    output::table(&rows)
}

// --- templates ---

fn template_json(name: &str, raw: &[u8]) -> Value {
    let parsed = parse_template(name, raw);
    let spec = json_or_string(raw);
    json!({
        "name": name,
        "valid": parsed.is_ok(),
        "error": parsed.as_ref().err().map(ToString::to_string),
        "pool": spec.get("pool"),
        "image": spec.get("image"),
        "snapshot": spec.get("snapshot"),
        "spec": spec,
    })
}

/// `ceph template list`.
pub async fn template_list(store: &Store) -> Result<Value, String> {
    Ok(Value::Array(
        list(store, TEMPLATES_PREFIX)
            .await?
            .into_iter()
            .filter_map(|kv| {
                let name = kv.key.strip_prefix(TEMPLATES_PREFIX)?;
                (!name.contains('/')).then(|| template_json(name, &kv.value))
            })
            .collect(),
    ))
}

/// `ceph template show NAME`.
pub async fn template_show(store: &Store, name: &str) -> Result<Value, String> {
    check_template_name(name)?;
    let e = get(store, &template_key(name))
        .await?
        .ok_or_else(|| format!("template {name} not found (no {})", template_key(name)))?;
    Ok(template_json(name, &e.value))
}

fn check_template_name(name: &str) -> Result<(), String> {
    validate_image_name(name).map_err(|r| format!("invalid NAME {name:?}: template name {r}"))
}

fn template_table(v: &Value) -> String {
    let mut rows = vec![["TEMPLATE", "SOURCE", "VALID"].map(String::from).to_vec()];
    for t in v.as_array().into_iter().flatten() {
        rows.push(vec![
            str_of(&t["name"]),
            format!(
                "{}/{}@{}",
                str_of(&t["pool"]),
                str_of(&t["image"]),
                str_of(&t["snapshot"])
            ),
            if t["valid"] == true {
                "yes".into()
            } else {
                format!("no: {}", str_of(&t["error"]))
            },
        ]);
    }
    output::table(&rows)
}

// --- status ---

/// `ceph status`: health, usage, OSD and pool counts as the primary reported them.
pub async fn status(store: &Store) -> Result<Value, String> {
    let health = get(store, &health_key()).await?;
    let usage = get(store, &usage_key()).await?;
    let osds = observed(store, "osds").await?;
    let obs_pools = observed(store, "pools").await?;
    let pools = pool_list(store).await?;
    let reported = health.is_some() || usage.is_some() || !osds.is_empty() || !obs_pools.is_empty();
    let up = osds.values().filter(|o| o["up"] == true).count();
    let inn = osds.values().filter(|o| o["in"] == true).count();
    let down: Vec<&String> = osds
        .iter()
        .filter(|(_, o)| o["up"] != true)
        .map(|(id, _)| id)
        .collect();
    let arr = pools.as_array().cloned().unwrap_or_default();
    let count = |f: &dyn Fn(&Value) -> bool| arr.iter().filter(|p| f(p)).count();
    Ok(json!({
        "reported": reported,
        "health": health.map(|e| json_or_string(&e.value)),
        "usage": usage.map(|e| json_or_string(&e.value)),
        "osds": { "total": osds.len(), "up": up, "in": inn, "down": down },
        "pools": {
            "declared": count(&|p| p["declared"] == true),
            "observed": count(&|p| !p["observed"].is_null()),
            "ready": count(&|p| p["status"]["state"] == "ready"),
            "error": arr.iter()
                .filter(|p| p["valid"] == false || p["status"]["state"] == "error")
                .map(|p| p["name"].clone())
                .collect::<Vec<_>>(),
            "undeclared": arr.iter()
                .filter(|p| p["declared"] == false)
                .map(|p| p["name"].clone())
                .collect::<Vec<_>>(),
        },
    }))
}

fn status_text(v: &Value) -> String {
    if v["reported"] != true {
        return format!(
            "no Ceph state reported yet: no primary has written {} (is `ceph:` enabled on the nodes and a primary elected?)\n",
            health_key()
        );
    }
    let h = &v["health"];
    let mut out = format!("health: {}\n", str_of(&h["status"]));
    if let Some(checks) = h["checks"].as_object() {
        for (name, c) in checks {
            out.push_str(&format!(
                "  {name} {}: {}{}\n",
                str_of(&c["severity"]),
                str_of(&c["message"]),
                if c["muted"] == true { " (muted)" } else { "" }
            ));
        }
    }
    let u = &v["usage"];
    out.push_str(&format!(
        "usage:  {} used of {} ({} available, {})\n",
        human_bytes(&u["used_bytes"]),
        human_bytes(&u["total_bytes"]),
        human_bytes(&u["avail_bytes"]),
        u["used_ratio"]
            .as_f64()
            .map(|r| format!("{:.1}%", r * 100.0))
            .unwrap_or_else(|| "-".into())
    ));
    let o = &v["osds"];
    out.push_str(&format!(
        "osds:   {} total, {} up, {} in{}\n",
        o["total"],
        o["up"],
        o["in"],
        match o["down"].as_array() {
            Some(d) if !d.is_empty() => format!(
                "; down: {}",
                d.iter().map(str_of).collect::<Vec<_>>().join(", ")
            ),
            _ => String::new(),
        }
    ));
    let p = &v["pools"];
    out.push_str(&format!(
        "pools:  {} declared ({} ready), {} in Ceph",
        p["declared"], p["ready"], p["observed"]
    ));
    for (what, key) in [("in error", "error"), ("undeclared", "undeclared")] {
        if let Some(a) = p[key].as_array().filter(|a| !a.is_empty()) {
            out.push_str(&format!(
                "; {what}: {}",
                a.iter().map(str_of).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// How many times a write re-reads and re-applies its change after losing a race.
const ATTEMPTS: usize = 3;

/// A spec after a change, from the raw JSON object read (or a new one).
fn spec_map(raw: Option<&KeyEntry>, key: &str) -> Result<Map<String, Value>, String> {
    match raw {
        None => Ok(Map::new()),
        Some(e) => match serde_json::from_slice::<Value>(&e.value) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(format!(
                "{key} is not a JSON object; fix or rewrite it first (nothing was changed)"
            )),
        },
    }
}

fn one_key(sub: &str, value: &[u8]) -> Keys {
    BTreeMap::from([(
        sub.to_string(),
        KeyEntry {
            value: value.to_vec(),
            mod_revision: 0,
            lease: 0,
        },
    )])
}

/// Build a pool spec from the current one (or defaults) and validate it with [`parse_pool`].
pub fn plan_pool_spec(
    pool: &str,
    current: Option<&KeyEntry>,
    pg_num: Option<u32>,
    size: Option<u32>,
    protected: Option<bool>,
    delete: Option<bool>,
) -> Result<Vec<u8>, String> {
    let key = pool_spec_key(pool);
    let mut m = spec_map(current, &key)?;
    if current.is_none() {
        m.insert("pg_num".into(), DEFAULT_PG_NUM.into());
        m.insert("size".into(), DEFAULT_POOL_SIZE.into());
        m.insert("protected".into(), false.into());
        m.insert("delete".into(), false.into());
    }
    for (k, v) in [
        ("pg_num", pg_num.map(Value::from)),
        ("size", size.map(Value::from)),
        ("protected", protected.map(Value::from)),
        ("delete", delete.map(Value::from)),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    }
    let bytes = Value::Object(m).to_string().into_bytes();
    parse_pool(pool, &one_key("spec", &bytes)).map_err(|e| {
        invalid(&e, |f| match f {
            "spec.pg_num" if pg_num.is_some() || current.is_none() => Some("--pg-num"),
            "spec.size" if size.is_some() || current.is_none() => Some("--size"),
            "spec.protected" if protected.is_some() => Some("--protected"),
            _ => None,
        })
    })?;
    Ok(bytes)
}

/// Build a volume spec from the current one and validate it with [`parse_volume`].
pub fn plan_volume_spec(
    pool: &str,
    image: &str,
    current: Option<&KeyEntry>,
    size: Option<(&str, &'static str)>,
    clone_from: Option<&CloneSource>,
    allow_shrink: Option<bool>,
    delete: bool,
) -> Result<Vec<u8>, String> {
    let mut m = spec_map(current, &volume_spec_key(pool, image))?;
    if let Some((s, _)) = size {
        m.insert("size".into(), s.trim().into());
    }
    if let Some(c) = clone_from {
        m.insert(
            "clone_from".into(),
            match c {
                CloneSource::Template(t) => json!({ "template": t }),
                CloneSource::Snapshot {
                    pool,
                    image,
                    snapshot,
                } => json!({ "pool": pool, "image": image, "snapshot": snapshot }),
            },
        );
    }
    if let Some(a) = allow_shrink {
        m.insert("allow_shrink".into(), a.into());
    }
    if delete {
        m.insert("delete".into(), true.into());
    }
    let bytes = Value::Object(m).to_string().into_bytes();
    parse_volume(&volume_id(pool, image), &one_key("spec", &bytes)).map_err(|e| {
        invalid(&e, |f| {
            if let Some((_, flag)) = size.filter(|_| f == "spec.size") {
                Some(flag)
            } else if f.starts_with("spec.clone_from") && clone_from.is_some() {
                Some(match clone_from {
                    Some(CloneSource::Template(_)) => "--from-template",
                    _ => "--clone-from",
                })
            } else {
                None
            }
        })
    })?;
    Ok(bytes)
}

/// Build a snapshot spec from the current one and validate it with [`parse_volume`].
pub fn plan_snapshot_spec(
    pool: &str,
    image: &str,
    snap: &str,
    volume_spec: &KeyEntry,
    current: Option<&KeyEntry>,
    rollback: Option<&str>,
    delete: bool,
) -> Result<Vec<u8>, String> {
    let mut m = spec_map(current, &snapshot_spec_key(pool, image, snap))?;
    if let Some(t) = rollback {
        m.insert("rollback".into(), t.into());
    }
    if delete {
        m.insert("delete".into(), true.into());
    }
    let bytes = Value::Object(m).to_string().into_bytes();
    let sub = format!("snapshots/{snap}/spec");
    let mut keys = one_key(&sub, &bytes);
    keys.insert("spec".into(), volume_spec.clone());
    let v = parse_volume(&volume_id(pool, image), &keys).map_err(|e| {
        format!(
            "volume {pool}/{image} has an invalid spec: {e}; fix it first (`ceph volume resize`)"
        )
    })?;
    match v.snapshots.get(snap) {
        Some(Ok(_)) => Ok(bytes),
        Some(Err(e)) => Err(invalid(e, |f| {
            if f == format!("snapshots/{snap}") {
                Some("SNAPSHOT")
            } else {
                None
            }
        })),
        None => Err(format!("snapshot {snap}: not parsed (internal error)")),
    }
}

/// Put `value` at `key` if the key is still at `read_rev` (0: still absent), plus extra
/// guards. Returns the revision written, or `None` when someone changed a guarded key.
pub async fn put_guarded(
    store: &Store,
    key: &str,
    read_rev: i64,
    value: Vec<u8>,
    also: &[(String, i64)],
) -> Result<Option<i64>, String> {
    let mut t = TxnBuilder::new().mod_revision_is(key, read_rev);
    for (k, r) in also {
        t = t.mod_revision_is(k, *r);
    }
    let r = store
        .txn(t.put(key, value))
        .await
        .map_err(crate::ctl::etcd_error)?;
    Ok(r.succeeded()
        .then(|| r.header().map_or(0, |h| h.revision())))
}

fn rev(e: Option<&KeyEntry>) -> i64 {
    e.map_or(0, |e| e.mod_revision)
}

fn lost(what: &str) -> Failure {
    Failure::from(format!(
        "{what} was changed by someone else while this command ran ({ATTEMPTS} times); run it again"
    ))
}

// --- pools ---

async fn pool_add(
    store: &Store,
    pool: &str,
    pg_num: Option<u32>,
    size: Option<u32>,
    protected: bool,
) -> Result<Written, Failure> {
    check_pool("POOL", pool)?;
    let bytes = plan_pool_spec(pool, None, pg_num, size, Some(protected), None)?;
    let key = pool_spec_key(pool);
    if get(store, &key).await?.is_some() {
        return Err(format!(
            "pool {pool} already exists ({key}); use `ceph pool set {pool}` to change it"
        )
        .into());
    }
    match put_guarded(store, &key, 0, bytes.clone(), &[]).await? {
        Some(revision) => Ok(Written {
            doc: json!({ "pool": pool, "spec": json_or_string(&bytes), "revision": revision }),
            text: format!("pool {pool} added\n"),
            revision,
            goal: Some(Goal::pool(pool, &["ready", "error"])),
        }),
        None => Err(format!("pool {pool} was added by someone else meanwhile ({key})").into()),
    }
}

async fn pool_set(
    store: &Store,
    pool: &str,
    size: Option<u32>,
    protected: Option<bool>,
) -> Result<Written, Failure> {
    check_pool("POOL", pool)?;
    if size.is_none() && protected.is_none() {
        return Err(Failure::from(
            "nothing to change: give --size and/or --protected".to_string(),
        ));
    }
    let key = pool_spec_key(pool);
    for _ in 0..ATTEMPTS {
        let cur = get(store, &key).await?.ok_or_else(|| {
            format!("pool {pool} not found (no {key}); `ceph pool add {pool}` declares it")
        })?;
        let bytes = plan_pool_spec(pool, Some(&cur), None, size, protected, None)?;
        if let Some(revision) =
            put_guarded(store, &key, cur.mod_revision, bytes.clone(), &[]).await?
        {
            return Ok(Written {
                doc: json!({ "pool": pool, "spec": json_or_string(&bytes), "revision": revision }),
                text: format!("pool {pool} updated\n"),
                revision,
                goal: Some(Goal::pool(pool, &["ready", "error"])),
            });
        }
    }
    Err(lost(&format!("pool {pool}")))
}

async fn pool_remove(store: &Store, pool: &str) -> Result<Written, Failure> {
    check_pool("POOL", pool)?;
    let key = pool_spec_key(pool);
    for _ in 0..ATTEMPTS {
        let cur = get(store, &key).await?.ok_or_else(|| {
            format!("pool {pool} not found (no {key}); only declared pools can be removed")
        })?;
        let spec = json_or_string(&cur.value);
        if spec["protected"] == true {
            return Err(format!(
                "pool {pool} is protected ({key}: protected = true); unprotect it first with `ceph pool set {pool} --protected false`"
            )
            .into());
        }
        let vols = volume_list(store, Some(pool)).await?;
        let left: Vec<String> = vols
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["declared"] == true && v["spec"]["delete"] != true)
            .map(|v| str_of(&v["volume"]))
            .collect();
        if !left.is_empty() {
            return Err(format!(
                "pool {pool} still has declared volumes: {}; remove them first",
                left.join(", ")
            )
            .into());
        }
        let bytes = plan_pool_spec(pool, Some(&cur), None, None, None, Some(true))?;
        if let Some(revision) =
            put_guarded(store, &key, cur.mod_revision, bytes.clone(), &[]).await?
        {
            return Ok(Written {
                doc: json!({ "pool": pool, "spec": json_or_string(&bytes), "revision": revision }),
                text: format!("pool {pool}: removal requested\n"),
                revision,
                goal: Some(Goal::pool(pool, &["deleted", "error"])),
            });
        }
    }
    Err(lost(&format!("pool {pool}")))
}

// --- volumes ---

async fn volume_add(
    store: &Store,
    volume: &str,
    size: &str,
    source: Option<CloneSource>,
) -> Result<Written, Failure> {
    let (pool, image) = parse_volume_arg("VOLUME", volume)?;
    parse_size(size).map_err(|r| format!("invalid --size {size:?}: {r}"))?;
    let bytes = plan_volume_spec(
        pool,
        image,
        None,
        Some((size, "--size")),
        source.as_ref(),
        None,
        false,
    )?;
    let key = volume_spec_key(pool, image);
    for _ in 0..ATTEMPTS {
        if get(store, &key).await?.is_some() {
            return Err(format!(
                "volume {pool}/{image} already exists ({key}); use `ceph volume resize` to change its size"
            )
            .into());
        }
        let pool_spec = get(store, &pool_spec_key(pool)).await?;
        let pool_observed = get(store, &format!("{OBSERVED_PREFIX}pools/{pool}")).await?;
        if pool_spec.is_none() && pool_observed.is_none() {
            return Err(format!(
                "pool {pool} of VOLUME {volume} not found (no {} and not observed in Ceph); `ceph pool add {pool}` declares it",
                pool_spec_key(pool)
            )
            .into());
        }
        if pool_spec
            .as_ref()
            .is_some_and(|e| json_or_string(&e.value)["delete"] == true)
        {
            return Err(format!("pool {pool} of VOLUME {volume} is being removed").into());
        }
        let mut also = vec![(pool_spec_key(pool), rev(pool_spec.as_ref()))];
        if let Some(CloneSource::Template(t)) = &source {
            let tk = template_key(t);
            let te = get(store, &tk)
                .await?
                .ok_or_else(|| format!("invalid --from-template {t:?}: no such template ({tk})"))?;
            parse_template(t, &te.value).map_err(|e| {
                format!("invalid --from-template {t:?}: the template is invalid: {e}")
            })?;
            also.push((tk, te.mod_revision));
        }
        if let Some(revision) = put_guarded(store, &key, 0, bytes.clone(), &also).await? {
            return Ok(Written {
                doc: json!({ "volume": format!("{pool}/{image}"), "spec": json_or_string(&bytes), "revision": revision }),
                text: format!("volume {pool}/{image} added\n"),
                revision,
                goal: Some(Goal::volume(pool, image, None, &["ready", "error"], None)),
            });
        }
    }
    Err(lost(&format!("volume {pool}/{image}")))
}

async fn volume_resize(
    store: &Store,
    volume: &str,
    size: &str,
    allow_shrink: bool,
) -> Result<Written, Failure> {
    let (pool, image) = parse_volume_arg("VOLUME", volume)?;
    let bytes_new = parse_size(size).map_err(|r| format!("invalid SIZE {size:?}: {r}"))?;
    let key = volume_spec_key(pool, image);
    for _ in 0..ATTEMPTS {
        let (keys, obs) = read_volume(store, pool, image).await?;
        let cur = keys.get("spec").ok_or_else(|| {
            format!("volume {pool}/{image} not found (no {key}); `ceph volume add` declares it")
        })?;
        let spec = json_or_string(&cur.value);
        if spec["delete"] == true {
            return Err(
                format!("volume {pool}/{image} is being removed ({key}: delete = true)").into(),
            );
        }
        let current = obs.as_ref().and_then(|o| o["size"].as_u64()).or_else(|| {
            parse_volume(&volume_id(pool, image), &keys)
                .ok()
                .map(|v| v.spec.size)
        });
        if let Some(c) = current.filter(|c| bytes_new < *c && !allow_shrink) {
            return Err(format!(
                "invalid SIZE {size:?}: smaller than the current size {} of {pool}/{image}; shrinking loses data, pass --allow-shrink to do it",
                human_bytes(&Value::from(c))
            )
            .into());
        }
        let bytes = plan_volume_spec(
            pool,
            image,
            Some(cur),
            Some((size, "SIZE")),
            None,
            Some(allow_shrink),
            false,
        )?;
        if let Some(revision) =
            put_guarded(store, &key, cur.mod_revision, bytes.clone(), &[]).await?
        {
            return Ok(Written {
                doc: json!({ "volume": format!("{pool}/{image}"), "spec": json_or_string(&bytes), "revision": revision }),
                text: format!("volume {pool}/{image}: size {} requested\n", size.trim()),
                revision,
                goal: Some(Goal::volume(pool, image, None, &["ready", "error"], None)),
            });
        }
    }
    Err(lost(&format!("volume {pool}/{image}")))
}

async fn volume_remove(store: &Store, volume: &str) -> Result<Written, Failure> {
    let (pool, image) = parse_volume_arg("VOLUME", volume)?;
    let key = volume_spec_key(pool, image);
    for _ in 0..ATTEMPTS {
        let cur = get(store, &key).await?.ok_or_else(|| {
            format!(
                "volume {pool}/{image} not found (no {key}); only declared volumes can be removed"
            )
        })?;
        let bytes = plan_volume_spec(pool, image, Some(&cur), None, None, None, true)?;
        if let Some(revision) =
            put_guarded(store, &key, cur.mod_revision, bytes.clone(), &[]).await?
        {
            return Ok(Written {
                doc: json!({ "volume": format!("{pool}/{image}"), "spec": json_or_string(&bytes), "revision": revision }),
                text: format!("volume {pool}/{image}: removal requested\n"),
                revision,
                goal: Some(Goal::volume(pool, image, None, &["deleted", "error"], None)),
            });
        }
    }
    Err(lost(&format!("volume {pool}/{image}")))
}

// --- snapshots ---

/// What a snapshot write changes.
#[derive(Clone, Copy)]
enum SnapOp<'a> {
    Add,
    Rollback(&'a str),
    Remove,
}

async fn snapshot_write(
    store: &Store,
    volume: &str,
    snap: &str,
    op: SnapOp<'_>,
) -> Result<Written, Failure> {
    let (pool, image) = parse_volume_arg("VOLUME", volume)?;
    validate_snapshot_name(snap)
        .map_err(|r| format!("invalid SNAPSHOT {snap:?}: snapshot name {r}"))?;
    let vkey = volume_spec_key(pool, image);
    let key = snapshot_spec_key(pool, image, snap);
    for _ in 0..ATTEMPTS {
        let vspec = get(store, &vkey).await?.ok_or_else(|| {
            format!(
                "volume {pool}/{image} (VOLUME) has no spec ({vkey}); snapshots need their volume declared (`ceph volume add`)"
            )
        })?;
        if json_or_string(&vspec.value)["delete"] == true {
            return Err(
                format!("volume {pool}/{image} is being removed ({vkey}: delete = true)").into(),
            );
        }
        let cur = get(store, &key).await?;
        let (rollback, delete) = match (op, &cur) {
            (SnapOp::Add, Some(_)) => {
                return Err(
                    format!("snapshot {snap} of {pool}/{image} already exists ({key})").into(),
                )
            }
            (SnapOp::Add, None) => (None, false),
            (_, None) => {
                return Err(
                    format!("snapshot {snap} of {pool}/{image} not found (no {key})").into(),
                )
            }
            (SnapOp::Rollback(t), Some(c)) => {
                if json_or_string(&c.value)["delete"] == true {
                    return Err(
                        format!("snapshot {snap} of {pool}/{image} is being removed").into(),
                    );
                }
                (Some(t), false)
            }
            (SnapOp::Remove, Some(_)) => (None, true),
        };
        let bytes = plan_snapshot_spec(pool, image, snap, &vspec, cur.as_ref(), rollback, delete)?;
        let also = [(vkey.clone(), vspec.mod_revision)];
        if let Some(revision) =
            put_guarded(store, &key, rev(cur.as_ref()), bytes.clone(), &also).await?
        {
            let (text, states): (String, &[&str]) = match op {
                SnapOp::Add => (
                    format!("snapshot {snap} of {pool}/{image} added\n"),
                    &["ready", "error"],
                ),
                SnapOp::Rollback(t) => (
                    format!("snapshot {snap} of {pool}/{image}: rollback requested (token {t})\n"),
                    &["ready", "error"],
                ),
                SnapOp::Remove => (
                    format!("snapshot {snap} of {pool}/{image}: removal requested\n"),
                    &["deleted", "error"],
                ),
            };
            let token = match op {
                SnapOp::Rollback(t) => Some(t.to_string()),
                _ => None,
            };
            return Ok(Written {
                doc: json!({
                    "volume": format!("{pool}/{image}"),
                    "snapshot": snap,
                    "spec": json_or_string(&bytes),
                    "revision": revision,
                }),
                text,
                revision,
                goal: Some(Goal::volume(pool, image, Some(snap), states, token)),
            });
        }
    }
    Err(lost(&format!("snapshot {snap} of {pool}/{image}")))
}

async fn snapshot_add(store: &Store, volume: &str, snap: &str) -> Result<Written, Failure> {
    snapshot_write(store, volume, snap, SnapOp::Add).await
}

/// A new rollback token: the request time, made different from the previous token.
pub fn rollback_token(previous: Option<&str>, now: OffsetDateTime) -> String {
    let t = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp_nanos().to_string());
    if previous == Some(t.as_str()) {
        format!("{t}-2")
    } else {
        t
    }
}

async fn snapshot_rollback(store: &Store, volume: &str, snap: &str) -> Result<Written, Failure> {
    let (pool, image) = parse_volume_arg("VOLUME", volume)?;
    let previous = match get(store, &snapshot_spec_key(pool, image, snap)).await? {
        Some(e) => json_or_string(&e.value)["rollback"]
            .as_str()
            .map(String::from),
        None => None,
    };
    let token = rollback_token(previous.as_deref(), OffsetDateTime::now_utc());
    snapshot_write(store, volume, snap, SnapOp::Rollback(&token)).await
}

async fn snapshot_remove(store: &Store, volume: &str, snap: &str) -> Result<Written, Failure> {
    snapshot_write(store, volume, snap, SnapOp::Remove).await
}

// --- templates ---

async fn template_add(
    store: &Store,
    name: &str,
    pool: &str,
    image: &str,
    snapshot: &str,
) -> Result<Written, Failure> {
    check_template_name(name)?;
    let bytes = json!({ "backend": "rbd", "pool": pool, "image": image, "snapshot": snapshot })
        .to_string()
        .into_bytes();
    parse_template(name, &bytes).map_err(|e| {
        invalid(&e, |f| match f {
            "template.pool" => Some("--pool"),
            "template.image" => Some("--image"),
            "template.snapshot" => Some("--snapshot"),
            "template" => Some("NAME"),
            _ => None,
        })
    })?;
    let key = template_key(name);
    if get(store, &key).await?.is_some() {
        return Err(format!("template {name} already exists ({key}); remove it first").into());
    }
    match put_guarded(store, &key, 0, bytes.clone(), &[]).await? {
        Some(revision) => Ok(Written {
            doc: json!({ "template": name, "spec": json_or_string(&bytes), "revision": revision }),
            text: format!("template {name} added ({pool}/{image}@{snapshot})\n"),
            revision,
            goal: None,
        }),
        None => Err(format!("template {name} was added by someone else meanwhile ({key})").into()),
    }
}

async fn template_remove(store: &Store, name: &str) -> Result<Written, Failure> {
    check_template_name(name)?;
    let key = template_key(name);
    let cur = get(store, &key)
        .await?
        .ok_or_else(|| format!("template {name} not found (no {key})"))?;
    let t = TxnBuilder::new()
        .mod_revision_is(&key, cur.mod_revision)
        .delete(&key);
    let r = store.txn(t).await.map_err(crate::ctl::etcd_error)?;
    if !r.succeeded() {
        return Err(format!(
            "template {name} was changed by someone else while this command ran; run it again"
        )
        .into());
    }
    let revision = r.header().map_or(0, |h| h.revision());
    Ok(Written {
        doc: json!({ "template": name, "deleted": true, "revision": revision }),
        text: format!("template {name} removed\n"),
        revision,
        goal: None,
    })
}

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// What `--wait` waits for: a status key written after the request in one of `states`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goal {
    /// Object prefix followed (`ceph/pools/<pool>/`, `ceph/volumes/<pool>:<image>/`).
    pub prefix: String,
    /// Status key relative to the prefix.
    pub status: String,
    /// What the object is called in messages.
    pub label: String,
    /// Final states (`error` ends the wait with a failure).
    pub states: Vec<String>,
    /// For a rollback: `ready` only counts with `rolled_back` equal to this token.
    pub token: Option<String>,
}

impl Goal {
    fn pool(pool: &str, states: &[&str]) -> Goal {
        Goal {
            prefix: format!("{POOLS_PREFIX}{pool}/"),
            status: "status".into(),
            label: format!("pool {pool}"),
            states: states.iter().map(|s| s.to_string()).collect(),
            token: None,
        }
    }

    fn volume(
        pool: &str,
        image: &str,
        snap: Option<&str>,
        states: &[&str],
        token: Option<String>,
    ) -> Goal {
        Goal {
            prefix: format!("{VOLUMES_PREFIX}{}/", volume_id(pool, image)),
            status: snap.map_or_else(|| "status".into(), |s| format!("snapshots/{s}/status")),
            label: match snap {
                Some(s) => format!("snapshot {s} of {pool}/{image}"),
                None => format!("volume {pool}/{image}"),
            },
            states: states.iter().map(|s| s.to_string()).collect(),
            token,
        }
    }

    /// The verdict on the object's keys: `None` while still waiting, `Ok(status)` when a
    /// final state was written after `rev`, `Err(status)` for an `error`.
    pub fn verdict(&self, keys: &Keys, rev: i64) -> Option<Result<Value, Value>> {
        let e = keys.get(&self.status).filter(|e| e.mod_revision > rev)?;
        let s = json_or_string(&e.value);
        let state = s.get("state").and_then(Value::as_str)?;
        if state == "error" {
            return Some(Err(s));
        }
        if !self.states.iter().any(|x| x == state) {
            return None;
        }
        if let Some(t) = &self.token {
            if state == "ready" && s.get("rolled_back").and_then(Value::as_str) != Some(t) {
                return None;
            }
        }
        Some(Ok(s))
    }
}

async fn finish(
    store: &Store,
    w: Written,
    wait: &WaitArgs,
    json_out: bool,
) -> Result<String, Failure> {
    let Some(goal) = w.goal.filter(|_| wait.wait) else {
        return Ok(if json_out {
            format!("{}\n", w.doc)
        } else {
            w.text
        });
    };
    let rev = w.revision;
    let mut progress = crate::ctl::wait::Progress::new();
    let r = crate::ctl::wait::follow(store, &goal.prefix, wait.timeout, |keys| {
        let now = key_json(keys, &goal.status);
        progress.show(format!("{}: status {}", goal.label, state_of(&now)));
        goal.verdict(keys, rev)
    })
    .await?;
    let mut doc = w.doc;
    match r {
        Followed::Done(Ok(status), _) => {
            let text = format!("{}: {}\n", goal.label, state_of(&status));
            doc["status"] = status;
            Ok(if json_out { format!("{doc}\n") } else { text })
        }
        Followed::Done(Err(status), _) => {
            let msg = format!("{} failed: {}", goal.label, state_of(&status));
            doc["status"] = status;
            Err(Failure {
                message: msg,
                stdout: json_out.then(|| format!("{doc}\n")),
            })
        }
        Followed::TimedOut(keys) => {
            let status = key_json(&keys, &goal.status);
            let msg = format!(
                "timed out after {}s waiting for {} to be {}; status now: {}",
                wait.timeout.as_secs(),
                goal.label,
                goal.states.join("|"),
                state_of(&status)
            );
            doc["status"] = status;
            Err(Failure {
                message: msg,
                stdout: json_out.then(|| format!("{doc}\n")),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(v: &str, rev: i64) -> KeyEntry {
        KeyEntry {
            value: v.as_bytes().to_vec(),
            mod_revision: rev,
            lease: 0,
        }
    }

    #[test]
    fn pool_specs_round_trip_through_the_parser() {
        let b = plan_pool_spec("rbd", None, Some(64), Some(2), Some(true), None).expect("add");
        let p = parse_pool("rbd", &one_key("spec", &b)).expect("parses");
        assert_eq!(
            (p.spec.pg_num, p.spec.size, p.spec.protected, p.spec.delete),
            (64, 2, true, false)
        );
        let b = plan_pool_spec("rbd", None, None, None, Some(false), None).expect("defaults");
        let p = parse_pool("rbd", &one_key("spec", &b)).expect("parses");
        assert_eq!(
            (p.spec.pg_num, p.spec.size),
            (DEFAULT_PG_NUM, DEFAULT_POOL_SIZE)
        );
        let cur = entry(std::str::from_utf8(&b).expect("utf8"), 5);
        let b = plan_pool_spec("rbd", Some(&cur), None, Some(3), None, Some(true)).expect("set");
        let p = parse_pool("rbd", &one_key("spec", &b)).expect("parses");
        assert!(p.spec.delete && p.spec.size == 3);
        let e = plan_pool_spec("rbd", None, Some(48), None, None, None).expect_err("pg");
        assert!(e.contains("--pg-num"), "{e}");
        let e = plan_pool_spec("rbd", None, None, Some(11), None, None).expect_err("size");
        assert!(e.contains("--size"), "{e}");
        // A bad existing field is named as such, not blamed on an argument.
        let bad = entry(r#"{"pg_num":48}"#, 5);
        let e = plan_pool_spec("rbd", Some(&bad), None, Some(2), None, None).expect_err("bad");
        assert!(e.contains("spec.pg_num") && e.contains("existing"), "{e}");
        let e = plan_pool_spec("rbd", Some(&entry("[]", 5)), None, Some(2), None, None)
            .expect_err("not an object");
        assert!(e.contains("ceph/pools/rbd/spec"), "{e}");
    }

    #[test]
    fn volume_and_snapshot_specs_round_trip_through_the_parser() {
        let src = clone_source(None, Some("rbd/base@golden")).expect("source");
        let b = plan_volume_spec(
            "rbd",
            "vm1",
            None,
            Some(("10G", "--size")),
            src.as_ref(),
            None,
            false,
        )
        .expect("add");
        let v = parse_volume("rbd:vm1", &one_key("spec", &b)).expect("parses");
        assert_eq!(v.spec.size, 10 << 30);
        assert_eq!(v.spec.clone_from, src);
        let src = clone_source(Some("deb12"), None).expect("template");
        let b = plan_volume_spec(
            "rbd",
            "vm1",
            None,
            Some(("1G", "--size")),
            src.as_ref(),
            None,
            false,
        )
        .expect("add");
        let v = parse_volume("rbd:vm1", &one_key("spec", &b)).expect("parses");
        assert_eq!(
            v.spec.clone_from,
            Some(CloneSource::Template("deb12".into()))
        );
        let cur = entry(std::str::from_utf8(&b).expect("utf8"), 7);
        let b2 = plan_volume_spec(
            "rbd",
            "vm1",
            Some(&cur),
            Some(("512M", "SIZE")),
            None,
            Some(true),
            false,
        )
        .expect("resize");
        let v = parse_volume("rbd:vm1", &one_key("spec", &b2)).expect("parses");
        assert!(v.spec.allow_shrink && v.spec.size == 512 << 20);
        assert_eq!(
            v.spec.clone_from,
            Some(CloneSource::Template("deb12".into()))
        );
        let b3 = plan_volume_spec("rbd", "vm1", Some(&cur), None, None, None, true).expect("rm");
        assert!(
            parse_volume("rbd:vm1", &one_key("spec", &b3))
                .expect("parses")
                .spec
                .delete
        );

        let vspec = entry(std::str::from_utf8(&b).expect("utf8"), 7);
        let s = plan_snapshot_spec("rbd", "vm1", "s1", &vspec, None, None, false).expect("snap");
        let s2 = plan_snapshot_spec(
            "rbd",
            "vm1",
            "s1",
            &vspec,
            Some(&entry(std::str::from_utf8(&s).expect("utf8"), 8)),
            Some("2026-01-01T00:00:00Z"),
            false,
        )
        .expect("rollback");
        let mut keys = one_key("spec", &b);
        keys.insert(
            "snapshots/s1/spec".into(),
            entry(std::str::from_utf8(&s2).expect("utf8"), 9),
        );
        let v = parse_volume("rbd:vm1", &keys).expect("parses");
        assert_eq!(
            v.snapshots["s1"]
                .as_ref()
                .expect("snapshot")
                .rollback
                .as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        let e = plan_snapshot_spec("rbd", "vm1", "s1", &entry("{}", 7), None, None, false)
            .expect_err("volume spec without size");
        assert!(e.contains("spec.size"), "{e}");
    }

    #[test]
    fn arguments_are_validated_with_their_name() {
        assert_eq!(parse_volume_arg("VOLUME", "rbd/vm1"), Ok(("rbd", "vm1")));
        for (bad, part) in [
            ("rbd", "expected"),
            ("-x/a", "pool"),
            ("rbd/a@b", "image"),
            ("rbd/", "image"),
        ] {
            let e = parse_volume_arg("VOLUME", bad).expect_err(bad);
            assert!(e.contains("VOLUME") && e.contains(part), "{bad}: {e}");
        }
        for bad in ["rbd/base", "rbd/base@", "rbd@s", "x/y@a b"] {
            let e = clone_source(None, Some(bad)).expect_err(bad);
            assert!(e.contains("--clone-from"), "{e}");
        }
        assert!(clone_source(Some("a/b"), None)
            .expect_err("t")
            .contains("--from-template"));
        assert_eq!(clone_source(None, None), Ok(None));
    }

    #[test]
    fn rollback_tokens_change_every_time_and_parse() {
        let t = time::macros::datetime!(2026-11-23 18:04:05 UTC);
        let a = rollback_token(None, t);
        let b = rollback_token(Some(&a), t);
        assert_ne!(a, b);
        assert!(!b.is_empty() && b.len() <= 64);
    }

    #[test]
    fn waits_count_only_final_states_written_after_the_request() {
        let g = Goal::volume(
            "rbd",
            "vm1",
            Some("s1"),
            &["ready", "error"],
            Some("t2".into()),
        );
        let keys = |v: &str, rev: i64| {
            BTreeMap::from([("snapshots/s1/status".to_string(), entry(v, rev))])
        };
        assert_eq!(
            g.verdict(&keys(r#"{"state":"ready","rolled_back":"t2"}"#, 10), 10),
            None
        );
        assert_eq!(
            g.verdict(&keys(r#"{"state":"ready","rolled_back":"t1"}"#, 11), 10),
            None
        );
        assert_eq!(g.verdict(&keys(r#"{"state":"pending"}"#, 11), 10), None);
        assert!(matches!(
            g.verdict(&keys(r#"{"state":"ready","rolled_back":"t2"}"#, 11), 10),
            Some(Ok(_))
        ));
        assert!(matches!(
            g.verdict(&keys(r#"{"state":"error","error":"in use"}"#, 11), 10),
            Some(Err(_))
        ));
        let g = Goal::pool("rbd", &["deleted", "error"]);
        let keys = |v: &str| BTreeMap::from([("status".to_string(), entry(v, 11))]);
        assert_eq!(g.verdict(&keys(r#"{"state":"ready"}"#), 10), None);
        assert!(matches!(
            g.verdict(&keys(r#"{"state":"deleted"}"#), 10),
            Some(Ok(_))
        ));
    }
}
