//! sd_notify: READY/STATUS/WATCHDOG/STOPPING to systemd. A no-op without `NOTIFY_SOCKET`.

use sd_notify::NotifyState;

/// Report a free-form status line (`systemctl status` shows it).
pub fn status(s: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(s)]);
}

/// Startup finished (`daemon_state` = run).
pub fn ready(s: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(s)]);
}

/// Graceful shutdown began.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// Whether systemd expects watchdog pings (`WATCHDOG_USEC` set for this PID).
pub fn watchdog_enabled() -> bool {
    sd_notify::watchdog_enabled().is_some()
}

/// Watchdog ping; called on each keepalive tick.
pub fn watchdog() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}
