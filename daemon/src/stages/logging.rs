//! Stage `logging`: install the tracing subscriber (journald or stderr) at the configured
//! level. A failure goes to stderr (exit 2): there is no log to write it to.

use crate::config::Config;
use crate::logging::{self, LogHandle};

/// Start logging; the handle reloads the level on SIGHUP.
pub fn run(cfg: &Config) -> Result<(LogHandle, String), String> {
    let log = logging::init(&cfg.logging)?;
    let detail = format!("target={} level={}", log.target, cfg.logging.level);
    Ok((log, detail))
}
