//! Kernel parameters for a hypervisor host: forwarding and the hardening set, written to
//! `/proc/sys` and read back to verify. Network sysctls are per network namespace, so a node
//! confined to a namespace changes only that namespace.

use std::collections::BTreeMap;
use std::path::PathBuf;

use thiserror::Error;

use crate::SysctlConfig;

/// Why a sysctl could not be applied.
#[derive(Debug, Error)]
pub enum SysctlError {
    #[error("sysctl {key}: cannot write {value:?}: {source}")]
    Write {
        key: String,
        value: String,
        source: std::io::Error,
    },
    #[error("sysctl {key}: cannot read back: {source}")]
    Read { key: String, source: std::io::Error },
    #[error("sysctl {key}: wrote {wanted:?} but the kernel reports {actual:?}")]
    Mismatch {
        key: String,
        wanted: String,
        actual: String,
    },
}

/// One key that was changed: its value before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlChange {
    pub key: String,
    pub before: String,
    pub after: String,
}

/// IP forwarding, v4 and v6: a hypervisor routes for its guests.
pub const FORWARDING: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
];

/// The hardening set (after DebVisor's `99-debvisor.conf`): no ICMP redirects, no source
/// routing, loose reverse-path filtering (strict breaks multi-homed and VXLAN hosts), SYN
/// cookies, martian logging, no broadcast pings.
pub const HARDENING: &[(&str, &str)] = &[
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
    ("net.ipv6.conf.all.accept_redirects", "0"),
    ("net.ipv6.conf.default.accept_redirects", "0"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
    ("net.ipv4.conf.all.accept_source_route", "0"),
    ("net.ipv4.conf.default.accept_source_route", "0"),
    ("net.ipv6.conf.all.accept_source_route", "0"),
    ("net.ipv4.conf.all.rp_filter", "2"),
    ("net.ipv4.conf.default.rp_filter", "2"),
    ("net.ipv4.tcp_syncookies", "1"),
    ("net.ipv4.conf.all.log_martians", "1"),
    ("net.ipv4.conf.default.log_martians", "1"),
    ("net.ipv4.icmp_echo_ignore_broadcasts", "1"),
];

/// The keys and values the config asks for, later entries winning (`extra` last).
pub fn plan(cfg: &SysctlConfig) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if cfg.forwarding {
        out.extend(
            FORWARDING
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
    }
    if cfg.hardening {
        out.extend(
            HARDENING
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
    }
    out.extend(cfg.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

fn path_of(root: &std::path::Path, key: &str) -> PathBuf {
    root.join(key.replace('.', "/"))
}

fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Apply `wanted` under `root` (`/proc/sys` on a host): write only what differs, read every
/// key back. Returns the changes made; errors name the key. Keys already right are untouched.
pub fn apply(
    root: &std::path::Path,
    wanted: &BTreeMap<String, String>,
) -> Result<Vec<SysctlChange>, SysctlError> {
    let mut changes = Vec::new();
    for (key, value) in wanted {
        let path = path_of(root, key);
        let read = |key: &str| -> Result<String, SysctlError> {
            std::fs::read_to_string(&path)
                .map(|s| normalize(&s))
                .map_err(|source| SysctlError::Read {
                    key: key.to_string(),
                    source,
                })
        };
        let before = read(key)?;
        let want = normalize(value);
        if before == want {
            continue;
        }
        std::fs::write(&path, format!("{want}\n")).map_err(|source| SysctlError::Write {
            key: key.clone(),
            value: want.clone(),
            source,
        })?;
        let after = read(key)?;
        if after != want {
            return Err(SysctlError::Mismatch {
                key: key.clone(),
                wanted: want,
                actual: after,
            });
        }
        changes.push(SysctlChange {
            key: key.clone(),
            before,
            after,
        });
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_layers_extra_last() {
        let mut cfg = SysctlConfig {
            apply: true,
            forwarding: true,
            hardening: true,
            extra: BTreeMap::new(),
        };
        cfg.extra
            .insert("net.ipv4.conf.all.rp_filter".into(), "1".into());
        let p = plan(&cfg);
        assert_eq!(p.get("net.ipv4.ip_forward").map(String::as_str), Some("1"));
        assert_eq!(
            p.get("net.ipv4.conf.all.rp_filter").map(String::as_str),
            Some("1")
        );
        cfg.forwarding = false;
        cfg.hardening = false;
        assert_eq!(plan(&cfg).len(), 1);
    }

    #[test]
    fn apply_writes_only_differences_and_verifies() {
        // A directory tree shaped like /proc/sys (plain files accept any value).
        let dir = std::env::temp_dir().join(format!("sysctl-test-{}", std::process::id()));
        let f = dir.join("net/ipv4");
        std::fs::create_dir_all(&f).expect("mkdir");
        std::fs::write(f.join("ip_forward"), "0\n").expect("write");
        std::fs::write(f.join("tcp_syncookies"), "1\n").expect("write");
        let wanted: BTreeMap<String, String> = [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.tcp_syncookies", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let ch = apply(&dir, &wanted).expect("apply");
        assert_eq!(
            ch,
            vec![SysctlChange {
                key: "net.ipv4.ip_forward".into(),
                before: "0".into(),
                after: "1".into()
            }]
        );
        assert!(apply(&dir, &wanted).expect("re-apply").is_empty());
        let missing: BTreeMap<String, String> =
            [("net.ipv4.nope".to_string(), "1".to_string())].into();
        let e = apply(&dir, &missing).expect_err("missing key");
        assert!(e.to_string().contains("net.ipv4.nope"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
