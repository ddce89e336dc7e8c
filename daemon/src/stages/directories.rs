//! Stage `directories`: create the state and run directories, private to root (mode 0750,
//! our owner; a pre-existing one with another owner or mode is repaired, a symlink not ours
//! refused).
//! It runs before logging exists; its result, repairs included, is logged once the logging
//! stage is done.

use crate::config::Config;

/// Mode of `paths.state_dir` and `paths.run_dir`.
pub const DIR_MODE: u32 = 0o750;

/// Make `paths.state_dir` and `paths.run_dir` private directories; the detail names them and
/// any repair, the error names the directory that could not be made safe.
pub fn run(cfg: &Config) -> Result<String, String> {
    let mut notes = Vec::new();
    for d in [&cfg.paths.state_dir, &cfg.paths.run_dir] {
        notes.extend(crate::securefs::private_dir(d, DIR_MODE).map_err(|e| e.to_string())?);
    }
    let mut detail = format!(
        "state={} run={}",
        cfg.paths.state_dir.display(),
        cfg.paths.run_dir.display()
    );
    if !notes.is_empty() {
        detail.push_str(&format!(" repaired: {}", notes.join("; ")));
    }
    Ok(detail)
}
