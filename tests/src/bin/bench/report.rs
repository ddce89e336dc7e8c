//! What every figure set's report shares: the machine it ran on, the command that
//! reproduces it, and publishing it (stdout, and its marked section of `docs/benchmarks.md`).

use std::path::{Path, PathBuf};

use crate::{Args, BenchResult};

/// Facts about the machine the numbers come from.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    pub(crate) mem_total: String,
    pub(crate) profile: String,
}

impl Machine {
    /// Read `/proc` and the executable's location.
    pub(crate) fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let mem_total = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            kernel: if kernel.is_empty() {
                "unknown".into()
            } else {
                kernel
            },
            mem_total,
            profile: profile_name(),
        }
    }
}

impl std::fmt::Display for Machine {
    /// What the reports' `- machine:` line says: CPUs, CPU model, kernel and RAM.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CPUs (`nproc`), {}, kernel {}, {} RAM",
            self.nproc, self.cpu_model, self.kernel, self.mem_total
        )
    }
}

/// The cargo profile directory name of this executable (`release`, `debug`, …).
fn profile_name() -> String {
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let dir = match dir {
        Some(d) if d.file_name().is_some_and(|n| n == "deps") => d.parent(),
        other => other,
    };
    dir.and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if cfg!(debug_assertions) {
                "debug".into()
            } else {
                "release".into()
            }
        })
}

/// `docs/benchmarks.md` of the workspace.
fn docs_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("docs")
        .join("benchmarks.md")
}

/// The `cargo run …` command line that reproduces this run.
pub(crate) fn bench_command(args: &Args, m: &Machine) -> String {
    let profile_flag = match m.profile.as_str() {
        "debug" => String::new(),
        "release" => " --release".to_owned(),
        other => format!(" --profile {other}"),
    };
    let mut cmd = format!("cargo run{profile_flag} -p debvisor-tests --bin debvisor-bench");
    if !args.raw.is_empty() {
        cmd.push_str(" -- ");
        cmd.push_str(&args.raw.join(" "));
    }
    cmd
}

/// Print `report` and, unless `--no-write`, put it between `start` and `end` in
/// [`docs_path`]: how every figure set of the bench ends.
pub(crate) fn publish(args: &Args, start: &str, end: &str, report: &str) -> BenchResult<()> {
    println!("{report}");
    if args.write {
        let path = docs_path();
        write_marked(&path, start, end, report)?;
        eprintln!("debvisor-bench: wrote {}", path.display());
    }
    Ok(())
}

/// Put `section` between `start` and `end` in `path` (appended at the end when the markers are
/// missing; a missing or empty file gets [`DOCS_HEADER`] first), keeping everything outside.
fn write_marked(path: &Path, start: &str, end: &str, section: &str) -> BenchResult<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let block = format!("{start}\n{}\n{end}", section.trim_end());
    let text = match (existing.find(start), existing.find(end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{block}{}", &existing[..a], &existing[b + end.len()..])
        }
        _ if existing.trim().is_empty() => format!("{DOCS_HEADER}\n{block}\n"),
        _ => format!("{}\n\n{block}\n", existing.trim_end()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Header of a new `docs/benchmarks.md`.
const DOCS_HEADER: &str = "# Benchmarks\n\n\
     Figures of docs/architecture.md §7, measured by `debvisor-bench` \
     (`tests/src/bin/debvisor-bench.rs`) against the real `debvisord`, a private etcd 3.4 \
     (`/usr/bin/etcd`) on loopback and the libvirt test driver (`test:///default`).\n\n\
     Foundation figures: startup time to `run` (and where it goes, per stage), idle RSS \
     and CPU at a 5 s keepalive tick, and etcd requests per keepalive tick. Issue-4 \
     figures (root): converging managed networks from etcd, and nft apply cost per \
     network. Issue-3 figures: VM start latency and convergence, requests per tick with \
     VMs, real guests (root). Issue-13 figures (`--cluster`, root): fault on the primary \
     coordinator (kill -9, link cut, SIGTERM) → a new primary alone holding the floating \
     address, on a 3-node cluster with the shipped keepalive settings. Issue-14 figures \
     (`--failover`, root, KVM, `ipmi_sim`): a node's daemon killed or its link cut → its \
     real guests running on other nodes, with the shipped keepalive and fencing timers.\n\n\
     Run:\n\n\
     ```sh\n\
     cargo run --release -p debvisor-tests --bin debvisor-bench \
     # --runs 10 --idle-secs 60 --ticks 20 --networks 100 \
     [--networks-only | --skip-networks] --vms 1000 --guests 10 \
     [--vms-only | --skip-vms] [--ceph | --ceph-objects | --cluster [--cluster-runs 20] | \
     --failover [--failover-runs 20]] \
     [--no-write]\n\
     ```\n\n\
     The sections between the `bench:foundation`, `bench:networks`, `bench:vms`, `bench:ceph`, \
     `bench:ceph-objects`, `bench:cluster` and `bench:failover` markers are rewritten by \
     each run; keep other notes outside them.\n\n\
     Numbers are from a shared, noisy 2-core VM; compare ratios within one run.\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_marked_section() {
        const START: &str = "<!-- bench:x:start -->";
        const END: &str = "<!-- bench:x:end -->";
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("b.md");
        std::fs::write(&p, format!("head\n{START}\nold\n{END}\ntail\n")).expect("write");
        write_marked(&p, START, END, "new\n").expect("write_marked");
        let s = std::fs::read_to_string(&p).expect("read");
        assert_eq!(s, format!("head\n{START}\nnew\n{END}\ntail\n"));
    }

    #[test]
    fn new_file_gets_the_header_and_other_sections_are_appended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("docs").join("b.md");
        write_marked(&p, "<a>", "</a>", "one").expect("first");
        write_marked(&p, "<b>", "</b>", "two").expect("second");
        let s = std::fs::read_to_string(&p).expect("read");
        assert_eq!(
            s,
            format!("{DOCS_HEADER}\n<a>\none\n</a>\n\n<b>\ntwo\n</b>\n")
        );
    }
}
