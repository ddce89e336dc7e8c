//! The evidence a node needs before it stops its own guests for `daemon_state = fenced`.
//!
//! `fenced` in etcd is the primary's verdict, but etcd content alone is no evidence: a
//! forged or garbage-written value, or an old etcd snapshot brought back, would otherwise
//! destroy every running guest of the node. The primary's fence record names the lease it
//! saw expire; the node stops its guests only when that lease is one it held itself and is
//! not its current good lease, and the store was not found replaced. Otherwise its guests
//! keep running (nothing starts while `daemon_state` says fenced: the start guard stays
//! conservative) and the node says why, once per reason.
//!
//! Pure: [`judge`] decides from the facts the Domain host gathers.

use std::time::Instant;

use debvisor_objects::lease::LeaseState;
use debvisor_objects::node::FenceRecord;

/// Record states that say the primary fenced the node (its guests may run elsewhere now).
const FENCED_STATES: [&str; 3] = ["fenced", "recovering", "recovered"];

/// What `nodes/<node>/fence` looks like to this node.
#[derive(Debug, Clone, Copy)]
pub enum RecordSeen<'a> {
    /// No record.
    Missing,
    /// A record that did not parse (the parse error).
    Unparsed(&'a str),
    /// The parsed record.
    Parsed(&'a FenceRecord),
}

/// Everything the decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// This node's name (for the reasons).
    pub node: &'a str,
    /// `daemon_state` is `fenced` in the node cache.
    pub fenced: bool,
    /// This node's fence record.
    pub record: RecordSeen<'a>,
    /// The lease this node holds now.
    pub current_lease: i64,
    /// Whether that lease is good by the node's own clock ([`lease_good`]).
    pub current_good: bool,
    /// The leases this node registered with lately (or why the history is unreadable).
    pub history: Result<&'a [i64], &'a str>,
    /// The witness found the store replaced (its reason), not yet confirmed by an operator.
    pub store_replaced: Option<&'a str>,
}

/// What to do with this node's guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `daemon_state` is not `fenced`: nothing to do.
    NotFenced,
    /// Fenced on evidence: stop the guests (the record names `lease`, one this node held).
    Stop {
        /// The lease the record names.
        lease: i64,
    },
    /// `daemon_state` says fenced but the evidence is missing: keep the guests, say why.
    Hold {
        /// What was missing, for the log line.
        reason: String,
    },
}

/// Is the lease `current` good by this node's own clock at `now`: the keeper's state is
/// about it and its `valid_until` (the bound before which the server cannot expire it) lies
/// ahead? Without a lease watch (`None`: a standalone node, tools) it cannot tell and says
/// good, as it does while the keeper's state is about another lease (a re-registration in
/// progress): a fence record naming the current lease is then no evidence.
pub fn lease_good(state: Option<&LeaseState>, current: i64, now: Instant) -> bool {
    match state {
        None => true,
        Some(s) if s.id() != current => true,
        Some(s) => s.valid_until().is_some_and(|until| now < until),
    }
}

/// Decide whether this node's guests must stop for `daemon_state = fenced`.
pub fn judge(f: &Facts<'_>) -> Verdict {
    if !f.fenced {
        return Verdict::NotFenced;
    }
    let hold = |reason: String| Verdict::Hold { reason };
    let key = format!("nodes/{}/fence", f.node);
    if let Some(why) = f.store_replaced {
        return hold(format!(
            "daemon_state is fenced but the store was found replaced ({why}); confirm it with `debvisorctl node confirm-removals {}`",
            f.node
        ));
    }
    let record = match f.record {
        RecordSeen::Missing => {
            return hold(format!("daemon_state is fenced but {key} is missing"));
        }
        RecordSeen::Unparsed(e) => {
            return hold(format!(
                "daemon_state is fenced but {key} does not parse: {e}"
            ));
        }
        RecordSeen::Parsed(r) => r,
    };
    if !FENCED_STATES.contains(&record.state.as_str()) {
        return hold(format!(
            "daemon_state is fenced but {key} has state {:?}, not fenced, recovering or recovered",
            record.state
        ));
    }
    let Some(named) = record.lease.as_deref() else {
        return hold(format!(
            "daemon_state is fenced but {key} names no lease (written by an older primary?)"
        ));
    };
    let Some(lease) = parse_lease(named) else {
        return hold(format!(
            "daemon_state is fenced but {key}.lease {named:?} is not a lease id (lowercase hex)"
        ));
    };
    let history = match f.history {
        Ok(h) => h,
        Err(e) => {
            return hold(format!(
                "the fence record names lease {lease:x} but this node's lease history is unreadable: {e}"
            ));
        }
    };
    if !history.contains(&lease) {
        return hold(format!(
            "the fence record names lease {lease:x} which this node never held (not in its lease history)"
        ));
    }
    if lease == f.current_lease && f.current_good {
        return hold(format!(
            "the fence record names lease {lease:x} which this node still holds with a good lease"
        ));
    }
    Verdict::Stop { lease }
}

/// A lease id as fence records and the lease history write it: lowercase hex, positive.
pub fn parse_lease(s: &str) -> Option<i64> {
    let ok =
        !s.is_empty() && s.len() <= 16 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    i64::from_str_radix(s, 16).ok().filter(|id| ok && *id > 0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn record(state: &str, lease: Option<&str>) -> FenceRecord {
        FenceRecord {
            state: state.into(),
            by: Some("ipmi".into()),
            reason: None,
            since: "2026-01-01T00:00:00Z".into(),
            primary: "p".into(),
            lease: lease.map(str::to_string),
        }
    }

    /// What a row expects.
    #[derive(Debug, Clone, Copy)]
    enum Want {
        /// Stop for this lease.
        Stop(i64),
        /// Hold with a reason containing this text.
        Hold(&'static str),
    }

    #[test]
    fn guests_stop_only_on_evidence() {
        let history: &[i64] = &[0xa1, 0xb2];
        let fenced = record("fenced", Some("a1"));
        let recovered = record("recovered", Some("a1"));
        let recovering = record("recovering", Some("a1"));
        let dead = record("dead", Some("a1"));
        let no_lease = record("fenced", None);
        let upper = record("fenced", Some("A1"));
        let garbage = record("fenced", Some("0xa1"));
        let negative = record("fenced", Some("-a1"));
        let foreign = record("fenced", Some("c3"));
        let current = record("fenced", Some("b2"));
        let base = Facts {
            node: "n1",
            fenced: true,
            record: RecordSeen::Parsed(&fenced),
            current_lease: 0xb2,
            current_good: true,
            history: Ok(history),
            store_replaced: None,
        };
        let table: Vec<(&str, Facts<'_>, Want)> = vec![
            ("an old lease of ours", base, Want::Stop(0xa1)),
            (
                "recovered",
                Facts {
                    record: RecordSeen::Parsed(&recovered),
                    ..base
                },
                Want::Stop(0xa1),
            ),
            (
                "recovering",
                Facts {
                    record: RecordSeen::Parsed(&recovering),
                    ..base
                },
                Want::Stop(0xa1),
            ),
            (
                "our current lease, gone bad",
                Facts {
                    record: RecordSeen::Parsed(&current),
                    current_good: false,
                    ..base
                },
                Want::Stop(0xb2),
            ),
            (
                "no record",
                Facts {
                    record: RecordSeen::Missing,
                    ..base
                },
                Want::Hold("daemon_state is fenced but nodes/n1/fence is missing"),
            ),
            (
                "garbage record",
                Facts {
                    record: RecordSeen::Unparsed("invalid JSON"),
                    ..base
                },
                Want::Hold("nodes/n1/fence does not parse: invalid JSON"),
            ),
            (
                "only declared dead",
                Facts {
                    record: RecordSeen::Parsed(&dead),
                    ..base
                },
                Want::Hold("has state \"dead\""),
            ),
            (
                "no lease named",
                Facts {
                    record: RecordSeen::Parsed(&no_lease),
                    ..base
                },
                Want::Hold("names no lease"),
            ),
            (
                "upper-case lease",
                Facts {
                    record: RecordSeen::Parsed(&upper),
                    ..base
                },
                Want::Hold("\"A1\" is not a lease id"),
            ),
            (
                "0x lease",
                Facts {
                    record: RecordSeen::Parsed(&garbage),
                    ..base
                },
                Want::Hold("is not a lease id"),
            ),
            (
                "negative lease",
                Facts {
                    record: RecordSeen::Parsed(&negative),
                    ..base
                },
                Want::Hold("is not a lease id"),
            ),
            (
                "a lease this node never held",
                Facts {
                    record: RecordSeen::Parsed(&foreign),
                    ..base
                },
                Want::Hold("names lease c3 which this node never held"),
            ),
            (
                "our current good lease",
                Facts {
                    record: RecordSeen::Parsed(&current),
                    ..base
                },
                Want::Hold("names lease b2 which this node still holds with a good lease"),
            ),
            (
                "empty history",
                Facts {
                    history: Ok(&[]),
                    ..base
                },
                Want::Hold("never held"),
            ),
            (
                "unreadable history",
                Facts {
                    history: Err("line 1: garbage"),
                    ..base
                },
                Want::Hold("lease history is unreadable: line 1: garbage"),
            ),
            (
                "store replaced",
                Facts {
                    store_replaced: Some("cluster id changed"),
                    ..base
                },
                Want::Hold("the store was found replaced (cluster id changed)"),
            ),
        ];
        for (name, facts, want) in table {
            let got = judge(&facts);
            match (want, &got) {
                (Want::Stop(want), Verdict::Stop { lease }) => assert_eq!(*lease, want, "{name}"),
                (Want::Hold(text), Verdict::Hold { reason }) => {
                    assert!(reason.contains(text), "{name}: {reason:?} lacks {text:?}")
                }
                _ => panic!("{name}: got {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn not_fenced_is_nothing_to_do_whatever_the_record_says() {
        let r = record("fenced", Some("a1"));
        let f = Facts {
            node: "n1",
            fenced: false,
            record: RecordSeen::Parsed(&r),
            current_lease: 0xb2,
            current_good: false,
            history: Ok(&[0xa1]),
            store_replaced: None,
        };
        assert_eq!(judge(&f), Verdict::NotFenced);
    }

    #[test]
    fn the_current_lease_is_good_until_its_valid_until_by_our_clock() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let alive = LeaseState::Alive {
            id: 7,
            ttl: 5,
            valid_until: later,
        };
        let unreachable = LeaseState::Unreachable {
            id: 7,
            valid_until: later,
        };
        let lost = LeaseState::Lost { id: 7 };
        let table = [
            (None, now, true),
            (Some(&alive), now, true),
            (Some(&alive), later, false),
            (Some(&alive), later + Duration::from_secs(1), false),
            (Some(&unreachable), now, true),
            (Some(&unreachable), later, false),
            (Some(&lost), now, false),
        ];
        for (i, (state, at, want)) in table.into_iter().enumerate() {
            assert_eq!(lease_good(state, 7, at), want, "row {i}");
        }
        // The keeper still reports another lease: no verdict on the current one.
        assert!(lease_good(Some(&lost), 8, now));
    }
}
