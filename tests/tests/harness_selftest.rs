//! Tests of the test harness itself, against real etcd processes.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use debvisor_tests::netns::{creator_pid, sweep_stale, NAME_SUFFIX};
use debvisor_tests::skip::{REQUIRE_ALL_ENV, SKIP_LOG_ENV};
use debvisor_tests::{
    bin_path, free_port, skip_unless_root, CertSet, EtcdProcess, NetNs, TcpProxy,
};
use etcd_client::{Client, ConnectOptions, GetOptions};

/// Upper bound for a single etcd request in these tests.
const REQ: Duration = Duration::from_secs(5);

/// Whether a process with this PID exists.
fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

async fn get_value(client: &mut Client, key: &str) -> Option<String> {
    let resp = tokio::time::timeout(REQ, client.get(key, None))
        .await
        .expect("get timed out")
        .expect("get failed");
    resp.kvs()
        .first()
        .map(|kv| kv.value_str().unwrap().to_owned())
}

#[test]
fn free_port_is_unique_and_bindable() {
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let p = free_port();
        assert!(seen.insert(p), "port {p} handed out twice");
    }
    let p = free_port();
    TcpListener::bind(("127.0.0.1", p)).expect("free port is bindable");
}

#[tokio::test]
async fn etcd_put_get_and_cleanup_on_drop() {
    let t = std::time::Instant::now();
    let etcd = EtcdProcess::start().unwrap();
    eprintln!("etcd ready after {:?}", t.elapsed());
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    let pid = etcd.pid().unwrap();
    let dir = etcd.data_dir().to_path_buf();
    assert!(dir.is_dir());
    let mut c = etcd.client().await.unwrap();
    c.put("k", "v", None).await.unwrap();
    assert_eq!(get_value(&mut c, "k").await.as_deref(), Some("v"));
    drop(c);
    drop(etcd);
    assert!(!pid_alive(pid), "etcd {pid} survived drop");
    assert!(!dir.exists(), "{} survived drop", dir.display());
}

#[tokio::test]
async fn etcd_kill_and_restart_keep_data() {
    let mut etcd = EtcdProcess::start().unwrap();
    let endpoint = etcd.endpoint();
    let mut c = etcd.client().await.unwrap();
    c.put("persist", "yes", None).await.unwrap();
    let old_pid = etcd.pid().unwrap();

    etcd.kill().unwrap();
    assert!(!etcd.is_running());
    assert_eq!(etcd.pid(), None);
    assert!(!pid_alive(old_pid));

    etcd.restart().unwrap();
    assert!(etcd.is_running());
    assert_eq!(etcd.endpoint(), endpoint);
    let mut c = etcd.client().await.unwrap();
    assert_eq!(get_value(&mut c, "persist").await.as_deref(), Some("yes"));

    // A graceful stop + restart keeps data too.
    etcd.stop().unwrap();
    assert!(!etcd.is_running());
    etcd.restart().unwrap();
    let mut c = etcd.client().await.unwrap();
    assert_eq!(get_value(&mut c, "persist").await.as_deref(), Some("yes"));
}

#[tokio::test]
async fn etcd_prepare_then_launch() {
    let mut etcd = EtcdProcess::prepare().unwrap();
    assert_eq!(etcd.pid(), None);
    assert!(!etcd.is_running());
    // Connecting to the not-yet-running etcd succeeds; the first request fails.
    let mut early = etcd.client().await.unwrap();
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(REQ, early.get("x", None)).await;
    eprintln!("not started: {:?} after {:?}", r, t.elapsed());
    assert!(
        !matches!(r, Ok(Ok(_))),
        "request to a not-started etcd succeeded"
    );

    etcd.launch().unwrap();
    assert!(etcd.is_running());
    assert!(matches!(
        etcd.launch(),
        Err(debvisor_tests::HarnessError::State(_))
    ));
    let mut c = etcd.client().await.unwrap();
    c.put("late", "1", None).await.unwrap();
    assert_eq!(get_value(&mut c, "late").await.as_deref(), Some("1"));
}

#[test]
fn etcd_cleaned_up_when_a_test_panics() {
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let etcd = EtcdProcess::start().unwrap();
        *seen.lock().unwrap() = Some((etcd.pid().unwrap(), etcd.data_dir().to_path_buf()));
        panic!("simulated test failure (expected)");
    });
    assert!(r.is_err());
    let (pid, dir) = seen.into_inner().unwrap().unwrap();
    assert!(!pid_alive(pid), "etcd {pid} survived a panicking test");
    assert!(!dir.exists(), "{} survived a panicking test", dir.display());
}

#[test]
fn etcd_launch_failure_reports_log_tail() {
    let mut etcd = EtcdProcess::prepare().unwrap();
    let _squatter = TcpListener::bind(etcd.client_addr()).unwrap();
    match etcd.launch() {
        Err(debvisor_tests::HarnessError::EtcdStart { reason, tail, .. }) => {
            assert!(reason.contains("exited early"), "{reason}");
            assert!(tail.contains("address already in use"), "{tail}");
        }
        other => panic!("expected EtcdStart, got {other:?}"),
    }
    assert!(!etcd.is_running());
    assert_eq!(etcd.pid(), None);
}

#[tokio::test]
async fn etcd_compact_and_revision() {
    let etcd = EtcdProcess::start().unwrap();
    let mut c = etcd.client().await.unwrap();
    for i in 0..5 {
        c.put("c", format!("{i}"), None).await.unwrap();
    }
    let rev = etcd.current_revision().await.unwrap();
    assert!(rev > 0);
    etcd.compact(rev - 1).await.unwrap();
    // Reading below the compacted revision is refused.
    let old = c
        .get("c", Some(GetOptions::new().with_revision(rev - 3)))
        .await;
    eprintln!("compacted read: {:?}", old.as_ref().err());
    assert!(old.is_err(), "read at a compacted revision succeeded");
    assert_eq!(etcd.current_revision().await.unwrap(), rev);
}

#[tokio::test]
async fn etcd_tls_right_and_wrong_ca() {
    let certs = CertSet::generate_temp().unwrap();
    for p in [
        &certs.ca,
        &certs.server_cert,
        &certs.server_key,
        &certs.client_cert,
        &certs.client_key,
        &certs.other_ca,
    ] {
        assert!(p.is_file(), "{} missing", p.display());
    }
    let t = std::time::Instant::now();
    let etcd = EtcdProcess::start_tls(&certs).unwrap();
    eprintln!("TLS etcd ready after {:?}", t.elapsed());
    assert!(etcd.endpoint().starts_with("https://127.0.0.1:"));

    let mut c = etcd.client().await.unwrap();
    c.put("secure", "ok", None).await.unwrap();
    assert_eq!(get_value(&mut c, "secure").await.as_deref(), Some("ok"));

    // Trusting the wrong CA: the server certificate is rejected.
    let wrong = ConnectOptions::new().with_tls(certs.client_tls_with_ca(&certs.other_ca).unwrap());
    let endpoint = etcd.endpoint();
    let mut bad = Client::connect([endpoint.as_str()], Some(wrong))
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(REQ, bad.get("secure", None)).await;
    eprintln!("wrong CA: {:?} after {:?}", r, t.elapsed());
    assert!(
        !matches!(r, Ok(Ok(_))),
        "client trusting other_ca got an answer"
    );

    // Right CA but no client certificate: etcd requires one.
    let ca = std::fs::read(&certs.ca).unwrap();
    let no_id =
        etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
    let mut anon = Client::connect(
        [endpoint.as_str()],
        Some(ConnectOptions::new().with_tls(no_id)),
    )
    .await
    .unwrap();
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(REQ, anon.get("secure", None)).await;
    eprintln!("no cert: {:?} after {:?}", r, t.elapsed());
    assert!(
        !matches!(r, Ok(Ok(_))),
        "client without certificate got an answer"
    );

    // Plain HTTP to the HTTPS endpoint fails as well.
    let plain = endpoint.replace("https://", "http://");
    let mut p = Client::connect([plain.as_str()], None).await.unwrap();
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(REQ, p.get("secure", None)).await;
    eprintln!("plain: {:?} after {:?}", r, t.elapsed());
    assert!(!matches!(r, Ok(Ok(_))), "plain-HTTP client got an answer");
    eprintln!("TLS etcd log:\n{}", etcd.log_tail(200));
}

/// A one-shot-per-connection echo server on a free port, on a background thread.
fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// True when the peer closed `s` (EOF or reset) within the read timeout.
fn is_closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn proxy_forwards_cuts_and_restores_raw_tcp() {
    let proxy = TcpProxy::start(echo_server()).unwrap();
    assert_eq!(proxy.endpoint(), format!("http://{}", proxy.addr()));

    let mut a = TcpStream::connect(proxy.addr()).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(echo_roundtrip(&mut a, b"hello").unwrap(), b"hello");
    assert_eq!(proxy.active_connections(), 1);

    proxy.cut().unwrap();
    assert!(proxy.is_cut());
    assert_eq!(proxy.active_connections(), 0);
    assert!(is_closed(&mut a), "open connection survived cut()");

    // New connections are accepted by the kernel but closed at once.
    let mut b = TcpStream::connect(proxy.addr()).unwrap();
    assert!(is_closed(&mut b), "new connection forwarded while cut");

    proxy.restore();
    assert!(!proxy.is_cut());
    let mut c = TcpStream::connect(proxy.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(echo_roundtrip(&mut c, b"again").unwrap(), b"again");
    assert!(proxy.accepted_connections() >= 3);

    let addr = proxy.addr();
    drop(proxy);
    assert!(is_closed(&mut c), "connection survived proxy drop");
    assert!(
        TcpStream::connect(addr).is_err(),
        "proxy still listening after drop"
    );
}

#[tokio::test]
async fn proxy_cut_breaks_etcd_client_and_restore_heals_it() {
    let etcd = EtcdProcess::start().unwrap();
    let proxy = TcpProxy::start(etcd.client_addr()).unwrap();
    let endpoint = proxy.endpoint();
    let mut c = Client::connect([endpoint.as_str()], None).await.unwrap();
    c.put("via-proxy", "1", None).await.unwrap();
    assert_eq!(get_value(&mut c, "via-proxy").await.as_deref(), Some("1"));

    proxy.cut().unwrap();
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(REQ, c.get("via-proxy", None)).await;
    eprintln!("cut: {:?} after {:?}", r, t.elapsed());
    assert!(
        !matches!(r, Ok(Ok(_))),
        "request through a cut proxy succeeded"
    );

    proxy.restore();
    // The same client recovers once forwarding resumes (it reconnects on the next request;
    // allow a few attempts for its reconnect backoff).
    let mut ok = false;
    for i in 0..50 {
        let r = tokio::time::timeout(REQ, c.get("via-proxy", None)).await;
        eprintln!(
            "after restore attempt {i}: {:?}",
            r.as_ref().map(|x| x.as_ref().err())
        );
        if let Ok(Ok(_)) = r {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "client through a restored proxy never recovered");
}

#[tokio::test]
async fn proxy_in_front_of_tls_etcd() {
    let certs = CertSet::generate_temp().unwrap();
    let etcd = EtcdProcess::start_tls(&certs).unwrap();
    let proxy = TcpProxy::start(etcd.client_addr()).unwrap();
    let endpoint = format!("https://{}", proxy.addr());
    let mut c = Client::connect([endpoint.as_str()], etcd.connect_options().unwrap())
        .await
        .unwrap();
    c.put("tls-proxy", "1", None).await.unwrap();
    assert_eq!(get_value(&mut c, "tls-proxy").await.as_deref(), Some("1"));
}

#[test]
fn netns_create_and_delete() {
    skip_unless_root!();
    let ns = NetNs::create("dvtest").unwrap();
    let name = ns.name().to_owned();
    assert!(name.starts_with(&format!("dvtest-{}-", std::process::id())));
    assert_eq!(creator_pid(&name), Some(std::process::id()), "{name}");
    assert!(Path::new("/run/netns").join(&name).exists());
    let out = ns.exec_cmd("ip", &["link", "show", "lo"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("LOOPBACK,UP"), "lo not up: {text}");
    drop(ns);
    assert!(!Path::new("/run/netns").join(&name).exists());
}

/// Deletes the named namespaces on drop (those a test made by hand with `ip netns add`).
struct NsByHand(Vec<String>);

impl Drop for NsByHand {
    fn drop(&mut self) {
        for n in &self.0 {
            if Path::new("/run/netns").join(n).exists() {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "delete", n])
                    .output();
            }
        }
    }
}

#[test]
fn stale_netns_of_a_dead_test_process_is_swept_and_a_live_ones_kept() {
    skip_unless_root!();
    // A PID that no longer exists: a child that has exited and been reaped.
    let mut gone = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead = gone.id();
    gone.wait().expect("reap");
    let stale = format!("dvsweep-{dead}-0{NAME_SUFFIX}");
    let live = format!("dvsweep-{}-999{NAME_SUFFIX}", std::process::id());
    let _cleanup = NsByHand(vec![stale.clone(), live.clone()]);
    for n in [&stale, &live] {
        let out = std::process::Command::new("ip")
            .args(["netns", "add", n])
            .output()
            .expect("ip netns add");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Something the dead run left running inside its namespace.
    let mut leftover = std::process::Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "600"])
        .spawn()
        .expect("sleep in the stale netns");
    debvisor_tests::eventually("the leftover runs inside", Duration::from_secs(10), || {
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", &stale])
            .output()
            .ok()?;
        (!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(())
    });

    sweep_stale();
    // (Another test process's sweep may have deleted it first: check the result, not who.)
    assert!(
        !Path::new("/run/netns").join(&stale).exists(),
        "{stale} of dead pid {dead} swept"
    );
    let status = leftover.wait().expect("reap the leftover");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the leftover inside was killed: {status:?}"
    );
    assert!(
        Path::new("/run/netns").join(&live).exists(),
        "{live} of this live process kept"
    );
}

/// Run this test binary's `netns_create_and_delete` (which needs root) as user `nobody`, so
/// it has to skip, with `env` set; returns its exit status and output.
fn run_selftest_unprivileged(env: &[(&str, &str)]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", "netns_create_and_delete", "--test-threads", "1"])
        .env_remove(REQUIRE_ALL_ENV)
        .env_remove(SKIP_LOG_ENV)
        .envs(env.iter().copied())
        .uid(65534)
        .gid(65534);
    cmd.output().expect("run the selftest as nobody")
}

#[test]
fn a_skip_is_logged_and_fails_under_require_all() {
    skip_unless_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    // nobody appends to the log.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let log = dir.path().join("skips");
    let log_s = log.display().to_string();

    // Allowed: the test reports ok, and the skip is in the log (test, reason, kind).
    let out = run_selftest_unprivileged(&[(SKIP_LOG_ENV, &log_s)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
    assert_eq!(
        std::fs::read_to_string(&log).expect("skip log"),
        "harness_selftest::netns_create_and_delete\tneeds root\tenvironment\n"
    );

    // DEBVISOR_REQUIRE_ALL=1: the same skip fails the test.
    let out = run_selftest_unprivileged(&[(SKIP_LOG_ENV, &log_s), (REQUIRE_ALL_ENV, "1")]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("1 failed"), "{text}");
    assert!(
        text.contains("would skip (needs root), but DEBVISOR_REQUIRE_ALL=1"),
        "{text}"
    );
    // A failure, not a skip: nothing more in the log.
    assert_eq!(
        std::fs::read_to_string(&log)
            .expect("skip log")
            .lines()
            .count(),
        1
    );
}

#[test]
fn daemon_binaries_are_built() {
    let d = bin_path("debvisord");
    assert!(d.is_file(), "{} missing", d.display());
    assert!(bin_path("debvisorctl").is_file());
}
