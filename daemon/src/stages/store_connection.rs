//! Stage `store-connection`: connect to etcd and probe it, retrying with backoff until
//! `store.startup_deadline`; every attempt is logged. A bad local file (TLS key, password)
//! or credentials etcd refuses (wrong `store.user` / `store.password_file`) fail at once:
//! they will not fix themselves.

use std::time::{Duration, Instant};

use debvisor_objects::{Store, StoreError};
use tracing::{info, warn};

use super::{Done, Stage, StageResult};
use crate::config::Config;
use crate::registration::LocalState;

/// Connect within the configured startup deadline; hands on the store.
pub async fn run(cfg: &Config) -> StageResult<Store> {
    let store = connect(cfg, cfg.store.startup_deadline).await?;
    Ok(Done::ok(store, cfg.store.endpoints.join(",")))
}

/// Connect and probe with backoff until `deadline`; each attempt is logged.
pub async fn connect(cfg: &Config, deadline: Duration) -> Result<Store, String> {
    let opts = cfg.store_options();
    let until = Instant::now() + deadline;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let res = match Store::connect(&opts).await {
            Ok(store) => {
                // The store as the last run saw it: a wiped or restored etcd is noticed at
                // the first answer.
                if let Some(mark) = LocalState::new(&cfg.paths.state_dir).store_mark() {
                    store.seed_mark(mark);
                }
                store.probe().await.map(|rev| (store, rev))
            }
            Err(e) => Err(e),
        };
        let err = match res {
            Ok((store, rev)) => {
                info!(node = %cfg.node_name(), stage = Stage::StoreConnection.name(), attempt, revision = rev,
                    endpoints = %opts.endpoints.join(","), "store answered");
                return Ok(store);
            }
            Err(e) => e,
        };
        if matches!(err, StoreError::File { .. } | StoreError::Auth { .. }) {
            return Err(err.to_string());
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no etcd answered at {} within {:?} ({attempt} attempts); last error: {err}",
                opts.endpoints.join(","),
                deadline
            ));
        }
        let wait = debvisor_objects::reactor::backoff(
            Duration::from_millis(250),
            Duration::from_secs(5),
            attempt,
        )
        .min(left);
        warn!(node = %cfg.node_name(), stage = Stage::StoreConnection.name(), attempt, error = %err,
            retry_in_ms = wait.as_millis() as u64, endpoints = %opts.endpoints.join(","), "store not reachable yet; retrying");
        tokio::time::sleep(wait).await;
    }
}
