//! Stage `directories`: create the state and run directories, private to root (mode 0750,
//! our owner; a pre-existing one with another owner or mode is repaired, a symlink not ours
//! refused), and take the exclusive lock on the state directory before anything else uses
//! it: a second daemon on the same state dir fails here, naming the PID that holds it
//! ([`crate::statelock`]).
//! It runs before logging exists; its result, repairs included, is logged once the logging
//! stage is done.

use crate::config::Config;
use crate::statelock::StateLock;

/// Mode of `paths.state_dir` and `paths.run_dir`.
pub const DIR_MODE: u32 = 0o750;

/// Make `paths.state_dir` private and lock it for the life of this process, then make
/// `paths.run_dir` private; the detail names them and any repair, the error names the
/// directory that could not be made safe or the daemon already running on it.
pub fn run(cfg: &Config) -> Result<String, String> {
    let mut notes =
        crate::securefs::private_dir(&cfg.paths.state_dir, DIR_MODE).map_err(|e| e.to_string())?;
    let lock = StateLock::acquire(&cfg.paths.state_dir)
        .map_err(|e| e.to_string())?
        .hold_for_life();
    notes.extend(
        crate::securefs::private_dir(&cfg.paths.run_dir, DIR_MODE).map_err(|e| e.to_string())?,
    );
    let mut detail = format!(
        "state={} run={} lock={}",
        cfg.paths.state_dir.display(),
        cfg.paths.run_dir.display(),
        lock.path().display()
    );
    if !notes.is_empty() {
        detail.push_str(&format!(" repaired: {}", notes.join("; ")));
    }
    Ok(detail)
}
