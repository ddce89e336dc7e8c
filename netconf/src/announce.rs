//! Announcing a (floating) address on a link so that peers update their neighbour caches at
//! once: gratuitous ARP for IPv4, an unsolicited neighbour advertisement for IPv6.
//!
//! Both are sent by us rather than left to the kernel:
//! * IPv4: the kernel's `arp_notify` only fires on link up / address change of the device,
//!   not when an address is added.
//! * IPv6: `ndisc_notify` sends an NA only on link up / MAC change, and the NA the kernel
//!   sends after DAD completes is skipped for `nodad` addresses — which ours are (a floating
//!   address must be usable at once, not after a second of DAD). So we send the NA ourselves
//!   on a raw ICMPv6 socket (the kernel fills in the checksum), with hop limit 255 as RFC 4861
//!   requires, Override set, and Router set when the link forwards (like the kernel does).
//!
//! One announcement is not enough on a link that has just come up (it is dropped until the
//! carrier is seen or a bridge port forwards), so [`crate::Netlink`] repeats it
//! ([`crate::ANNOUNCE_REPEATS`]) while the address is still held.
//!
//! The sockets are created by the caller's thread, so inside [`crate::Netlink`]'s namespace
//! thread they belong to that namespace.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// ARP operation codes.
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const ETH_P_ARP: u16 = 0x0806;

/// A gratuitous ARP packet (the ARP payload, without the Ethernet header): sender and target
/// protocol address are both `ip`. Requests carry a zero target MAC, replies the broadcast.
pub fn garp_packet(op_reply: bool, mac: [u8; 6], ip: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    p[4] = 6;
    p[5] = 4;
    let op = if op_reply { ARP_REPLY } else { ARP_REQUEST };
    p[6..8].copy_from_slice(&op.to_be_bytes());
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    if op_reply {
        p[18..24].copy_from_slice(&[0xff; 6]);
    }
    p[24..28].copy_from_slice(&ip.octets());
    p
}

/// An unsolicited neighbour advertisement for `target` (ICMPv6 type 136, checksum left 0 for
/// the kernel), with the Override flag, the Router flag if `router`, and the target
/// link-layer address option.
pub fn na_packet(target: Ipv6Addr, mac: [u8; 6], router: bool) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 136;
    p[4] = 0x20 | if router { 0x80 } else { 0 };
    p[8..24].copy_from_slice(&target.octets());
    p[24] = 2; // option: target link-layer address
    p[25] = 1; // length in units of 8 octets
    p[26..32].copy_from_slice(&mac);
    p
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory preconditions; a non-negative result is an fd we own.
    let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_to<A>(fd: &OwnedFd, buf: &[u8], addr: &A) -> io::Result<()> {
    // SAFETY: buf and addr are valid for the given lengths for the duration of the call.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (addr as *const A).cast(),
            size_of::<A>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(io::Error::other(format!(
            "short send: {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

fn set_int_opt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: v lives for the call; the length matches its type.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Broadcast a gratuitous ARP request and reply for `ip` from `mac` on interface `ifindex`
/// (an `AF_PACKET` datagram socket: the kernel adds the Ethernet header).
pub fn send_garp(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    let fd = socket(
        libc::AF_PACKET,
        libc::SOCK_DGRAM,
        libc::c_int::from(ETH_P_ARP.to_be()),
    )?;
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for reply in [false, true] {
        send_to(&fd, &garp_packet(reply, mac, ip), &sll)?;
    }
    Ok(())
}

/// Send an unsolicited neighbour advertisement for `ip` to all nodes (`ff02::1`) on interface
/// `ifindex`, from `ip` itself (which must be assigned and not tentative).
pub fn send_unsolicited_na(
    ifindex: u32,
    mac: [u8; 6],
    ip: Ipv6Addr,
    router: bool,
) -> io::Result<()> {
    let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)?;
    set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, 255)?;
    set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 255)?;
    let idx = libc::c_int::try_from(ifindex).map_err(io::Error::other)?;
    set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF, idx)?;
    let sa = |addr: Ipv6Addr, scope: u32| {
        // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value.
        let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        s.sin6_family = libc::AF_INET6 as u16;
        s.sin6_addr.s6_addr = addr.octets();
        s.sin6_scope_id = scope;
        s
    };
    let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
    let src = sa(ip, if link_local { ifindex } else { 0 });
    // SAFETY: src is a valid sockaddr_in6 for the call.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&src as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    })?;
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    send_to(&fd, &na_packet(ip, mac, router), &sa(all_nodes, ifindex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_layout() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip = Ipv4Addr::new(10, 0, 0, 100);
        let req = garp_packet(false, mac, ip);
        assert_eq!(&req[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&req[8..14], &mac);
        assert_eq!(&req[14..18], &[10, 0, 0, 100]);
        assert_eq!(&req[18..24], &[0; 6]);
        assert_eq!(&req[24..28], &[10, 0, 0, 100]);
        let rep = garp_packet(true, mac, ip);
        assert_eq!(&rep[6..8], &[0, 2]);
        assert_eq!(&rep[18..24], &[0xff; 6]);
    }

    #[test]
    fn na_layout() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip: Ipv6Addr = "fd00::100".parse().expect("ip");
        let p = na_packet(ip, mac, false);
        assert_eq!(p[0], 136);
        assert_eq!(p[1], 0);
        assert_eq!(p[4], 0x20);
        assert_eq!(&p[8..24], &ip.octets());
        assert_eq!(&p[24..26], &[2, 1]);
        assert_eq!(&p[26..32], &mac);
        assert_eq!(na_packet(ip, mac, true)[4], 0xa0);
    }
}
