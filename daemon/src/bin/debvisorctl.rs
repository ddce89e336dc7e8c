//! `debvisorctl`: operate a DebVisor cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use debvisor_daemon::ctl::{self, Output};
use debvisor_daemon::ctl_ceph::{self, CephCommand};
use debvisor_daemon::ctl_network::{self, NetworkCommand};
use debvisor_daemon::ctl_vm::{self, Drain, VmCommand, WaitArgs};

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

#[derive(Subcommand)]
enum NodeCommand {
    /// Everything known about one node.
    Show { name: String },
    /// Drain a node: its daemon moves its VMs away and reports `flushed`.
    Flush {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Undrain a node: its daemon takes its VMs back and reports `ready`.
    Unflush {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("debvisorctl: {msg}");
    ExitCode::from(1)
}

/// Print a VM/drain command's outcome; on failure its stdout document (if any) and the error.
fn report(r: Result<String, ctl_vm::Failure>) -> ExitCode {
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
    let json_out = cli.output == Output::Json;
    let command = match cli.command {
        Command::Vm { command } => return report(ctl_vm::run(&store, *command, cli.output).await),
        Command::Ceph { command } => {
            return report(ctl_ceph::run(&store, *command, cli.output).await)
        }
        Command::Node {
            command: NodeCommand::Flush { name, wait },
        } => return report(ctl_vm::node_drain(&store, &name, Drain::Flush, &wait, json_out).await),
        Command::Node {
            command: NodeCommand::Unflush { name, wait },
        } => {
            return report(ctl_vm::node_drain(&store, &name, Drain::Unflush, &wait, json_out).await)
        }
        other => other,
    };
    let command = match command {
        Command::Network { command } => {
            return match ctl_network::run(&store, *command, cli.output).await {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        other => other,
    };
    let rows = match ctl::nodes(&store).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    match command {
        Command::Status => match cli.output {
            Output::Json => {
                let arr: Vec<serde_json::Value> = rows.iter().map(ctl::node_json).collect();
                println!("{}", serde_json::Value::Array(arr));
            }
            Output::Table => print!("{}", ctl::status_table(&rows)),
        },
        Command::Node {
            command: NodeCommand::Show { name },
        } => {
            let Some(row) = rows.iter().find(|r| r.name == name) else {
                return fail(&format!(
                    "node {name:?} not found under {}/nodes/",
                    cfg.store.prefix
                ));
            };
            match cli.output {
                Output::Json => println!("{}", ctl::node_json(row)),
                Output::Table => print!("{}", ctl::node_text(row)),
            }
        }
        Command::Schema
        | Command::Network { .. }
        | Command::Vm { .. }
        | Command::Ceph { .. }
        | Command::Node {
            command: NodeCommand::Flush { .. } | NodeCommand::Unflush { .. },
        } => {}
    }
    ExitCode::SUCCESS
}
