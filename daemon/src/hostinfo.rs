//! Facts about this host read from the kernel (`/proc`, `getifaddrs`): hostname, addresses,
//! CPUs, memory, kernel, load and uptime. Cheap enough to read on every keepalive tick.

use std::net::IpAddr;

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
