//! `debvisorctl` away from a node: no daemon configuration anywhere, only its own client
//! config in `~/.config/debvisor/ctl.yaml` (endpoints and a prefix), `DEBVISORCTL_*`
//! variables over it, and flags over both — against a real etcd.

use std::path::Path;
use std::process::{Command, Output};

use debvisor_tests::bin_path;
use debvisor_tests::etcd::EtcdProcess;

/// `debvisorctl args` with nothing but `PATH`, `HOME` and `env` in its environment, run
/// from `home` (no daemon configuration reachable: `/etc/debvisor` does not exist here or
/// is not read when a client config is found first).
fn ctl(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(bin_path("debvisorctl"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .envs(env.iter().copied())
        .args(args)
        .current_dir(home)
        .output()
        .expect("run debvisorctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The raw value at `key` (absolute), if any.
fn raw_get(etcd: &EtcdProcess, key: &str) -> Option<String> {
    let k = key.to_owned();
    etcd.with_client(|mut c| async move {
        let r = c
            .get(k.clone(), None)
            .await
            .map_err(|e| debvisor_tests::error::HarnessError::State(format!("get {k}: {e}")))?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    })
    .expect("etcd get")
}

#[test]
fn the_client_config_in_home_then_environment_then_flags() {
    let etcd = EtcdProcess::start().expect("etcd");
    let home = tempfile::tempdir().expect("home");
    let ep = etcd.endpoint();
    let cfg_dir = home.path().join(".config/debvisor");
    std::fs::create_dir_all(&cfg_dir).expect("config dir");
    std::fs::write(
        cfg_dir.join("ctl.yaml"),
        format!("endpoints: [{ep}]\nprefix: /dvremote\ntimeout: 5s\n"),
    )
    .expect("ctl.yaml");
    let blob = home.path().join("cluster.yaml");
    std::fs::write(&blob, "log_level: info\n").expect("blob");
    let blob = blob.to_string_lossy().into_owned();

    // From ctl.yaml alone: the endpoint and the prefix it names.
    let out = ctl(home.path(), &[], &["config", "set", &blob]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let version = raw_get(&etcd, "/dvremote/config/current_version");
    assert!(
        version.is_some(),
        "written under the client config's prefix"
    );
    assert_eq!(
        raw_get(&etcd, "/debvisor/config/current_version"),
        None,
        "nothing under the default prefix"
    );
    let out = ctl(home.path(), &[], &["config", "show", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(version.as_deref().unwrap_or("?")),
        "{}",
        text(&out.stdout)
    );

    // DEBVISORCTL_ENDPOINTS beats the file: a closed port, one line naming it.
    let bad = [("DEBVISORCTL_ENDPOINTS", "http://127.0.0.1:9")];
    let out = ctl(home.path(), &bad, &["config", "show"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");

    // A flag beats the environment.
    let out = ctl(home.path(), &bad, &["--endpoints", &ep, "config", "show"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // `--prefix` beats the file's prefix: nothing there yet.
    let out = ctl(
        home.path(),
        &[],
        &["--prefix", "/dvother", "config", "show", "-o", "json"],
    );
    assert!(
        !text(&out.stdout).contains(version.as_deref().unwrap_or("?")),
        "another prefix, another cluster: {}",
        text(&out.stdout)
    );
}
