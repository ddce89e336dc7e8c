//! Host networking on real netlink, inside throw-away network namespaces.
//!
//! Each test builds a "host" namespace whose "physical" NICs are veths (`dv0`, `dv1`, …)
//! with their peers (`pv0`, …, up) in a second "peer" namespace, then drives
//! `debvisor-netconf` against the host namespace: apply a layout, re-apply (no change), drift
//! it with `ip` and check that `ensure` corrects exactly that. The `ip` commands are test
//! setup and independent verification only; the crate itself never runs `ip`.
//! Namespaces are deleted on drop, also when a test fails. Without root every test skips
//! (a failure under `DEBVISOR_REQUIRE_ALL=1`; see `debvisor_tests::skip`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use debvisor_netconf::{
    ensure, release_floating, take_floating, Change, HostNet, HostNetwork, HostNetworks,
    NetconfError, Netlink, Outcome, VxlanSpec,
};
use debvisor_tests::{skip_or_fail, skip_unless_root, NetNs, SkipKind};
use serde_json::Value;

/// A host namespace with veth "NICs" whose peers sit in a peer namespace.
struct Lab {
    // Declared first: the netlink thread ends before the namespaces are deleted.
    nl: Netlink,
    host: NetNs,
    peer: NetNs,
    started: Instant,
}

impl Lab {
    /// `nics` veth pairs: `dv<i>` in the host namespace (down, MTU 1500), `pv<i>` up in the
    /// peer namespace.
    fn new(nics: usize) -> Lab {
        let started = Instant::now();
        let host = NetNs::create("nch").expect("host netns");
        let peer = NetNs::create("ncp").expect("peer netns");
        for i in 0..nics {
            let (d, p) = (format!("dv{i}"), format!("pv{i}"));
            run(
                &host,
                "ip",
                &[
                    "link",
                    "add",
                    &d,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &p,
                    "netns",
                    peer.name(),
                ],
            );
            run(&peer, "ip", &["link", "set", &p, "up"]);
        }
        let nl = Netlink::in_netns(host.name()).expect("netlink in netns");
        Lab {
            nl,
            host,
            peer,
            started,
        }
    }

    /// `ip args…` in the host namespace.
    fn ip(&self, args: &[&str]) -> String {
        run(&self.host, "ip", args)
    }

    /// `ip -j args…` in the host namespace, parsed.
    fn ip_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["-j"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ip(&a)).expect("ip -j output")
    }

    /// `ip -j -d link show dev NAME` as one object.
    fn link(&self, name: &str) -> Value {
        self.ip_json(&["-d", "link", "show", "dev", name])[0].clone()
    }

    fn has_link(&self, name: &str) -> bool {
        self.host
            .exec_cmd("ip", &["link", "show", "dev", name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Addresses (`addr/prefix`) on a link, global scope only.
    fn addrs(&self, name: &str) -> Vec<String> {
        let v = self.ip_json(&["addr", "show", "dev", name, "scope", "global"]);
        v[0]["addr_info"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["scope"] == "global")
                    .map(|x| format!("{}/{}", str_of(&x["local"]), x["prefixlen"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn ensure(&self, d: &HostNetworks) -> Vec<String> {
        ensure(&self.nl, d)
            .await
            .unwrap_or_else(|e| panic!("ensure: {e}"))
            .iter()
            .map(Change::to_string)
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        eprintln!("lab {} took {:?}", self.host.name(), self.started.elapsed());
    }
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Run `program args…` in `ns`; panic with stderr unless it succeeds.
fn run(ns: &NetNs, program: &str, args: &[&str]) -> String {
    let out = ns
        .exec_cmd(program, args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn net(device: &str, addresses: &[&str]) -> HostNetwork {
    HostNetwork {
        device: device.into(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

fn only_cluster(n: HostNetwork) -> HostNetworks {
    HostNetworks {
        cluster: Some(n),
        ..Default::default()
    }
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn device_only_v4_v6_apply_reapply_drift_and_ownership() {
    skip_unless_root!();
    let lab = Lab::new(1);
    let mut d = only_cluster(net("dv0", &["10.10.0.11/24", "fd10::11/64"]));

    assert_eq!(
        lab.ensure(&d).await,
        strs(&[
            "cluster dv0 state: down -> up",
            "cluster dv0 address: absent -> 10.10.0.11/24",
            "cluster dv0 address: absent -> fd10::11/64",
        ])
    );
    assert_eq!(lab.addrs("dv0"), strs(&["10.10.0.11/24", "fd10::11/64"]));
    assert!(lab.link("dv0")["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP")));
    // Marked as ours in the kernel (IFA_PROTO), and IPv6 without DAD (usable at once).
    let v6 = lab.ip("-6 addr show dev dv0 scope global"
        .split(' ')
        .collect::<Vec<_>>()
        .as_slice());
    assert!(v6.contains("fd10::11/64"), "{v6}");
    assert!(!v6.contains("tentative"), "{v6}");
    assert!(v6.contains("nodad"), "{v6}");

    assert!(lab.ensure(&d).await.is_empty(), "re-apply changes nothing");

    // Drift: an address deleted, the link set down.
    lab.ip(&["addr", "del", "10.10.0.11/24", "dev", "dv0"]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&["cluster dv0 address: absent -> 10.10.0.11/24"])
    );
    // Setting a link down also flushes its IPv6 addresses (keep_addr_on_down=0): both return.
    lab.ip(&["link", "set", "dv0", "down"]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&[
            "cluster dv0 state: down -> up",
            "cluster dv0 address: absent -> fd10::11/64",
        ])
    );

    // An address someone else added stays; one of ours dropped from the config goes.
    lab.ip(&["addr", "add", "10.10.0.99/24", "dev", "dv0"]);
    assert!(lab.ensure(&d).await.is_empty());
    d.cluster.as_mut().expect("cluster").addresses = strs(&["10.10.0.11/24"]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&["cluster dv0 address: fd10::11/64 -> absent"])
    );
    assert_eq!(lab.addrs("dv0"), strs(&["10.10.0.11/24", "10.10.0.99/24"]));
}

#[tokio::test]
async fn bridge_with_mtu_apply_reapply_and_drift() {
    skip_unless_root!();
    let lab = Lab::new(1);
    let mut n = net("dv0", &["10.20.0.11/24", "fd20::11/64"]);
    n.bridge = Some("brc".into());
    n.mtu = Some(9000);
    let d = only_cluster(n);

    assert_eq!(
        lab.ensure(&d).await,
        strs(&[
            "cluster brc link: absent -> bridge",
            "cluster dv0 mtu: 1500 -> 9000",
            "cluster dv0 master: none -> brc",
            // no "brc mtu": the kernel raised the new bridge to its port's MTU on enslaving
            "cluster dv0 state: down -> up",
            "cluster brc state: down -> up",
            "cluster brc address: absent -> 10.20.0.11/24",
            "cluster brc address: absent -> fd20::11/64",
        ])
    );
    let br = lab.link("brc");
    assert_eq!(str_of(&br["linkinfo"]["info_kind"]), "bridge");
    assert_eq!(br["mtu"], 9000);
    let dv = lab.link("dv0");
    assert_eq!(str_of(&dv["master"]), "brc");
    assert_eq!(dv["mtu"], 9000);
    assert_eq!(lab.addrs("brc"), strs(&["10.20.0.11/24", "fd20::11/64"]));
    assert!(lab.addrs("dv0").is_empty());

    assert!(lab.ensure(&d).await.is_empty(), "re-apply changes nothing");

    lab.ip(&["link", "set", "brc", "mtu", "1400"]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&["cluster brc mtu: 1400 -> 9000"])
    );
    lab.ip(&["link", "set", "dv0", "mtu", "1500"]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&["cluster dv0 mtu: 1500 -> 9000"])
    );

    // Someone deletes the bridge: it comes back with its port, MTU and addresses.
    lab.ip(&["link", "del", "brc"]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&[
            "cluster brc link: absent -> bridge",
            "cluster dv0 master: none -> brc",
            "cluster brc state: down -> up",
            "cluster brc address: absent -> 10.20.0.11/24",
            "cluster brc address: absent -> fd20::11/64",
        ])
    );
    assert_eq!(lab.link("brc")["mtu"], 9000);
    assert!(lab.ensure(&d).await.is_empty());
}

#[tokio::test]
async fn storage_and_upstream_share_the_cluster_device_and_bridge() {
    skip_unless_root!();
    let lab = Lab::new(2);
    // cluster and storage on dv0 directly; upstream shares the bridge on dv1 with nobody.
    let d = HostNetworks {
        cluster: Some(net("dv0", &["10.30.0.11/24"])),
        storage: Some(net("dv0", &["10.31.0.11/24", "fd31::11/64"])),
        upstream: None,
    };
    assert_eq!(
        lab.ensure(&d).await,
        strs(&[
            "cluster,storage dv0 state: down -> up",
            "cluster,storage dv0 address: absent -> 10.30.0.11/24",
            "cluster,storage dv0 address: absent -> 10.31.0.11/24",
            "cluster,storage dv0 address: absent -> fd31::11/64",
        ])
    );
    assert!(lab.ensure(&d).await.is_empty());

    // All three on one bridge over dv1: one bridge, one port, one state change each.
    let b = |a: &str| {
        let mut n = net("dv1", &[a]);
        n.bridge = Some("brs".into());
        n.mtu = Some(1400);
        n
    };
    let mut up = b("10.34.0.11/24");
    up.gateway = Some("10.34.0.1".into());
    let d = HostNetworks {
        cluster: Some(b("10.32.0.11/24")),
        storage: Some(b("10.33.0.11/24")),
        upstream: Some(up),
    };
    let l = "cluster,storage,upstream";
    assert_eq!(
        lab.ensure(&d).await,
        [
            format!("{l} brs link: absent -> bridge"),
            format!("{l} dv1 mtu: 1500 -> 1400"),
            format!("{l} dv1 master: none -> brs"),
            format!("{l} dv1 state: down -> up"),
            format!("{l} brs state: down -> up"),
            format!("{l} brs address: absent -> 10.32.0.11/24"),
            format!("{l} brs address: absent -> 10.33.0.11/24"),
            format!("{l} brs address: absent -> 10.34.0.11/24"),
            // dv0's addresses were ours and no network wants them now.
            "stale dv0 address: 10.30.0.11/24 -> absent".to_owned(),
            "stale dv0 address: 10.31.0.11/24 -> absent".to_owned(),
            "stale dv0 address: fd31::11/64 -> absent".to_owned(),
            "upstream brs default-route: none -> default via 10.34.0.1 dev brs".to_owned(),
        ]
    );
    assert!(lab.ensure(&d).await.is_empty());
    assert_eq!(
        lab.addrs("brs"),
        strs(&["10.32.0.11/24", "10.33.0.11/24", "10.34.0.11/24"])
    );
}

#[tokio::test]
async fn mtu_on_a_device_changes_and_drifts() {
    skip_unless_root!();
    let lab = Lab::new(1);
    let mut n = net("dv0", &["10.35.0.11/24"]);
    n.mtu = Some(1400);
    let mut d = only_cluster(n);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&[
            "cluster dv0 mtu: 1500 -> 1400",
            "cluster dv0 state: down -> up",
            "cluster dv0 address: absent -> 10.35.0.11/24",
        ])
    );
    assert_eq!(lab.link("dv0")["mtu"], 1400);
    lab.ip(&["link", "set", "dv0", "mtu", "1500"]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&["cluster dv0 mtu: 1500 -> 1400"])
    );
    d.cluster.as_mut().expect("cluster").mtu = Some(9000);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&["cluster dv0 mtu: 1400 -> 9000"])
    );
    assert!(lab.ensure(&d).await.is_empty());
    // No MTU configured: the device's MTU is left alone.
    d.cluster.as_mut().expect("cluster").mtu = None;
    assert!(lab.ensure(&d).await.is_empty());
    assert_eq!(lab.link("dv0")["mtu"], 9000);
}

#[tokio::test]
async fn default_routes_v4_and_v6_apply_and_drift() {
    skip_unless_root!();
    let lab = Lab::new(2);
    let mut up = net("dv0", &["10.40.0.11/24"]);
    up.gateway = Some("10.40.0.1".into());
    let mut cl = net("dv1", &["fd41::11/64"]);
    cl.gateway = Some("fd41::1".into());
    let d = HostNetworks {
        cluster: Some(cl),
        storage: None,
        upstream: Some(up),
    };
    let changes = lab.ensure(&d).await;
    assert_eq!(
        &changes[changes.len() - 2..],
        &strs(&[
            "upstream dv0 default-route: none -> default via 10.40.0.1 dev dv0",
            "cluster dv1 default-route: none -> default via fd41::1 dev dv1",
        ])
    );
    let v4 = lab.ip_json(&["route", "show", "default"]);
    assert_eq!(str_of(&v4[0]["gateway"]), "10.40.0.1");
    assert_eq!(str_of(&v4[0]["dev"]), "dv0");
    let v6 = lab.ip_json(&["-6", "route", "show", "default"]);
    assert_eq!(str_of(&v6[0]["gateway"]), "fd41::1");
    assert_eq!(str_of(&v6[0]["dev"]), "dv1");
    assert!(lab.ensure(&d).await.is_empty());

    lab.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "10.40.0.254",
        "dev",
        "dv0",
    ]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&["upstream dv0 default-route: default via 10.40.0.254 dev dv0 metric 0 -> default via 10.40.0.1 dev dv0"])
    );
    lab.ip(&["-6", "route", "del", "default"]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&["cluster dv1 default-route: none -> default via fd41::1 dev dv1"])
    );
    assert!(lab.ensure(&d).await.is_empty());
}

/// What a capture in the peer namespace looks for.
#[derive(Clone, Copy)]
enum Expect {
    /// A gratuitous ARP for this address from this MAC.
    Garp(Ipv4Addr, [u8; 6]),
    /// An unsolicited NA for this address, to all nodes, hop limit 255, with this MAC.
    Na(Ipv6Addr, [u8; 6]),
}

fn matches(frame: &[u8], want: Expect) -> bool {
    let ethertype = frame.get(12..14);
    match want {
        Expect::Garp(ip, mac) => {
            let Some(arp) = frame.get(14..42) else {
                return false;
            };
            ethertype == Some(&[0x08, 0x06][..])
                && arp[8..14] == mac
                && arp[14..18] == ip.octets()
                && arp[24..28] == ip.octets()
        }
        Expect::Na(ip, mac) => {
            let (Some(ip6), Some(icmp)) = (frame.get(14..54), frame.get(54..86)) else {
                return false;
            };
            ethertype == Some(&[0x86, 0xdd][..])
                && ip6[6] == 58
                && ip6[7] == 255
                && ip6[24..40] == Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets()
                && icmp[0] == 136
                && icmp[4] & 0x20 != 0
                && icmp[8..24] == ip.octets()
                && icmp[24..26] == [2, 1]
                && icmp[26..32] == mac
        }
    }
}

/// Capture on `ifname` in namespace `ns` (AF_PACKET, all protocols) until a frame matches
/// `want` or `limit` passes. Returns once the socket is bound; join the handle for the result.
fn capture(ns: &str, ifname: &str, want: Expect, limit: Duration) -> JoinHandle<bool> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (ns, ifname) = (ns.to_owned(), ifname.to_owned());
    let h = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
        // SAFETY: setns(2) on a valid fd; only this short-lived thread changes namespace.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(all)) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh socket owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(ifname).expect("ifname");
        // SAFETY: cname is a valid C string.
        let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(idx > 0, "no interface in {ns}");
        // SAFETY: all-zero sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = idx as i32;
        // SAFETY: sll is valid for the call.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: tv lives for the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let _ = ready_tx.send(());
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && matches(&buf[..n as usize], want) {
                return true;
            }
        }
        false
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("capture ready");
    h
}

async fn mac_of(nl: &Netlink, link: &str) -> [u8; 6] {
    let o = nl.observe().await.expect("observe");
    let mac = o.link(link).and_then(|l| l.mac.clone()).expect("mac");
    <[u8; 6]>::try_from(mac.as_slice()).expect("ethernet mac")
}

#[tokio::test]
async fn floating_addresses_are_announced_held_and_released() {
    skip_unless_root!();
    let lab = Lab::new(2);
    let mut up = net("dv0", &["10.50.0.11/24"]);
    up.bridge = Some("brf".into());
    up.floating = Some("10.50.0.100/24".into());
    let mut cl = net("dv1", &["fd51::11/64"]);
    cl.floating = Some("fd51::100/64".into());
    let d = HostNetworks {
        cluster: Some(cl.clone()),
        storage: None,
        upstream: Some(up.clone()),
    };
    assert!(!lab.ensure(&d).await.is_empty());
    assert!(lab.ensure(&d).await.is_empty());

    // IPv4: gratuitous ARP, seen on the far end of the veth behind the bridge.
    let mac = mac_of(&lab.nl, "brf").await;
    let ip: Ipv4Addr = "10.50.0.100".parse().expect("ip");
    let cap = capture(
        lab.peer.name(),
        "pv0",
        Expect::Garp(ip, mac),
        Duration::from_secs(5),
    );
    let c = take_floating(&lab.nl, "upstream", &up).await.expect("take");
    assert_eq!(
        c.map(|c| c.to_string()),
        Some("upstream brf floating: absent -> 10.50.0.100/24".into())
    );
    assert!(
        cap.join().expect("capture thread"),
        "no gratuitous ARP for {ip} seen on the peer"
    );
    assert!(lab.addrs("brf").contains(&"10.50.0.100/24".to_owned()));

    // IPv6: unsolicited neighbour advertisement.
    let mac = mac_of(&lab.nl, "dv1").await;
    let ip6: Ipv6Addr = "fd51::100".parse().expect("ip");
    let cap = capture(
        lab.peer.name(),
        "pv1",
        Expect::Na(ip6, mac),
        Duration::from_secs(5),
    );
    let c = take_floating(&lab.nl, "cluster", &cl).await.expect("take");
    assert!(c.is_some());
    assert!(
        cap.join().expect("capture thread"),
        "no unsolicited NA for {ip6} seen on the peer"
    );

    // Idempotent, and the planner keeps held floating addresses.
    assert_eq!(
        take_floating(&lab.nl, "upstream", &up).await.expect("take"),
        None
    );
    assert_eq!(
        take_floating(&lab.nl, "cluster", &cl).await.expect("take"),
        None
    );
    assert!(lab.ensure(&d).await.is_empty());

    let c = release_floating(&lab.nl, "upstream", &up)
        .await
        .expect("release");
    assert_eq!(
        c.map(|c| c.to_string()),
        Some("upstream brf floating: 10.50.0.100/24 -> absent".into())
    );
    assert!(release_floating(&lab.nl, "cluster", &cl)
        .await
        .expect("release")
        .is_some());
    assert_eq!(lab.addrs("brf"), strs(&["10.50.0.11/24"]));
    assert_eq!(lab.addrs("dv1"), strs(&["fd51::11/64"]));
    assert_eq!(
        release_floating(&lab.nl, "upstream", &up)
            .await
            .expect("release"),
        None
    );
    assert_eq!(
        release_floating(&lab.nl, "cluster", &cl)
            .await
            .expect("release"),
        None
    );
}

#[tokio::test]
async fn no_gratuitous_arp_without_take() {
    // The capture really can fail: adding the address by other means sends nothing.
    skip_unless_root!();
    let lab = Lab::new(1);
    let d = only_cluster(net("dv0", &["10.55.0.11/24"]));
    lab.ensure(&d).await;
    let mac = mac_of(&lab.nl, "dv0").await;
    let ip: Ipv4Addr = "10.55.0.100".parse().expect("ip");
    let cap = capture(
        lab.peer.name(),
        "pv0",
        Expect::Garp(ip, mac),
        Duration::from_millis(500),
    );
    lab.ip(&["addr", "add", "10.55.0.100/24", "dev", "dv0"]);
    assert!(
        !cap.join().expect("capture thread"),
        "an ARP appeared without an announcement"
    );
}

#[tokio::test]
async fn vlan_layout_or_skip() {
    skip_unless_root!();
    let lab = Lab::new(1);
    match lab.nl.ensure_vlan("dv0.10", "dv0", 10).await {
        Err(e) if e.is_unsupported() => {
            return skip_or_fail(
                &format!("this kernel has no 802.1Q VLAN support ({e})"),
                SkipKind::KernelFeature,
            );
        }
        Err(e) => panic!("creating a VLAN: {e}"),
        Ok(_) => {
            lab.nl
                .delete_link("dv0.10")
                .await
                .expect("delete probe vlan");
        }
    }
    let mut n = net("dv0", &["10.60.0.11/24"]);
    n.vlan = Some(10);
    n.bridge = Some("br10".into());
    n.mtu = Some(9000);
    let d = only_cluster(n);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&[
            "cluster dv0.10 link: absent -> vlan 10 on dv0",
            "cluster br10 link: absent -> bridge",
            "cluster dv0 mtu: 1500 -> 9000",
            "cluster dv0.10 mtu: 1500 -> 9000",
            "cluster dv0.10 master: none -> br10",
            "cluster dv0 state: down -> up",
            "cluster dv0.10 state: down -> up",
            "cluster br10 state: down -> up",
            "cluster br10 address: absent -> 10.60.0.11/24",
        ])
    );
    assert!(lab.ensure(&d).await.is_empty());
    lab.ip(&["link", "del", "dv0.10"]);
    assert_eq!(
        lab.ensure(&d).await,
        strs(&[
            "cluster dv0.10 link: absent -> vlan 10 on dv0",
            "cluster dv0.10 master: none -> br10",
            "cluster dv0.10 state: down -> up",
        ])
    );
}

#[tokio::test]
async fn vxlan_is_created_idempotently_and_read_back() {
    skip_unless_root!();
    let lab = Lab::new(1);
    let spec = VxlanSpec {
        name: "vx100".into(),
        vni: 100,
        dev: Some("dv0".into()),
        dstport: 4789,
        local: Some(IpAddr::V4("10.70.0.11".parse().expect("ip"))),
        ttl: Some(16),
        group: Some(IpAddr::V4("239.0.0.100".parse().expect("ip"))),
    };
    assert_eq!(
        lab.nl.ensure_vxlan(&spec).await.expect("create"),
        Outcome::Changed(())
    );
    assert_eq!(
        lab.nl.ensure_vxlan(&spec).await.expect("again"),
        Outcome::Unchanged
    );
    let o = lab.nl.observe().await.expect("observe");
    let l = o.link("vx100").expect("vx100 observed");
    assert_eq!(l.kind.as_deref(), Some("vxlan"));
    assert_eq!(l.vxlan.as_ref(), Some(&spec));
    // Cross-check with iproute2.
    let j = lab.link("vx100");
    let data = &j["linkinfo"]["info_data"];
    assert_eq!(data["id"], 100);
    assert_eq!(data["port"], 4789);
    assert_eq!(str_of(&data["local"]), "10.70.0.11");
    assert_eq!(data["ttl"], 16);
    assert_eq!(str_of(&data["link"]), "dv0");

    // Same name, other VNI: refused, naming the link; nothing recreated behind our back.
    let other = VxlanSpec {
        vni: 101,
        ..spec.clone()
    };
    let e = lab.nl.ensure_vxlan(&other).await.expect_err("conflict");
    assert!(matches!(e, NetconfError::Conflict { .. }), "{e}");
    assert!(e.to_string().contains("vx100"), "{e}");

    // Up, MTU (cluster MTU − 50 style), then delete, idempotently.
    assert!(lab
        .nl
        .ensure_mtu("vx100", 1400)
        .await
        .expect("mtu")
        .changed());
    assert_eq!(
        lab.nl.ensure_mtu("vx100", 1400).await.expect("mtu"),
        Outcome::Unchanged
    );
    assert!(lab.nl.ensure_up("vx100").await.expect("up").changed());
    assert_eq!(
        lab.nl.delete_link("vx100").await.expect("del"),
        Outcome::Changed(())
    );
    assert_eq!(
        lab.nl.delete_link("vx100").await.expect("del"),
        Outcome::Unchanged
    );
    assert!(!lab.has_link("vx100"));

    // Without a device and with an IPv6 endpoint.
    let v6 = VxlanSpec {
        name: "vx200".into(),
        vni: 200,
        dev: None,
        dstport: 4789,
        local: Some(IpAddr::V6("fd70::11".parse().expect("ip"))),
        ttl: None,
        group: None,
    };
    assert!(lab.nl.ensure_vxlan(&v6).await.expect("create v6").changed());
    let o = lab.nl.observe().await.expect("observe");
    assert_eq!(o.link("vx200").and_then(|l| l.vxlan.clone()), Some(v6));
}

#[tokio::test]
async fn errors_name_the_interface_and_the_operation() {
    skip_unless_root!();
    let lab = Lab::new(1);

    let e = lab
        .nl
        .ensure_mtu("nosuchlink", 1500)
        .await
        .expect_err("missing");
    assert!(matches!(e, NetconfError::NoSuchLink { .. }), "{e}");
    assert_eq!(e.to_string(), "set mtu nosuchlink: no such interface");

    let e = lab
        .nl
        .ensure_bridge("averyveryverylongname")
        .await
        .expect_err("long");
    assert!(matches!(e, NetconfError::InvalidName { .. }), "{e}");
    assert!(e.to_string().contains("create bridge"), "{e}");

    // dv0 exists but is a veth, not a bridge.
    let e = lab.nl.ensure_bridge("dv0").await.expect_err("kind");
    assert!(e.to_string().starts_with("create bridge dv0:"), "{e}");

    // A kernel refusal carries the errno: MTU above the veth maximum.
    let e = lab.nl.ensure_mtu("dv0", 70000).await.expect_err("mtu");
    assert!(e.raw_os_error().is_some(), "{e}");
    assert!(e.to_string().starts_with("set mtu dv0:"), "{e}");

    // The planner refuses a missing device, naming the network and device.
    let e = ensure(&lab.nl, &only_cluster(net("eth9", &["10.80.0.11/24"])))
        .await
        .expect_err("blocked");
    assert_eq!(
        e.to_string(),
        "host network cluster, eth9: device does not exist (physical devices are never created)"
    );

    let e = Netlink::in_netns("debvisor-no-such-netns").expect_err("no netns");
    assert!(matches!(e, NetconfError::Namespace { .. }), "{e}");
    assert!(Netlink::in_netns("../etc").is_err());
}
