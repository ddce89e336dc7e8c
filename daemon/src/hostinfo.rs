//! Facts about this host read from the kernel (`/proc`, `getifaddrs`): hostname, addresses,
//! CPUs, memory, kernel, load and uptime. Cheap enough to read on every keepalive tick.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use debvisor_objects::node::MemoryStats;

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The kernel hostname.
pub fn hostname() -> String {
    read_trim("/proc/sys/kernel/hostname").unwrap_or_else(|| "localhost".into())
}

/// Kernel release (`uname -r`).
pub fn kernel() -> String {
    read_trim("/proc/sys/kernel/osrelease").unwrap_or_default()
}

/// Current boot id: changes on every host reboot.
pub fn boot_id() -> String {
    read_trim("/proc/sys/kernel/random/boot_id").unwrap_or_default()
}

/// Start time of process `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22),
/// `None` when it does not exist or is a zombie. With the boot id and the PID it names one
/// process for as long as the host runs: a reused PID has another start time.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm)" — comm may hold spaces and parentheses, so split at the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // rest starts at field 3 (state); start time is field 22.
    let state = fields.next()?;
    if state == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The round-trip time of one ICMP echo to `addr`, waiting at most `timeout` (a raw ICMP
/// socket: needs CAP_NET_RAW, which the daemon has as root). `seq` tells concurrent probes
/// apart; replies are matched on identifier, sequence and source. Blocking: call it from a
/// blocking thread.
pub fn ping(addr: std::net::Ipv4Addr, seq: u16, timeout: Duration) -> std::io::Result<Duration> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let id = (std::process::id() & 0xffff) as u16;
    let mut pkt = [0u8; 16];
    pkt[0] = 8; // echo request
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    pkt[8..16].copy_from_slice(b"dvping00");
    let sum = icmp_checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    let dest = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    // SAFETY: valid buffer and address of the stated lengths.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&dest as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: valid buffer and address storage of the stated lengths.
        let got = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return Err(e);
        }
        let pkt = &buf[..got as usize];
        if from.sin_addr.s_addr != u32::from_ne_bytes(addr.octets()) || pkt.is_empty() {
            continue;
        }
        // Raw IPv4 sockets deliver the IP header first.
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        let Some(icmp) = pkt.get(ihl..ihl + 8) else {
            continue;
        };
        if icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
            return Ok(start.elapsed());
        }
    }
}

/// The Internet checksum (RFC 1071) of an ICMP message.
fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Online CPUs.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Memory from `/proc/meminfo` (used = total − available).
pub fn memory() -> MemoryStats {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let total = field("MemTotal") / 1024;
    let avail = field("MemAvailable") / 1024;
    MemoryStats {
        total_mib: total,
        used_mib: total.saturating_sub(avail),
        free_mib: avail,
    }
}

/// 1/5/15-minute load averages.
pub fn load() -> [f64; 3] {
    let s = read_trim("/proc/loadavg").unwrap_or_default();
    let mut it = s
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// Host uptime in seconds.
pub fn uptime_s() -> u64 {
    read_trim("/proc/uptime")
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|f| f as u64)
        .unwrap_or(0)
}

/// Non-loopback, non-link-local addresses of all interfaces, sorted, as `addr/prefix`.
pub fn addresses() -> Vec<String> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a valid node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if let (Some(addr), Some(mask)) = (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask))
        {
            let keep = match addr {
                IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
                IpAddr::V6(a) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80,
            };
            if keep {
                let prefix = match mask {
                    IpAddr::V4(m) => u32::from(m).count_ones(),
                    IpAddr::V6(m) => u128::from(m).count_ones(),
                };
                out.push(format!("{addr}/{prefix}"));
            }
        }
    }
    // SAFETY: ifap came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out.dedup();
    out
}

fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: sa points to a sockaddr whose family tells its real type.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

/// The current time as RFC 3339 (UTC), as every timestamp the daemon writes.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_real_kernel_facts() {
        assert!(!hostname().is_empty());
        assert!(cpus() >= 1);
        let m = memory();
        assert!(m.total_mib > 0 && m.used_mib <= m.total_mib);
        assert!(uptime_s() > 0);
        assert!(!kernel().is_empty());
        for a in addresses() {
            assert!(a.contains('/'), "{a}");
            assert!(!a.starts_with("127."), "{a}");
        }
    }

    #[test]
    fn icmp_checksums_are_the_internet_checksum() {
        // An echo request with id 1, seq 1 and no payload: 0xf7fd.
        assert_eq!(icmp_checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
        // A message with its checksum filled in sums to zero.
        let mut m = [8u8, 0, 0, 0, 0x12, 0x34, 0, 7, b'a', b'b', b'c'];
        let c = icmp_checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(icmp_checksum(&m), 0);
    }

    #[test]
    fn loopback_answers_a_ping_as_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: raw ICMP sockets need root");
            return;
        }
        let rtt =
            ping(std::net::Ipv4Addr::LOCALHOST, 7, Duration::from_secs(2)).expect("ping 127.0.0.1");
        assert!(rtt < Duration::from_secs(2));
    }

    #[test]
    fn a_process_start_time_names_this_process_and_not_a_reaped_child() {
        let me = std::process::id();
        let t = process_start_ticks(me).expect("own start time");
        assert_eq!(process_start_ticks(me), Some(t), "stable");
        let mut child = std::process::Command::new("/bin/true")
            .spawn()
            .expect("spawn /bin/true");
        let pid = child.id();
        child.wait().expect("reap");
        assert_eq!(
            process_start_ticks(pid),
            None,
            "a reaped process has no start time"
        );
    }
}
