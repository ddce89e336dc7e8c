//! Stage `config`: read the configuration file and the `DEBVISOR_*` overrides. It runs
//! before logging exists, so a failure goes to stderr (exit 2) and success is logged once the
//! logging stage is done.

use std::path::Path;

use crate::config::Config;

/// Load and validate the configuration at `path` with this process' environment.
pub fn run(path: &Path) -> Result<Config, String> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    crate::config::load(path, &env).map_err(|e| format!("{}: {e}", path.display()))
}

/// The `detail=` of the stage line.
pub fn detail(cfg: &Config) -> String {
    format!(
        "mode={} endpoints={}",
        cfg.node.mode.as_str(),
        cfg.store.endpoints.join(",")
    )
}
