//! Config sync against a real etcd and two real daemons: `debvisorctl config set --wait`
//! until both nodes report the version OK (the log level changes at runtime), a blob one
//! node cannot apply refused with the field named while the previous version stays in force,
//! `config status` exit codes; and `self/node_id` of a standalone node.

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
