//! Round-trip times to the peers' cluster addresses, measured with ICMP echo on the
//! keepalive interval in a task of their own (never on the keepalive's path), a few peers
//! per tick round robin (`node_status.rtt_peers_per_tick`, so the cost does not grow with
//! the cluster), and reported in the node's health for the primary's status verdict.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use debvisor_objects::node::{NodeKind, PeerRtt};
use debvisor_objects::Reactor;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The latest round-trip times, one per peer.
pub type PeersRx = watch::Receiver<Vec<PeerRtt>>;

/// The peers to measure: alive nodes other than `me` that publish a cluster address.
fn peers(nodes: &Reactor<NodeKind>, me: &str) -> Vec<(String, Ipv4Addr)> {
    nodes
        .list()
        .into_iter()
        .filter(|(name, _)| name != me)
        .filter_map(|(name, e)| {
            let n = e.parsed.as_ref().ok()?;
            let addr = n.info.as_ref()?.cluster_address.as_deref()?;
            let ip = addr.split('/').next()?.parse().ok()?;
            n.alive.then_some((name, ip))
        })
        .collect()
}

/// Measure `per_tick` peers every `interval` (each waiting at most `timeout`), until
/// `cancel`.
pub fn spawn(
    me: String,
    nodes: Arc<Reactor<NodeKind>>,
    interval: Duration,
    per_tick: usize,
    timeout: Duration,
    cancel: CancellationToken,
) -> PeersRx {
    let (tx, rx) = watch::channel(Vec::new());
    if per_tick == 0 {
        return rx;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: BTreeMap<String, Option<f64>> = BTreeMap::new();
        let (mut offset, mut seq) = (0usize, 0u16);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let all = peers(&nodes, &me);
            last.retain(|n, _| all.iter().any(|(p, _)| p == n));
            if all.is_empty() {
                tx.send_replace(Vec::new());
                continue;
            }
            let take = per_tick.min(all.len());
            let mut probes = Vec::with_capacity(take);
            for i in 0..take {
                let (name, ip) = all[(offset + i) % all.len()].clone();
                seq = seq.wrapping_add(1);
                let s = seq;
                probes.push(tokio::task::spawn_blocking(move || {
                    let rtt = crate::hostinfo::ping(ip, s, timeout).ok();
                    (name, rtt.map(|d| d.as_secs_f64() * 1000.0))
                }));
            }
            offset = (offset + take) % all.len();
            for p in probes {
                if let Ok((name, rtt)) = p.await {
                    last.insert(name, rtt);
                }
            }
            tx.send_replace(
                last.iter()
                    .map(|(node, rtt_ms)| PeerRtt {
                        node: node.clone(),
                        rtt_ms: *rtt_ms,
                    })
                    .collect(),
            );
        }
    });
    rx
}
