//! Termination handling: SIGTERM/SIGINT request a graceful shutdown, a second one exits at
//! once (after SIGTERM to the programs we started); SIGHUP reloads the log level.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

/// A signal the daemon acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: graceful shutdown.
    Terminate(&'static str),
    /// SIGHUP: reload the log level.
    Reload,
}

/// Install the handlers; signals arrive on the returned channel. Runs a dedicated thread.
pub fn install() -> std::io::Result<mpsc::UnboundedReceiver<Signal>> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut terms = 0;
        for sig in signals.forever() {
            let ev = match sig {
                SIGHUP => Signal::Reload,
                SIGINT => Signal::Terminate("SIGINT"),
                _ => Signal::Terminate("SIGTERM"),
            };
            if matches!(ev, Signal::Terminate(_)) {
                terms += 1;
                if terms >= 2 {
                    eprintln!("debvisord: second termination signal; exiting now without graceful shutdown");
                    crate::services::terminate_owned_now();
                    std::process::exit(130);
                }
            }
            if tx.send(ev).is_err() {
                return;
            }
        }
    })?;
    Ok(rx)
}
