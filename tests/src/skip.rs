//! The one place that decides whether a test may skip, so a skipped test cannot pass for a
//! test that ran.
//!
//! libtest has no "skipped" outcome: a test that returns early reports `ok`, and its
//! explanation goes to captured stderr. Every early return of a test for a missing
//! prerequisite therefore goes through [`skip_or_fail`], which
//!
//! - fails the test instead when [`REQUIRE_ALL_ENV`]`=1` (set by `.ci/run`) and the reason is
//!   of kind [`SkipKind::Environment`] (not root, no KVM, a tool or package not installed):
//!   CI has all of those, so a skip there means the test silently did not run;
//! - lets it skip in every case when the reason is [`SkipKind::KernelFeature`] (a kernel
//!   built without 802.1Q VLANs, bonding or dummy links cannot be fixed by the CI setup);
//! - appends one line per skip to the file named by [`SKIP_LOG_ENV`], if set, so the run can
//!   print a summary of what did not run (`scripts/test.sh` does).

use std::io::Write;
use std::path::Path;

/// Environment variable: `1` turns every skip of kind [`SkipKind::Environment`] into a test
/// failure.
pub const REQUIRE_ALL_ENV: &str = "DEBVISOR_REQUIRE_ALL";

/// Environment variable: a file every skip appends one line to
/// (`<test>\t<reason>\t<kind>`).
pub const SKIP_LOG_ENV: &str = "DEBVISOR_SKIP_LOG";

/// Why a test cannot run here, which decides whether it may skip under [`REQUIRE_ALL_ENV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipKind {
    /// The running kernel lacks a feature (802.1Q VLAN, bonding, dummy links): nothing the
    /// machine's setup can provide. Always a skip.
    KernelFeature,
    /// Something the machine could provide (root, `/dev/kvm`, installed packages): a skip
    /// locally, a failure under `DEBVISOR_REQUIRE_ALL=1`.
    Environment,
}

impl SkipKind {
    /// The name written to the skip log.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipKind::KernelFeature => "kernel-feature",
            SkipKind::Environment => "environment",
        }
    }
}

/// What [`skip_or_fail`] does for a skip of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Log it and let the test return.
    Skip,
    /// Fail the test.
    Fail,
}

/// Whether `DEBVISOR_REQUIRE_ALL=1` is set for this process.
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| v.trim() == "1")
}

/// The decision for a skip of `kind`, with or without `DEBVISOR_REQUIRE_ALL=1`.
pub fn decide(require_all: bool, kind: SkipKind) -> Decision {
    match (require_all, kind) {
        (true, SkipKind::Environment) => Decision::Fail,
        _ => Decision::Skip,
    }
}

/// The name of the running test: `<test binary>::<test>` (libtest names each test's thread
/// after the test; the binary's name loses cargo's `-<hash>` suffix).
pub fn current_test() -> String {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_owned();
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| match n.rsplit_once('-') {
            Some((stem, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => stem.to_owned(),
            _ => n,
        })
        .unwrap_or_default();
    format!("{binary}::{test}")
}

/// One skip-log line: `<test>\t<reason>\t<kind>\n` (tabs and newlines inside the fields
/// become spaces, so each skip is exactly one line of three fields).
pub fn log_line(test: &str, reason: &str, kind: SkipKind) -> String {
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    format!("{}\t{}\t{}\n", clean(test), clean(reason), kind.as_str())
}

/// Append `line` to `path` with one `write(2)` on an `O_APPEND` descriptor: the kernel
/// places each such write at the end of the file atomically, so test processes running in
/// parallel never interleave their lines.
pub fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let n = f.write(line.as_bytes())?;
    if n != line.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("short append ({n} of {} bytes)", line.len()),
        ));
    }
    Ok(())
}

/// Record that the running test skips for `reason` (of `kind`), or fail it when skips of that
/// kind are not allowed (`DEBVISOR_REQUIRE_ALL=1` and [`SkipKind::Environment`]). On return
/// the caller returns from the test (or leaves out the check that cannot run here).
///
/// The skip is printed as `SKIP: <test>: <reason>` and appended to `$DEBVISOR_SKIP_LOG`.
///
/// # Panics
/// When the skip is not allowed; also when the skip log is set but cannot be written (a
/// skip nobody hears about is what this module exists to prevent).
#[track_caller]
pub fn skip_or_fail(reason: &str, kind: SkipKind) {
    let test = current_test();
    if decide(require_all(), kind) == Decision::Fail {
        panic!(
            "{test}: would skip ({reason}), but {REQUIRE_ALL_ENV}=1 makes a skip of kind {} a \
             failure",
            kind.as_str()
        );
    }
    eprintln!("SKIP: {test}: {reason} ({})", kind.as_str());
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV).filter(|p| !p.is_empty()) {
        let path = Path::new(&path);
        if let Err(e) = append_line(path, &log_line(&test, reason, kind)) {
            panic!(
                "{test}: skipping ({reason}) but cannot append to {SKIP_LOG_ENV} {}: {e}",
                path.display()
            );
        }
    }
}

/// Return from the calling test after [`skip_or_fail`] (`reason` of
/// [`SkipKind::Environment`]) unless running as root. `skip_unless_root!(value)` returns
/// `value` instead of `()`.
#[macro_export]
macro_rules! skip_unless_root {
    () => {
        $crate::skip_unless_root!(())
    };
    ($ret:expr) => {
        if !$crate::netns::is_root() {
            $crate::skip::skip_or_fail("needs root", $crate::skip::SkipKind::Environment);
            return $ret;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_environment_skips_fail_and_only_when_required() {
        assert_eq!(decide(false, SkipKind::Environment), Decision::Skip);
        assert_eq!(decide(false, SkipKind::KernelFeature), Decision::Skip);
        assert_eq!(decide(true, SkipKind::KernelFeature), Decision::Skip);
        assert_eq!(decide(true, SkipKind::Environment), Decision::Fail);
    }

    #[test]
    fn a_log_line_is_one_line_of_three_fields() {
        let l = log_line("bin::t", "no\tVLAN\nsupport", SkipKind::KernelFeature);
        assert_eq!(l, "bin::t\tno VLAN support\tkernel-feature\n");
        assert_eq!(l.matches('\n').count(), 1);
        assert_eq!(l.trim_end().split('\t').count(), 3);
    }

    #[test]
    fn the_test_name_is_the_binary_and_the_thread() {
        let name = current_test();
        assert!(
            name.ends_with("::skip::tests::the_test_name_is_the_binary_and_the_thread"),
            "{name}"
        );
        assert!(name.starts_with("debvisor_tests::"), "{name}");
    }

    #[test]
    fn parallel_appends_keep_every_line_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("skips");
        let threads = 8;
        let per = 200;
        std::thread::scope(|s| {
            for t in 0..threads {
                let path = &path;
                s.spawn(move || {
                    for i in 0..per {
                        let reason = format!("reason {t}/{i} {}", "x".repeat(100));
                        append_line(
                            path,
                            &log_line(&format!("t{t}"), &reason, SkipKind::Environment),
                        )
                        .expect("append");
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&path).expect("read log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), threads * per);
        for l in &lines {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 3, "{l:?}");
            assert!(f[0].starts_with('t') && f[1].starts_with("reason ") && f[2] == "environment");
        }
    }
}
