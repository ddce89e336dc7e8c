//! `debvisorctl vm …` and `node flush|unflush` against a real etcd: the real binary, the keys
//! it writes and the guards it writes them through, what it refuses (field named, nothing
//! written), what it prints, and `--wait` with the test playing the node's part in etcd.

use std::process::Output;
use std::time::Duration;

use debvisor_daemon::ctl::vm as ctl_vm;
use debvisor_tests::CtlCluster as Cluster;
use etcd_client::{Client, PutOptions};
use serde_json::{json, Value};

const P: &str = "/debvisor/";
const U1: &str = "11111111-1111-4111-8111-111111111111";
const U2: &str = "22222222-2222-4222-8222-222222222222";
const U3: &str = "33333333-3333-4333-8333-333333333333";

/// What the VM tests add to the shared `debvisorctl` bench.
trait VmBench {
    /// Write an XML file; returns its path as a string.
    fn xml_file(&self, file: &str, xml: &str) -> String;
}

impl VmBench for Cluster {
    fn xml_file(&self, file: &str, xml: &str) -> String {
        let p = self.dir().join(file);
        std::fs::write(&p, xml).expect("xml file");
        p.to_string_lossy().into_owned()
    }
}

fn domain_xml(uuid: Option<&str>, name: &str, mem: u32) -> String {
    let uuid = uuid
        .map(|u| format!("  <uuid>{u}</uuid>\n"))
        .unwrap_or_default();
    format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n{uuid}  <memory unit='MiB'>{mem}</memory>\n  <vcpu>1</vcpu>\n  <os><type>hvm</type></os>\n</domain>\n"
    )
}

async fn get(c: &mut Client, key: &str) -> Option<(String, i64)> {
    let r = c.get(format!("{P}{key}"), None).await.expect("get");
    r.kvs().first().map(|kv| {
        (
            String::from_utf8_lossy(kv.value()).into_owned(),
            kv.mod_revision(),
        )
    })
}

async fn val(c: &mut Client, key: &str) -> Option<String> {
    get(c, key).await.map(|(v, _)| v)
}

async fn rev(c: &mut Client, key: &str) -> i64 {
    get(c, key).await.map_or(0, |(_, r)| r)
}

async fn put(c: &mut Client, key: &str, value: &str) {
    c.put(format!("{P}{key}"), value, None).await.expect("put");
}

async fn del(c: &mut Client, key: &str) {
    c.delete(format!("{P}{key}"), None).await.expect("delete");
}

/// Per-node figures: free MiB, provisioned MiB, 1-min load, vCPUs, VMs.
type Figures = (u64, u64, f64, u32, u32);

fn health(f: Figures) -> String {
    let (free, prov, load, vcpus, vms) = f;
    json!({
        "libvirt": true,
        "load": [load, 0.0, 0.0],
        "memory": {"total_mib": 65536, "used_mib": 65536 - free, "free_mib": free},
        "vms": {"total": vms, "running": vms},
        "alloc": {"memory_mib": prov, "memory_provisioned_mib": prov, "vcpus": vcpus, "vcpus_provisioned": vcpus},
        "version": "0.1.0",
        "uptime_s": 100,
    })
    .to_string()
}

/// Register a node the way its daemon would: alive (on a lease), run, ready, health.
async fn add_node(c: &mut Client, name: &str, f: Figures) {
    let lease = c.lease_grant(600, None).await.expect("lease").id();
    c.put(
        format!("{P}nodes/{name}/alive"),
        r#"{"hostname":"h","pid":1}"#,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("alive");
    put(c, &format!("nodes/{name}/daemon_state"), "run").await;
    put(c, &format!("nodes/{name}/domain_state"), "ready").await;
    put(c, &format!("nodes/{name}/health"), &health(f)).await;
}

/// Status JSON as a node writes it.
fn status(state: &str, node: &str, since: &str) -> String {
    json!({"state": state, "since": since, "reason": "", "error": null, "node": node}).to_string()
}

/// Wait (generous deadline) until `key`'s mod revision passes `after`: the CLI has written.
async fn written_after(c: &mut Client, key: &str, after: i64) -> String {
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((v, r)) = get(c, key).await {
            if r > after {
                return v;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{key} was never written by debvisorctl"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Two nodes; hv2 has the most free memory.
async fn two_nodes(c: &mut Client) {
    add_node(c, "hv1", (4000, 1000, 0.5, 2, 1)).await;
    add_node(c, "hv2", (8000, 2000, 1.5, 4, 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn define_writes_one_transaction_refuses_duplicates_and_replace_changes_only_xml() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    two_nodes(&mut c).await;

    let f = cl.xml_file("web.xml", &domain_xml(Some(U1), "web", 64));
    let v = cl.json(&[
        "vm",
        "define",
        &f,
        "--node",
        "hv1",
        "--autostart",
        "--method",
        "shutdown",
        "--selector",
        "load",
        "--limit",
        "hv1",
        "--limit",
        "hv2",
    ]);
    assert_eq!(v["uuid"], U1);
    assert_eq!(v["name"], "web");
    assert_eq!(v["uuid_generated"], false);
    let (xml, r_xml) = get(&mut c, &format!("vms/{U1}/xml")).await.expect("xml");
    assert_eq!(xml, domain_xml(Some(U1), "web", 64));
    let (node, r_node) = get(&mut c, &format!("vms/{U1}/node")).await.expect("node");
    let (state, r_state) = get(&mut c, &format!("vms/{U1}/state"))
        .await
        .expect("state");
    let (meta, r_meta) = get(&mut c, &format!("vms/{U1}/metadata"))
        .await
        .expect("metadata");
    assert_eq!((node.as_str(), state.as_str()), ("hv1", "start"));
    assert!(
        r_xml == r_node && r_node == r_state && r_state == r_meta,
        "one transaction: {r_xml} {r_node} {r_state} {r_meta}"
    );
    let meta: Value = serde_json::from_str(&meta).expect("metadata JSON");
    assert_eq!(meta["autostart"], true);
    assert_eq!(meta["migration_method"], "shutdown");
    assert_eq!(meta["node_selector"], "load");
    assert_eq!(meta["node_limit"], json!(["hv1", "hv2"]));
    assert_eq!(meta["protected"], false);

    // No <uuid>: one is generated and inserted; no --node: placement (mem → hv2).
    let f2 = cl.xml_file("db.xml", &domain_xml(None, "db", 128));
    let out = cl.ok(&["vm", "define", &f2, "--stopped"]);
    assert!(
        out.contains("VM db defined") && out.contains("(generated)") && out.contains("node hv2"),
        "{out}"
    );
    let list = cl.json(&["vm", "list"]);
    let db = list
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == "db"))
        .expect("db listed")
        .clone();
    let u = db["uuid"].as_str().expect("uuid").to_string();
    assert!(debvisor_objects::domain::valid_uuid(&u), "{u}");
    let xml = val(&mut c, &format!("vms/{u}/xml")).await.expect("xml");
    assert!(xml.contains(&format!("<uuid>{u}</uuid>")), "{xml}");
    assert_eq!(
        val(&mut c, &format!("vms/{u}/state")).await.as_deref(),
        Some("stop")
    );
    assert_eq!(
        val(&mut c, &format!("vms/{u}/node")).await.as_deref(),
        Some("hv2")
    );
    let meta: Value = serde_json::from_str(
        &val(&mut c, &format!("vms/{u}/metadata"))
            .await
            .expect("metadata"),
    )
    .expect("JSON");
    assert_eq!(meta["migration_method"], "live", "default method");
    assert_eq!(meta["node_selector"], "mem", "default selector");

    // Defining it again is refused, and says how to change the XML.
    let e = cl.refused(&["vm", "define", &f], "already exists").await;
    assert!(e.contains("--replace"), "{e}");
    // Another UUID with a name in use.
    let f3 = cl.xml_file("web2.xml", &domain_xml(Some(U2), "web", 64));
    cl.refused(
        &["vm", "define", &f3, "--node", "hv1"],
        "already used by VM",
    )
    .await;

    // --replace: only xml changes, guarded on its revision.
    let f4 = cl.xml_file("web-big.xml", &domain_xml(Some(U1), "web", 256));
    let v = cl.json(&["vm", "define", &f4, "--replace"]);
    assert_eq!(v["replaced"], true);
    let (xml, r_xml2) = get(&mut c, &format!("vms/{U1}/xml")).await.expect("xml");
    assert!(xml.contains(">256<") && r_xml2 > r_xml, "{xml}");
    assert_eq!(rev(&mut c, &format!("vms/{U1}/state")).await, r_state);
    assert_eq!(rev(&mut c, &format!("vms/{U1}/node")).await, r_node);
    // Without a <uuid>, --replace finds the VM by name and keeps its UUID.
    let f5 = cl.xml_file("web-nouuid.xml", &domain_xml(None, "web", 512));
    cl.ok(&["vm", "define", &f5, "--replace"]);
    let xml = val(&mut c, &format!("vms/{U1}/xml")).await.expect("xml");
    assert!(
        xml.contains(">512<") && xml.contains(&format!("<uuid>{U1}</uuid>")),
        "{xml}"
    );
    // A different UUID under the same name cannot replace it.
    let f6 = cl.xml_file("web-other.xml", &domain_xml(Some(U3), "web", 64));
    cl.refused(
        &["vm", "define", &f6, "--replace"],
        "does not match the UUID",
    )
    .await;
}

/// The nodes judge XML by their own `domains.xml_policy`: `vm define` writes it, warning on
/// stderr (and in `policy_warning`) when the policy of the configuration it read refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn define_warns_about_xml_the_configured_policy_refuses() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    two_nodes(&mut c).await;
    let qemu = domain_xml(Some(U1), "passthrough", 64)
        .replacen(
            "<domain type='kvm'>",
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
            1,
        )
        .replacen(
            "</domain>",
            "  <qemu:commandline><qemu:arg value='-S'/></qemu:commandline>\n</domain>",
            1,
        );
    let f = cl.xml_file("qemu.xml", &qemu);
    let out = cl.run(&["vm", "define", &f, "--node", "hv1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "debvisorctl: warning: xml: <qemu:commandline> is not allowed \
             (domains.xml_policy.allow_qemu_passthrough)"
        ),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("VM passthrough defined"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        val(&mut c, &format!("vms/{U1}/xml")).await,
        Some(qemu.clone())
    );

    let shadow = domain_xml(None, "shadow", 64).replacen(
        "</domain>",
        "  <devices><disk type='file'><source file='/etc/shadow'/><target dev='vda'/></disk></devices>\n</domain>",
        1,
    );
    let v = cl.json(&[
        "vm",
        "define",
        &cl.xml_file("shadow.xml", &shadow),
        "--node",
        "hv1",
    ]);
    let w = v["policy_warning"].as_str().unwrap_or_default();
    assert!(
        w.contains(
            "<disk type='file'> source file /etc/shadow is not under domains.xml_policy.disk_dirs"
        ),
        "{v}"
    );
    // --replace warns too; a clean XML brings no warning.
    let out = cl.run(&["vm", "define", &f, "--replace"]);
    assert!(out.status.success() && stderr(&out).contains("warning: xml: <qemu:commandline>"));
    let clean = cl.xml_file("clean.xml", &domain_xml(Some(U2), "clean", 64));
    let out = cl.run(&["vm", "define", &clean, "--node", "hv2", "-o", "json"]);
    assert!(
        out.status.success() && stderr(&out).is_empty(),
        "{}",
        stderr(&out)
    );
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert!(v.get("policy_warning").is_none(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_with_the_field_named_and_nothing_written() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    two_nodes(&mut c).await;
    let good = cl.xml_file("good.xml", &domain_xml(Some(U1), "good", 64));
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            cl.xml_file("broken.xml", "<domain type='kvm'><name>x</name>"),
            vec![],
            "invalid xml (FILE): not well-formed",
        ),
        (
            cl.xml_file("net.xml", "<network><name>x</name></network>"),
            vec![],
            "invalid xml (FILE): root element is <network>",
        ),
        (
            cl.xml_file("name.xml", &domain_xml(Some(U1), "bad name", 64)),
            vec![],
            "invalid xml (FILE): domain name",
        ),
        (
            cl.xml_file("uuid.xml", &domain_xml(Some("1234"), "x", 64)),
            vec![],
            "not a canonical UUID",
        ),
        (
            good.clone(),
            vec!["--node", "hv9"],
            "invalid node (--node): node \"hv9\" not found",
        ),
        (
            good.clone(),
            vec!["--node", "HV1"],
            "--node: invalid node name",
        ),
        (
            good.clone(),
            vec!["--limit", "Bad_Node"],
            "invalid metadata.node_limit[0] (--limit)",
        ),
        (
            good.clone(),
            vec!["--node", "hv2", "--limit", "hv1"],
            "hv2 is not in --limit [hv1]",
        ),
        (
            good.clone(),
            vec!["--limit", "hv3"],
            "no --node given and none can be chosen: no eligible node",
        ),
        (
            cl.dir().join("missing.xml").to_string_lossy().into(),
            vec![],
            "cannot read",
        ),
        (good.clone(), vec!["--replace"], "does not exist"),
    ];
    for (file, extra, needle) in &cases {
        let mut args = vec!["vm", "define", file.as_str()];
        args.extend(extra);
        cl.refused(&args, needle).await;
    }
    // Usage errors are clap's: exit 2 (bad method, --replace with policy flags).
    for args in [
        vec!["vm", "define", good.as_str(), "--method", "teleport"],
        vec!["vm", "define", good.as_str(), "--replace", "--stopped"],
        vec!["vm", "start", "x", "--wait", "--timeout", "soon"],
    ] {
        assert_eq!(cl.run(&args).status.code(), Some(2), "{args:?}");
    }
    // With every node drained, placement says why.
    put(&mut c, "nodes/hv1/domain_state", "flushed").await;
    del(&mut c, "nodes/hv2/alive").await;
    let e = cl
        .refused(&["vm", "define", &good], "no eligible node")
        .await;
    assert!(
        e.contains("hv1: domain_state flushed") && e.contains("hv2: not alive"),
        "{e}"
    );
    assert!(get(&mut c, &format!("vms/{U1}/xml")).await.is_none());

    // Verbs on VMs that do not exist or cannot take them.
    put(&mut c, "nodes/hv1/domain_state", "ready").await;
    cl.ok(&["vm", "define", &good, "--node", "hv1", "--stopped"]);
    for (args, needle) in [
        (vec!["vm", "start", "nope"], "VM \"nope\" not found"),
        (
            vec!["vm", "restart", "good"],
            "not meant to run (state stop)",
        ),
        (vec!["vm", "migrate", "good"], "is not running (state stop)"),
        (vec!["vm", "unmigrate", "good"], "has no last_node"),
        (vec!["vm", "show", U2], "not found"),
    ] {
        cl.refused(&args, needle).await;
    }
    // An invalid VM is not started: the field is named.
    put(
        &mut c,
        &format!("vms/{U1}/metadata"),
        r#"{"autostart":"yes"}"#,
    )
    .await;
    cl.refused(&["vm", "start", "good"], "VM good is invalid: metadata")
        .await;
    // …but can be stopped.
    cl.ok(&["vm", "stop", "good"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_show_in_table_and_json_including_an_invalid_vm() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    two_nodes(&mut c).await;
    cl.ok(&[
        "vm",
        "define",
        &cl.xml_file("a.xml", &domain_xml(Some(U1), "alpha", 64)),
        "--node",
        "hv1",
    ]);
    cl.ok(&[
        "vm",
        "define",
        &cl.xml_file("b.xml", &domain_xml(Some(U2), "beta", 64)),
        "--node",
        "hv2",
        "--stopped",
    ]);
    // A VM written by hand with a bad desired state.
    put(
        &mut c,
        &format!("vms/{U3}/xml"),
        &domain_xml(Some(U3), "gamma", 64),
    )
    .await;
    put(&mut c, &format!("vms/{U3}/state"), "running").await;
    // What the owning node reports for alpha.
    let lease = c.lease_grant(600, None).await.expect("lease").id();
    c.put(
        format!("{P}vms/{U1}/lock"),
        "hv1",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("lock");
    put(&mut c, &format!("vms/{U1}/owner"), "hv1").await;
    put(&mut c, &format!("vms/{U1}/last_node"), "hv2").await;
    put(
        &mut c,
        &format!("vms/{U1}/status"),
        &status("running", "hv1", "2026-11-23T10:00:00Z"),
    )
    .await;
    put(
        &mut c,
        &format!("vmstats/{U1}"),
        r#"{"node":"hv1","active":true,"cpu_pct":42,"memory_kib":65536,"max_memory_kib":65536,"vcpus":1,"at":"2026-11-23T10:00:00Z"}"#,
    )
    .await;
    put(
        &mut c,
        &format!("vms/{U2}/status"),
        &json!({"state":"fail","since":"2026-11-23T10:00:00Z","reason":"start failed","error":"xml: no such emulator","node":"hv2"}).to_string(),
    )
    .await;

    let list = cl.json(&["vm", "list"]);
    let arr = list.as_array().expect("array");
    let names: Vec<&str> = arr.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, vec!["alpha", "beta", "gamma"]);
    assert_eq!(arr[0]["valid"], true);
    assert_eq!(arr[0]["status"]["state"], "running");
    assert_eq!(arr[0]["owner"], "hv1");
    assert_eq!(arr[2]["valid"], false);
    assert_eq!(arr[2]["error_field"], "state");
    assert_eq!(arr[2]["state"], "running");
    assert!(arr[0].get("xml").is_none(), "XML only in vm show");

    let table = cl.ok(&["vm", "list"]);
    let mut lines = table.lines();
    let header = lines.next().expect("header");
    for col in [
        "NAME", "UUID", "STATE", "STATUS", "NODE", "OWNER", "PROBLEM",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let rows: Vec<&str> = lines.collect();
    assert!(
        rows[0].starts_with("alpha")
            && rows[0].contains(U1)
            && rows[0].contains("start")
            && rows[0].contains("running")
            && rows[0].contains("hv1"),
        "{table}"
    );
    assert!(
        rows[1].starts_with("beta")
            && rows[1].contains("fail")
            && rows[1].contains("xml: no such emulator"),
        "{table}"
    );
    assert!(
        rows[2].starts_with("gamma") && rows[2].contains("INVALID state:"),
        "{table}"
    );

    let show = cl.json(&["vm", "show", "alpha"]);
    assert_eq!(show["uuid"], U1);
    assert_eq!(show["lock"]["node"], "hv1");
    assert_eq!(show["lock"]["lease"], format!("{lease:x}"));
    assert_eq!(show["last_node"], "hv2");
    assert_eq!(show["stats"]["cpu_pct"], 42);
    assert_eq!(show["metadata"]["migration_method"], "live");
    assert!(show["xml"].as_str().is_some_and(|x| x.contains("alpha")));
    assert_eq!(cl.json(&["vm", "show", U1]), show, "by UUID");
    let text = cl.ok(&["vm", "show", &U1.to_ascii_uppercase()]);
    for needle in [
        "VM alpha",
        "running on hv1 for ",
        &format!("hv1 (lease {lease:x}"),
        "last node  hv2",
        "migration      live",
        "42 % of one core",
        "64 MiB of 64 MiB",
        "<name>alpha</name>",
    ] {
        assert!(text.contains(needle), "{needle:?} in {text}");
    }
    let text = cl.ok(&["vm", "show", "gamma"]);
    assert!(text.contains("INVALID    state:"), "{text}");

    // A duplicate name (possible only by hand) makes the name ambiguous.
    let u4 = "44444444-4444-4444-8444-444444444444";
    put(
        &mut c,
        &format!("vms/{u4}/xml"),
        &domain_xml(Some(u4), "alpha", 64),
    )
    .await;
    let e = cl.refused(&["vm", "show", "alpha"], "ambiguous").await;
    assert!(e.contains(U1) && e.contains(u4), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_verb_writes_its_value_through_its_guard_and_undefine_deletes() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    two_nodes(&mut c).await;
    cl.ok(&[
        "vm",
        "define",
        &cl.xml_file("a.xml", &domain_xml(Some(U1), "alpha", 64)),
        "--node",
        "hv1",
        "--stopped",
    ]);
    let key = format!("vms/{U1}/state");
    for (verb, value) in [
        ("start", "start"),
        ("restart", "restart"),
        ("shutdown", "shutdown"),
        ("stop", "stop"),
        ("disable", "disable"),
        ("start", "start"),
    ] {
        let before = rev(&mut c, &key).await;
        let v = cl.json(&["vm", verb, "alpha"]);
        let (now, r) = get(&mut c, &key).await.expect("state");
        assert_eq!(now, value, "vm {verb}");
        assert!(r > before);
        assert_eq!(v["revision"], r, "vm {verb} reports the revision it wrote");
        assert_eq!(v["state"], value);
    }
    // The guard: a state written between read and write loses the transaction. Build the
    // same guarded write the verbs use from a stale read and see it refused.
    let store = cl.store().await;
    let (rows, _) = ctl_vm::read_vms(&store).await.expect("read");
    let stale = ctl_vm::resolve(&rows, "alpha").expect("alpha").clone();
    put(&mut c, &key, "stop").await;
    let state_rev = stale.keys.get("state").map_or(0, |e| e.mod_revision);
    let t = debvisor_objects::TxnBuilder::new()
        .mod_revision_is(&key, state_rev)
        .put(&key, "start");
    assert!(!store.txn(t).await.expect("txn").succeeded());
    assert_eq!(val(&mut c, &key).await.as_deref(), Some("stop"));

    // undefine: refused while running, --force deletes every key.
    put(&mut c, &key, "start").await;
    put(
        &mut c,
        &format!("vms/{U1}/status"),
        &status("running", "hv1", "2026-11-23T10:00:00Z"),
    )
    .await;
    put(&mut c, &format!("vms/{U1}/owner"), "hv1").await;
    cl.refused(&["vm", "undefine", "alpha"], "is running on hv1")
        .await;
    put(
        &mut c,
        &format!("vms/{U1}/status"),
        &status("stopped", "hv1", "2026-11-23T10:00:00Z"),
    )
    .await;
    put(&mut c, &format!("vms/{U1}/lock"), "hv1").await;
    cl.refused(&["vm", "undefine", "alpha"], "holds the run lock of hv1")
        .await;
    let v = cl.json(&["vm", "undefine", "alpha", "--force"]);
    assert_eq!(v["deleted"], 7);
    let r = c
        .get(
            format!("{P}vms/{U1}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("get");
    assert_eq!(r.kvs().len(), 0);
    cl.refused(&["vm", "start", "alpha"], "not found").await;
    // A stopped VM is undefined without --force.
    cl.ok(&[
        "vm",
        "define",
        &cl.xml_file("b.xml", &domain_xml(Some(U2), "beta", 64)),
        "--node",
        "hv2",
        "--stopped",
    ]);
    put(
        &mut c,
        &format!("vms/{U2}/status"),
        &status("stopped", "hv2", "2026-11-23T10:00:00Z"),
    )
    .await;
    let out = cl.ok(&["vm", "undefine", "beta"]);
    assert!(
        out.contains("VM beta") && out.contains("undefined"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_picks_the_target_by_selector_and_honours_limits_and_node_states() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    // hv0 is where the VMs run; each other node is best by exactly one selector.
    add_node(&mut c, "hv0", (60000, 0, 0.0, 0, 0)).await;
    add_node(&mut c, "hv1", (9000, 8000, 3.0, 8, 6)).await;
    add_node(&mut c, "hv2", (4000, 1000, 2.0, 6, 5)).await;
    add_node(&mut c, "hv3", (5000, 7000, 0.5, 7, 4)).await;
    add_node(&mut c, "hv4", (3000, 6000, 1.5, 2, 3)).await;
    add_node(&mut c, "hv5", (2000, 5000, 2.5, 9, 1)).await;
    let cases = [
        ("mem", "hv1"),
        ("memprov", "hv2"),
        ("load", "hv3"),
        ("vcpus", "hv4"),
        ("vms", "hv5"),
    ];
    for (i, (sel, want)) in cases.iter().enumerate() {
        let uuid = format!("00000000-0000-4000-8000-00000000000{i}");
        let name = format!("vm-{sel}");
        let f = cl.xml_file(&format!("{name}.xml"), &domain_xml(Some(&uuid), &name, 64));
        cl.ok(&["vm", "define", &f, "--node", "hv0", "--selector", sel]);
        let v = cl.json(&["vm", "migrate", &name]);
        assert_eq!(v["target"], *want, "selector {sel}");
        assert_eq!(v["from"], "hv0");
        assert_eq!(
            val(&mut c, &format!("vms/{uuid}/node")).await.as_deref(),
            Some(*want)
        );
        assert_eq!(
            val(&mut c, &format!("vms/{uuid}/state")).await.as_deref(),
            Some("migrate")
        );
        let (_, rn) = get(&mut c, &format!("vms/{uuid}/node"))
            .await
            .expect("node");
        assert_eq!(
            rev(&mut c, &format!("vms/{uuid}/state")).await,
            rn,
            "one txn"
        );
        // A second migrate while the first is in flight is refused.
        cl.refused(&["vm", "migrate", &name], "already moving")
            .await;
    }
    // --live, an explicit target, node_limit, and refused targets.
    let f = cl.xml_file("lim.xml", &domain_xml(Some(U1), "lim", 64));
    cl.ok(&[
        "vm", "define", &f, "--node", "hv0", "--limit", "hv0", "--limit", "hv4",
    ]);
    let v = cl.json(&["vm", "migrate", "lim", "--live"]);
    assert_eq!(
        v["target"], "hv4",
        "mem would pick hv1, node_limit allows hv4 only"
    );
    assert_eq!(
        val(&mut c, &format!("vms/{U1}/state")).await.as_deref(),
        Some("migrate-live")
    );
    // Back to a running state on hv4 (as the daemon would leave it).
    put(&mut c, &format!("vms/{U1}/state"), "start").await;
    cl.refused(
        &["vm", "migrate", "lim", "--target", "hv1"],
        "--target hv1: not in node_limit",
    )
    .await;
    cl.refused(
        &["vm", "migrate", "lim", "--target", "hv4"],
        "--target hv4: current node",
    )
    .await;
    cl.refused(
        &["vm", "migrate", "lim", "--target", "hv9"],
        "--target hv9: no such node",
    )
    .await;
    put(&mut c, "nodes/hv0/domain_state", "flushed").await;
    cl.refused(
        &["vm", "migrate", "lim", "--target", "hv0"],
        "--target hv0: domain_state flushed, not ready",
    )
    .await;
    let e = cl
        .refused(&["vm", "migrate", "lim"], "no target node for VM lim")
        .await;
    assert!(
        e.contains("hv4: current node") && e.contains("hv0: domain_state flushed"),
        "{e}"
    );
    put(&mut c, "nodes/hv0/domain_state", "ready").await;
    let v = cl.json(&["vm", "migrate", "lim", "--target", "hv0"]);
    assert_eq!(v["target"], "hv0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_loses_its_transaction_when_the_node_changes_concurrently() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    two_nodes(&mut c).await;
    add_node(&mut c, "hv3", (1000, 0, 0.0, 0, 0)).await;
    cl.ok(&[
        "vm",
        "define",
        &cl.xml_file("a.xml", &domain_xml(Some(U1), "alpha", 64)),
        "--node",
        "hv1",
    ]);
    let store = cl.store().await;
    let (rows, _) = ctl_vm::read_vms(&store).await.expect("vms");
    let node_rows = debvisor_daemon::ctl::nodes(&store).await.expect("nodes");
    let names: Vec<String> = node_rows.iter().map(|r| r.name.clone()).collect();
    let nodes: Vec<_> = node_rows.into_iter().filter_map(|r| r.node.ok()).collect();
    let plan = ctl_vm::plan_migrate(&rows, &nodes, &names, "alpha", false, None).expect("plan");
    assert_eq!(plan.target, "hv2");
    // Someone moves the VM between the read and the write.
    put(&mut c, &format!("vms/{U1}/node"), "hv3").await;
    let before = cl.etcd.current_revision().await.expect("revision");
    assert_eq!(ctl_vm::commit_migrate(&store, &plan).await, Ok(None));
    assert_eq!(cl.etcd.current_revision().await.expect("revision"), before);
    assert_eq!(
        val(&mut c, &format!("vms/{U1}/node")).await.as_deref(),
        Some("hv3")
    );
    assert_eq!(
        val(&mut c, &format!("vms/{U1}/state")).await.as_deref(),
        Some("start")
    );
    // A fresh plan from a fresh read commits.
    let (rows, _) = ctl_vm::read_vms(&store).await.expect("vms");
    let plan =
        ctl_vm::plan_migrate(&rows, &nodes, &names, "alpha", true, Some("hv1")).expect("plan");
    assert!(ctl_vm::commit_migrate(&store, &plan)
        .await
        .expect("txn")
        .is_some());
    assert_eq!(
        val(&mut c, &format!("vms/{U1}/state")).await.as_deref(),
        Some("migrate-live")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_succeed_when_the_node_reports_and_fail_on_timeout_or_fail_status() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    two_nodes(&mut c).await;
    cl.ok(&[
        "vm",
        "define",
        &cl.xml_file("a.xml", &domain_xml(Some(U1), "alpha", 64)),
        "--node",
        "hv1",
        "--stopped",
    ]);
    let state = format!("vms/{U1}/state");
    let st = format!("vms/{U1}/status");
    let t0 = "2026-11-23T10:00:00Z";
    put(&mut c, &st, &status("stopped", "hv1", t0)).await;

    // Timeout: nobody answers; a progress line as the wait begins, then exit 1 with the
    // current status and why nothing happened.
    let out = cl.run(&["vm", "start", "alpha", "--wait", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.starts_with('[')
            && e.lines()
                .next()
                .is_some_and(|l| l.contains("s] status stopped on hv1; desired start"))
            && e.contains("timed out after 1s")
            && e.contains("be running on hv1")
            && e.contains("now: status stopped on hv1"),
        "{e}"
    );
    let out = cl.run(&[
        "vm",
        "start",
        "alpha",
        "--wait",
        "--timeout",
        "500ms",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON status on stdout");
    assert_eq!(v["status"]["state"], "stopped");
    assert_eq!(v["state"], "start");

    // Success: the test plays hv1. A running status from the wrong node does not count.
    put(&mut c, &state, "stop").await;
    let before = rev(&mut c, &state).await;
    let h = cl.spawn(&["vm", "start", "alpha", "--wait", "--timeout", "120s"]);
    assert_eq!(written_after(&mut c, &state, before).await, "start");
    put(&mut c, &st, &status("running", "hv2", t0)).await;
    put(
        &mut c,
        &st,
        &status("running", "hv1", "2026-11-23T10:00:01Z"),
    )
    .await;
    let out = h.await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "VM alpha: running on hv1\n");

    // Restart: done once state is back to start and since is newer.
    let before = rev(&mut c, &state).await;
    let h = cl.spawn(&["vm", "restart", "alpha", "--wait", "-o", "json"]);
    assert_eq!(written_after(&mut c, &state, before).await, "restart");
    put(
        &mut c,
        &st,
        &status("running", "hv1", "2026-11-23T10:00:01Z"),
    )
    .await;
    put(&mut c, &state, "start").await;
    put(
        &mut c,
        &st,
        &status("running", "hv1", "2026-11-23T10:05:00Z"),
    )
    .await;
    let out = h.await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["status"]["since"], "2026-11-23T10:05:00Z");

    // Migrate: done when hv2 owns it and reports running.
    let before = rev(&mut c, &state).await;
    let h = cl.spawn(&["vm", "migrate", "alpha", "--wait"]);
    assert_eq!(written_after(&mut c, &state, before).await, "migrate");
    put(
        &mut c,
        &st,
        &status("migrating", "hv1", "2026-11-23T10:06:00Z"),
    )
    .await;
    put(
        &mut c,
        &st,
        &status("running", "hv2", "2026-11-23T10:06:05Z"),
    )
    .await;
    put(&mut c, &format!("vms/{U1}/owner"), "hv2").await;
    put(&mut c, &format!("vms/{U1}/last_node"), "hv1").await;
    put(&mut c, &state, "start").await;
    let out = h.await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "VM alpha: running on hv2\n");

    // Unmigrate: back to last_node hv1 (the daemon moves node itself).
    let before = rev(&mut c, &state).await;
    let h = cl.spawn(&["vm", "unmigrate", "alpha", "--wait"]);
    assert_eq!(written_after(&mut c, &state, before).await, "unmigrate");
    assert_eq!(
        val(&mut c, &format!("vms/{U1}/node")).await.as_deref(),
        Some("hv2"),
        "unmigrate leaves node to the daemon"
    );
    put(&mut c, &format!("vms/{U1}/node"), "hv1").await;
    put(&mut c, &format!("vms/{U1}/owner"), "hv1").await;
    put(
        &mut c,
        &st,
        &status("running", "hv1", "2026-11-23T10:07:00Z"),
    )
    .await;
    put(&mut c, &state, "start").await;
    let out = h.await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "VM alpha: running on hv1\n");

    // Fail fast: a fail status written after the request ends the wait at once.
    let before = rev(&mut c, &state).await;
    let h = cl.spawn(&["vm", "shutdown", "alpha", "--wait", "--timeout", "600s"]);
    assert_eq!(written_after(&mut c, &state, before).await, "shutdown");
    put(
        &mut c,
        &st,
        &json!({"state":"fail","since":"2026-11-23T10:08:00Z","reason":"shutdown refused","error":"xml: guest agent missing","node":"hv1"}).to_string(),
    )
    .await;
    let out = h.await.expect("join");
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("VM alpha failed: status fail on hv1: shutdown refused")
            && e.contains("xml: guest agent missing")
            && !e.contains("timed out"),
        "{e}"
    );
    // Stop: stopped counts; an invalid status after the request fails a start.
    let before = rev(&mut c, &state).await;
    let h = cl.spawn(&["vm", "stop", "alpha", "--wait"]);
    assert_eq!(written_after(&mut c, &state, before).await, "stop");
    put(
        &mut c,
        &st,
        &status("stopped", "hv1", "2026-11-23T10:09:00Z"),
    )
    .await;
    let out = h.await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let before = rev(&mut c, &state).await;
    let h = cl.spawn(&["vm", "disable", "alpha", "--wait", "-o", "json"]);
    assert_eq!(written_after(&mut c, &state, before).await, "disable");
    put(
        &mut c,
        &st,
        &json!({"state":"invalid","since":"2026-11-23T10:10:00Z","reason":"","error":"xml: bad","node":"hv1"}).to_string(),
    )
    .await;
    let out = h.await.expect("join");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("status invalid on hv1"),
        "{}",
        stderr(&out)
    );
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON on failure");
    assert_eq!(v["status"]["state"], "invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_flush_and_unflush_write_domain_state_and_wait_for_the_node() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    two_nodes(&mut c).await;
    let ds = "nodes/hv1/domain_state";
    let v = cl.json(&["node", "flush", "hv1"]);
    assert_eq!(v["written"], true);
    let (now, r) = get(&mut c, ds).await.expect("domain_state");
    assert_eq!(now, "flush");
    assert_eq!(v["revision"], r);
    // Already requested: nothing written.
    let out = cl.ok(&["node", "flush", "hv1"]);
    assert!(out.contains("already in progress"), "{out}");
    assert_eq!(rev(&mut c, ds).await, r);

    // Wait: timeout with the current domain_state, then the node (the test) completes.
    let out = cl.run(&["node", "flush", "hv1", "--wait", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "timed out after 1s waiting for node hv1 to be flushed; domain_state is flush"
        ),
        "{}",
        stderr(&out)
    );
    put(&mut c, ds, "ready").await;
    let before = rev(&mut c, ds).await;
    let h = cl.spawn(&["node", "flush", "hv1", "--wait"]);
    assert_eq!(written_after(&mut c, ds, before).await, "flush");
    put(&mut c, ds, "flushed").await;
    let out = h.await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "node hv1 flushed\n");

    let before = rev(&mut c, ds).await;
    let h = cl.spawn(&["node", "unflush", "hv1", "--wait", "-o", "json"]);
    assert_eq!(written_after(&mut c, ds, before).await, "unflush");
    put(&mut c, ds, "ready").await;
    let out = h.await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["domain_state"], "ready");
    let out = cl.ok(&["node", "unflush", "hv1"]);
    assert!(out.contains("node hv1 is already ready"), "{out}");

    // Refusals: unknown, invalid name, not alive.
    cl.refused(&["node", "flush", "hv9"], "node \"hv9\" not found")
        .await;
    cl.refused(&["node", "flush", "HV1"], "invalid node name")
        .await;
    del(&mut c, "nodes/hv2/alive").await;
    cl.refused(&["node", "flush", "hv2"], "node hv2 is not alive")
        .await;
}

/// `vm define` keeps names unique with a ranged guard "no key under `vms/` created after
/// R"; prove this etcd honours it: a new key fails it, a changed existing key does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_honours_the_ranged_create_guard_of_define() {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let cl = Cluster::start();
    let mut c = cl.client().await;
    let txn = |rev: i64| {
        Txn::new()
            .when(vec![Compare::create_revision(
                format!("{P}vms/"),
                CompareOp::Less,
                rev + 1,
            )
            .with_prefix()])
            .and_then(vec![TxnOp::put(format!("{P}probe"), "x", None)])
    };
    let r0 = cl.etcd.current_revision().await.expect("revision");
    assert!(
        c.txn(txn(r0)).await.expect("txn").succeeded(),
        "empty range"
    );
    put(&mut c, &format!("vms/{U1}/xml"), "a").await;
    let r1 = cl.etcd.current_revision().await.expect("revision");
    assert!(
        !c.txn(txn(r0)).await.expect("txn").succeeded(),
        "created after R"
    );
    put(&mut c, &format!("vms/{U1}/xml"), "b").await;
    put(&mut c, &format!("vms/{U1}/status"), "{}").await;
    assert!(
        !c.txn(txn(r1)).await.expect("txn").succeeded(),
        "status created"
    );
    let r2 = cl.etcd.current_revision().await.expect("revision");
    put(
        &mut c,
        &format!("vms/{U1}/status"),
        "{\"state\":\"running\"}",
    )
    .await;
    assert!(
        c.txn(txn(r2)).await.expect("txn").succeeded(),
        "a status rewrite does not trip the guard"
    );
}

/// End to end with real daemons on libvirt's test driver: every `--wait` of the CLI ends on
/// what the daemons actually report (start, restart, a shutdown migration chosen by
/// placement, unmigrate, a live migration the test driver cannot do failing fast, stop).
#[test]
fn waits_end_on_what_real_daemons_report() {
    use debvisor_tests::libvirt::{random_uuid, test_driver_xml, unique_name};
    use debvisor_tests::{eventually, DaemonBuilder};
    let cl = Cluster::start();
    let daemon = |node: &str| {
        let mut d = DaemonBuilder::new(node)
            .endpoints(&[cl.endpoint().to_string()])
            .clustered(&[node])
            .env("DEBVISOR_DOMAINS_SHUTDOWN_TIMEOUT", "3s")
            .spawn()
            .expect("spawn daemon");
        d.wait_run(Duration::from_secs(30))
            .expect("daemon reaches run");
        d
    };
    let _a = daemon("e2e-a");
    let _b = daemon("e2e-b");
    for n in ["e2e-a", "e2e-b"] {
        eventually(
            &format!("{n} reports health"),
            Duration::from_secs(60),
            || cl.etcd.get_key(&format!("nodes/{n}/health")).ok().flatten(),
        );
    }
    let name = unique_name("ctl");
    let f = cl.xml_file("e2e.xml", &test_driver_xml(&name, &random_uuid()));
    cl.ok(&["vm", "define", &f, "--node", "e2e-a", "--stopped"]);
    let run = |verb: &[&str]| {
        let mut args = vec!["vm"];
        args.extend_from_slice(verb);
        args.extend([name.as_str(), "--wait", "--timeout", "90s"]);
        cl.run(&args)
    };
    let ok = |verb: &[&'static str], want: &str| {
        let out = run(verb);
        assert!(out.status.success(), "{verb:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("VM {name}: {want}\n"), "{verb:?}");
    };
    ok(&["start"], "running on e2e-a");
    ok(&["restart"], "running on e2e-a");
    ok(&["migrate"], "running on e2e-b");
    assert_eq!(
        cl.etcd
            .get_key(&format!(
                "vms/{}/last_node",
                cl.json(&["vm", "show", &name])["uuid"]
                    .as_str()
                    .unwrap_or_default()
            ))
            .expect("get")
            .as_deref(),
        Some("e2e-a")
    );
    ok(&["unmigrate"], "running on e2e-a");
    // Drain e2e-a and take the VM back: the CLI waits for the node's own verdicts.
    for (verb, done) in [("flush", "flushed"), ("unflush", "ready")] {
        let out = cl.run(&["node", verb, "e2e-a", "--wait", "--timeout", "90s"]);
        assert!(out.status.success(), "node {verb}: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("node e2e-a {done}\n"));
        let shown = cl.json(&["vm", "show", &name]);
        let want = if verb == "flush" { "e2e-b" } else { "e2e-a" };
        assert_eq!(shown["owner"], want, "after {verb}: {shown}");
    }
    ok(&["start"], "running on e2e-a");
    // The test driver cannot migrate live and migrate-live forbids the fallback.
    let out = run(&["migrate", "--live"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(
        e.contains("failed: status fail on e2e-a") && !e.contains("timed out"),
        "{e}"
    );
    // After the failed migrate-live, node is e2e-b but e2e-a runs the VM: the wait ends
    // only when the owner released the run lock, whichever node wrote "stopped".
    let out = run(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!("VM {name}: stopped on e2e-")),
        "{}",
        stdout(&out)
    );
    let shown = cl.json(&["vm", "show", &name]);
    assert_eq!(shown["lock"], Value::Null, "{shown}");
    let out = cl.ok(&["vm", "undefine", &name]);
    assert!(out.contains("undefined"), "{out}");
}
