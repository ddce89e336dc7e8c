//! Asking the wire who answers for an IPv4 address: ARP requests broadcast from the switch's
//! bridge, and every reply collected for a short window. Two MACs answering for one address
//! is a duplicate on the wire, whatever each namespace believes.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// EtherType of ARP.
const ETH_P_ARP: u16 = 0x0806;
/// ARP operation: request.
const ARP_REQUEST: u16 = 1;
/// ARP operation: reply.
const ARP_REPLY: u16 = 2;

/// A MAC address.
pub type Mac = [u8; 6];

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// An ARP request for `target` from `mac`/`src` (the ARP payload; the kernel adds the
/// Ethernet header of a datagram packet socket).
fn request(mac: Mac, src: Ipv4Addr, target: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes());
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&src.octets());
    p[24..28].copy_from_slice(&target.octets());
    p
}

/// `(sender MAC, sender IP)` of an ARP reply addressed to `to`, `None` for anything else.
fn parse_reply(p: &[u8], to: Ipv4Addr) -> Option<(Mac, Ipv4Addr)> {
    if p.len() < 28
        || p[0..2] != 1u16.to_be_bytes()
        || p[2..4] != 0x0800u16.to_be_bytes()
        || p[4] != 6
        || p[5] != 4
        || p[6..8] != ARP_REPLY.to_be_bytes()
        || p[24..28] != to.octets()
    {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&p[8..14]);
    Some((mac, Ipv4Addr::new(p[14], p[15], p[16], p[17])))
}

/// A datagram packet socket bound to one interface, for ARP probes.
#[derive(Debug)]
pub struct ArpProber {
    fd: OwnedFd,
    ifindex: i32,
    mac: Mac,
    src: Ipv4Addr,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl ArpProber {
    /// Open the socket on interface `ifname` (whose MAC is `mac` and address `src`). Call it
    /// on a thread inside the interface's namespace: the socket belongs to the namespace of
    /// the thread creating it.
    pub fn open(ifname: &str, mac: Mac, src: Ipv4Addr) -> io::Result<ArpProber> {
        let name = CString::new(ifname).map_err(io::Error::other)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string that lives for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
        let proto = libc::c_int::from(ETH_P_ARP.to_be());
        // SAFETY: socket(2) has no memory preconditions; a non-negative result is our fd.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                proto,
            )
        })?;
        // SAFETY: `raw` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sll = sockaddr(ifindex, [0; 6]);
        // SAFETY: `sll` is a valid sockaddr_ll for the length given.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(ArpProber {
            fd,
            ifindex,
            mac,
            src,
        })
    }

    /// Broadcast one request per target, then collect replies for `window`: for each target,
    /// the MACs that answered for it.
    pub fn probe(
        &self,
        targets: &[Ipv4Addr],
        window: Duration,
    ) -> io::Result<BTreeMap<Ipv4Addr, BTreeSet<Mac>>> {
        let mut buf = [0u8; 128];
        // Replies that arrived late for the previous probe are not this probe's.
        while self.recv(&mut buf, 0)?.is_some() {}
        let to = sockaddr(self.ifindex, [0xff; 6]);
        for t in targets {
            let p = request(self.mac, self.src, *t);
            // SAFETY: `p` and `to` are valid for the lengths given during the call.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let mut seen: BTreeMap<Ipv4Addr, BTreeSet<Mac>> =
            targets.iter().map(|t| (*t, BTreeSet::new())).collect();
        let deadline = Instant::now() + window;
        let mut record = |n: usize, buf: &[u8]| {
            if let Some((mac, ip)) = parse_reply(&buf[..n], self.src) {
                if let Some(set) = seen.get_mut(&ip) {
                    set.insert(mac);
                }
            }
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            if let Some(n) = self.recv(&mut buf, ms)? {
                record(n, &buf);
            }
        }
        // Replies already queued when the window closed are this probe's: a thread
        // descheduled past the deadline (a loaded machine) must not drop them.
        while let Some(n) = self.recv(&mut buf, 0)? {
            record(n, &buf);
        }
        Ok(seen)
    }

    /// Receive one packet, waiting up to `timeout_ms` (0: only what is queued).
    fn recv(&self, buf: &mut [u8], timeout_ms: libc::c_int) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if ready == 0 {
            return Ok(None);
        }
        // SAFETY: `buf` is valid for writes of its length during the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }
}

/// A link-layer address on interface `ifindex` for ARP, with hardware address `addr`.
fn sockaddr(ifindex: i32, addr: Mac) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&addr);
    sll
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_recognised_and_a_request_is_not() {
        let me = Ipv4Addr::new(192, 0, 2, 254);
        let target = Ipv4Addr::new(192, 0, 2, 100);
        let mac = [2, 0, 0, 0, 0, 1];
        let mut reply = request(mac, target, me);
        reply[6..8].copy_from_slice(&ARP_REPLY.to_be_bytes());
        assert_eq!(parse_reply(&reply, me), Some((mac, target)));
        assert_eq!(
            parse_reply(&reply, target),
            None,
            "addressed to someone else"
        );
        assert_eq!(parse_reply(&request(mac, target, me), me), None);
        assert_eq!(parse_reply(&reply[..20], me), None);
    }

    #[test]
    fn macs_round_trip() {
        let m = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
        assert_eq!(mac_string(&m), "52:54:00:ab:cd:ef");
        assert_eq!(parse_mac("52:54:00:ab:cd:ef"), Some(m));
        assert_eq!(parse_mac("52:54:00:ab:cd"), None);
        assert_eq!(parse_mac("52:54:00:ab:cd:ef:01"), None);
        assert_eq!(parse_mac("zz:54:00:ab:cd:ef"), None);
    }
}
