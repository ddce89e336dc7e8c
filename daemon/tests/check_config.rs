//! `debvisord check-config` on real files: valid configs pass, and every malformed config
//! exits non-zero with a message that names the offending field (or variable).

use std::path::Path;
use std::process::{Command, Output};

/// Run `debvisord check-config --config <path>` with only PATH and `env` in the environment.
fn check(path: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_debvisord"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .arg("check-config")
        .arg("--config")
        .arg(path);
    cmd.output().expect("run debvisord")
}

/// Write `yaml` to a temp file and check it; always sets a node name so the host's name
/// cannot matter.
fn check_yaml(yaml: &str, env: &[(&str, &str)]) -> (Output, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("debvisord.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let mut all = vec![("DEBVISOR_NODE_NAME", "t1")];
    all.retain(|(k, _)| !env.iter().any(|(e, _)| e == k));
    all.extend_from_slice(env);
    let out = check(&path, &all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn repo_file(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// (case name, file contents, environment, substrings stderr must contain).
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
);

const CASES: &[Case] = &[
    ("unknown top-level key", "bogus: 1\n", &[], &["bogus: unknown field"]),
    ("unknown nested key", "store:\n  tls:\n    cafile: /ca\n", &[], &["store.tls.cafile: unknown field"]),
    ("wrong type", "fencing:\n  max_concurrent: lots\n", &[], &["fencing.max_concurrent: invalid type"]),
    ("section as list", "keepalive: [5s, 15s]\n", &[], &["keepalive: expected a mapping"]),
    ("duplicate key", "keepalive:\n  interval: 5s\n  interval: 6s\n", &[], &["duplicate mapping key `interval`", "keepalive:"]),
    ("yes as bool", "firewall:\n  enabled: yes\n", &[], &["firewall.enabled:", "\"yes\""]),
    ("unknown enum variant", "node:\n  mode: clusterd\n", &[], &["node.mode: unknown variant \"clusterd\""]),
    ("bad duration unit", "store:\n  request_timeout: 5 sec\n", &[], &["store.request_timeout: invalid duration"]),
    ("zero duration", "hypervisor:\n  timeout: 0s\n", &[], &["hypervisor.timeout: must be greater than 0"]),
    ("interval out of range", "keepalive:\n  interval: 90s\n  lease_ttl: 300s\n", &[], &["keepalive.interval: must be between 100ms and 60s"]),
    ("ttl < 2 x interval", "keepalive:\n  interval: 5s\n  lease_ttl: 6s\n", &[], &["keepalive.lease_ttl: must be at least 2 × keepalive.interval (5s), got 6s"]),
    ("ttl too long", "keepalive:\n  lease_ttl: 10m\n", &[], &["keepalive.lease_ttl: must be between 2s and 300s"]),
    ("bad endpoint URL", "store:\n  endpoints: [\"http://10.0.0.1:2379\", \"htp://x\"]\n", &[], &["store.endpoints[1]: \"htp://x\" is not an http:// or https:// URL"]),
    ("endpoint without port", "store:\n  endpoints: [\"http://10.0.0.1\"]\n", &[], &["store.endpoints[0]:", "no port"]),
    ("empty endpoints", "store:\n  endpoints: []\n", &[], &["store.endpoints: must list at least one"]),
    ("https without ca", "store:\n  endpoints: [\"https://10.0.0.1:2379\"]\n", &[], &["store.tls.ca: required"]),
    ("cert without key", "store:\n  tls:\n    ca: /ca.pem\n    cert: /c.pem\n", &[], &["store.tls.key: required when store.tls.cert is set"]),
    ("user without password_file", "store:\n  user: debvisor\n", &[], &["store.password_file: required when store.user is set"]),
    ("bad prefix", "store:\n  prefix: debvisor/\n", &[], &["store.prefix:"]),
    ("bad node name", "node:\n  name: Node_1\n", &[("DEBVISOR_NODE_NAME", "Node_1")], &["node.name: \"Node_1\" is not a valid node name"]),
    ("bad coordinator name", "node:\n  mode: clustered\n  coordinators: [hv1, -x]\n", &[], &["node.coordinators[1]:"]),
    ("clustered without coordinators", "node:\n  mode: clustered\n", &[], &["node.coordinators: must name at least one node in clustered mode"]),
    ("embedded in clustered mode", "node:\n  mode: clustered\n  coordinators: [t1]\nstore:\n  embedded:\n    enabled: true\n", &[], &["store.embedded.enabled: only allowed with node.mode: standalone"]),
    ("embedded endpoint mismatch", "store:\n  endpoints: [\"http://127.0.0.1:2379\"]\n  embedded:\n    enabled: true\n    client_port: 23790\n", &[], &["store.endpoints[0]: must be http://127.0.0.1:23790"]),
    ("embedded ports equal", "store:\n  embedded:\n    peer_port: 2379\n", &[], &["store.embedded.peer_port: must differ"]),
    ("bad hypervisor uri", "hypervisor:\n  uri: qemu\n", &[], &["hypervisor.uri:"]),
    ("bad log level", "logging:\n  level: verbose\n", &[], &["logging.level:", "verbose"]),
    ("bad log directive", "logging:\n  level: \"info,debvisor=loud\"\n", &[], &["logging.level:"]),
    ("max_concurrent 0", "fencing:\n  max_concurrent: 0\n", &[], &["fencing.max_concurrent: must be at least 1"]),
    ("empty ceph client", "ceph:\n  client: \"\"\n", &[], &["ceph.client:"]),
    ("bad unit name", "services:\n  coordinator_units: [etcd]\n", &[], &["services.coordinator_units[0]:"]),
    ("vlan 5000", "networking:\n  host_networks:\n    cluster:\n      device: eth0\n      vlan: 5000\n", &[], &["networking.host_networks.cluster.vlan: must be between 1 and 4094, got 5000"]),
    ("bad CIDR", "networking:\n  host_networks:\n    storage:\n      device: eth1\n      addresses: [10.0.0.300/24]\n", &[], &["networking.host_networks.storage.addresses[0]:"]),
    ("gateway outside network", "networking:\n  host_networks:\n    upstream:\n      device: eth2\n      addresses: [192.0.2.10/24]\n      gateway: 198.51.100.1\n", &[], &["networking.host_networks.upstream.gateway:", "not inside"]),
    ("interface name > 15 chars", "networking:\n  host_networks:\n    cluster:\n      device: averyveryverylongname\n", &[], &["networking.host_networks.cluster.device:", "longer than 15"]),
    ("bad mtu", "networking:\n  host_networks:\n    cluster:\n      device: eth0\n      mtu: 100\n", &[], &["networking.host_networks.cluster.mtu:"]),
    ("bad sysctl key", "networking:\n  sysctl:\n    extra:\n      fs.file-max: 100000\n", &[], &["networking.sysctl.extra.fs.file-max:"]),
    ("bad migration port range", "firewall:\n  migration_ports: 49215-49152\n", &[], &["firewall.migration_ports:"]),
    ("bad extra_allow port", "firewall:\n  extra_allow:\n    - proto: tcp\n      port: 70000\n", &[], &["firewall.extra_allow[0].port:"]),
    ("bad extra_allow proto", "firewall:\n  extra_allow:\n    - proto: icmp\n      port: 1\n", &[], &["firewall.extra_allow[0].proto: unknown variant \"icmp\""]),
    ("log prefix too long", "firewall:\n  log_prefix: \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"\n", &[], &["firewall.log_prefix: is longer than 127"]),
    ("relative disk dir", "domains:\n  xml_policy:\n    disk_dirs: [images]\n", &[], &["domains.xml_policy.disk_dirs[0]: \"images\" is not an absolute path"]),
    ("disk dir with ..", "domains:\n  xml_policy:\n    disk_dirs: [/srv/a, /srv/../etc]\n", &[], &["domains.xml_policy.disk_dirs[1]:", "'..'"]),
    ("relative emulator", "domains:\n  xml_policy:\n    emulators: [qemu-kvm]\n", &[], &["domains.xml_policy.emulators[0]:"]),
    ("unknown disk protocol", "domains:\n  xml_policy:\n    disk_protocols: [rbd, smb]\n", &[], &["domains.xml_policy.disk_protocols[1]: \"smb\" is not one of"]),
    ("bad rbd pool", "domains:\n  xml_policy:\n    rbd_pools: [\"vms/x\"]\n", &[], &["domains.xml_policy.rbd_pools[0]:"]),
    ("unknown interface type", "domains:\n  xml_policy:\n    interface_types: [wifi]\n", &[], &["domains.xml_policy.interface_types[0]: \"wifi\""]),
    ("bad bridge pattern", "domains:\n  xml_policy:\n    bridges: [\"br*x\"]\n", &[], &["domains.xml_policy.bridges[0]:"]),
    ("unknown policy key", "domains:\n  xml_policy:\n    allow_everything: true\n", &[], &["domains.xml_policy.allow_everything: unknown field"]),
    ("policy bool as yes", "domains:\n  xml_policy:\n    allow_host_devices: yes\n", &[], &["domains.xml_policy.allow_host_devices:"]),
    ("policy from env", "", &[("DEBVISOR_DOMAINS_XML_POLICY_DISK_DIRS", "/srv/img,img")], &["domains.xml_policy.disk_dirs[1]:", "DEBVISOR_DOMAINS_XML_POLICY_DISK_DIRS"]),
    ("unknown DEBVISOR_ variable", "", &[("DEBVISOR_STORE_ENDPOINT", "http://a:1")], &["DEBVISOR_STORE_ENDPOINT: unknown variable"]),
    ("bad env number", "", &[("DEBVISOR_FENCING_MAX_CONCURRENT", "two")], &["DEBVISOR_FENCING_MAX_CONCURRENT: expected an integer for fencing.max_concurrent"]),
    ("bad env bool", "", &[("DEBVISOR_FIREWALL_ENABLED", "1")], &["DEBVISOR_FIREWALL_ENABLED: expected true or false"]),
    ("not YAML", "node: [unclosed\n", &[], &["debvisord.yaml"]),
];

#[test]
fn malformed_configs_are_rejected_with_the_field_named() {
    assert!(CASES.len() >= 20);
    let mut failures = Vec::new();
    for (name, yaml, env, want) in CASES {
        let (out, stderr) = check_yaml(yaml, env);
        if out.status.success() || out.status.code() != Some(2) {
            failures.push(format!("{name}: exit {:?}, stderr:\n{stderr}", out.status));
            continue;
        }
        for w in want.iter().filter(|w| !stderr.contains(*w)) {
            failures.push(format!("{name}: stderr lacks {w:?}:\n{stderr}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

#[test]
fn all_problems_are_listed_one_per_line() {
    let yaml =
        "store:\n  endpoints: []\nkeepalive:\n  interval: 50ms\nfencing:\n  max_concurrent: 0\n";
    let (out, stderr) = check_yaml(yaml, &[]);
    assert_eq!(out.status.code(), Some(2));
    for p in [
        "store.endpoints:",
        "keepalive.interval:",
        "fencing.max_concurrent:",
    ] {
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with(p)).count(),
            1,
            "{p}:\n{stderr}"
        );
    }
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.yaml");
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&*path.to_string_lossy()), "{stderr}");
}

#[test]
fn sample_config_passes_with_three_env_vars() {
    let out = check(
        &repo_file("etc/debvisor/debvisord.yaml"),
        &[
            ("DEBVISOR_NODE_NAME", "hv1"),
            (
                "DEBVISOR_STORE_ENDPOINTS",
                "http://10.0.0.1:2379,http://10.0.0.2:2379",
            ),
            ("DEBVISOR_HYPERVISOR_URI", "test:///default"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dev_config_passes() {
    let out = check(&repo_file("etc/debvisor/debvisord.dev.yaml"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn xml_policy_switches_load_from_file_and_environment() {
    let yaml = "domains:\n  xml_policy:\n    allow_qemu_passthrough: true\n    disk_dirs: []\n    \
                rbd_pools: [vms]\n    interface_types: [bridge, network]\n    bridges: [\"*\"]\n";
    let (out, stderr) = check_yaml(yaml, &[]);
    assert!(out.status.success(), "{stderr}");
    let (out, stderr) = check_yaml(
        "",
        &[
            ("DEBVISOR_DOMAINS_XML_POLICY_ALLOW_HOST_DEVICES", "true"),
            ("DEBVISOR_DOMAINS_XML_POLICY_DISK_DIRS", "/srv/img,/dev/vg0"),
        ],
    );
    assert!(out.status.success(), "{stderr}");
}

#[test]
fn env_override_can_invalidate_a_valid_file() {
    let yaml = "keepalive:\n  interval: 5s\n  lease_ttl: 15s\n";
    let (out, _) = check_yaml(yaml, &[]);
    assert!(out.status.success());
    let (out, stderr) = check_yaml(yaml, &[("DEBVISOR_KEEPALIVE_LEASE_TTL", "8s")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("keepalive.lease_ttl:") && stderr.contains("DEBVISOR_KEEPALIVE_LEASE_TTL"),
        "{stderr}"
    );
    let (out, stderr) = check_yaml("", &[("DEBVISOR_STORE_ENDPOINTS", "http://a:1,ftp://b:2")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("store.endpoints[1]:") && stderr.contains("DEBVISOR_STORE_ENDPOINTS"),
        "{stderr}"
    );
}

/// Write `name` with `text` and `mode` into `dir`; returns its path as a string.
fn file_with_mode(dir: &Path, name: &str, text: &str, mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p.display().to_string()
}

#[test]
fn store_files_are_checked_and_a_ca_needs_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = file_with_mode(d, "ca.pem", "x", 0o644);
    let cert = file_with_mode(d, "node.pem", "x", 0o644);
    let key = file_with_mode(d, "node-key.pem", "x", 0o600);
    let pw = file_with_mode(d, "etcd-password", "secret\n", 0o600);
    let pw_open = file_with_mode(d, "open-password", "secret\n", 0o644);
    let missing = d.join("absent.pem").display().to_string();
    let https = "endpoints: [\"https://10.0.0.1:2379\"]";

    // All files present, private password file, https: valid.
    let good = format!(
        "store:\n  {https}\n  tls:\n    ca: {ca}\n    cert: {cert}\n    key: {key}\n  user: debvisor\n  password_file: {pw}\n"
    );
    let (out, stderr) = check_yaml(&good, &[]);
    assert!(out.status.success(), "{stderr}");

    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "CA with http:// endpoints",
            format!("store:\n  endpoints: [\"http://10.0.0.1:2379\"]\n  tls:\n    ca: {ca}\n"),
            vec!["store.tls.ca:".into(), "store.endpoints".into(), "http://".into()],
        ),
        (
            "missing CA",
            format!("store:\n  {https}\n  tls:\n    ca: {missing}\n"),
            vec![format!("store.tls.ca: {missing}"), "does not exist".into()],
        ),
        (
            "missing cert",
            format!("store:\n  {https}\n  tls:\n    ca: {ca}\n    cert: {missing}\n    key: {key}\n"),
            vec![format!("store.tls.cert: {missing}")],
        ),
        (
            "missing key",
            format!("store:\n  {https}\n  tls:\n    ca: {ca}\n    cert: {cert}\n    key: {missing}\n"),
            vec![format!("store.tls.key: {missing}")],
        ),
        (
            "missing password file",
            format!("store:\n  user: debvisor\n  password_file: {missing}\n"),
            vec![format!("store.password_file: {missing}")],
        ),
        (
            "password file readable by others",
            format!("store:\n  user: debvisor\n  password_file: {pw_open}\n"),
            vec![
                format!("store.password_file: {pw_open}"),
                "0644".into(),
                "group or others".into(),
            ],
        ),
        (
            "ipmi password file readable by others",
            format!("fencing:\n  ipmi:\n    host: 192.0.2.9\n    user: admin\n    password_file: {pw_open}\n"),
            vec![format!("fencing.ipmi.password_file: {pw_open}")],
        ),
    ];
    let mut failures = Vec::new();
    for (name, yaml, want) in &cases {
        let (out, stderr) = check_yaml(yaml, &[]);
        if out.status.code() != Some(2) {
            failures.push(format!("{name}: exit {:?}, stderr:\n{stderr}", out.status));
            continue;
        }
        for w in want.iter().filter(|w| !stderr.contains(w.as_str())) {
            failures.push(format!("{name}: stderr lacks {w:?}:\n{stderr}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}
