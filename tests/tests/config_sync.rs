//! Config sync against a real etcd and two real daemons: `debvisorctl config set --wait`
//! until both nodes report the version OK (the log level changes at runtime), a blob one
//! node cannot apply refused with the field named while the previous version stays in force,
//! `config status` exit codes; one blob applied by one node and refused by the other (a link
//! only one node has, on the namespace harness); and `self/node_id` of a standalone node.

use std::process::Output;
use std::time::Duration;

use debvisor_objects::cluster_config::digest_version;
use debvisor_tests::{eventually, CtlCluster as Cluster, DaemonBuilder};
use serde_json::Value;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_blob_is_applied_on_both_nodes_and_a_bad_one_is_refused_whole() {
    let cl = Cluster::start();
    let nodes = ["cs-a", "cs-b"];
    let mut ds: Vec<_> = nodes
        .iter()
        .map(|n| {
            let mut d = DaemonBuilder::new(n)
                .endpoints(&[cl.endpoint().to_string()])
                .clustered(&nodes)
                .spawn()
                .expect("spawn daemon");
            d.wait_run(Duration::from_secs(30))
                .expect("daemon reaches run");
            d
        })
        .collect();

    let good_text = "log_level: debug\nvm_defaults:\n  autostart: true\n";
    let good = cl.dir().join("good.yaml");
    std::fs::write(&good, good_text).expect("write");
    let good = good.to_string_lossy().into_owned();
    let out = cl.run(&["config", "set", &good, "--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    println!(
        "$ debvisorctl config set good.yaml --wait\n{}{}",
        stderr(&out),
        stdout(&out)
    );
    let v_good = digest_version(good_text);
    for n in nodes {
        assert_eq!(
            cl.etcd
                .get_key(&format!("nodes/{n}/config/version"))
                .expect("get")
                .as_deref(),
            Some(v_good.as_str())
        );
        assert_eq!(
            cl.etcd
                .get_key(&format!("nodes/{n}/config/status"))
                .expect("get")
                .as_deref(),
            Some("OK")
        );
    }
    let out = cl.run(&["config", "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    // The log level changed at runtime: debug lines appear.
    for d in &mut ds {
        d.wait_for_message("cluster config applied", Duration::from_secs(10))
            .expect("applied");
        d.wait_for(|v| v["level"] == "DEBUG", Duration::from_secs(30))
            .expect("a debug line once log_level is debug");
    }

    // A kernel parameter no node has: valid syntax (the CLI writes it), refused by each node
    // with the field named; the good version stays in force.
    let bad_text = "log_level: warn\nsysctl:\n  net.ipv4.no_such_knob_dv: 1\n";
    let bad = cl.dir().join("bad.yaml");
    std::fs::write(&bad, bad_text).expect("write");
    let bad = bad.to_string_lossy().into_owned();
    let out = cl.run(&["config", "set", &bad, "--wait", "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("sysctl.net.ipv4.no_such_knob_dv: no such kernel parameter on this node"),
        "{e}"
    );
    println!("$ debvisorctl config set bad.yaml --wait\n{e}");
    for n in nodes {
        let status = eventually("the refusal", Duration::from_secs(30), || {
            cl.etcd
                .get_key(&format!("nodes/{n}/config/status"))
                .ok()
                .flatten()
                .filter(|s| s.starts_with("ERROR"))
        });
        assert_eq!(
            status,
            "ERROR: sysctl.net.ipv4.no_such_knob_dv: no such kernel parameter on this node"
        );
        assert_eq!(
            cl.etcd
                .get_key(&format!("nodes/{n}/config/version"))
                .expect("get")
                .as_deref(),
            Some(v_good.as_str()),
            "the previous version stays in force"
        );
    }
    let out = cl.run(&["config", "status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    println!("$ debvisorctl config status\n{}", stdout(&out));
    let out = cl.run(&["status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let _: Value = serde_json::from_str(&stdout(&out)).expect("status JSON");
    assert_eq!(
        cl.etcd.get_key("self/node_id").expect("get"),
        None,
        "a clustered store has no single self"
    );
}

#[test]
fn a_standalone_node_writes_self_node_id() {
    let cl = Cluster::start();
    let mut d = DaemonBuilder::new("solo-a")
        .endpoints(&[cl.endpoint().to_string()])
        .spawn()
        .expect("spawn daemon");
    d.wait_run(Duration::from_secs(30))
        .expect("daemon reaches run");
    let id = eventually("self/node_id", Duration::from_secs(30), || {
        cl.etcd.get_key("self/node_id").ok().flatten()
    });
    assert_eq!(id, "solo-a");
}

/// One blob, two nodes that differ: a kernel parameter of a link only c1 has (a bridge made
/// in c1's namespace). c1 applies the blob and reports the new version `OK`; c2 refuses it
/// whole with the field named and keeps the previous version in force; `config status`
/// lists c2 as the one that needs attention.
#[test]
fn one_node_applies_a_blob_the_other_refuses_naming_the_field() {
    use debvisor_tests::cluster::{wait_until, Cluster as NsCluster};
    debvisor_tests::skip_unless_root!();
    let c = NsCluster::builder()
        .nodes(2)
        .etcd_members(1)
        .build()
        .expect("cluster");
    let c1 = c.node(0);
    let wait = Duration::from_secs(60);
    let put_blob = |name: &str, text: &str| -> Output {
        let path = c.dir().join(name);
        std::fs::write(&path, text).expect("write blob");
        c1.ctl(&[
            "config",
            "set",
            &path.to_string_lossy(),
            "--wait",
            "--timeout",
            "30s",
        ])
        .expect("debvisorctl")
    };
    let key = |n: &str, f: &str| c.etcd_get(&format!("nodes/{n}/config/{f}")).expect("get");

    let first = "log_level: info\n";
    let out = put_blob("first.yaml", first);
    assert!(out.status.success(), "{}", stderr(&out));
    let v1 = digest_version(first);
    for n in ["c1", "c2"] {
        wait_until("the first version applied", wait, || {
            (key(n, "version").as_deref() == Some(v1.as_str())
                && key(n, "status").as_deref() == Some("OK"))
            .then_some(())
        })
        .expect("applied");
    }

    c1.exec_ok("ip", &["link", "add", "dvcfg0", "type", "bridge"])
        .expect("a bridge only c1 has");
    let second = "log_level: info\nsysctl:\n  net.ipv4.conf.dvcfg0.forwarding: 0\n";
    let out = put_blob("second.yaml", second);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "one node refused: {err}");
    let want = "sysctl.net.ipv4.conf.dvcfg0.forwarding: no such kernel parameter on this node";
    assert!(err.contains(want) && err.contains("c2"), "{err}");
    println!("$ debvisorctl config set second.yaml --wait\n{err}");
    let v2 = digest_version(second);
    wait_until("c1 on the second version", wait, || {
        (key("c1", "version").as_deref() == Some(v2.as_str())
            && key("c1", "status").as_deref() == Some("OK"))
        .then_some(())
    })
    .expect("c1 applied it");
    let refusal = wait_until("c2's refusal", wait, || {
        key("c2", "status").filter(|s| s.starts_with("ERROR"))
    })
    .expect("c2 refused it");
    assert_eq!(refusal, format!("ERROR: {want}"));
    assert_eq!(
        key("c2", "version").as_deref(),
        Some(v1.as_str()),
        "c2 keeps the previous version in force"
    );
    let out = c1.ctl(&["config", "status"]).expect("config status");
    let text = stdout(&out);
    println!("$ debvisorctl config status\n{text}");
    assert_eq!(out.status.code(), Some(3), "{text}");
    let c2_line = text.lines().find(|l| l.contains("c2")).unwrap_or_default();
    assert!(c2_line.contains("ERROR"), "c2 is the one listed: {text}");
    let c1_line = text.lines().find(|l| l.contains("c1")).unwrap_or_default();
    assert!(!c1_line.contains("ERROR"), "c1 is fine: {text}");
}
