//! The daemon's life against a real etcd: staged startup to `run`, registration keys,
//! graceful and brutal ends, duplicate names, signals, and `debvisorctl`.

use std::time::Duration;

use debvisor_tests::{ctl, is_message, str_field, DaemonBuilder, DaemonProcess, EtcdProcess};
use etcd_client::Client;
use serde_json::Value;

const STAGES: [&str; 13] = [
    "config",
    "directories",
    "logging",
    "host-networking",
    "sysctl",
    "coordinator-services",
    "store-connection",
    "termination-handling",
    "self-registration",
    "hypervisor-check",
    "firewall",
    "objects",
    "keepalive",
];

fn wait_run(d: &mut DaemonProcess) {
    d.wait_run(Duration::from_secs(30))
        .expect("daemon reaches run");
}

async fn get(c: &mut Client, key: &str) -> Option<etcd_client::KeyValue> {
    c.get(key, None)
        .await
        .expect("etcd get")
        .kvs()
        .first()
        .cloned()
}

async fn get_str(c: &mut Client, key: &str) -> Option<String> {
    get(c, key)
        .await
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

async fn wait_key_gone(c: &mut Client, key: &str, within: Duration) -> bool {
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        if get(c, key).await.is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_reaches_run_with_every_key_and_stages_in_order() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("alpha")
        .endpoints(&[etcd.endpoint()])
        .yaml("node:\n  fqdn: alpha.cluster.example\n  rack: r1\n")
        .spawn()
        .expect("spawn");
    wait_run(&mut d);

    // Stages logged in the prescribed order, each once, each with an outcome and a duration.
    let stages: Vec<Value> = d
        .json_lines()
        .into_iter()
        .filter(|v| is_message(v, "stage complete"))
        .collect();
    let names: Vec<&str> = stages
        .iter()
        .filter_map(|v| str_field(v, "stage"))
        .collect();
    assert_eq!(names, STAGES.to_vec());
    for s in &stages {
        assert!(
            str_field(s, "outcome").is_some() && s.get("duration_ms").is_some(),
            "{s}"
        );
        assert_eq!(str_field(s, "node"), Some("alpha"));
    }

    let mut c = etcd.client().await.expect("client");
    let p = "/debvisor/nodes/alpha";
    assert_eq!(
        get_str(&mut c, &format!("{p}/daemon_state"))
            .await
            .as_deref(),
        Some("run")
    );
    assert_eq!(
        get_str(&mut c, &format!("{p}/mode")).await.as_deref(),
        Some("standalone")
    );
    // A standalone node always wins the election: it publishes `primary`.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let st = get_str(&mut c, &format!("{p}/coordinator_state")).await;
        if st.as_deref() == Some("primary") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "coordinator_state {st:?}, want primary"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get_str(&mut c, &format!("{p}/domain_state"))
            .await
            .as_deref(),
        Some("ready")
    );
    assert_eq!(
        get_str(&mut c, &format!("{p}/info/fqdn")).await.as_deref(),
        Some("alpha.cluster.example")
    );
    assert_eq!(
        get_str(&mut c, "/debvisor/schema/version").await.as_deref(),
        Some("1")
    );

    let info: Value =
        serde_json::from_str(&get_str(&mut c, &format!("{p}/info")).await.expect("info"))
            .expect("info JSON");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["rack"], "r1");
    assert!(info["cpus"].as_u64().unwrap_or(0) >= 1);
    assert!(info["memory_mib"].as_u64().unwrap_or(0) > 0);
    assert!(!info["hostname"].as_str().unwrap_or("").is_empty());
    assert!(!info["kernel"].as_str().unwrap_or("").is_empty());
    assert!(info["addresses"].is_array());
    let node_id = std::fs::read_to_string(d.state_dir().join("node_id")).expect("node_id file");
    assert_eq!(info["node_id"].as_str(), Some(node_id.trim()));

    // alive is bound to a live lease.
    let alive = get(&mut c, &format!("{p}/alive")).await.expect("alive");
    assert_ne!(alive.lease(), 0);
    let ttl = c
        .lease_time_to_live(alive.lease(), None)
        .await
        .expect("ttl")
        .ttl();
    assert!(ttl > 0, "lease alive");
    let holder: Value = serde_json::from_slice(alive.value()).expect("alive JSON");
    assert_eq!(holder["pid"].as_u64(), Some(d.pid() as u64));

    // The libvirt version reaches info once the keepalive rewrote it, and health/last_seen
    // are written in one transaction per tick (same revision).
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info: Value = serde_json::from_str(
            &get_str(&mut c, &format!("{p}/info"))
                .await
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        let h = get(&mut c, &format!("{p}/health")).await;
        let l = get(&mut c, &format!("{p}/last_seen")).await;
        if let (Some(h), Some(l)) = (h, l) {
            if info["libvirt_version"].is_string() && h.mod_revision() == l.mod_revision() {
                let health: Value = serde_json::from_slice(h.value()).expect("health JSON");
                assert_eq!(health["libvirt"], true);
                assert_eq!(
                    health["vms"]["running"], 1,
                    "test:///default runs one domain"
                );
                assert!(health["memory"]["total_mib"].as_u64().unwrap_or(0) > 0);
                assert!(health["load"].is_array());
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "libvirt_version in info and health+last_seen in one txn"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // debvisorctl reads the same config + env overrides.
    let env: Vec<(String, String)> = d
        .env()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = ctl(d.config_path(), &env, &["status", "--output", "json"]);
    // 3: something needs attention (a busy machine's load, a primary not elected yet).
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let arr: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let me = arr
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "alpha"))
        .expect("alpha listed");
    assert_eq!(me["daemon_state"], "run");
    assert_eq!(me["coordinator_state"], "primary");
    assert_eq!(me["domain_state"], "ready");
    assert_eq!(me["alive"], true);
    let table = ctl(d.config_path(), &env, &["status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.lines().any(|l| l.starts_with("NODE")), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("alpha") && l.contains("run") && l.contains("yes")),
        "{text}"
    );
    let show = ctl(
        d.config_path(),
        &env,
        &["node", "show", "alpha", "-o", "json"],
    );
    let v: Value = serde_json::from_slice(&show.stdout).expect("show JSON");
    assert_eq!(v["info"]["rack"], "r1");
    let missing = ctl(d.config_path(), &env, &["node", "show", "nosuchnode"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nosuchnode"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_and_alive_vanishes_at_once() {
    let etcd = EtcdProcess::start().expect("etcd");
    // A long TTL: only the revoke can make alive vanish quickly.
    let mut d = DaemonBuilder::new("bravo")
        .endpoints(&[etcd.endpoint()])
        .env("DEBVISOR_KEEPALIVE_LEASE_TTL", "60s")
        .spawn()
        .expect("spawn");
    wait_run(&mut d);
    let mut c = etcd.client().await.expect("client");
    let mut stream = c
        .watch(
            "/debvisor/nodes/bravo/daemon_state",
            Some(etcd_client::WatchOptions::new()),
        )
        .await
        .expect("watch");
    d.signal(libc::SIGTERM).expect("SIGTERM");
    let status = d.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0), "exit 0");
    // daemon_state went shutdown then stop.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("watch event")
            .expect("watch")
            .expect("msg");
        for ev in msg.events() {
            if let Some(kv) = ev.kv() {
                seen.push(String::from_utf8_lossy(kv.value()).into_owned());
            }
        }
    }
    assert_eq!(seen, vec!["shutdown".to_string(), "stop".to_string()]);
    assert!(
        get(&mut c, "/debvisor/nodes/bravo/alive").await.is_none(),
        "alive revoked at once"
    );
    assert!(d
        .json_lines()
        .iter()
        .any(|v| is_message(v, "debvisord stopped")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leaves_alive_until_the_lease_expires() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("charlie")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    wait_run(&mut d);
    let mut c = etcd.client().await.expect("client");
    let alive = get(&mut c, "/debvisor/nodes/charlie/alive")
        .await
        .expect("alive");
    d.kill().expect("SIGKILL");
    // TTL is 3 s in the harness; allow etcd's expiry granularity (and a loaded machine's
    // delay of the leader's revoke) on top.
    assert!(
        wait_key_gone(
            &mut c,
            "/debvisor/nodes/charlie/alive",
            Duration::from_secs(20)
        )
        .await,
        "alive expires with the lease"
    );
    let ttl = c
        .lease_time_to_live(alive.lease(), None)
        .await
        .map(|r| r.ttl())
        .unwrap_or(-1);
    assert!(ttl <= 0, "lease gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_node_name_is_refused_and_a_restart_after_a_crash_is_not() {
    let etcd = EtcdProcess::start().expect("etcd");
    let state = tempfile::tempdir().expect("tempdir");
    let mut first = DaemonBuilder::new("delta")
        .endpoints(&[etcd.endpoint()])
        .state_dir(state.path())
        .env("DEBVISOR_KEEPALIVE_LEASE_TTL", "60s")
        .spawn()
        .expect("spawn");
    wait_run(&mut first);

    // Another daemon (another state dir: another machine) claiming the same name.
    let mut second = DaemonBuilder::new("delta")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    let status = second
        .wait_exit(Duration::from_secs(20))
        .expect("second exits");
    assert!(!status.success());
    let (stage, err) = second.failed_stage().expect("a failed stage line");
    assert_eq!(stage, "self-registration");

    assert!(
        err.contains("already held by a live daemon")
            && err.contains(&format!("pid {}", first.pid())),
        "{err}"
    );

    // The same node restarted after a crash (same state dir) takes its name back at once,
    // although the old lease (60 s) is still alive.
    first.kill().expect("SIGKILL");
    let mut again = DaemonBuilder::new("delta")
        .endpoints(&[etcd.endpoint()])
        .state_dir(state.path())
        .env("DEBVISOR_KEEPALIVE_LEASE_TTL", "60s")
        .spawn()
        .expect("spawn");
    wait_run(&mut again);
    let mut c = etcd.client().await.expect("client");
    let alive = get(&mut c, "/debvisor/nodes/delta/alive")
        .await
        .expect("alive");
    let holder: Value = serde_json::from_slice(alive.value()).expect("JSON");
    assert_eq!(holder["pid"].as_u64(), Some(again.pid() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_log_level_and_a_second_sigterm_exits_at_once() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("echo")
        .endpoints(&[etcd.endpoint()])
        .yaml("logging:\n  level: info\n")
        // The graceful shutdown below waits on a frozen etcd: let its requests wait long.
        .env("DEBVISOR_STORE_REQUEST_TIMEOUT", "60s")
        .spawn()
        .expect("spawn");
    wait_run(&mut d);
    // Change the level in the file, then SIGHUP: the reload is logged with the new level and
    // debug lines (keepalive written) start to appear.
    let cfg = std::fs::read_to_string(d.config_path()).expect("config");
    std::fs::write(d.config_path(), cfg.replace("level: info", "level: debug"))
        .expect("rewrite config");
    d.signal(libc::SIGHUP).expect("SIGHUP");
    let v = d
        .wait_for(
            |v| is_message(v, "SIGHUP: log level reloaded"),
            Duration::from_secs(10),
        )
        .expect("reload logged");
    assert_eq!(str_field(&v, "log_level"), Some("debug"));
    d.wait_for(
        |v| str_field(v, "level") == Some("DEBUG"),
        Duration::from_secs(10),
    )
    .expect("debug lines after reload");

    // A second SIGTERM during the graceful shutdown ends the process at once. etcd is frozen
    // so the graceful path, once begun, is held at its first store write (it cannot finish
    // before the second signal); then the signal thread's exit: status 130 and its line.
    let pause = etcd.pause().expect("freeze etcd");
    d.signal(libc::SIGTERM).expect("SIGTERM");
    d.wait_for(
        |v| is_message(v, "termination requested; shutting down gracefully"),
        Duration::from_secs(10),
    )
    .expect("graceful shutdown begun");
    d.signal(libc::SIGTERM).expect("second SIGTERM");
    let st = d.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_eq!(
        st.code(),
        Some(130),
        "exit 130 on the second signal: {st:?}"
    );
    let lines = d.lines();
    assert!(
        lines.iter().any(|l| l.contains(
            "debvisord: second termination signal; exiting now without graceful shutdown"
        )),
        "{}",
        d.tail(20)
    );
    assert!(
        !d.json_lines()
            .iter()
            .any(|v| is_message(v, "debvisord stopped")),
        "the graceful path did not finish"
    );
    // Nor did it get to `stop` in etcd (its first write may still land once etcd thaws).
    drop(pause);
    let mut c = etcd.client().await.expect("client");
    let state = get_str(&mut c, "/debvisor/nodes/echo/daemon_state").await;
    assert!(
        matches!(state.as_deref(), Some("run") | Some("shutdown")),
        "{state:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_loss_is_detected_and_the_node_re_registers() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("foxtrot")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    wait_run(&mut d);
    let mut c = etcd.client().await.expect("client");
    let old = get(&mut c, "/debvisor/nodes/foxtrot/alive")
        .await
        .expect("alive")
        .lease();
    // Someone (an operator, a bug, etcd itself) revokes the node lease.
    c.lease_revoke(old).await.expect("revoke");
    d.wait_for(
        |v| is_message(v, "re-registered with a fresh lease"),
        Duration::from_secs(15),
    )
    .expect("re-registration");
    let kv = get(&mut c, "/debvisor/nodes/foxtrot/alive")
        .await
        .expect("alive again");
    assert_ne!(kv.lease(), old, "a fresh lease");
    assert!(
        c.lease_time_to_live(kv.lease(), None)
            .await
            .expect("ttl")
            .ttl()
            > 0
    );
    assert_eq!(
        get_str(&mut c, "/debvisor/nodes/foxtrot/daemon_state")
            .await
            .as_deref(),
        Some("run")
    );
}

#[test]
fn sd_notify_reports_stages_ready_at_run_and_watchdog_pings() {
    use std::os::unix::net::UnixDatagram;
    let etcd = EtcdProcess::start().expect("etcd");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut d = DaemonBuilder::new("golf")
        .endpoints(&[etcd.endpoint()])
        .env("NOTIFY_SOCKET", &sock_path.display().to_string())
        .env("WATCHDOG_USEC", "10000000")
        .spawn()
        .expect("spawn");
    let mut msgs: Vec<String> = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < until && !msgs.iter().any(|m| m.contains("WATCHDOG=1")) {
        if let Ok(n) = sock.recv(&mut buf) {
            msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let statuses: Vec<&String> = msgs
        .iter()
        .filter(|m| m.contains("STATUS=stage "))
        .collect();
    assert!(
        statuses
            .iter()
            .any(|m| m.contains("STATUS=stage store-connection: ok")),
        "{msgs:?}"
    );
    let ready = msgs
        .iter()
        .position(|m| m.contains("READY=1"))
        .expect("READY=1 sent");
    let objects = msgs
        .iter()
        .position(|m| m.contains("STATUS=stage objects: ok"))
        .expect("objects stage reported");
    assert!(
        objects < ready,
        "READY only after the objects synced: {msgs:?}"
    );
    assert!(
        msgs.iter().skip(ready).any(|m| m.contains("WATCHDOG=1")),
        "watchdog pinged on the tick: {msgs:?}"
    );
    d.signal(libc::SIGTERM).expect("SIGTERM");
    assert!(d
        .wait_exit(Duration::from_secs(20))
        .expect("exit")
        .success());
    let mut tail = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        tail.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(tail.iter().any(|m| m.contains("STOPPING=1")), "{tail:?}");
}

/// Under a watchdog shorter than 3 keepalive intervals the daemon warns; a stop that drains
/// the node (`domains.on_shutdown: flush`) asks systemd for the time it needs
/// (`EXTEND_TIMEOUT_USEC` covering the flush budget), so a unit's `TimeoutStopSec=` does not
/// kill a drain.
#[test]
fn a_short_watchdog_is_warned_about_and_a_draining_stop_extends_the_stop_timeout() {
    use std::os::unix::net::UnixDatagram;
    let etcd = EtcdProcess::start().expect("etcd");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut d = DaemonBuilder::new("hotel")
        .endpoints(&[etcd.endpoint()])
        .env("NOTIFY_SOCKET", &sock_path.display().to_string())
        // 2 s < 3 × keepalive.interval (1 s in the harness).
        .env("WATCHDOG_USEC", "2000000")
        .env("DEBVISOR_DOMAINS_ON_SHUTDOWN", "flush")
        .env("DEBVISOR_DOMAINS_FLUSH_TIMEOUT", "90s")
        .spawn()
        .expect("spawn");
    wait_run(&mut d);
    let warned = d
        .wait_for(
            |v| {
                str_field(v, "level") == Some("WARN")
                    && str_field(v, "message").is_some_and(|m| {
                        m.contains(
                            "the systemd watchdog (2s) is shorter than 3 × keepalive.interval (1s)",
                        )
                    })
            },
            Duration::from_secs(1),
        )
        .expect("the short watchdog is warned about");
    assert_eq!(str_field(&warned, "node"), Some("hotel"));
    while sock.recv(&mut [0u8; 4096]).is_ok() {}
    d.signal(libc::SIGTERM).expect("SIGTERM");
    let status = d.wait_exit(Duration::from_secs(120)).expect("exit");
    assert!(status.success(), "{}", d.tail(20));
    let mut buf = [0u8; 4096];
    let mut extends = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        extends.extend(m.lines().filter_map(|l| {
            l.strip_prefix("EXTEND_TIMEOUT_USEC=")
                .and_then(|v| v.parse::<u64>().ok())
        }));
    }
    // The first one, at the start of the stop, covers the whole flush budget (90 s) plus the
    // rest of the shutdown: more than the 60 s a unit gave before.
    let first = *extends.first().expect("EXTEND_TIMEOUT_USEC sent on stop");
    assert!(first > 90_000_000, "{extends:?}");
}
