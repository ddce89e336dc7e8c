//! The startup stages, one file each, in the order of [`Stage::ALL`]:
//!
//! config → directories → logging → host networking → sysctl → coordinator services →
//! store connection → termination handling → self-registration → hypervisor check →
//! firewall → objects → keepalive.
//!
//! A stage is a function that does its work and returns [`Done`] (a value for the stages
//! after it, an [`Outcome`] and a detail for the log) or an error message. The driver in
//! `daemon.rs` runs them in order, times each one and reports it through [`StageClock`]:
//! one `stage complete` line with `stage= outcome= duration_ms= detail=` and an sd_notify
//! `STATUS=`, or one `stage failed; exiting` line and exit code 1. No stage sleeps for a
//! fixed time.

pub mod config;
pub mod coordinator_services;
pub mod directories;
pub mod firewall;
pub mod host_networking;
pub mod hypervisor_check;
pub mod keepalive;
pub mod logging;
pub mod objects;
pub mod self_registration;
pub mod store_connection;
pub mod sysctl;
pub mod termination_handling;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{error, info};

use crate::notify;

/// The startup stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Config,
    Directories,
    Logging,
    HostNetworking,
    Sysctl,
    CoordinatorServices,
    StoreConnection,
    TerminationHandling,
    SelfRegistration,
    HypervisorCheck,
    Firewall,
    Objects,
    Keepalive,
}

impl Stage {
    /// Every stage in startup order.
    pub const ALL: [Stage; 13] = [
        Stage::Config,
        Stage::Directories,
        Stage::Logging,
        Stage::HostNetworking,
        Stage::Sysctl,
        Stage::CoordinatorServices,
        Stage::StoreConnection,
        Stage::TerminationHandling,
        Stage::SelfRegistration,
        Stage::HypervisorCheck,
        Stage::Firewall,
        Stage::Objects,
        Stage::Keepalive,
    ];

    /// The `stage=` field value.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Config => "config",
            Stage::Directories => "directories",
            Stage::Logging => "logging",
            Stage::HostNetworking => "host-networking",
            Stage::Sysctl => "sysctl",
            Stage::CoordinatorServices => "coordinator-services",
            Stage::StoreConnection => "store-connection",
            Stage::TerminationHandling => "termination-handling",
            Stage::SelfRegistration => "self-registration",
            Stage::HypervisorCheck => "hypervisor-check",
            Stage::Firewall => "firewall",
            Stage::Objects => "objects",
            Stage::Keepalive => "keepalive",
        }
    }
}

/// Seconds each stage of this process took (`f64` bits; `u64::MAX` = not completed), in
/// the order of [`Stage::ALL`]. One process runs the stages once, so a process-wide record is
/// what `/metrics` exports as `debvisor_stage_duration_seconds`.
static DURATIONS: [AtomicU64; Stage::ALL.len()] =
    [const { AtomicU64::new(u64::MAX) }; Stage::ALL.len()];

/// The stages completed so far and how long each took, in seconds (startup order).
pub fn durations() -> Vec<(Stage, f64)> {
    Stage::ALL
        .iter()
        .zip(DURATIONS.iter())
        .filter_map(|(s, d)| {
            let bits = d.load(Ordering::Relaxed);
            (bits != u64::MAX).then(|| (*s, f64::from_bits(bits)))
        })
        .collect()
}

/// How a stage that did not fail ended (the `outcome=` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Did its work.
    Ok,
    /// Had nothing to do on this node (by configuration).
    Skipped,
    /// Did not do all of its work; the node runs anyway and the detail says what is missing.
    Degraded,
}

impl Outcome {
    /// The `outcome=` field value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Skipped => "skipped",
            Outcome::Degraded => "degraded",
        }
    }
}

/// A stage that did not fail: what it hands on, how it ended, and the log detail.
pub struct Done<T> {
    /// What the later stages need from this one.
    pub value: T,
    /// How it ended.
    pub outcome: Outcome,
    /// The `detail=` field.
    pub detail: String,
}

impl<T> Done<T> {
    /// Ended `ok`.
    pub fn ok(value: T, detail: impl Into<String>) -> Self {
        Done::with(value, Outcome::Ok, detail)
    }

    /// Ended with `outcome`.
    pub fn with(value: T, outcome: Outcome, detail: impl Into<String>) -> Self {
        Done {
            value,
            outcome,
            detail: detail.into(),
        }
    }
}

/// What a stage returns: done, or the error that stops the daemon.
pub type StageResult<T> = Result<Done<T>, String>;

/// The clock of one running stage, and its report.
pub struct StageClock {
    stage: Stage,
    started: Instant,
    /// Whether success goes to systemd too (not for the stages before logging).
    notify: bool,
}

impl StageClock {
    /// `stage` starts now.
    pub fn start(stage: Stage) -> Self {
        StageClock {
            stage,
            started: Instant::now(),
            notify: true,
        }
    }

    /// A stage that ran before logging existed and took `took`: logged late, and its
    /// success not reported to systemd (a failure is).
    pub fn ran(stage: Stage, took: Duration) -> Self {
        StageClock {
            stage,
            started: Instant::now()
                .checked_sub(took)
                .unwrap_or_else(Instant::now),
            notify: false,
        }
    }

    /// Log the finished stage and report it to systemd.
    pub fn done(&self, node: &str, outcome: Outcome, detail: &str) {
        if let Some(i) = Stage::ALL.iter().position(|s| *s == self.stage) {
            DURATIONS[i].store(
                self.started.elapsed().as_secs_f64().to_bits(),
                Ordering::Relaxed,
            );
        }
        info!(node = %node, stage = self.stage.name(), outcome = outcome.as_str(),
            duration_ms = self.duration_ms(), detail, "stage complete");
        if self.notify {
            notify::status(&format!(
                "stage {}: {}",
                self.stage.name(),
                outcome.as_str()
            ));
        }
    }

    /// Log the failed stage, report it to systemd; the daemon exits with the returned code.
    pub fn failed(&self, node: &str, err: &str) -> ExitCode {
        error!(node = %node, stage = self.stage.name(), outcome = "failed",
            duration_ms = self.duration_ms(), error = %err, "stage failed; exiting");
        notify::status(&format!("stage {} failed: {err}", self.stage.name()));
        ExitCode::from(1)
    }

    fn duration_ms(&self) -> String {
        format!("{:.1}", self.started.elapsed().as_secs_f64() * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_are_unique_and_ordered() {
        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert_eq!(names.first(), Some(&"config"));
        assert_eq!(names.last(), Some(&"keepalive"));
    }
}
