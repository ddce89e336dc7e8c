//! Where `debvisorctl` finds etcd: its own small client configuration, so it runs from an
//! operator's workstation as well as on a node.
//!
//! Sources, the first that sets a field wins:
//!
//! 1. flags (`--endpoints`, `--prefix`, `--cacert`, `--cert`, `--key`, `--server-name`,
//!    `--user`, `--password-file`, `--timeout`);
//! 2. `DEBVISORCTL_<FIELD>` environment variables (`DEBVISORCTL_ENDPOINTS=https://a:2379,…`);
//! 3. a file: `--config FILE` (a daemon configuration, with its `DEBVISOR_*` overrides),
//!    else `--client-config FILE` / `DEBVISORCTL_CONFIG`, else
//!    `~/.config/debvisor/ctl.yaml` (`$XDG_CONFIG_HOME` honoured) when it exists, else
//!    `/etc/debvisor/debvisord.yaml` when it exists (on a node);
//! 4. defaults: `http://127.0.0.1:2379`, prefix `/debvisor`.
//!
//! `ctl.yaml` holds the same fields as the flags:
//!
//! ```yaml
//! endpoints: [https://hv1:2379, https://hv2:2379]
//! prefix: /debvisor
//! cacert: /etc/debvisor/ca.pem
//! cert: ~/.config/debvisor/me.pem
//! key: ~/.config/debvisor/me.key
//! timeout: 5s
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use debvisor_objects::xml_policy::XmlPolicy;
use debvisor_objects::StoreOptions;
use serde::Deserialize;

use crate::config::{self, DEFAULT_CONFIG_PATH};

/// The connection flags of `debvisorctl` (global, so they go before or after the command).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Connection (flags, DEBVISORCTL_*, ctl.yaml)")]
pub struct ClientArgs {
    /// A debvisord configuration file to take the store settings (and the domain-XML policy)
    /// from; default: the client config, else /etc/debvisor/debvisord.yaml when present.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// debvisorctl's own client config (default ~/.config/debvisor/ctl.yaml).
    #[arg(long, global = true, value_name = "FILE", env = "DEBVISORCTL_CONFIG")]
    pub client_config: Option<PathBuf>,
    /// etcd endpoints, comma-separated (http://host:2379, https://host:2379).
    #[arg(long, global = true, value_name = "URLS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Key prefix of the cluster (default /debvisor).
    #[arg(long, global = true, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// CA bundle that signed etcd's server certificates.
    #[arg(long, global = true, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd; needs --key.
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key of --cert.
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// TLS server name to verify instead of the endpoint's host.
    #[arg(long, global = true, value_name = "NAME")]
    pub server_name: Option<String>,
    /// etcd user (role-based auth); needs --password-file.
    #[arg(long, global = true, value_name = "USER")]
    pub user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Timeout of one etcd request, e.g. 5s.
    #[arg(long = "request-timeout", global = true, value_name = "DURATION", value_parser = crate::ctl::wait::parse_duration)]
    pub request_timeout: Option<Duration>,
}

/// `ctl.yaml`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientFile {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// Key prefix.
    pub prefix: Option<String>,
    /// CA bundle.
    pub cacert: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Its key.
    pub key: Option<PathBuf>,
    /// TLS server name.
    pub server_name: Option<String>,
    /// etcd user.
    pub user: Option<String>,
    /// Password file of `user`.
    pub password_file: Option<PathBuf>,
    /// Request timeout (`5s`).
    pub timeout: Option<String>,
}

/// What `debvisorctl` connects with, and where each part came from.
#[derive(Debug, Clone)]
pub struct Client {
    /// Store options.
    pub store: StoreOptions,
    /// The domain-XML policy `vm define` warns by (a daemon config's, else the default).
    pub xml_policy: XmlPolicy,
    /// The file the settings came from, if any (for messages).
    pub source: Option<PathBuf>,
}

fn defaults() -> StoreOptions {
    config::Config::default().store_options()
}

/// `~` at the start of a path is the home directory.
fn expand(p: PathBuf, home: Option<&Path>) -> PathBuf {
    match (p.strip_prefix("~"), home) {
        (Ok(rest), Some(h)) => h.join(rest),
        _ => p,
    }
}

/// The default client config path: `$XDG_CONFIG_HOME/debvisor/ctl.yaml` or
/// `~/.config/debvisor/ctl.yaml`.
pub fn default_client_path(env: &[(String, String)]) -> Option<PathBuf> {
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if let Some(x) = get("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("debvisor/ctl.yaml"));
    }
    get("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".config/debvisor/ctl.yaml"))
}

/// Parse a `ctl.yaml` text (`name` for messages).
pub fn parse_client_file(text: &str, name: &str) -> Result<ClientFile, String> {
    if text.trim().is_empty() {
        return Ok(ClientFile::default());
    }
    serde_saphyr::from_str(text).map_err(|e| format!("{name}: {e}"))
}

/// Resolve the client settings from flags, environment and files.
pub fn resolve(args: &ClientArgs, env: &[(String, String)]) -> Result<Client, String> {
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let home = get("HOME").map(PathBuf::from);
    let mut store = defaults();
    let mut policy = XmlPolicy::default();
    let mut source = None;
    let daemon_file = |path: &Path| -> Result<(StoreOptions, XmlPolicy), String> {
        config::load(path, env)
            .map(|c| (c.store_options(), c.domains.xml_policy.clone()))
            .map_err(|e| format!("{}: invalid configuration:\n{e}", path.display()))
    };
    // 3. A file.
    if let Some(p) = &args.config {
        (store, policy) = daemon_file(p)?;
        source = Some(p.clone());
    } else {
        let client_path = args
            .client_config
            .clone()
            .or_else(|| default_client_path(env).filter(|p| p.exists()));
        if let Some(p) = client_path {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("{}: cannot read: {e}", p.display()))?;
            let f = parse_client_file(&text, &p.display().to_string())?;
            apply_file(&mut store, f, home.as_deref(), &p)?;
            source = Some(p);
        } else if Path::new(DEFAULT_CONFIG_PATH).exists() {
            let p = PathBuf::from(DEFAULT_CONFIG_PATH);
            (store, policy) = daemon_file(&p)?;
            source = Some(p);
        }
    }
    // 2. Environment.
    if let Some(v) = get("DEBVISORCTL_ENDPOINTS") {
        store.endpoints = split(&v);
    }
    let path = |k: &str| get(k).map(|v| expand(PathBuf::from(v), home.as_deref()));
    set(&mut store.prefix, get("DEBVISORCTL_PREFIX"));
    store.ca = path("DEBVISORCTL_CACERT").or(store.ca);
    store.cert = path("DEBVISORCTL_CERT").or(store.cert);
    store.key = path("DEBVISORCTL_KEY").or(store.key);
    store.server_name = get("DEBVISORCTL_SERVER_NAME").or(store.server_name);
    store.user = get("DEBVISORCTL_USER").or(store.user);
    store.password_file = path("DEBVISORCTL_PASSWORD_FILE").or(store.password_file);
    if let Some(t) = get("DEBVISORCTL_TIMEOUT") {
        store.request_timeout = crate::ctl::wait::parse_duration(&t)
            .map_err(|e| format!("DEBVISORCTL_TIMEOUT: {e}"))?;
    }
    // 1. Flags.
    if !args.endpoints.is_empty() {
        store.endpoints = args.endpoints.clone();
    }
    set(&mut store.prefix, args.prefix.clone());
    let flag_path = |p: &Option<PathBuf>| p.clone().map(|p| expand(p, home.as_deref()));
    store.ca = flag_path(&args.cacert).or(store.ca);
    store.cert = flag_path(&args.cert).or(store.cert);
    store.key = flag_path(&args.key).or(store.key);
    store.server_name = args.server_name.clone().or(store.server_name);
    store.user = args.user.clone().or(store.user);
    store.password_file = flag_path(&args.password_file).or(store.password_file);
    if let Some(t) = args.request_timeout {
        store.request_timeout = t;
    }
    check(&store)?;
    Ok(Client {
        store,
        xml_policy: policy,
        source,
    })
}

fn set(field: &mut String, v: Option<String>) {
    if let Some(v) = v {
        *field = v;
    }
}

fn split(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn apply_file(
    store: &mut StoreOptions,
    f: ClientFile,
    home: Option<&Path>,
    path: &Path,
) -> Result<(), String> {
    let shown = path.display();
    if !f.endpoints.is_empty() {
        store.endpoints = f.endpoints;
    }
    set(&mut store.prefix, f.prefix);
    let p = |x: Option<PathBuf>| x.map(|p| expand(p, home));
    store.ca = p(f.cacert).or(store.ca.take());
    store.cert = p(f.cert).or(store.cert.take());
    store.key = p(f.key).or(store.key.take());
    store.server_name = f.server_name.or(store.server_name.take());
    store.user = f.user.or(store.user.take());
    store.password_file = p(f.password_file).or(store.password_file.take());
    if let Some(t) = f.timeout {
        store.request_timeout =
            crate::ctl::wait::parse_duration(&t).map_err(|e| format!("{shown}: timeout: {e}"))?;
    }
    Ok(())
}

/// The settings must make sense before a connection is tried (each error names its source).
fn check(s: &StoreOptions) -> Result<(), String> {
    if s.endpoints.is_empty() {
        return Err("no etcd endpoints: give --endpoints or DEBVISORCTL_ENDPOINTS".into());
    }
    for e in &s.endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(format!(
                "endpoint {e:?} must start with http:// or https:// (--endpoints, DEBVISORCTL_ENDPOINTS or the config file)"
            ));
        }
    }
    if !s.prefix.starts_with('/') || s.prefix.ends_with('/') && s.prefix.len() > 1 {
        return Err(format!(
            "prefix {:?} must start with '/' and not end with one (e.g. /debvisor)",
            s.prefix
        ));
    }
    if s.cert.is_some() != s.key.is_some() {
        return Err("--cert and --key go together (a client certificate needs its key)".into());
    }
    if s.user.is_some() != s.password_file.is_some() {
        return Err("--user and --password-file go together".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ctl.yaml");
        std::fs::write(
            &file,
            "endpoints: [https://f:2379]\nprefix: /file\ncacert: ~/ca.pem\ntimeout: 7s\n",
        )
        .expect("write");
        let mut args = ClientArgs {
            client_config: Some(file.clone()),
            ..ClientArgs::default()
        };
        let e = env(&[("HOME", "/home/op")]);
        let c = resolve(&args, &e).expect("file");
        assert_eq!(c.store.endpoints, vec!["https://f:2379"]);
        assert_eq!(c.store.prefix, "/file");
        assert_eq!(c.store.ca, Some(PathBuf::from("/home/op/ca.pem")));
        assert_eq!(c.store.request_timeout, Duration::from_secs(7));
        assert_eq!(c.source, Some(file.clone()));
        let e = env(&[
            ("HOME", "/home/op"),
            ("DEBVISORCTL_ENDPOINTS", "http://e1:2379, http://e2:2379"),
            ("DEBVISORCTL_PREFIX", "/env"),
        ]);
        let c = resolve(&args, &e).expect("env");
        assert_eq!(c.store.endpoints, vec!["http://e1:2379", "http://e2:2379"]);
        assert_eq!(c.store.prefix, "/env");
        args.endpoints = vec!["http://flag:2379".into()];
        args.prefix = Some("/flag".into());
        let c = resolve(&args, &e).expect("flags");
        assert_eq!(c.store.endpoints, vec!["http://flag:2379"]);
        assert_eq!(c.store.prefix, "/flag");
    }

    #[test]
    fn bad_settings_are_named() {
        let args = ClientArgs {
            endpoints: vec!["hv1:2379".into()],
            ..ClientArgs::default()
        };
        let e = resolve(&args, &[]).expect_err("no scheme");
        assert!(e.contains("http://"), "{e}");
        let args = ClientArgs {
            endpoints: vec!["http://a:1".into()],
            cert: Some("c.pem".into()),
            ..ClientArgs::default()
        };
        assert!(resolve(&args, &[]).expect_err("no key").contains("--key"));
        assert!(parse_client_file("bogus: 1\n", "ctl.yaml")
            .expect_err("unknown field")
            .contains("ctl.yaml"));
        assert_eq!(
            default_client_path(&env(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.config/debvisor/ctl.yaml"))
        );
        assert_eq!(
            default_client_path(&env(&[("HOME", "/h"), ("XDG_CONFIG_HOME", "/x")])),
            Some(PathBuf::from("/x/debvisor/ctl.yaml"))
        );
    }
}
