//! `debvisorctl`: operate a DebVisor cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use debvisor_daemon::ctl::ceph::{self as ctl_ceph, CephCommand};
use debvisor_daemon::ctl::network::{self as ctl_network, NetworkCommand};
use debvisor_daemon::ctl::node::{self as ctl_node, NodeCommand};
use debvisor_daemon::ctl::vm::{self as ctl_vm, VmCommand};
use debvisor_daemon::ctl::Failure;
use debvisor_daemon::ctl::{self, Output};

/// DebVisor cluster CLI. Reads the same configuration (and DEBVISOR_* overrides) as debvisord.
#[derive(Parser)]
#[command(name = "debvisorctl", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = debvisor_daemon::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every node: states, liveness, last keepalive, load, memory, VMs.
    Status,
    /// Node commands.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Client networks: define, change, remove, list; DHCP reservations; ACL rules.
    Network {
        #[command(subcommand)]
        command: Box<NetworkCommand>,
    },
    /// Virtual machines: define, start/stop, migrate, list, show, undefine.
    Vm {
        #[command(subcommand)]
        command: Box<VmCommand>,
    },
    /// Ceph storage: pools, RBD volumes, snapshots, templates; cluster health and usage.
    Ceph {
        #[command(subcommand)]
        command: Box<CephCommand>,
    },
    /// Print the etcd schema as markdown (docs/schema.md).
    Schema,
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("debvisorctl: {msg}");
    ExitCode::from(1)
}

/// Print a VM/drain command's outcome; on failure its stdout document (if any) and the error.
fn report(r: Result<String, Failure>) -> ExitCode {
    match r {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            if let Some(out) = &f.stdout {
                print!("{out}");
            }
            fail(&f.message)
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = match debvisor_daemon::config::load(&cli.config, &env) {
        Ok(c) => c,
        Err(e) => {
            return fail(&format!(
                "{}: invalid configuration:\n{e}",
                cli.config.display()
            ))
        }
    };
    if let Command::Schema = cli.command {
        print!(
            "{}",
            debvisor_objects::schema::render_markdown(&cfg.store.prefix)
        );
        return ExitCode::SUCCESS;
    }
    // A bad name is refused before any connection is tried.
    if let Command::Node {
        command: NodeCommand::Show { name },
    } = &cli.command
    {
        if let Err(e) = ctl::check_node_name(name) {
            return fail(&e);
        }
    }
    let store = match ctl::connect(&cfg).await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    match cli.command {
        Command::Status => report(ctl_node::status(&store, cli.output).await),
        Command::Node { command } => report(ctl_node::run(&store, command, cli.output).await),
        Command::Vm { command } => {
            report(ctl_vm::run(&store, *command, cli.output, &cfg.domains.xml_policy).await)
        }
        Command::Ceph { command } => report(ctl_ceph::run(&store, *command, cli.output).await),
        Command::Network { command } => report(
            ctl_network::run(&store, *command, cli.output)
                .await
                .map_err(Failure::from),
        ),
        Command::Schema => ExitCode::SUCCESS,
    }
}
