//! The configuration of an isolated libvirtd: its /etc/libvirt and a seeded qemu
//! capabilities cache.

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

use super::LIBVIRT_TCP_PORT;
use crate::error::{IoContext, Result};

fn libvirtd_conf(addr: Ipv4Addr, host_uuid: &str) -> String {
    format!(
        "# debvisor test instance: TCP without auth on the namespace address only.
listen_tls = 0
listen_tcp = 1
tcp_port = \"{LIBVIRT_TCP_PORT}\"
listen_addr = \"{addr}\"
auth_tcp = \"none\"
auth_unix_rw = \"none\"
auth_unix_ro = \"none\"
unix_sock_group = \"root\"
unix_sock_ro_perms = \"0700\"
unix_sock_rw_perms = \"0700\"
unix_sock_admin_perms = \"0700\"
host_uuid = \"{host_uuid}\"
log_outputs = \"3:stderr\"
"
    )
}

fn qemu_conf(addr: Ipv4Addr) -> String {
    format!(
        "# debvisor test instance: migration over the namespace address, no host-wide state.
migration_host = \"{addr}\"
migration_address = \"{addr}\"
stdio_handler = \"file\"
cgroup_controllers = [ ]
security_driver = \"none\"
user = \"root\"
group = \"root\"
"
    )
}

/// The instance's /etc/libvirt: the host's top-level config files (client `libvirt.conf`
/// etc.), then our own `libvirtd.conf` and `qemu.conf` (written whole: libvirt reads the
/// first of duplicate keys, so appending would not override). No domain, network or
/// nwfilter definitions are copied.
pub(super) fn write_config(etc: &Path, addr: Ipv4Addr, host_uuid: &str) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir("/etc/libvirt") {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                let to = etc.join(e.file_name());
                std::fs::copy(e.path(), &to)
                    .ctx(|| format!("copying {} to {}", e.path().display(), to.display()))?;
            }
        }
    }
    std::fs::create_dir_all(etc.join("qemu")).ctx(|| format!("creating {}/qemu", etc.display()))?;
    for (name, text) in [
        ("libvirtd.conf", libvirtd_conf(addr, host_uuid)),
        ("qemu.conf", qemu_conf(addr)),
    ] {
        let path = etc.join(name);
        let mut f = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes())
            .ctx(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Where the host's libvirtd caches what it probed of each qemu binary.
const HOST_CAPS_CACHE: &str = "/var/cache/libvirt/qemu/capabilities";

/// Copy the host's qemu capabilities cache into the instance's `/var/cache/libvirt`:
/// probing every qemu binary takes seconds per instance. libvirt checks each entry against
/// the binaries, itself and the host CPU and re-probes whatever is stale, so a copy is
/// never wrong, only possibly useless.
pub(super) fn seed_capabilities_cache(cache: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(HOST_CAPS_CACHE) else {
        return Ok(());
    };
    let to_dir = cache.join("qemu").join("capabilities");
    std::fs::create_dir_all(&to_dir).ctx(|| format!("creating {}", to_dir.display()))?;
    for e in entries.flatten() {
        let from = e.path();
        if e.file_type().is_ok_and(|t| t.is_file()) && from.extension().is_some_and(|x| x == "xml")
        {
            let to = to_dir.join(e.file_name());
            std::fs::copy(&from, &to)
                .ctx(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn config_names_the_address_and_uuid() {
        let addr = Ipv4Addr::new(10, 231, 0, 1);
        let conf = libvirtd_conf(addr, "0a1b2c3d-4e5f-6789-abcd-ef0123456789");
        assert!(conf.contains("listen_addr = \"10.231.0.1\""));
        assert!(conf.contains("host_uuid = \"0a1b2c3d-4e5f-6789-abcd-ef0123456789\""));
        assert!(conf.contains("listen_tcp = 1") && conf.contains("listen_tls = 0"));
        let q = qemu_conf(addr);
        assert!(q.contains("migration_host = \"10.231.0.1\""));
        assert!(q.contains("stdio_handler = \"file\""));
    }
}
