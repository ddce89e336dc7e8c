//! A switch port flapping in the background ([`super::Node::flap_link`]).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::switch::set_port_in;
use crate::error::{HarnessError, IoContext, Result};

/// A running link flapper. Dropping it stops the flapping and leaves the port up. It borrows
/// the node, so it cannot outlive the cluster.
#[derive(Debug)]
pub struct Flap<'a> {
    started: Instant,
    stop: Arc<AtomicBool>,
    cycles: Arc<AtomicU32>,
    thread: Option<JoinHandle<Result<()>>>,
    node: PhantomData<&'a super::Node>,
}

/// Sleep `d`, waking early when `stop` is set; whether it was set.
fn nap(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        let left = until.saturating_duration_since(Instant::now());
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
    stop.load(Ordering::SeqCst)
}

impl Flap<'_> {
    /// Start flapping port `port` of the switch in `switch_ns`: `times` cycles of down for
    /// `period / 2`, up for `period / 2`.
    pub(super) fn start<'a>(
        switch_ns: String,
        port: String,
        period: Duration,
        times: u32,
    ) -> Result<Flap<'a>> {
        let stop = Arc::new(AtomicBool::new(false));
        let cycles = Arc::new(AtomicU32::new(0));
        let (s, c) = (stop.clone(), cycles.clone());
        let half = period / 2;
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name(format!("flap {port}"))
            .spawn(move || -> Result<()> {
                let mut result = Ok(());
                for _ in 0..times {
                    if let Err(e) = set_port_in(&switch_ns, &port, false) {
                        result = Err(e);
                        break;
                    }
                    let stopped = nap(&s, half);
                    if let Err(e) = set_port_in(&switch_ns, &port, true) {
                        result = Err(e);
                        break;
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                    if stopped || nap(&s, half) {
                        break;
                    }
                }
                // Whatever happened, the port ends up.
                let up = set_port_in(&switch_ns, &port, true);
                result.and(up)
            })
            .ctx(|| "spawning the flap thread".to_owned())?;
        Ok(Flap {
            started,
            stop,
            cycles,
            thread: Some(thread),
            node: PhantomData,
        })
    }

    /// When the first down was applied (just before).
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// Completed down/up cycles so far.
    pub fn cycles(&self) -> u32 {
        self.cycles.load(Ordering::SeqCst)
    }

    /// Wait for the flapping to finish its cycles (the port is up afterwards).
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    /// Stop flapping now and leave the port up.
    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| HarnessError::State("the flap thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Flap<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.join() {
            eprintln!("debvisor-tests: flapping a link: {e}");
        }
    }
}
