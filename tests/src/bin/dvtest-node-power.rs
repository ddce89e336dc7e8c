//! `dvtest-node-power`: what a test node's fake BMC (`ipmi_sim`'s `startcmd`) runs as the
//! node's power: `dvtest-node-power <power socket> <node netns> <harness pid>`. While it
//! runs the node is on; on SIGTERM (power off) it kills every process of the node's network
//! namespace and takes its network down before exiting. See
//! `debvisor_tests::cluster::power`.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    debvisor_tests::cluster::power::supervise(&args)
}
