//! `dvtest-udhcpc-script`: the `-s` script of `busybox udhcpc` in the harness's DHCP guests
//! (`debvisor_tests::cluster::DhcpGuest`). udhcpc runs it with the event as its argument
//! (`deconfig`, `bound`, `renew`, `nak`, `leasefail`) and the lease in environment variables
//! (`ip`, `serverid`, `router`, `subnet`, `mask`, `lease`, `dns`, `domain`, …). It configures
//! nothing: it appends one JSON line `{"event": …, "<var>": …}` with every variable but
//! `PATH` to the file named by `DVTEST_LEASE_FILE`, which the harness reads back.

use std::io::Write;

/// Environment variable naming the file to append to.
const LEASE_FILE: &str = "DVTEST_LEASE_FILE";

fn main() -> std::process::ExitCode {
    let Some(path) = std::env::var_os(LEASE_FILE) else {
        eprintln!("dvtest-udhcpc-script: {LEASE_FILE} is not set");
        return std::process::ExitCode::FAILURE;
    };
    let mut m = serde_json::Map::new();
    m.insert(
        "event".into(),
        std::env::args().nth(1).unwrap_or_default().into(),
    );
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        if k != "PATH" && k != LEASE_FILE {
            m.insert(k.to_owned(), v.into());
        }
    }
    let line = format!("{}\n", serde_json::Value::Object(m));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    match written {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "dvtest-udhcpc-script: writing {}: {e}",
                path.to_string_lossy()
            );
            std::process::ExitCode::FAILURE
        }
    }
}
