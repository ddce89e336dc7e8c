//! The node and an unreliable store: etcd away while running, etcd late at startup, no etcd
//! at all, and TLS with client certificates.

use std::time::Duration;

use debvisor_tests::{is_message, str_field, CertSet, DaemonBuilder, DaemonProcess, EtcdProcess};

fn wait_run(d: &mut DaemonProcess, within: Duration) {
    d.wait_run(within).expect("daemon reaches run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_away_for_20s_the_node_stays_up_and_comes_back_to_run() {
    let mut etcd = EtcdProcess::start().expect("etcd");
    // Debug logging: every keepalive tick skipped during the outage is logged.
    let mut d = DaemonBuilder::new("outage")
        .endpoints(&[etcd.endpoint()])
        .env("DEBVISOR_LOGGING_LEVEL", "debug")
        .spawn()
        .expect("spawn");
    wait_run(&mut d, Duration::from_secs(30));
    let before = d.json_lines().len();

    etcd.kill().expect("kill etcd");
    d.wait_for(
        |v| {
            is_message(
                v,
                "store unreachable; keepalive skipped (VMs and networks stay as they are)",
            )
        },
        Duration::from_secs(10),
    )
    .expect("outage logged");
    // Not a fixed pause: the daemon keeps working through 20 more keepalive ticks (1 s apart)
    // without the store; waiting fails at once if it exits meanwhile.
    let skipped = |d: &DaemonProcess| {
        d.json_lines()
            .iter()
            .filter(|v| is_message(v, "store still unreachable; keepalive skipped"))
            .count()
    };
    let until = std::time::Instant::now() + Duration::from_secs(120);
    while skipped(&d) < 20 {
        assert!(d.is_running(), "the daemon survives a store outage");
        assert!(
            std::time::Instant::now() < until,
            "20 keepalive ticks skipped within 120 s: {}",
            d.tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.is_running(), "the daemon survives a store outage");
    etcd.restart().expect("etcd back");

    d.wait_for(
        |v| is_message(v, "store reachable again; keepalive resumed"),
        Duration::from_secs(30),
    )
    .expect("recovery logged");
    // The node view relisted after its watch broke.
    let lines = d.json_lines();
    assert!(
        lines[before..]
            .iter()
            .any(|v| is_message(v, "watch broken; relisting")),
        "watch break logged"
    );
    assert!(!lines
        .iter()
        .any(|v| str_field(v, "outcome") == Some("failed")));

    // Back in run with a live lease holding alive (a fresh one when etcd expired the old).
    let mut c = etcd.client().await.expect("client");
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let alive = c
            .get("/debvisor/nodes/outage/alive", None)
            .await
            .expect("get")
            .kvs()
            .first()
            .cloned();
        let state = c
            .get("/debvisor/nodes/outage/daemon_state", None)
            .await
            .expect("get")
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec());
        if let (Some(a), Some(s)) = (alive, state) {
            let ttl = c
                .lease_time_to_live(a.lease(), None)
                .await
                .expect("ttl")
                .ttl();
            if ttl > 0 && s == b"run" {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "alive with a live lease and daemon_state run after the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(d.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_started_10s_after_the_daemon_is_waited_for() {
    let mut etcd = EtcdProcess::prepare().expect("etcd ports");
    let mut d = DaemonBuilder::new("late")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    d.wait_for(
        |v| is_message(v, "store not reachable yet; retrying"),
        Duration::from_secs(10),
    )
    .expect("retries logged");
    // Not a fixed pause: the daemon is still retrying at its 8th attempt (≥ 8.9 s of backoff
    // between attempts 1 and 8); waiting fails at once if it exits meanwhile.
    d.wait_for(
        |v| {
            is_message(v, "store not reachable yet; retrying")
                && v["attempt"].as_u64().is_some_and(|a| a >= 8)
        },
        Duration::from_secs(30),
    )
    .expect("8th attempt logged");
    assert!(d.is_running(), "still waiting");
    etcd.launch().expect("etcd");
    wait_run(&mut d, Duration::from_secs(30));
    let attempts = d
        .json_lines()
        .iter()
        .filter(|v| is_message(v, "store not reachable yet; retrying"))
        .count();
    assert!(attempts >= 2, "each attempt logged ({attempts})");
}

#[test]
fn no_etcd_and_a_short_deadline_exit_non_zero_naming_the_endpoints() {
    let port = debvisor_tests::free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let mut d = DaemonBuilder::new("lonely")
        .endpoints(std::slice::from_ref(&ep))
        .env("DEBVISOR_STORE_STARTUP_DEADLINE", "2s")
        .spawn()
        .expect("spawn");
    let st = d.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(!st.success());
    let (stage, err) = d.failed_stage().expect("a failed stage line");
    assert_eq!(stage, "store-connection");

    assert!(err.contains(&ep), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_connect_and_a_wrong_ca_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = CertSet::generate(dir.path()).expect("certs");
    let etcd = EtcdProcess::start_tls(&certs).expect("etcd with client-cert auth");
    let tls_yaml = |ca: &std::path::Path| {
        format!(
            "store:\n  tls:\n    ca: {}\n    cert: {}\n    key: {}\n",
            ca.display(),
            certs.client_cert.display(),
            certs.client_key.display()
        )
    };
    let mut ok = DaemonBuilder::new("secure")
        .endpoints(&[etcd.endpoint()])
        .yaml(&tls_yaml(&certs.ca))
        .spawn()
        .expect("spawn");
    wait_run(&mut ok, Duration::from_secs(30));
    let mut c = etcd.client().await.expect("tls client");
    let state = c
        .get("/debvisor/nodes/secure/daemon_state", None)
        .await
        .expect("get");
    assert_eq!(
        state.kvs().first().map(|kv| kv.value().to_vec()),
        Some(b"run".to_vec())
    );

    let mut bad = DaemonBuilder::new("insecure")
        .endpoints(&[etcd.endpoint()])
        .yaml(&tls_yaml(&certs.other_ca))
        .env("DEBVISOR_STORE_STARTUP_DEADLINE", "2s")
        .spawn()
        .expect("spawn");
    let st = bad.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(!st.success());
    let (stage, err) = bad.failed_stage().expect("a failed stage line");
    assert_eq!(stage, "store-connection");
    let err = err.to_lowercase();
    assert!(err.contains(&etcd.endpoint()), "{err}");
    assert!(
        err.contains("certificate") || err.contains("unknownissuer") || err.contains("tls"),
        "TLS named: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_user_auth_with_a_password_file() {
    use etcd_client::Permission;
    let etcd = EtcdProcess::start().expect("etcd");
    let mut c = etcd.client().await.expect("client");
    c.user_add("root", "rootpw", None).await.expect("root user");
    c.user_grant_role("root", "root").await.expect("root role");
    c.role_add("debvisor").await.expect("role");
    c.role_grant_permission(
        "debvisor",
        Permission::read_write("/debvisor").with_prefix(),
    )
    .await
    .expect("permission");
    c.user_add("debvisord", "s3cret-pw", None)
        .await
        .expect("user");
    c.user_grant_role("debvisord", "debvisor")
        .await
        .expect("grant");
    c.auth_enable().await.expect("auth enable");

    let dir = tempfile::tempdir().expect("tempdir");
    let pw = dir.path().join("etcd-password");
    std::fs::write(&pw, "s3cret-pw\n").expect("password file");
    // Private to its owner: check-config refuses a password file others can read.
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod password file");
    let yaml = format!(
        "store:\n  user: debvisord\n  password_file: {}\n",
        pw.display()
    );
    let mut d = DaemonBuilder::new("authed")
        .endpoints(&[etcd.endpoint()])
        .yaml(&yaml)
        .spawn()
        .expect("spawn");
    wait_run(&mut d, Duration::from_secs(30));
    // The password never appears in the log or the command line.
    assert!(!d.lines().iter().any(|l| l.contains("s3cret-pw")));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", d.pid())).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains("s3cret-pw"));

    // A wrong password is not an outage: the stage fails at once (the daemon exits long
    // before its 300 s startup deadline) and names the fields to fix.
    std::fs::write(&pw, "wrong\n").expect("password file");
    let mut bad = DaemonBuilder::new("denied")
        .endpoints(&[etcd.endpoint()])
        .yaml(&yaml)
        .env("DEBVISOR_STORE_STARTUP_DEADLINE", "300s")
        .spawn()
        .expect("spawn");
    assert!(!bad
        .wait_exit(Duration::from_secs(60))
        .expect("exits before the startup deadline")
        .success());
    assert!(
        !bad.json_lines()
            .iter()
            .any(|v| is_message(v, "store not reachable yet; retrying")),
        "not retried like an outage:\n{}",
        bad.tail(20)
    );
    let (stage, err) = bad.failed_stage().expect("a failed stage line");
    assert_eq!(stage, "store-connection");
    assert!(
        err.contains("store.user") && err.contains("store.password_file"),
        "the fields are named: {err}"
    );
    let err = err.to_lowercase();
    assert!(
        err.contains("authentication failed") || err.contains("invalid user"),
        "{err}"
    );
}
