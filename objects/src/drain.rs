//! `nodes/<node>/drain`: what a node's drain pass reports about a flush or unflush in
//! progress, so the operator (`debvisorctl node flush --wait`, `node show`) sees why a drain
//! waits instead of reading the node's log.

use serde::{Deserialize, Serialize};

/// One VM a drain is waiting for, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainWait {
    /// The VM's UUID.
    pub uuid: String,
    /// Its domain name.
    pub name: String,
    /// Why it has not moved yet (`migrating to hv2`, `no eligible node: …`).
    pub reason: String,
}

/// The value of `nodes/<node>/drain`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// The `domain_state` the pass acted on (`flush`, `unflush`) or reached (`flushed`,
    /// `ready`).
    pub state: String,
    /// RFC 3339 time this drain began (the first pass that saw `state`).
    pub since: String,
    /// VMs still to move (or to come back).
    pub remaining: u32,
    /// At most [`DrainReport::MAX_WAITING`] of them, with the reason each one waits.
    #[serde(default)]
    pub waiting: Vec<DrainWait>,
}

impl DrainReport {
    /// Most VMs listed in `waiting` (the value stays small on a node with many VMs).
    pub const MAX_WAITING: usize = 20;

    /// Parse a stored value.
    pub fn parse(v: &[u8]) -> Result<DrainReport, String> {
        serde_json::from_slice(v).map_err(|e| format!("invalid drain report: {e}"))
    }

    /// One line for an operator: `flush: 2 VM(s) left; web: no eligible node (…)`.
    pub fn summary(&self) -> String {
        let mut s = format!("{}: {} VM(s) left", self.state, self.remaining);
        for w in &self.waiting {
            s.push_str(&format!("; {}: {}", w.name, w.reason));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_summary() {
        let r = DrainReport {
            state: "flush".into(),
            since: "2026-11-23T10:00:00Z".into(),
            remaining: 1,
            waiting: vec![DrainWait {
                uuid: "u".into(),
                name: "web".into(),
                reason: "no eligible node".into(),
            }],
        };
        let v = serde_json::to_vec(&r).unwrap_or_default();
        assert_eq!(DrainReport::parse(&v), Ok(r.clone()));
        assert_eq!(r.summary(), "flush: 1 VM(s) left; web: no eligible node");
        assert!(DrainReport::parse(b"nope").is_err());
    }
}
