//! Stage `termination-handling`: from here on SIGTERM/SIGINT request a graceful shutdown
//! (a second one exits at once) and SIGHUP reloads the log level.

use tokio::sync::mpsc::UnboundedReceiver;

use super::{Done, StageResult};
use crate::signals::{self, Signal};

/// Install the signal handlers; hands on the channel the signals arrive on.
pub fn run() -> StageResult<UnboundedReceiver<Signal>> {
    let rx = signals::install().map_err(|e| e.to_string())?;
    Ok(Done::ok(
        rx,
        "SIGTERM/SIGINT: graceful shutdown; SIGHUP: reload log level",
    ))
}
