//! The cluster-wide settings in `config/blob` (DebVisor's config sync): what every node
//! applies at runtime, without a restart, and how a blob is validated as a whole before any
//! of it is applied. `debvisorctl config set` validates with the same parser before it
//! writes; each node validates again (plus what only it can check, e.g. that a sysctl key
//! exists on its kernel) and reports `nodes/<node>/config/{version,last_applied_at,status}`.
//!
//! The subset (YAML or JSON; every section optional):
//!
//! ```yaml
//! log_level: info,debvisor_daemon=debug     # the daemon's log filter
//! node_status:                              # when the primary calls a node DEGRADED
//!   memory_percent: 90
//!   load_percent_per_cpu: 300
//!   stale_ticks: 3
//!   rtt: 150ms
//! firewall_allow:                           # added to each node's firewall.extra_allow
//!   - {proto: tcp, port: 9100, source: 10.0.0.0/24, comment: node exporter}
//! sysctl:                                   # on top of networking.sysctl
//!   net.ipv4.tcp_keepalive_time: 600
//! vm_defaults:                              # what `vm define` uses when no flag is given
//!   autostart: true
//!   migration_method: live
//!   node_selector: memprov
//!   migration_max_downtime: 300
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use debvisor_firewall::{FirewallAllow, FirewallConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{MigrationMethod, NodeSelector};

/// `node_status` overrides (each optional; unset ones keep the node's own config).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStatusOverrides {
    /// Memory in use above this percentage of the total (1-100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_percent: Option<u32>,
    /// 1-minute load above this percentage per CPU (≥ 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_percent_per_cpu: Option<u32>,
    /// `last_seen` older than this many keepalive intervals (≥ 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_ticks: Option<u32>,
    /// Round-trip time to a peer above this (1ms-10s), e.g. `150ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt: Option<String>,
}

/// Defaults for `debvisorctl vm define` when its flags do not say otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefaults {
    /// `--autostart` unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// `--method` unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_method: Option<MigrationMethod>,
    /// `--selector` unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,
    /// Maximum downtime of a live migration, milliseconds (1-60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_max_downtime: Option<u64>,
}

/// The cluster-wide settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The daemons' log filter (like `logging.level`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Thresholds of the primary's node status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_status: Option<NodeStatusOverrides>,
    /// Allow rules added to every node's firewall (nodes with `firewall.enabled`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firewall_allow: Vec<FirewallAllow>,
    /// Kernel parameters (nodes with `networking.sysctl.apply`).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub sysctl: BTreeMap<String, String>,
    /// Defaults of `vm define`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_defaults: Option<VmDefaults>,
}

/// A field of the blob that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigFieldError {
    /// Path of the field (`firewall_allow[0].source`, `sysctl.net.ipv4.x`).
    pub field: String,
    /// Why.
    pub reason: String,
}

impl ConfigFieldError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigFieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A map whose values may be written as numbers or booleans (`net.x: 1`).
fn scalar_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let m: BTreeMap<String, Value> = BTreeMap::deserialize(d)?;
    m.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            Value::Number(n) => Ok((k, n.to_string())),
            Value::Bool(b) => Ok((k, if b { "1".into() } else { "0".into() })),
            other => Err(serde::de::Error::custom(format!(
                "{k}: expected a number or a string, got {other}"
            ))),
        })
        .collect()
}

/// Parse a duration like `150ms`, `2s`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 150ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?} is not a duration like 150ms or 2s")),
    }
}

/// The levels a log directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

fn check_log_level(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match d.split_once('=') {
            Some((target, level)) => {
                if target.is_empty()
                    || !target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                {
                    return Err(format!("{d:?}: {target:?} is not a module path"));
                }
                level
            }
            None => d,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{d:?} is neither a level (trace, debug, info, warn, error, off) nor target=level"
            ));
        }
    }
    Ok(())
}

/// Is `key` a sysctl key this config may set (`net.`, `vm.`, `kernel.`, `fs.`; dotted
/// names of letters, digits, `_` and `-`)?
fn check_sysctl_key(key: &str) -> Result<(), String> {
    const ROOTS: [&str; 4] = ["net", "vm", "kernel", "fs"];
    let mut parts = key.split('.');
    let root = parts.next().unwrap_or("");
    if !ROOTS.contains(&root) {
        return Err(format!(
            "only net.*, vm.*, kernel.* and fs.* keys can be set (got {root:?})"
        ));
    }
    let rest: Vec<&str> = parts.collect();
    if rest.is_empty()
        || rest.iter().any(|p| {
            p.is_empty()
                || p.starts_with('-')
                || !p
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
    {
        return Err("not a sysctl key (dotted names of letters, digits, '_' and '-')".into());
    }
    Ok(())
}

impl ClusterConfig {
    /// Parse a blob (JSON, or YAML) and validate it; the error names the field. Nothing of a
    /// blob that fails here may be applied.
    pub fn parse(text: &str) -> Result<ClusterConfig, ConfigFieldError> {
        let tree: Value = if text.trim_start().starts_with('{') {
            serde_json::from_str(text)
                .map_err(|e| ConfigFieldError::new("(blob)", format!("invalid JSON: {e}")))?
        } else if text.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            serde_saphyr::from_str(text)
                .map_err(|e| ConfigFieldError::new("(blob)", format!("invalid YAML: {e}")))?
        };
        let tree = if tree.is_null() {
            Value::Object(Default::default())
        } else {
            tree
        };
        let cfg: ClusterConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
            let p = e.path().to_string();
            let field = if p == "." { "(blob)".to_string() } else { p };
            ConfigFieldError::new(field, e.inner().to_string().replace('`', ""))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range and syntax checks of every field; the first problem, in field order.
    pub fn validate(&self) -> Result<(), ConfigFieldError> {
        if let Some(l) = &self.log_level {
            check_log_level(l).map_err(|r| ConfigFieldError::new("log_level", r))?;
        }
        if let Some(ns) = &self.node_status {
            if let Some(m) = ns.memory_percent.filter(|m| !(1..=100).contains(m)) {
                return Err(ConfigFieldError::new(
                    "node_status.memory_percent",
                    format!("must be between 1 and 100, got {m}"),
                ));
            }
            if ns.load_percent_per_cpu == Some(0) {
                return Err(ConfigFieldError::new(
                    "node_status.load_percent_per_cpu",
                    "must be at least 1",
                ));
            }
            if let Some(t) = ns.stale_ticks.filter(|t| *t < 2) {
                return Err(ConfigFieldError::new(
                    "node_status.stale_ticks",
                    format!("must be at least 2, got {t}"),
                ));
            }
            if let Some(r) = &ns.rtt {
                let d =
                    parse_duration(r).map_err(|e| ConfigFieldError::new("node_status.rtt", e))?;
                if d < Duration::from_millis(1) || d > Duration::from_secs(10) {
                    return Err(ConfigFieldError::new(
                        "node_status.rtt",
                        format!("must be between 1ms and 10s, got {r}"),
                    ));
                }
            }
        }
        let fw = FirewallConfig {
            extra_allow: self.firewall_allow.clone(),
            ..FirewallConfig::default()
        };
        if let Some((field, reason)) = fw.validate("firewall").into_iter().next() {
            let field = field.replacen("firewall.extra_allow", "firewall_allow", 1);
            return Err(ConfigFieldError::new(field, reason));
        }
        for (k, v) in &self.sysctl {
            let field = format!("sysctl.{k}");
            check_sysctl_key(k).map_err(|r| ConfigFieldError::new(&field, r))?;
            if v.trim().is_empty() || v.len() > 256 || v.contains(['\n', '\r', '\0']) {
                return Err(ConfigFieldError::new(
                    field,
                    "the value must be one line of at most 256 characters",
                ));
            }
        }
        if let Some(d) = self
            .vm_defaults
            .as_ref()
            .and_then(|v| v.migration_max_downtime)
        {
            if d == 0 || d > 60_000 {
                return Err(ConfigFieldError::new(
                    "vm_defaults.migration_max_downtime",
                    format!("{d} ms is outside 1..=60000"),
                ));
            }
        }
        Ok(())
    }

    /// `node_status.rtt` as a duration (validated by [`ClusterConfig::parse`]).
    pub fn rtt(&self) -> Option<Duration> {
        self.node_status
            .as_ref()
            .and_then(|n| n.rtt.as_deref())
            .and_then(|r| parse_duration(r).ok())
    }
}

/// The version `debvisorctl config set` gives a blob when the operator gives none: a
/// digest of its text (`c-` and 12 hex digits), so the same blob keeps its version.
pub fn digest_version(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("c-{:012x}", h & 0xffff_ffff_ffff)
}

/// A node's config sync status value: `OK`, `STALE: reason`, `ERROR: field: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncStatus {
    /// The current version is in force.
    Ok,
    /// The node could not apply the current version at runtime; the previous one stays.
    Stale(String),
    /// The node refused the current version (the field named); the previous one stays.
    Error(ConfigFieldError),
}

impl SyncStatus {
    /// The value written to `nodes/<node>/config/status`.
    pub fn value(&self) -> String {
        match self {
            SyncStatus::Ok => "OK".into(),
            SyncStatus::Stale(r) => format!("STALE: {r}"),
            SyncStatus::Error(e) => format!("ERROR: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_blob_parses_from_yaml_and_json() {
        let yaml = "log_level: info,debvisor_daemon=debug\nnode_status:\n  memory_percent: 90\n  rtt: 150ms\nfirewall_allow:\n  - {proto: tcp, port: 9100, source: 10.0.0.0/24}\nsysctl:\n  net.ipv4.tcp_keepalive_time: 600\nvm_defaults:\n  autostart: true\n  migration_method: shutdown\n  node_selector: memprov\n";
        let c = ClusterConfig::parse(yaml).expect("valid");
        assert_eq!(c.sysctl["net.ipv4.tcp_keepalive_time"], "600");
        assert_eq!(c.rtt(), Some(Duration::from_millis(150)));
        assert_eq!(c.firewall_allow[0].port.start, 9100);
        let json = serde_json::to_string(&c).expect("json");
        assert_eq!(ClusterConfig::parse(&json).expect("json parses"), c);
        assert_eq!(
            ClusterConfig::parse("").expect("empty"),
            ClusterConfig::default()
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        for (blob, field) in [
            ("log_level: loud\n", "log_level"),
            (
                "node_status: {memory_percent: 101}\n",
                "node_status.memory_percent",
            ),
            ("node_status: {stale_ticks: 1}\n", "node_status.stale_ticks"),
            ("node_status: {rtt: 20s}\n", "node_status.rtt"),
            (
                "firewall_allow: [{port: 22, source: 10.0.0.300/8}]\n",
                "firewall_allow[0].source",
            ),
            (
                "firewall_allow: [{proto: sctp, port: 1}]\n",
                "firewall_allow[0].proto",
            ),
            (
                "sysctl: {dev.cdrom.autoclose: 0}\n",
                "sysctl.dev.cdrom.autoclose",
            ),
            ("sysctl: {net..x: 1}\n", "sysctl.net..x"),
            (
                "vm_defaults: {migration_max_downtime: 0}\n",
                "vm_defaults.migration_max_downtime",
            ),
            (
                "vm_defaults: {node_selector: fastest}\n",
                "vm_defaults.node_selector",
            ),
            ("colour: blue\n", "colour"),
        ] {
            let e = ClusterConfig::parse(blob).expect_err(blob);
            assert_eq!(e.field, field, "{blob}: {e}");
        }
    }

    #[test]
    fn versions_and_statuses() {
        assert_eq!(digest_version("a"), digest_version("a"));
        assert_ne!(digest_version("a"), digest_version("b"));
        assert!(digest_version("a").starts_with("c-"));
        assert_eq!(SyncStatus::Ok.value(), "OK");
        assert_eq!(
            SyncStatus::Error(ConfigFieldError::new("sysctl.net.x", "no such key")).value(),
            "ERROR: sysctl.net.x: no such key"
        );
        assert_eq!(
            SyncStatus::Stale("nft refused".into()).value(),
            "STALE: nft refused"
        );
    }
}
