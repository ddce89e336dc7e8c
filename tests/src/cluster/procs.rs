//! Finding the dnsmasq processes of the node namespaces: `/proc/<pid>/ns/net` places a
//! process (what `ip netns pids` compares; one `stat` per process), `/proc/<pid>/comm` names
//! it, and its command line (or the config file it names) tells the network.

use std::path::Path;

use crate::libvirt_pair::process_netns_inode;

/// A dnsmasq running in one of the node namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsmasqProc {
    /// Its PID.
    pub pid: u32,
    /// The node whose namespace it runs in.
    pub node: String,
    /// The network (VNI) it serves, from `dvbr<vni>` on its command line or in the config
    /// file it names (`--conf-file=…/dnsmasq/<vni>/dnsmasq.conf` as the daemon starts it);
    /// `None` if neither tells.
    pub vni: Option<u32>,
}

/// The number right after `dvbr` in `s`, if any.
fn bridge_vni(s: &str) -> Option<u32> {
    s.match_indices("dvbr").find_map(|(i, _)| {
        let digits: String = s[i + 4..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

/// The VNI a dnsmasq with arguments `args` serves (see [`DnsmasqProc::vni`]); `read` reads
/// a config file (the real one, or a stand-in in unit tests).
pub fn vni_of(args: &[String], read: impl Fn(&Path) -> Option<String>) -> Option<u32> {
    if let Some(v) = args.iter().find_map(|a| bridge_vni(a)) {
        return Some(v);
    }
    let conf = args.iter().find_map(|a| a.strip_prefix("--conf-file="))?;
    let path = Path::new(conf);
    let from_path = path
        .parent()
        .filter(|dir| {
            dir.parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == "dnsmasq")
        })
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok());
    from_path.or_else(|| {
        read(path)?
            .lines()
            .find_map(|l| l.trim().strip_prefix("interface=").and_then(bridge_vni))
    })
}

/// The NUL-separated arguments of process `pid`.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every dnsmasq whose network namespace is one of `namespaces` (`(inode, node name)`).
pub fn scan_dnsmasq(namespaces: &[(u64, String)]) -> Vec<DnsmasqProc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // The namespace first (one stat per process), the rest only inside a node's.
        let Some(ino) = process_netns_inode(pid) else {
            continue;
        };
        let Some((_, node)) = namespaces.iter().find(|(i, _)| *i == ino) else {
            continue;
        };
        match std::fs::read(format!("/proc/{pid}/comm")) {
            Ok(c) if c.strip_suffix(b"\n").unwrap_or(&c) == b"dnsmasq" => {}
            _ => continue,
        }
        let vni = vni_of(&cmdline(pid), |p| std::fs::read_to_string(p).ok());
        found.push(DnsmasqProc {
            pid,
            node: node.clone(),
            vni,
        });
    }
    found.sort_by_key(|p| p.pid);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_network_comes_from_the_bridge_or_the_config_path() {
        let none = |_: &Path| None;
        assert_eq!(
            vni_of(&args(&["dnsmasq", "--interface=dvbr100"]), none),
            Some(100)
        );
        assert_eq!(vni_of(&args(&["dnsmasq", "-i", "dvbr7"]), none), Some(7));
        assert_eq!(
            vni_of(
                &args(&[
                    "/usr/sbin/dnsmasq",
                    "--keep-in-foreground",
                    "--conf-file=/tmp/x/run/dnsmasq/4242/dnsmasq.conf",
                    "--pid-file="
                ]),
                none
            ),
            Some(4242)
        );
        let conf = |_: &Path| Some("port=0\ninterface=dvbr55\n".to_owned());
        assert_eq!(
            vni_of(&args(&["dnsmasq", "--conf-file=/etc/other.conf"]), conf),
            Some(55)
        );
        assert_eq!(
            vni_of(&args(&["dnsmasq", "--conf-file=/etc/o.conf"]), none),
            None
        );
        assert_eq!(vni_of(&args(&["dnsmasq", "--interface=eth0"]), none), None);
    }
}
