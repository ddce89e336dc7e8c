//! `debvisord`: the DebVisor node daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Guard,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig) => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            match debvisor_daemon::config::load(&cli.config, &env) {
                Ok(_) => {
                    println!("{}: configuration is valid", cli.config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: invalid configuration:\n{e}", cli.config.display());
                    ExitCode::from(2)
                }
            }
        }
        Some(Command::Guard) => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            match debvisor_daemon::config::load(&cli.config, &env) {
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
