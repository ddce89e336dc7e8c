//! `debvisord`: the DebVisor node daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use debvisor_daemon::config;

/// DebVisor node daemon.
#[derive(Parser)]
#[command(name = "debvisord", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = debvisor_daemon::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration (file plus DEBVISOR_* overrides) and exit 0 if it is valid.
    CheckConfig,
    /// (Internal) the guardian the daemon starts for itself: releases the primary's
    /// floating addresses, gateways and dnsmasq when the daemon dies or freezes.
    #[command(hide = true)]
    Guard {
        /// Run once after the daemon exited (the unit's ExecStopPost=): release the
        /// primary's duties unless systemd reports a clean stop ($SERVICE_RESULT).
        #[arg(long)]
        after_exit: bool,
    },
}

/// The watchdog the daemon would run under, for `check-config`: the loaded unit's
/// `WatchdogSec=` when systemd is PID 1 and knows `debvisord.service`, else the shipped
/// unit's. `None` when the unit has no watchdog.
fn unit_watchdog() -> (Option<Duration>, &'static str) {
    const SHIPPED: &str = "WatchdogSec= of the shipped debvisord.service";
    if !debvisor_daemon::services::systemd_is_pid1() {
        return (Some(config::SHIPPED_WATCHDOG), SHIPPED);
    }
    let out = std::process::Command::new("systemctl")
        .args([
            "show",
            "--property=LoadState,WatchdogUSec",
            "debvisord.service",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => return (Some(config::SHIPPED_WATCHDOG), SHIPPED),
    };
    let prop = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::trim)
    };
    if prop("LoadState") != Some("loaded") {
        return (Some(config::SHIPPED_WATCHDOG), SHIPPED);
    }
    let unit = "WatchdogSec= of the loaded debvisord.service";
    match prop("WatchdogUSec").map(parse_timespan) {
        Some(Some(d)) if !d.is_zero() => (Some(d), unit),
        Some(Some(_)) => (None, unit),
        _ => (Some(config::SHIPPED_WATCHDOG), SHIPPED),
    }
}

/// A systemd time span as `systemctl show` prints it (`30s`, `1min 30s`, `500ms`, `0`);
/// `infinity` and anything unknown are `None`.
fn parse_timespan(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for word in s.split_whitespace() {
        let split = word
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(word.len());
        let (num, unit) = word.split_at(split);
        let n: u64 = num.parse().ok()?;
        let unit_len = match unit {
            "" | "s" | "sec" => Duration::from_secs(1),
            "ms" | "msec" => Duration::from_millis(1),
            "us" | "usec" | "µs" => Duration::from_micros(1),
            "m" | "min" => Duration::from_secs(60),
            "h" | "hr" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return None,
        };
        total += unit_len * u32::try_from(n).ok()?;
    }
    Some(total)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig) => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            match debvisor_daemon::config::load(&cli.config, &env) {
                Ok(cfg) => {
                    let (watchdog, source) = unit_watchdog();
                    if let Some(w) = watchdog.and_then(|w| cfg.watchdog_warning(w)) {
                        eprintln!("{}: warning ({source}): {w}", cli.config.display());
                    }
                    println!("{}: configuration is valid", cli.config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: invalid configuration:\n{e}", cli.config.display());
                    ExitCode::from(2)
                }
            }
        }
        Some(Command::Guard { after_exit }) => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            match debvisor_daemon::config::load(&cli.config, &env) {
                Ok(cfg) if after_exit => debvisor_daemon::guard::after_exit(&cfg),
                Ok(cfg) => debvisor_daemon::guard::run(&cfg),
                Err(e) => {
                    eprintln!(
                        "debvisord guard: {}: invalid configuration:\n{e}",
                        cli.config.display()
                    );
                    ExitCode::from(2)
                }
            }
        }
        None => {
            // Every thread that allocates would otherwise get its own glibc malloc arena; libvirt
            // calls run on short-lived threads, so cap the arenas to keep the idle RSS small.
            // SAFETY: mallopt only tunes the allocator; called before any thread is spawned.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("debvisord")
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("debvisord: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let code = rt.block_on(debvisor_daemon::daemon::run(&cli.config));
            // A libvirt call still running on the blocking pool (bounded by its own timeout)
            // must not hold up an exit that has already been logged.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
    }
}
