//! sd_notify: READY/STATUS/WATCHDOG/STOPPING/EXTEND_TIMEOUT_USEC to systemd. A no-op
//! without `NOTIFY_SOCKET`.

use std::time::Duration;

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

/// The watchdog limit systemd gave this process (`WatchdogSec=`), if any.
pub fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Ask systemd for `d` more time in the current phase (`EXTEND_TIMEOUT_USEC`): a graceful
/// stop that drains the node may take longer than the unit's `TimeoutStopSec=`, and says so
/// while it works. systemd keeps the later of its own deadline and now + `d`.
pub fn extend_timeout(d: Duration) {
    let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    let _ = sd_notify::notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// Watchdog ping; called on each keepalive tick.
pub fn watchdog() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}
