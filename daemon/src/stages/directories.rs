//! Stage `directories`: create the state and run directories. It runs before logging
//! exists; its result is logged once the logging stage is done.

use crate::config::Config;

/// Create `paths.state_dir` and `paths.run_dir`; the detail names them, the error names the
/// directory that could not be created.
pub fn run(cfg: &Config) -> Result<String, String> {
    let mut err = None;
    for d in [&cfg.paths.state_dir, &cfg.paths.run_dir] {
        if let Err(e) = std::fs::create_dir_all(d) {
            err = Some(format!("{}: {e}", d.display()));
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(format!(
            "state={} run={}",
            cfg.paths.state_dir.display(),
            cfg.paths.run_dir.display()
        )),
    }
}
