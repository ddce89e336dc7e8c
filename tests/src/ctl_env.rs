//! A `debvisorctl` test bench: a private etcd, a config file `{}` and the environment that
//! points the real `debvisorctl` binary at that etcd — run, require success, parse JSON, or
//! require a refusal that names a field and writes nothing.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use debvisor_objects::Store;

use etcd_client::Client;
use serde_json::Value;

use crate::daemon::ctl;
use crate::etcd::{store_for, EtcdProcess};

/// An etcd, a config file and a scratch directory for `debvisorctl` tests.
pub struct CtlCluster {
    /// The etcd `debvisorctl` talks to.
    pub etcd: EtcdProcess,
    dir: tempfile::TempDir,
    config: PathBuf,
    endpoint: String,
}

fn run_ctl(config: &Path, endpoint: &str, args: &[&str]) -> Output {
    ctl(
        config,
        &[
            ("DEBVISOR_STORE_ENDPOINTS", endpoint),
            ("DEBVISOR_NODE_NAME", "ctl"),
        ],
        args,
    )
}

impl CtlCluster {
    /// Start etcd and write the config.
    ///
    /// # Panics
    /// If etcd or the temp dir cannot be created.
    pub fn start() -> CtlCluster {
        let etcd = EtcdProcess::start().expect("etcd");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("debvisord.yaml");
        std::fs::write(&config, "{}\n").expect("config");
        let endpoint = etcd.endpoint();
        CtlCluster {
            etcd,
            dir,
            config,
            endpoint,
        }
    }

    /// The etcd endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A daemon-side store on this etcd (prefix `/debvisor`), for what a test reads or
    /// writes through the same code as the daemon and `debvisorctl`.
    ///
    /// # Panics
    /// If etcd does not answer.
    pub async fn store(&self) -> Store {
        store_for(self.endpoint.as_str(), Duration::from_secs(5))
            .await
            .expect("store")
    }

    /// The scratch directory (for input files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Run `debvisorctl args…`.
    pub fn run(&self, args: &[&str]) -> Output {
        run_ctl(&self.config, &self.endpoint, args)
    }

    /// Run `debvisorctl` on a blocking thread (e.g. `--wait` while the test acts meanwhile).
    pub fn spawn(&self, args: &[&str]) -> tokio::task::JoinHandle<Output> {
        let config = self.config.clone();
        let endpoint = self.endpoint.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run_ctl(&config, &endpoint, &a)
        })
    }

    /// Run and require success; returns stdout.
    ///
    /// # Panics
    /// If `debvisorctl` fails (its stderr is in the message).
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "debvisorctl {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run with `-o json` and parse stdout.
    ///
    /// # Panics
    /// If it fails or prints no JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }

    /// Run, require exit code 1, `needle` on stderr, nothing on stdout and nothing written
    /// to etcd; returns stderr.
    ///
    /// # Panics
    /// If any of that does not hold.
    pub async fn refused(&self, args: &[&str], needle: &str) -> String {
        let before = self.etcd.current_revision().await.expect("revision");
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "debvisorctl {args:?}: expected exit 1, got {}\nstdout: {}\nstderr: {err}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            err.contains(needle),
            "debvisorctl {args:?}: stderr does not name {needle:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?} printed on stdout");
        let after = self.etcd.current_revision().await.expect("revision");
        assert_eq!(before, after, "debvisorctl {args:?} wrote to etcd: {err}");
        err
    }

    /// A client of the etcd.
    ///
    /// # Panics
    /// If it cannot connect.
    pub async fn client(&self) -> Client {
        self.etcd.client().await.expect("etcd client")
    }
}
