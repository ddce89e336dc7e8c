//! Stage `logging`: install the tracing subscriber (journald or stderr) at the configured
//! level. A failure goes to stderr (exit 2): there is no log to write it to. Once logging
//! works, a systemd watchdog too short for the keepalive tick is warned about.

use tracing::warn;

use crate::config::Config;
use crate::logging::{self, LogHandle};
use crate::notify;

/// Start logging; the handle reloads the level on SIGHUP.
pub fn run(cfg: &Config) -> Result<(LogHandle, String), String> {
    let log = logging::init(&cfg.logging)?;
    let mut detail = format!("target={} level={}", log.target, cfg.logging.level);
    if let Some(w) = notify::watchdog_timeout().and_then(|w| cfg.watchdog_warning(w)) {
        warn!(node = %cfg.node_name(), "{w}");
        detail.push_str(" (watchdog too short, see the warning)");
    }
    Ok((log, detail))
}
