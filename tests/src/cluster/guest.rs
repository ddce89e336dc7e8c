//! A DHCP "guest": a namespace whose `eth0` is a veth plugged into a node's client-network
//! bridge, asking for a lease with `busybox udhcpc` (one-shot), the lease recorded by the
//! `dvtest-udhcpc-script` helper and the answering server's MAC caught by a packet socket.

use std::collections::BTreeMap;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::arp::{mac_string, Mac};
use crate::daemon::harness_bin_path;
use crate::error::{HarnessError, IoContext, Result};
use crate::netns::NetNs;

/// The udhcpc script helper binary of this package.
const SCRIPT_BIN: &str = "dvtest-udhcpc-script";
/// How long one udhcpc run may take before it is killed.
const UDHCPC_TIMEOUT: Duration = Duration::from_secs(30);
/// EtherType of IPv4.
const ETH_P_IP: u16 = 0x0800;

/// A lease as udhcpc reported it to its script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpLease {
    /// The address leased.
    pub ip: Ipv4Addr,
    /// Prefix length (`mask`).
    pub prefix_len: Option<u8>,
    /// DHCP server identifier (option 54) of the server that acknowledged.
    pub server_id: Option<Ipv4Addr>,
    /// Routers (option 3), space-separated as udhcpc gives them.
    pub router: Option<String>,
    /// Lease time in seconds.
    pub lease_secs: Option<u64>,
    /// Source MAC of the DHCPACK that udhcpc accepted (the answering server's bridge, which
    /// names the node: [`crate::cluster::Cluster::node_of_mac`]).
    pub server_mac: Option<String>,
    /// Every variable udhcpc passed to its script (`ip`, `serverid`, `dns`, `domain`, …).
    pub env: BTreeMap<String, String>,
}

/// A guest plugged into a node's bridge. Dropping it deletes its namespace (and with it the
/// veth pair).
#[derive(Debug)]
pub struct DhcpGuest {
    mac: String,
    dir: tempfile::TempDir,
    ns: NetNs,
}

impl DhcpGuest {
    /// Plug a new guest into `bridge` of `node`: a veth whose node end is `host_end`
    /// (enslaved, up) and whose guest end is `eth0` with MAC `mac` (up).
    pub(super) fn plug(node: &NetNs, bridge: &str, host_end: &str, mac: &str) -> Result<DhcpGuest> {
        let dir = tempfile::Builder::new()
            .prefix("dvcl-guest-")
            .tempdir()
            .ctx(|| "creating the guest temp dir".to_owned())?;
        let ns = NetNs::create("dvcl-g")?;
        node.ip(&[
            "link",
            "add",
            host_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        node.ip(&["link", "set", host_end, "master", bridge, "up"])?;
        ns.ip(&["link", "set", "eth0", "address", mac, "up"])?;
        Ok(DhcpGuest {
            mac: mac.to_owned(),
            dir,
            ns,
        })
    }

    /// The guest's namespace.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// The guest's MAC.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// Ask for a lease (DISCOVER, up to 5 tries 1 s apart).
    pub fn dhcp(&self) -> Result<DhcpLease> {
        self.dhcp_request(None)
    }

    /// Ask for a lease, requesting address `requested` if given (`udhcpc -r`: a guest renewing
    /// the address it had, e.g. across a takeover). One-shot: `udhcpc -n -q` exits after the
    /// lease or after 5 unanswered tries; an error then.
    pub fn dhcp_request(&self, requested: Option<Ipv4Addr>) -> Result<DhcpLease> {
        let lease_file = self.dir.path().join("lease.jsonl");
        match std::fs::remove_file(&lease_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(HarnessError::Io {
                    context: format!("removing {}", lease_file.display()),
                    source: e,
                })
            }
        }
        let sniffer = self.ns.run(|| open_sniffer("eth0"))??;
        let script = harness_bin_path(SCRIPT_BIN);
        let script_s = script.display().to_string();
        let mut args = vec![
            "udhcpc", "-i", "eth0", "-f", "-n", "-q", "-t", "5", "-T", "1", "-s", &script_s,
        ];
        let req = requested.map(|r| r.to_string());
        if let Some(r) = &req {
            args.extend(["-r", r.as_str()]);
        }
        let mut child = self
            .ns
            .exec_cmd("busybox", &args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DVTEST_LEASE_FILE", &lease_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ctx(|| "spawning busybox udhcpc".to_owned())?;
        let deadline = Instant::now() + UDHCPC_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().ctx(|| "waiting for udhcpc".to_owned())? {
                break Some(s);
            }
            if Instant::now() >= deadline {
                // SAFETY: kill(2) of our own unreaped child.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child
            .wait_with_output()
            .ctx(|| "reaping udhcpc".to_owned())?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let acks = drain_acks(&sniffer);
        let bound = read_bound(&lease_file);
        let Some(env) = bound else {
            return Err(HarnessError::State(format!(
                "udhcpc got no lease ({}): {}",
                status.map_or("killed after 30 s".into(), |s| s.to_string()),
                log.trim()
            )));
        };
        lease_from(env, &acks)
    }

    /// Put the lease's address on the guest's `eth0` (so it can talk from it).
    pub fn configure(&self, lease: &DhcpLease) -> Result<()> {
        let cidr = format!("{}/{}", lease.ip, lease.prefix_len.unwrap_or(24));
        self.ns.ip(&["addr", "replace", &cidr, "dev", "eth0"])
    }
}

/// The last `bound`/`renew` event's variables in the script's file.
fn read_bound(path: &std::path::Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| matches!(v["event"].as_str(), Some("bound") | Some("renew")))
        .and_then(|v| {
            v.as_object().map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
        })
}

/// Build the lease from the script's variables and the DHCPACKs seen (`(server id, MAC)`).
fn lease_from(
    env: BTreeMap<String, String>,
    acks: &[(Option<Ipv4Addr>, Mac)],
) -> Result<DhcpLease> {
    let ip: Ipv4Addr = env
        .get("ip")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HarnessError::State(format!("udhcpc reported no address: {env:?}")))?;
    let server_id: Option<Ipv4Addr> = env.get("serverid").and_then(|s| s.parse().ok());
    // The ACK udhcpc accepted is the last one from its server.
    let server_mac = acks
        .iter()
        .rev()
        .find(|(sid, _)| server_id.is_none() || *sid == server_id)
        .map(|(_, mac)| mac_string(mac));
    Ok(DhcpLease {
        ip,
        prefix_len: env.get("mask").and_then(|s| s.parse().ok()),
        server_id,
        router: env.get("router").cloned(),
        lease_secs: env.get("lease").and_then(|s| s.parse().ok()),
        server_mac,
        env,
    })
}

/// A datagram packet socket for IPv4 on `ifname`, created by the calling thread (run it in
/// the guest's namespace).
fn open_sniffer(ifname: &str) -> Result<OwnedFd> {
    let err = |what: &str| HarnessError::Io {
        context: format!("{what} (DHCP sniffer on {ifname})"),
        source: std::io::Error::last_os_error(),
    };
    let name = std::ffi::CString::new(ifname)
        .map_err(|_| HarnessError::State(format!("NUL in {ifname:?}")))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that lives for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(err("if_nametoindex"));
    }
    let proto = libc::c_int::from(ETH_P_IP.to_be());
    // SAFETY: socket(2) has no memory preconditions.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            proto,
        )
    };
    if raw < 0 {
        return Err(err("socket"));
    }
    // SAFETY: `raw` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_IP.to_be();
    sll.sll_ifindex = i32::try_from(ifindex).map_err(|_| err("ifindex"))?;
    // SAFETY: `sll` is a valid sockaddr_ll for the length given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(err("bind"));
    }
    Ok(fd)
}

/// Every DHCPACK queued on the sniffer: `(server identifier, source MAC)`.
fn drain_acks(fd: &OwnedFd) -> Vec<(Option<Ipv4Addr>, Mac)> {
    let mut acks = Vec::new();
    let mut buf = vec![0u8; 2048];
    loop {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for writes of the lengths given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n <= 0 {
            break;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&from.sll_addr[..6]);
        if let Some(sid) = dhcp_ack(&buf[..n as usize]) {
            acks.push((sid, mac));
        }
    }
    acks
}

/// If `ip` is an IPv4 packet carrying a DHCPACK (UDP 67 → 68), its server identifier
/// (option 54, if present): `Some(sid)`; `None` for anything else.
fn dhcp_ack(ip: &[u8]) -> Option<Option<Ipv4Addr>> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let udp = ip.get(ihl..)?;
    if udp.len() < 8 || udp[0..2] != 67u16.to_be_bytes() || udp[2..4] != 68u16.to_be_bytes() {
        return None;
    }
    let bootp = &udp[8..];
    // Fixed BOOTP part (236 bytes), then the magic cookie, then options.
    if bootp.len() < 240 || bootp[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let mut opts = &bootp[240..];
    let (mut kind, mut sid) = (None, None);
    while let [code, rest @ ..] = opts {
        match code {
            0 => opts = rest,
            255 => break,
            _ => {
                let [len, rest @ ..] = rest else { break };
                let len = usize::from(*len);
                let Some(val) = rest.get(..len) else { break };
                match (code, val) {
                    (53, [t]) => kind = Some(*t),
                    (54, [a, b, c, d]) => sid = Some(Ipv4Addr::new(*a, *b, *c, *d)),
                    _ => {}
                }
                opts = &rest[len..];
            }
        }
    }
    (kind == Some(5)).then_some(sid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack_packet(kind: u8, sid: Option<[u8; 4]>) -> Vec<u8> {
        let mut opts = vec![53, 1, kind];
        if let Some(s) = sid {
            opts.extend([54, 4]);
            opts.extend(s);
        }
        opts.push(255);
        let mut bootp = vec![0u8; 236];
        bootp[0] = 2;
        bootp.extend([99, 130, 83, 99]);
        bootp.extend(opts);
        let mut udp = Vec::new();
        udp.extend(67u16.to_be_bytes());
        udp.extend(68u16.to_be_bytes());
        udp.extend(((8 + bootp.len()) as u16).to_be_bytes());
        udp.extend([0, 0]);
        udp.extend(bootp);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend([10, 1, 0, 1, 255, 255, 255, 255]);
        ip.extend(udp);
        ip
    }

    #[test]
    fn an_ack_yields_its_server_id_and_an_offer_does_not() {
        assert_eq!(
            dhcp_ack(&ack_packet(5, Some([10, 1, 0, 1]))),
            Some(Some(Ipv4Addr::new(10, 1, 0, 1)))
        );
        assert_eq!(dhcp_ack(&ack_packet(5, None)), Some(None));
        assert_eq!(
            dhcp_ack(&ack_packet(2, Some([10, 1, 0, 1]))),
            None,
            "an OFFER"
        );
        let mut tcp = ack_packet(5, None);
        tcp[9] = 6;
        assert_eq!(dhcp_ack(&tcp), None);
        assert_eq!(dhcp_ack(&[0x45; 10]), None);
    }

    #[test]
    fn the_lease_takes_the_ack_of_its_server() {
        let env: BTreeMap<String, String> = [
            ("ip", "10.1.0.120"),
            ("mask", "24"),
            ("serverid", "10.1.0.1"),
            ("router", "10.1.0.1"),
            ("lease", "3600"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let other = (Some(Ipv4Addr::new(10, 1, 0, 2)), [2, 0, 0, 0, 0, 2]);
        let ours = (Some(Ipv4Addr::new(10, 1, 0, 1)), [2, 0, 0, 0, 0, 1]);
        let l = lease_from(env, &[ours, other]).expect("lease");
        assert_eq!(l.ip, Ipv4Addr::new(10, 1, 0, 120));
        assert_eq!(l.prefix_len, Some(24));
        assert_eq!(l.server_id, Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(l.lease_secs, Some(3600));
        assert_eq!(l.server_mac.as_deref(), Some("02:00:00:00:00:01"));
        assert!(lease_from(BTreeMap::new(), &[]).is_err());
    }
}
