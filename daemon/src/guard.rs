//! The guardian: a small process of its own (`debvisord guard`) that releases the primary's
//! host duties when the daemon cannot — killed (`kill -9`, a crash) or frozen (SIGSTOP, a
//! hung runtime) — so another coordinator never takes over a floating address or a gateway
//! that this host still holds, and no second dnsmasq serves a network.
//!
//! The daemon heartbeats over a socket pair every [`HEARTBEAT`]: whether it is the primary
//! and how long its duties may last (its lease's `valid_until − demote_margin`, the same
//! deadline the election demotes at). The guardian acts when
//!
//! - the socket closes without a goodbye (the daemon died), or
//! - the deadline passes without a newer heartbeat while the daemon is primary (frozen),
//!
//! by removing every address this host holds as the primary (floating addresses and client
//! network gateways: the `FLOATING` address protocol) and stopping the daemon's dnsmasq
//! processes. A graceful stop says goodbye first.
//!
//! With self-fence on (`fencing`, clustered), the guardian also keeps the self-fence bound
//! when the daemon cannot: a daemon killed, crashed, frozen, or stopped without its `stop`
//! recorded leaves guests that the primary may recover elsewhere once the lease expires. So
//! at the lease deadline (`valid_until − self_fence_margin`, from the last heartbeat) the
//! guardian destroys (or pauses) every guest carrying this node's ownership mark — unless a
//! new daemon has registered meanwhile (the state dir names a newer lease). Clustered
//! coordinators and clustered nodes with self-fence run one; a standalone node keeps its
//! duties and guests across restarts, nobody else takes them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use debvisor_netconf::{HostNet, Netlink};

use crate::config::Config;

/// How often the daemon heartbeats.
pub const HEARTBEAT: Duration = Duration::from_millis(200);

/// One heartbeat: `primary` and the time its duties may last from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// The daemon is the primary.
    pub primary: bool,
    /// How long its primary duties may last without a newer heartbeat.
    pub lasts: Duration,
    /// Guests must stop by the self-fence deadline if the daemon cannot see to it.
    pub fence: bool,
    /// How long its guests may run without a newer heartbeat (the self-fence deadline).
    pub guests_last: Duration,
    /// The node lease the daemon holds (a newer one in the state dir: a new daemon).
    pub lease: i64,
}

impl Beat {
    /// The wire form: `beat <0|1> <millis> <0|1> <millis> <lease>`.
    pub fn line(&self) -> String {
        format!(
            "beat {} {} {} {} {}\n",
            u8::from(self.primary),
            self.lasts.as_millis(),
            u8::from(self.fence),
            self.guests_last.as_millis(),
            self.lease
        )
    }

    /// Parse one line (`beat …` or `bye`): `Ok(None)` for a goodbye.
    pub fn parse(line: &str) -> Result<Option<Beat>, String> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let flag = |p: &str| match p {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(format!("bad flag {p:?}")),
        };
        let millis = |ms: &str| {
            ms.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("bad millis {ms:?}"))
        };
        match f.as_slice() {
            ["bye"] => Ok(None),
            ["beat", p, ms, fence, gms, lease] => Ok(Some(Beat {
                primary: flag(p)?,
                lasts: millis(ms)?,
                fence: flag(fence)?,
                guests_last: millis(gms)?,
                lease: lease.parse().map_err(|_| format!("bad lease {lease:?}"))?,
            })),
            _ => Err(format!("bad line {line:?}")),
        }
    }
}

/// The daemon's end of the guardian.
pub struct Guardian {
    sock: UnixStream,
    child: Child,
}

impl Guardian {
    /// Start `debvisord guard --config <config_path>` (this executable) with its stdin on a
    /// socket pair.
    pub fn spawn(config_path: &Path) -> std::io::Result<Guardian> {
        let (ours, theirs) = UnixStream::pair()?;
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .arg("guard")
            .arg("--config")
            .arg(config_path)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()?;
        ours.set_write_timeout(Some(Duration::from_millis(100)))?;
        Ok(Guardian { sock: ours, child })
    }

    /// The guardian's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a heartbeat (errors are the guardian's problem: it acts on silence).
    pub fn beat(&mut self, beat: Beat) {
        let _ = self.sock.write_all(beat.line().as_bytes());
    }

    /// A graceful stop: the guardian exits without touching the host.
    pub fn bye(mut self) {
        let _ = self.sock.write_all(b"bye\n");
        drop(self.sock);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the daemon tells its guardian now.
type BeatFn = std::sync::Arc<dyn Fn() -> Beat + Send + Sync>;
/// The guardian, shared by the heartbeat thread and the promotion guard (`None` once it
/// was told goodbye or abandoned).
type Shared = std::sync::Arc<std::sync::Mutex<Option<Guardian>>>;

fn lock(g: &Shared) -> std::sync::MutexGuard<'_, Option<Guardian>> {
    g.lock().unwrap_or_else(|p| p.into_inner())
}

/// The daemon's heartbeat thread and its guardian.
pub struct Heartbeat {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    guardian: Shared,
    beat: BeatFn,
}

impl Heartbeat {
    /// Heartbeat `guardian` every [`HEARTBEAT`] from its own thread (never behind the async
    /// runtime): `beat` says what to send now. Each beat is computed and sent under one lock,
    /// so no beat computed before a promotion arrives after [`Heartbeat::promotion_guard`]'s.
    pub fn start(guardian: Guardian, beat: impl Fn() -> Beat + Send + Sync + 'static) -> Heartbeat {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guardian: Shared = std::sync::Arc::new(std::sync::Mutex::new(Some(guardian)));
        let beat: BeatFn = std::sync::Arc::new(beat);
        let (flag, shared, next) = (stop.clone(), guardian.clone(), beat.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(g) = lock(&shared).as_mut() {
                    g.beat(next());
                }
                std::thread::sleep(HEARTBEAT);
            }
        });
        Heartbeat {
            stop,
            thread,
            guardian,
            beat,
        }
    }

    /// The guard for [`crate::reactors::role::RoleSender::guard_promotions`]: before the
    /// promotion is published to the duties, the guardian is sent a beat that says
    /// "primary" (a socket write: once it returns, a daemon killed at once still leaves the
    /// guardian knowing it must release). Without it a daemon killed within a heartbeat of
    /// winning left its floating address up beside the next primary's.
    pub fn promotion_guard(&self) -> crate::reactors::role::PromotionGuard {
        let (shared, beat) = (self.guardian.clone(), self.beat.clone());
        std::sync::Arc::new(move |publish: &mut dyn FnMut()| {
            let mut g = lock(&shared);
            if let Some(g) = g.as_mut() {
                g.beat(Beat {
                    primary: true,
                    ..beat()
                });
            }
            publish();
        })
    }

    /// Stop the thread and take the guardian out.
    fn end(self) -> Option<Guardian> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.thread.join();
        lock(&self.guardian).take()
    }

    /// A graceful stop: the guardian exits without touching the host.
    pub fn bye(self) {
        if let Some(g) = self.end() {
            g.bye();
        }
    }

    /// Stop heartbeating without a goodbye (the stop could not be recorded): the guardian
    /// acts as on the daemon's death and keeps the self-fence bound.
    pub fn abandon(self) {
        if let Some(g) = self.end() {
            drop(g.sock);
            // The guardian lives on; the child handle is dropped without waiting.
        }
    }
}

/// One line on stderr (the journal under systemd). A stderr that is gone is no reason to
/// stop: `eprintln!` would panic there and take the guardian's release with it.
fn say(msg: &str) {
    let _ = writeln!(
        std::io::stderr().lock(),
        "debvisord guard[{}]: {msg}",
        std::process::id()
    );
}

/// The guardian's main (`debvisord guard`): follow the heartbeats on stdin until a goodbye,
/// releasing the primary's duties when the daemon dies or its deadline passes.
pub fn run(cfg: &Config) -> ExitCode {
    // Only the socket ends us: a SIGTERM meant for the service is the daemon's to handle.
    // SAFETY: setting signal dispositions to ignore has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let (tx, rx) = std::sync::mpsc::channel::<Option<Result<Option<Beat>, String>>>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in BufReader::new(stdin.lock()).lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(Beat::parse(&l))).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let mut last: Option<(Beat, Instant)> = None;
    // What was done for the current deadlines (so a daemon beating with nothing left acts
    // once, not on every beat).
    let mut done = Done::default();
    loop {
        let wait = last
            .and_then(|(b, at)| next_deadline(&done.pending(b), at))
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok(Some(Ok(Some(b)))) => {
                done.renewed(&b);
                last = Some((b, Instant::now()));
            }
            Ok(Some(Ok(None))) => return ExitCode::SUCCESS,
            Ok(Some(Err(e))) => say(&format!("ignoring {e}")),
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if let Some((b, at)) = last {
                    orphaned(cfg, &done.pending(b), at);
                }
                return ExitCode::SUCCESS;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some((b, at)) = last {
                    overdue(cfg, &mut done, &b, at);
                }
            }
        }
    }
}

/// Which deadlines the guardian has acted on since the daemon last had time left.
#[derive(Debug, Default)]
struct Done {
    released: bool,
    fenced: bool,
}

impl Done {
    /// A beat with time left re-arms its deadline.
    fn renewed(&mut self, b: &Beat) {
        if !b.primary || !b.lasts.is_zero() {
            self.released = false;
        }
        if !b.fence || !b.guests_last.is_zero() {
            self.fenced = false;
        }
    }

    /// `b` without what was already done.
    fn pending(&self, mut b: Beat) -> Beat {
        b.primary &= !self.released;
        b.fence &= !self.fenced;
        b
    }
}

/// The guardian's other half under systemd (`debvisord guard --after-exit`, the unit's
/// `ExecStopPost=`): when the daemon's main process dies, systemd kills the rest of the unit
/// (`KillMode=mixed`), this guardian included, before it could act; so systemd runs this
/// afterwards, and it does what the guardian would have: releases the primary's duties,
/// unless the daemon stopped cleanly (`SERVICE_RESULT=success`: it handed over itself).
/// With `failed_fence: migrate` (the cluster then relies on the self-fence bound) it also
/// stops this node's guests when the daemon ended without recording a clean stop (its lease
/// id still in the state dir): a restart registers afresh and starts them again.
pub fn after_exit(cfg: &Config) -> ExitCode {
    let coordinator = cfg.node.mode == crate::config::NodeMode::Clustered && cfg.is_coordinator();
    let fence =
        cfg.self_fence_active() && cfg.fencing.failed_fence == crate::config::FenceAction::Migrate;
    let result = std::env::var("SERVICE_RESULT").unwrap_or_default();
    let unclean = !(result.is_empty() || result == "success");
    let lease_left = crate::registration::LocalState::new(&cfg.paths.state_dir)
        .last_lease()
        .is_some();
    if coordinator && unclean {
        say(&format!(
            "the daemon ended without a clean stop (SERVICE_RESULT={result}); releasing the primary's duties"
        ));
        release(cfg);
    }
    if fence && lease_left {
        say("the daemon ended without a recorded stop; stopping this node's guests (self-fence bound, failed_fence: migrate)");
        fence_guests(cfg);
    }
    ExitCode::SUCCESS
}

/// The next deadline the guardian acts at for `b` received `at`: the primary's duties, then
/// the guests' self-fence.
fn next_deadline(b: &Beat, at: Instant) -> Option<Instant> {
    let duties = b.primary.then_some(at + b.lasts);
    let guests = b.fence.then_some(at + b.guests_last);
    duties.into_iter().chain(guests).min()
}

/// The daemon went away without a goodbye: its duties go now, its guests at the deadline
/// (unless a new daemon registered meanwhile).
fn orphaned(cfg: &Config, b: &Beat, at: Instant) {
    if b.primary {
        say("the daemon is gone without a goodbye; releasing the primary's duties");
        release(cfg);
    }
    if b.fence {
        let deadline = at + b.guests_last;
        say(&format!(
            "the daemon is gone; its guests stop in {}ms (the self-fence deadline) unless a new daemon registers",
            deadline.saturating_duration_since(Instant::now()).as_millis()
        ));
        while Instant::now() < deadline {
            if newer_registration(cfg, b.lease) {
                return say("a new daemon registered with a new lease; guests left to it");
            }
            std::thread::sleep(
                Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
        if newer_registration(cfg, b.lease) {
            return say("a new daemon registered with a new lease; guests left to it");
        }
        fence_guests(cfg);
    }
}

/// A deadline passed without a renewal (the daemon is stuck, or cut off from the store):
/// release what is due, once.
fn overdue(cfg: &Config, done: &mut Done, b: &Beat, at: Instant) {
    let now = Instant::now();
    if b.primary && !done.released && now >= at + b.lasts {
        say("the primary's deadline passed without a renewal; releasing the primary's duties");
        release(cfg);
        done.released = true;
    }
    if b.fence && !done.fenced && now >= at + b.guests_last {
        say("the self-fence deadline passed without a renewal; stopping the guests");
        fence_guests(cfg);
        done.fenced = true;
    }
}

/// Has a daemon registered a lease other than `lease` since (the state dir's `lease`)?
fn newer_registration(cfg: &Config, lease: i64) -> bool {
    crate::registration::LocalState::new(&cfg.paths.state_dir)
        .last_lease()
        .is_some_and(|l| l != lease)
}

/// Self-fence from the guardian: destroy (or pause) every running guest that carries this
/// node's ownership mark.
fn fence_guests(cfg: &Config) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return say(&format!("cannot start a runtime: {e}")),
    };
    let node = cfg.node_name().to_string();
    rt.block_on(async {
        let lv = crate::hypervisor::Libvirt::new(&cfg.hypervisor.uri, cfg.hypervisor.timeout);
        let list = match lv.list().await {
            Ok(l) => l,
            Err(e) => return say(&format!("self-fence: cannot list the guests: {e}")),
        };
        for d in list.iter().filter(|d| d.state.is_active()) {
            let ours = match lv.xml(&d.uuid).await {
                Ok(x) => debvisor_objects::domain::read_mark(&x).is_some_and(|m| m.node == node),
                Err(_) => false,
            };
            if !ours {
                continue;
            }
            let r = match cfg.fencing.self_fence_action {
                crate::config::SelfFenceAction::Destroy => lv.destroy(&d.uuid).await,
                crate::config::SelfFenceAction::Pause => lv.suspend(&d.uuid).await,
            };
            match r {
                Ok(_) => say(&format!(
                    "self-fence: guest {} ({}) stopped: the daemon could not keep its lease",
                    d.name, d.uuid
                )),
                Err(e) => say(&format!(
                    "self-fence: guest {} ({}) NOT stopped: {e}",
                    d.name, d.uuid
                )),
            }
        }
        lv.close().await;
    });
}

/// Remove every address this host holds as the primary and stop the daemon's dnsmasq.
fn release(cfg: &Config) {
    for (vni, pid) in crate::dnsmasq::stop_all_in(&cfg.paths.run_dir, Duration::from_secs(1)) {
        say(&format!("stopped dnsmasq of network {vni} (pid {pid})"));
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return say(&format!("cannot start a runtime: {e}")),
    };
    rt.block_on(async {
        let host = match Netlink::current() {
            Ok(h) => h,
            Err(e) => return say(&format!("netlink: {e}")),
        };
        let observed = match host.observe().await {
            Ok(o) => o,
            Err(e) => return say(&format!("cannot list addresses: {e}")),
        };
        for link in observed.links.values() {
            for a in link.addresses.iter().filter(|a| a.owner.primary_only()) {
                match host.remove_address(&link.name, a.cidr).await {
                    Ok(_) => say(&format!("removed {} from {}", a.cidr, link.name)),
                    Err(e) => say(&format!("cannot remove {} from {}: {e}", a.cidr, link.name)),
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guardian_acts_at_the_earlier_of_its_deadlines() {
        let at = Instant::now();
        let b = |primary, fence| Beat {
            primary,
            lasts: Duration::from_secs(2),
            fence,
            guests_last: Duration::from_secs(3),
            lease: 1,
        };
        assert_eq!(next_deadline(&b(false, false), at), None);
        assert_eq!(
            next_deadline(&b(true, false), at),
            Some(at + Duration::from_secs(2))
        );
        assert_eq!(
            next_deadline(&b(false, true), at),
            Some(at + Duration::from_secs(3))
        );
        assert_eq!(
            next_deadline(&b(true, true), at),
            Some(at + Duration::from_secs(2))
        );
    }

    #[test]
    fn beats_round_trip_and_garbage_is_an_error() {
        for b in [
            Beat {
                primary: true,
                lasts: Duration::from_millis(2400),
                fence: true,
                guests_last: Duration::from_millis(2600),
                lease: 0x5963a24a72eb1c09,
            },
            Beat {
                primary: false,
                lasts: Duration::ZERO,
                fence: false,
                guests_last: Duration::ZERO,
                lease: 0,
            },
        ] {
            assert_eq!(Beat::parse(b.line().trim()), Ok(Some(b)));
        }
        assert_eq!(Beat::parse("bye"), Ok(None));
        for bad in [
            "",
            "beat",
            "beat 2 5 0 0 1",
            "beat 1 x 0 0 1",
            "beat 1 5 6",
            "beat 1 5 1 5 x",
            "hello",
        ] {
            assert!(Beat::parse(bad).is_err(), "{bad:?}");
        }
    }
}
