//! `debvisorctl`: operate a DebVisor cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use debvisor_daemon::ctl::ceph::{self as ctl_ceph, CephCommand};
use debvisor_daemon::ctl::client::{self, ClientArgs};
use debvisor_daemon::ctl::cluster::{self, ClusterCommand, ATTENTION_EXIT};
use debvisor_daemon::ctl::config_sync::{self, ConfigCommand};
use debvisor_daemon::ctl::network::{self as ctl_network, NetworkCommand};
use debvisor_daemon::ctl::node::{self as ctl_node, NodeCommand};
use debvisor_daemon::ctl::vm::{self as ctl_vm, VmCommand};
use debvisor_daemon::ctl::Failure;
use debvisor_daemon::ctl::{self, errors, Output};

/// DebVisor cluster CLI: talks to the cluster's etcd only.
///
/// Where etcd is: --endpoints/--cacert/… flags, DEBVISORCTL_* variables,
/// ~/.config/debvisor/ctl.yaml, or a node's /etc/debvisor/debvisord.yaml (see `--help` of
/// each flag). Exit codes: 0 ok, 1 failed, 2 bad usage, 3 (status, cluster status, config
/// status) something needs attention.
#[derive(Parser)]
#[command(name = "debvisorctl", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Print full error chains (etcd, TLS, OS errors) instead of one line.
    #[arg(long, short = 'v', global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The cluster summary, then every node: states, liveness, last keepalive, load, memory,
    /// VMs, status; problems one per line. Exit code 3 when something needs attention.
    Status,
    /// The cluster as a whole.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
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
    /// Virtual machines: define, meta, start/stop, migrate, list, show, undefine.
    Vm {
        #[command(subcommand)]
        command: Box<VmCommand>,
    },
    /// Ceph storage: pools, RBD volumes, snapshots, templates; cluster health and usage.
    Ceph {
        #[command(subcommand)]
        command: Box<CephCommand>,
    },
    /// The cluster-wide settings every node applies at runtime (config sync).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the etcd schema as markdown (docs/schema.md); needs no configuration.
    Schema,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write one manual page per command (debvisorctl.1, debvisorctl-vm-define.1, …) to DIR.
    #[command(hide = true)]
    Manpages {
        /// Output directory.
        dir: PathBuf,
    },
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("debvisorctl: {msg}");
    ExitCode::from(1)
}

/// Print a command's outcome; on failure its stdout document (if any) and the error.
fn report(r: Result<String, Failure>) -> ExitCode {
    report_attention(r.map(|s| (s, false)))
}

/// Like [`report`]; exit code 3 when the command found something that needs attention.
fn report_attention(r: Result<(String, bool), Failure>) -> ExitCode {
    match r {
        Ok((out, attention)) => {
            print!("{out}");
            if attention {
                ExitCode::from(ATTENTION_EXIT)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(f) => {
            if let Some(out) = &f.stdout {
                print!("{out}");
            }
            fail(&f.message)
        }
    }
}

/// Every (sub)command's manual page, named `debvisorctl-a-b.1`.
fn manpages(dir: &std::path::Path) -> std::io::Result<usize> {
    fn walk(
        cmd: &clap::Command,
        name: &str,
        dir: &std::path::Path,
        n: &mut usize,
    ) -> std::io::Result<()> {
        let cmd = cmd
            .clone()
            .name(name.to_string())
            .bin_name(name.replace('-', " "));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
        std::fs::write(dir.join(format!("{name}.1")), buf)?;
        *n += 1;
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            walk(sub, &format!("{name}-{}", sub.get_name()), dir, n)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut n = 0;
    let mut cmd = Cli::command();
    cmd.build();
    walk(&cmd, "debvisorctl", dir, &mut n)?;
    Ok(n)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    errors::set_verbose(cli.verbose);
    // What needs no configuration at all.
    match &cli.command {
        Command::Schema => {
            let prefix = cli.client.prefix.as_deref().unwrap_or("/debvisor");
            print!("{}", debvisor_objects::schema::render_markdown(prefix));
            return ExitCode::SUCCESS;
        }
        Command::Completion { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "debvisorctl", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Manpages { dir } => {
            return match manpages(dir) {
                Ok(n) => {
                    println!("{n} manual pages written to {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&format!("{}: {e}", dir.display())),
            };
        }
        _ => {}
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
    let env: Vec<(String, String)> = std::env::vars().collect();
    let client = match client::resolve(&cli.client, &env) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let store = match ctl::connect_with(&client.store).await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let out = cli.output;
    match cli.command {
        Command::Status => report_attention(cluster::status(&store, out).await),
        Command::Cluster { command } => report_attention(cluster::run(&store, command, out).await),
        Command::Node { command } => report(ctl_node::run(&store, command, out).await),
        Command::Vm { command } => {
            report(ctl_vm::run(&store, *command, out, &client.xml_policy).await)
        }
        Command::Ceph { command } => report(ctl_ceph::run(&store, *command, out).await),
        Command::Network { command } => report(
            ctl_network::run(&store, *command, out)
                .await
                .map_err(Failure::from),
        ),
        Command::Config { command } => {
            report_attention(config_sync::run(&store, command, out).await)
        }
        Command::Schema | Command::Completion { .. } | Command::Manpages { .. } => {
            ExitCode::SUCCESS
        }
    }
}
