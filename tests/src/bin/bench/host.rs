//! Readers of `/proc`: CPU ticks and memory of processes, the machine's CPU counters and
//! load, for the figures that measure what a daemon (and etcd, dnsmasq, nft) costs.

use std::time::Instant;

use crate::BenchResult;

/// When a bench run began and under what load: every report says when it ran, the load
/// before and after, and how long it took (the machine is shared).
pub(crate) struct RunStart {
    /// UTC start, as the report's heading shows it.
    pub(crate) started: String,
    /// `/proc/loadavg` (1/5/15 min) at the start.
    pub(crate) load: String,
    /// For the run's length.
    pub(crate) t0: Instant,
}

impl RunStart {
    /// Now.
    pub(crate) fn now() -> RunStart {
        RunStart {
            started: super::clock::now_utc_string(),
            load: load_triple(),
            t0: Instant::now(),
        }
    }
}

/// A tokio runtime with `workers` threads for a bench's etcd and libvirt calls.
pub(crate) fn bench_runtime(workers: usize) -> BenchResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(|e| format!("building a tokio runtime: {e}"))
}

/// `sysconf(_SC_CLK_TCK)`.
pub(crate) fn clk_tck() -> BenchResult<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(v)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("sysconf(_SC_CLK_TCK) returned {v}"))
}

/// CPU ticks of a process: its own (utime + stime) and its reaped children's
/// (cutime + cstime), from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub(crate) own: u64,
    pub(crate) children: u64,
}

impl Cpu {
    /// Read `/proc/<pid>/stat`.
    pub(crate) fn read(pid: u32) -> BenchResult<Cpu> {
        let path = format!("/proc/{pid}/stat");
        let s = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        // The command name (field 2) may contain spaces and parentheses: split after the
        // last ')'.
        let rest = s
            .rfind(')')
            .map(|i| &s[i + 1..])
            .ok_or_else(|| format!("{path}: no ')' in {s:?}"))?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // f[0] is field 3 (state): utime, stime, cutime, cstime are fields 14–17.
        let get = |idx: usize| -> BenchResult<u64> {
            let v = f
                .get(idx)
                .ok_or_else(|| format!("{path}: short line"))?
                .parse::<i64>()
                .map_err(|e| format!("{path}: field {}: {e}", idx + 3))?;
            Ok(u64::try_from(v).unwrap_or(0))
        };
        Ok(Cpu {
            own: get(11)? + get(12)?,
            children: get(13)? + get(14)?,
        })
    }

    /// Ticks spent since `before`.
    pub(crate) fn since(self, before: Cpu) -> Cpu {
        Cpu {
            own: self.own.saturating_sub(before.own),
            children: self.children.saturating_sub(before.children),
        }
    }
}

/// utime + stime of `pid` in clock ticks, from `/proc/<pid>/stat`.
pub(crate) fn cpu_ticks(pid: u32) -> BenchResult<u64> {
    Ok(Cpu::read(pid)?.own)
}

/// A numeric line of `/proc/<pid>/status` (`VmRSS`, `VmHWM` in kB; `Threads`).
pub(crate) fn status_kib(pid: u32, key: &str) -> BenchResult<u64> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let line = s
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .ok_or_else(|| format!("{path}: no {key} line"))?;
    let num = line.trim().trim_end_matches("kB").trim();
    num.parse::<u64>()
        .map_err(|e| format!("{path}: {key} {num:?}: {e}"))
}

/// Busy and total ticks of all CPUs, from the `cpu` line of `/proc/stat`.
pub(crate) fn machine_ticks() -> BenchResult<(u64, u64)> {
    let s =
        std::fs::read_to_string("/proc/stat").map_err(|e| format!("reading /proc/stat: {e}"))?;
    let f: Vec<u64> = s
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .ok_or("/proc/stat: no cpu line")?
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    let idle = get(3) + get(4);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    Ok((busy, busy + idle))
}

/// The 1-minute load average (`/proc/loadavg`), NaN if unreadable: the machine is shared.
pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A load average as `/proc/loadavg` writes it (two decimals), `?` if unknown (NaN or
/// infinite), for the reports.
pub(crate) fn load_fmt(l: f64) -> String {
    if l.is_finite() {
        format!("{l:.2}")
    } else {
        "?".into()
    }
}

/// The 1-minute load average now, formatted by [`load_fmt`].
pub(crate) fn load_text() -> String {
    load_fmt(loadavg())
}

/// The 1, 5 and 15-minute load averages as `/proc/loadavg` writes them
/// (`0.52 0.61 0.70`), `?` if unreadable: what `cat /proc/loadavg` shows, for reports of
/// long runs where the 1-minute figure alone says little.
pub(crate) fn load_triple() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// The load bullet of a cluster bench: the machine is shared, so its figures are read
/// with the load they ran under (`load`: `/proc/loadavg` before and after; `starts`: the
/// 1-min load at each run's start).
pub(crate) fn render_load(
    o: &mut String,
    load: &(String, String),
    starts: impl Iterator<Item = f64> + Clone,
    took: std::time::Duration,
) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "- load (`cat /proc/loadavg`, 1/5/15 min) before: `{}`, after: `{}`; 1-min load at \
         the runs' starts {}–{}; whole bench {:.1} min (the machine is shared, other builds \
         and tests ran meanwhile)\n",
        load.0,
        load.1,
        load_fmt(starts.clone().fold(f64::INFINITY, f64::min)),
        load_fmt(starts.fold(f64::NEG_INFINITY, f64::max)),
        took.as_secs_f64() / 60.0
    );
}

/// A bench stopped before all its runs says so above its tables.
pub(crate) fn render_stopped(o: &mut String, stopped: Option<&str>) {
    use std::fmt::Write as _;
    if let Some(e) = stopped {
        let _ = writeln!(
            o,
            "**Stopped early** (the runs below are all there are): {e}\n"
        );
    }
}

/// The type of the filesystem holding `path` (`ext4`, `tmpfs`, …; `?` if unknown), from
/// the longest mount point of `/proc/self/mounts` that contains it: etcd's commit latency
/// is its disk's fsync, so a figure that includes commits names where etcd kept its data.
pub(crate) fn fs_type_of(path: &std::path::Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "?".into();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, point, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        let before = Cpu::read(pid).expect("stat");
        assert!(Cpu::read(pid).expect("stat").since(before).own < 1_000_000);
        assert!(cpu_ticks(pid).is_ok());
        assert!(status_kib(pid, "VmRSS").expect("VmRSS") > 0);
        assert!(status_kib(pid, "NoSuchKey").is_err());
        let (busy, total) = machine_ticks().expect("/proc/stat");
        assert!(busy <= total);
        assert!(clk_tck().expect("CLK_TCK") > 0);
        assert!(loadavg() >= 0.0);
        assert_eq!(load_fmt(1.234), "1.23");
        assert_eq!(load_fmt(f64::NAN), "?");
        assert_ne!(load_text(), "?");
        assert_eq!(load_triple().split(' ').count(), 3);
    }

    #[test]
    fn the_filesystem_of_a_path_is_its_longest_mount_point() {
        // `/proc` is always procfs; `/proc/self` below it too, not the root's type.
        assert_eq!(fs_type_of(std::path::Path::new("/proc/self")), "proc");
        assert_ne!(fs_type_of(std::path::Path::new("/")), "?");
    }
}
