//! The Ceph planner (pure): one pool or one volume (with its snapshots), desired vs observed,
//! to the driver steps that make Ceph match, and the status to report per object.
//!
//! Rules: nothing is deleted unless its spec says `delete: true` (a pool also not while
//! `protected`); an invalid spec yields an error status and no step for that object only (a
//! bad snapshot spec does not stop its volume's other steps); shrinking needs
//! `allow_shrink`; a rollback of a volume in use is refused; snapshots Ceph has that nobody
//! declared are left alone.

use std::collections::BTreeMap;

use crate::ceph::{CephState, CloneSource, Pool, SnapshotSpec, Template, Volume};
use crate::reactor::ObjectError;

/// What the primary reports for one object after planning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Already as desired.
    Ready,
    /// The steps, once applied, make it so.
    Pending,
    /// Gone as asked.
    Deleted,
    /// Cannot be applied; nothing was planned for it.
    Error(ObjectError),
}

impl Verdict {
    /// The state for the status key.
    pub fn state(&self) -> CephState {
        match self {
            Verdict::Ready => CephState::Ready,
            Verdict::Pending => CephState::Pending,
            Verdict::Deleted => CephState::Deleted,
            Verdict::Error(_) => CephState::Error,
        }
    }
}

/// A pool as Ceph has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPool {
    /// Replica count.
    pub size: u32,
    /// Placement groups.
    pub pg_num: u32,
}

/// A step on a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolStep {
    /// Create it (replicated, application rbd).
    Create {
        /// Placement groups.
        pg_num: u32,
        /// Replicas.
        size: u32,
    },
    /// Change the replica count.
    SetSize(u32),
    /// Delete it with its data.
    Delete,
}

/// The plan for one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPlan {
    /// Steps in order.
    pub steps: Vec<PoolStep>,
    /// Status to report.
    pub verdict: Verdict,
}

/// Plan one pool. `pg_num` of an existing pool is Ceph's business (the autoscaler may change
/// it), so only the replica count is reconciled after creation.
pub fn plan_pool(parsed: &Result<Pool, ObjectError>, observed: Option<&ObservedPool>) -> PoolPlan {
    let plan = |steps: Vec<PoolStep>, verdict| PoolPlan { steps, verdict };
    let pool = match parsed {
        Ok(p) => p,
        Err(e) => return plan(vec![], Verdict::Error(e.clone())),
    };
    let spec = &pool.spec;
    if spec.delete {
        if spec.protected {
            return plan(
                vec![],
                Verdict::Error(ObjectError::new(
                    "spec.delete",
                    "the pool is protected (clear spec.protected first)",
                )),
            );
        }
        return match observed {
            Some(_) => plan(vec![PoolStep::Delete], Verdict::Pending),
            None => plan(vec![], Verdict::Deleted),
        };
    }
    match observed {
        None => plan(
            vec![PoolStep::Create {
                pg_num: spec.pg_num,
                size: spec.size,
            }],
            Verdict::Pending,
        ),
        Some(o) if o.size != spec.size => {
            plan(vec![PoolStep::SetSize(spec.size)], Verdict::Pending)
        }
        Some(_) => plan(vec![], Verdict::Ready),
    }
}

/// A snapshot as Ceph has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedSnapshot {
    /// Protected (a clone source).
    pub protected: bool,
}

/// A volume as Ceph has it, with what the planner needs to know around it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedVolume {
    /// Size in bytes.
    pub size: u64,
    /// Snapshots by name.
    pub snapshots: BTreeMap<String, ObservedSnapshot>,
}

/// Facts around a volume that are not in Ceph's view of it.
#[derive(Debug, Clone, Default)]
pub struct VolumeContext<'a> {
    /// Templates by name (parsed or why not), for `clone_from.template`.
    pub templates: Option<&'a BTreeMap<String, Result<Template, ObjectError>>>,
    /// A running VM uses the volume (watchers, or a running domain with this disk).
    pub in_use: bool,
    /// Last rollback token done per snapshot (from the snapshot status keys).
    pub rolled_back: Option<&'a BTreeMap<String, String>>,
}

/// A step on a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeStep {
    /// Create an empty image.
    Create {
        /// Bytes.
        size: u64,
    },
    /// Clone `pool/image@snapshot` (protecting the snapshot first if needed), then grow to
    /// `size` if the clone is smaller.
    Clone {
        /// Source pool.
        pool: String,
        /// Source image.
        image: String,
        /// Source snapshot.
        snapshot: String,
        /// Bytes.
        size: u64,
    },
    /// Resize (grow, or shrink when allowed).
    Resize {
        /// New size in bytes.
        size: u64,
        /// Shrinking (needs `--allow-shrink`).
        shrink: bool,
    },
    /// Create a snapshot.
    CreateSnapshot(String),
    /// Roll back to a snapshot, then record `token` as done.
    Rollback {
        /// Snapshot.
        snapshot: String,
        /// The request token.
        token: String,
    },
    /// Remove a snapshot (unprotecting it first when `protected`).
    RemoveSnapshot {
        /// Snapshot.
        snapshot: String,
        /// Currently protected.
        protected: bool,
    },
    /// Unprotect and purge every snapshot, then remove the image.
    PurgeAndRemove,
}

/// The plan for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlan {
    /// Steps in order.
    pub steps: Vec<VolumeStep>,
    /// The volume's status.
    pub verdict: Verdict,
    /// Each declared snapshot's status.
    pub snapshots: BTreeMap<String, Verdict>,
}

fn resolve_source(
    source: &CloneSource,
    ctx: &VolumeContext<'_>,
) -> Result<(String, String, String), ObjectError> {
    match source {
        CloneSource::Snapshot {
            pool,
            image,
            snapshot,
        } => Ok((pool.clone(), image.clone(), snapshot.clone())),
        CloneSource::Template(name) => {
            let field = "spec.clone_from.template";
            match ctx.templates.and_then(|t| t.get(name)) {
                None => Err(ObjectError::new(field, format!("no template {name:?}"))),
                Some(Err(e)) => Err(ObjectError::new(
                    field,
                    format!("template {name:?} is invalid: {e}"),
                )),
                Some(Ok(t)) => Ok((t.pool.clone(), t.image.clone(), t.snapshot.clone())),
            }
        }
    }
}

/// Plan one volume and its declared snapshots.
///
/// Order: create/clone, then snapshot creations, a rollback, snapshot removals, and a resize
/// last (a rollback may change the size; the next plan corrects it).
pub fn plan_volume(
    parsed: &Result<Volume, ObjectError>,
    observed: Option<&ObservedVolume>,
    ctx: &VolumeContext<'_>,
) -> VolumePlan {
    let vol = match parsed {
        Ok(v) => v,
        Err(e) => {
            return VolumePlan {
                steps: vec![],
                verdict: Verdict::Error(e.clone()),
                snapshots: BTreeMap::new(),
            }
        }
    };
    let mut steps = Vec::new();
    let mut snapshots = BTreeMap::new();
    let spec = &vol.spec;

    if spec.delete {
        let verdict = match observed {
            None => Verdict::Deleted,
            Some(_) if ctx.in_use => Verdict::Error(ObjectError::new(
                "spec.delete",
                "the volume is in use by a running VM",
            )),
            Some(_) => {
                steps.push(VolumeStep::PurgeAndRemove);
                Verdict::Pending
            }
        };
        for name in vol.snapshots.keys() {
            let v = match &verdict {
                Verdict::Error(_) => Verdict::Error(ObjectError::new(
                    format!("snapshots/{name}"),
                    "its volume cannot be removed",
                )),
                _ if observed.is_some_and(|o| o.snapshots.contains_key(name)) => Verdict::Pending,
                _ => Verdict::Deleted,
            };
            snapshots.insert(name.clone(), v);
        }
        return VolumePlan {
            steps,
            verdict,
            snapshots,
        };
    }

    // The image itself.
    let mut verdict = Verdict::Ready;
    let mut resize = None;
    let exists = match observed {
        None => {
            match spec.clone_from.as_ref().map(|s| resolve_source(s, ctx)) {
                None => {
                    steps.push(VolumeStep::Create { size: spec.size });
                    verdict = Verdict::Pending;
                }
                Some(Ok((pool, image, snapshot))) => {
                    steps.push(VolumeStep::Clone {
                        pool,
                        image,
                        snapshot,
                        size: spec.size,
                    });
                    verdict = Verdict::Pending;
                }
                Some(Err(e)) => verdict = Verdict::Error(e),
            }
            matches!(verdict, Verdict::Pending)
        }
        Some(o) => {
            if spec.size > o.size {
                resize = Some(VolumeStep::Resize {
                    size: spec.size,
                    shrink: false,
                });
            } else if spec.size < o.size {
                if spec.allow_shrink {
                    resize = Some(VolumeStep::Resize {
                        size: spec.size,
                        shrink: true,
                    });
                } else {
                    verdict = Verdict::Error(ObjectError::new(
                        "spec.size",
                        format!(
                            "{} bytes is below the current {} bytes; shrinking needs spec.allow_shrink",
                            spec.size, o.size
                        ),
                    ));
                }
            }
            if resize.is_some() {
                verdict = Verdict::Pending;
            }
            true
        }
    };

    // Snapshots: only once the image exists or is being made.
    let have = |name: &str| observed.and_then(|o| o.snapshots.get(name));
    let mut creates = Vec::new();
    let mut rollback: Option<VolumeStep> = None;
    let mut removes = Vec::new();
    for (name, parsed) in &vol.snapshots {
        let field = format!("snapshots/{name}/spec");
        let v = match parsed {
            Err(e) => Verdict::Error(e.clone()),
            Ok(_) if !exists => Verdict::Error(ObjectError::new(
                format!("snapshots/{name}"),
                "the volume does not exist",
            )),
            Ok(SnapshotSpec { delete: true, .. }) => match have(name) {
                Some(s) => {
                    removes.push(VolumeStep::RemoveSnapshot {
                        snapshot: name.clone(),
                        protected: s.protected,
                    });
                    Verdict::Pending
                }
                None => Verdict::Deleted,
            },
            Ok(SnapshotSpec {
                rollback: token, ..
            }) => {
                let done = ctx.rolled_back.and_then(|r| r.get(name));
                let wanted = token.as_ref().filter(|t| Some(*t) != done);
                match (have(name), wanted) {
                    (None, _) => {
                        // A rollback to a snapshot taken now would restore what is there.
                        creates.push(VolumeStep::CreateSnapshot(name.clone()));
                        Verdict::Pending
                    }
                    (Some(_), None) => Verdict::Ready,
                    (Some(_), Some(_)) if ctx.in_use => Verdict::Error(ObjectError::new(
                        format!("{field}.rollback"),
                        "the volume is in use by a running VM",
                    )),
                    (Some(_), Some(_)) if rollback.is_some() => Verdict::Error(ObjectError::new(
                        format!("{field}.rollback"),
                        "another rollback of this volume is pending",
                    )),
                    (Some(_), Some(t)) => {
                        rollback = Some(VolumeStep::Rollback {
                            snapshot: name.clone(),
                            token: t.clone(),
                        });
                        Verdict::Pending
                    }
                }
            }
        };
        snapshots.insert(name.clone(), v);
    }
    steps.extend(creates);
    steps.extend(rollback);
    steps.extend(removes);
    steps.extend(resize);
    VolumePlan {
        steps,
        verdict,
        snapshots,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ceph::{parse_pool, parse_template, parse_volume};
    use crate::reactor::KeyEntry;

    const G: u64 = 1 << 30;

    fn pool(spec: &str) -> Result<Pool, ObjectError> {
        parse_pool("rbd", &KeyEntry::object(&[("spec", spec)]))
    }

    fn volume(pairs: &[(&str, &str)]) -> Result<Volume, ObjectError> {
        parse_volume("rbd:vm1", &KeyEntry::object(pairs))
    }

    fn observed(size: u64, snaps: &[(&str, bool)]) -> ObservedVolume {
        ObservedVolume {
            size,
            snapshots: snaps
                .iter()
                .map(|(n, p)| (n.to_string(), ObservedSnapshot { protected: *p }))
                .collect(),
        }
    }

    fn is_destructive(s: &VolumeStep) -> bool {
        matches!(
            s,
            VolumeStep::PurgeAndRemove
                | VolumeStep::RemoveSnapshot { .. }
                | VolumeStep::Rollback { .. }
                | VolumeStep::Resize { shrink: true, .. }
        )
    }

    fn field(v: &Verdict) -> &str {
        match v {
            Verdict::Error(e) => &e.field,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn pool_create_resize_ready() {
        let p = plan_pool(&pool(r#"{"pg_num":16,"size":2}"#), None);
        assert_eq!(
            p.steps,
            [PoolStep::Create {
                pg_num: 16,
                size: 2
            }]
        );
        assert_eq!(p.verdict, Verdict::Pending);
        let o = ObservedPool {
            size: 3,
            pg_num: 16,
        };
        let p = plan_pool(&pool(r#"{"pg_num":16,"size":2}"#), Some(&o));
        assert_eq!(p.steps, [PoolStep::SetSize(2)]);
        let o = ObservedPool {
            size: 2,
            pg_num: 128,
        };
        let p = plan_pool(&pool(r#"{"pg_num":16,"size":2}"#), Some(&o));
        assert_eq!(
            (p.steps.len(), p.verdict),
            (0, Verdict::Ready),
            "pg_num left to Ceph"
        );
    }

    #[test]
    fn pool_delete_only_when_asked_and_unprotected() {
        let o = ObservedPool { size: 1, pg_num: 8 };
        let p = plan_pool(&pool(r#"{"delete":true}"#), Some(&o));
        assert_eq!(p.steps, [PoolStep::Delete]);
        let p = plan_pool(&pool(r#"{"delete":true}"#), None);
        assert_eq!((p.steps.len(), p.verdict), (0, Verdict::Deleted));
        let p = plan_pool(&pool(r#"{"delete":true,"protected":true}"#), Some(&o));
        assert!(p.steps.is_empty());
        assert_eq!(field(&p.verdict), "spec.delete");
    }

    #[test]
    fn bad_pool_input_deletes_nothing() {
        let o = ObservedPool { size: 1, pg_num: 8 };
        for bad in [
            r#"{"delete":"yes"}"#,
            r#"{"size":99,"delete":true}"#,
            "{",
            r#"{"x":1}"#,
        ] {
            let p = plan_pool(&pool(bad), Some(&o));
            assert!(p.steps.is_empty(), "{bad}: {:?}", p.steps);
            assert!(matches!(p.verdict, Verdict::Error(_)), "{bad}");
        }
    }

    #[test]
    fn volume_create_and_clone() {
        let ctx = VolumeContext::default();
        let p = plan_volume(&volume(&[("spec", r#"{"size":"10G"}"#)]), None, &ctx);
        assert_eq!(p.steps, [VolumeStep::Create { size: 10 * G }]);
        assert_eq!(p.verdict, Verdict::Pending);

        let templates = BTreeMap::from([
            (
                "deb12".to_string(),
                parse_template(
                    "deb12",
                    br#"{"backend":"rbd","pool":"tpl","image":"deb12","snapshot":"golden"}"#,
                ),
            ),
            ("broken".to_string(), parse_template("broken", b"{}")),
        ]);
        let ctx = VolumeContext {
            templates: Some(&templates),
            ..Default::default()
        };
        let v = volume(&[(
            "spec",
            r#"{"size":"20G","clone_from":{"template":"deb12"}}"#,
        )]);
        let p = plan_volume(&v, None, &ctx);
        assert_eq!(
            p.steps,
            [VolumeStep::Clone {
                pool: "tpl".into(),
                image: "deb12".into(),
                snapshot: "golden".into(),
                size: 20 * G
            }]
        );
        let v = volume(&[(
            "spec",
            r#"{"size":"1G","clone_from":{"pool":"p","image":"i","snapshot":"s"}}"#,
        )]);
        assert!(
            matches!(&plan_volume(&v, None, &ctx).steps[..], [VolumeStep::Clone { pool, .. }] if pool == "p")
        );
        for t in ["missing", "broken"] {
            let v = volume(&[(
                "spec",
                &format!(r#"{{"size":"1G","clone_from":{{"template":"{t}"}}}}"#),
            )]);
            let p = plan_volume(&v, None, &ctx);
            assert!(p.steps.is_empty(), "{t}");
            assert_eq!(field(&p.verdict), "spec.clone_from.template");
        }
        // clone_from is creation-only.
        let v = volume(&[(
            "spec",
            r#"{"size":"20G","clone_from":{"template":"deb12"}}"#,
        )]);
        let p = plan_volume(&v, Some(&observed(20 * G, &[])), &ctx);
        assert_eq!((p.steps.len(), p.verdict), (0, Verdict::Ready));
    }

    #[test]
    fn volume_grow_and_shrink_only_with_the_flag() {
        let ctx = VolumeContext::default();
        let p = plan_volume(
            &volume(&[("spec", r#"{"size":"20G"}"#)]),
            Some(&observed(10 * G, &[])),
            &ctx,
        );
        assert_eq!(
            p.steps,
            [VolumeStep::Resize {
                size: 20 * G,
                shrink: false
            }]
        );
        let p = plan_volume(
            &volume(&[("spec", r#"{"size":"5G"}"#)]),
            Some(&observed(10 * G, &[])),
            &ctx,
        );
        assert!(p.steps.is_empty());
        assert_eq!(field(&p.verdict), "spec.size");
        let p = plan_volume(
            &volume(&[("spec", r#"{"size":"5G","allow_shrink":true}"#)]),
            Some(&observed(10 * G, &[])),
            &ctx,
        );
        assert_eq!(
            p.steps,
            [VolumeStep::Resize {
                size: 5 * G,
                shrink: true
            }]
        );
    }

    #[test]
    fn volume_delete_purges_and_refuses_in_use() {
        let v = volume(&[("spec", r#"{"delete":true}"#), ("snapshots/s1/spec", "{}")]);
        let o = observed(G, &[("s1", true)]);
        let p = plan_volume(&v, Some(&o), &VolumeContext::default());
        assert_eq!(p.steps, [VolumeStep::PurgeAndRemove]);
        assert_eq!(p.snapshots["s1"], Verdict::Pending);
        let p = plan_volume(&v, None, &VolumeContext::default());
        assert_eq!((p.steps.len(), &p.verdict), (0, &Verdict::Deleted));
        assert_eq!(p.snapshots["s1"], Verdict::Deleted);
        let busy = VolumeContext {
            in_use: true,
            ..Default::default()
        };
        let p = plan_volume(&v, Some(&o), &busy);
        assert!(p.steps.is_empty());
        assert_eq!(field(&p.verdict), "spec.delete");
        assert_eq!(field(&p.snapshots["s1"]), "snapshots/s1");
    }

    #[test]
    fn snapshots_create_remove_and_leave_undeclared_alone() {
        let v = volume(&[
            ("spec", r#"{"size":"1G"}"#),
            ("snapshots/new/spec", "{}"),
            ("snapshots/old/spec", r#"{"delete":true}"#),
            ("snapshots/keep/spec", "{}"),
            ("snapshots/gone/spec", r#"{"delete":true}"#),
        ]);
        let o = observed(G, &[("old", true), ("keep", false), ("undeclared", false)]);
        let p = plan_volume(&v, Some(&o), &VolumeContext::default());
        assert_eq!(
            p.steps,
            [
                VolumeStep::CreateSnapshot("new".into()),
                VolumeStep::RemoveSnapshot {
                    snapshot: "old".into(),
                    protected: true
                },
            ]
        );
        assert_eq!(p.verdict, Verdict::Ready);
        assert_eq!(p.snapshots["keep"], Verdict::Ready);
        assert_eq!(p.snapshots["gone"], Verdict::Deleted);
        assert_eq!(p.snapshots["new"], Verdict::Pending);
        assert!(!p.snapshots.contains_key("undeclared"));
        // A volume being created gets its snapshots after it.
        let p = plan_volume(&v, None, &VolumeContext::default());
        assert_eq!(
            p.steps,
            [
                VolumeStep::Create { size: G },
                VolumeStep::CreateSnapshot("keep".into()),
                VolumeStep::CreateSnapshot("new".into())
            ]
        );
    }

    #[test]
    fn rollback_once_per_token_and_never_in_use() {
        let v = volume(&[
            ("spec", r#"{"size":"1G"}"#),
            ("snapshots/s1/spec", r#"{"rollback":"t2"}"#),
        ]);
        let o = observed(G, &[("s1", false)]);
        let p = plan_volume(&v, Some(&o), &VolumeContext::default());
        assert_eq!(
            p.steps,
            [VolumeStep::Rollback {
                snapshot: "s1".into(),
                token: "t2".into()
            }]
        );
        let done = BTreeMap::from([("s1".to_string(), "t1".to_string())]);
        let ctx = VolumeContext {
            rolled_back: Some(&done),
            ..Default::default()
        };
        assert_eq!(plan_volume(&v, Some(&o), &ctx).steps.len(), 1, "new token");
        let done = BTreeMap::from([("s1".to_string(), "t2".to_string())]);
        let ctx = VolumeContext {
            rolled_back: Some(&done),
            ..Default::default()
        };
        let p = plan_volume(&v, Some(&o), &ctx);
        assert_eq!(
            (p.steps.len(), &p.snapshots["s1"]),
            (0, &Verdict::Ready),
            "done once"
        );
        let busy = VolumeContext {
            in_use: true,
            ..Default::default()
        };
        let p = plan_volume(&v, Some(&o), &busy);
        assert!(p.steps.is_empty());
        assert_eq!(field(&p.snapshots["s1"]), "snapshots/s1/spec.rollback");
        assert_eq!(p.verdict, Verdict::Ready, "only the snapshot is in error");
        // Two rollbacks at once: the first (by name) wins, the other is refused.
        let v = volume(&[
            ("spec", r#"{"size":"1G"}"#),
            ("snapshots/a/spec", r#"{"rollback":"x"}"#),
            ("snapshots/b/spec", r#"{"rollback":"y"}"#),
        ]);
        let o = observed(G, &[("a", false), ("b", false)]);
        let p = plan_volume(&v, Some(&o), &VolumeContext::default());
        assert_eq!(
            p.steps,
            [VolumeStep::Rollback {
                snapshot: "a".into(),
                token: "x".into()
            }]
        );
        assert_eq!(field(&p.snapshots["b"]), "snapshots/b/spec.rollback");
    }

    #[test]
    fn step_order_creates_rollback_removes_resize() {
        let v = volume(&[
            ("spec", r#"{"size":"2G"}"#),
            ("snapshots/a/spec", r#"{"delete":true}"#),
            ("snapshots/b/spec", r#"{"rollback":"t"}"#),
            ("snapshots/c/spec", "{}"),
        ]);
        let o = observed(G, &[("a", false), ("b", false)]);
        let p = plan_volume(&v, Some(&o), &VolumeContext::default());
        assert_eq!(
            p.steps,
            [
                VolumeStep::CreateSnapshot("c".into()),
                VolumeStep::Rollback {
                    snapshot: "b".into(),
                    token: "t".into()
                },
                VolumeStep::RemoveSnapshot {
                    snapshot: "a".into(),
                    protected: false
                },
                VolumeStep::Resize {
                    size: 2 * G,
                    shrink: false
                },
            ]
        );
    }

    #[test]
    fn bad_input_deletes_nothing_and_touches_only_its_object() {
        let o = observed(10 * G, &[("s1", false), ("s2", false)]);
        let ctx = VolumeContext::default();
        // A broken volume spec: no step at all, whatever the snapshots say.
        for bad in [
            r#"{"size":"ten","delete":true}"#,
            r#"{"delete":"true"}"#,
            r#"{"size":"1G","purge":true}"#,
            "not json",
        ] {
            let v = volume(&[("spec", bad), ("snapshots/s1/spec", r#"{"delete":true}"#)]);
            let p = plan_volume(&v, Some(&o), &ctx);
            assert!(p.steps.is_empty(), "{bad}: {:?}", p.steps);
            assert!(matches!(p.verdict, Verdict::Error(_)));
        }
        // A broken snapshot spec: that snapshot in error, its siblings and volume go on.
        let v = volume(&[
            ("spec", r#"{"size":"10G"}"#),
            ("snapshots/s1/spec", r#"{"delete":"please"}"#),
            ("snapshots/s2/spec", r#"{"delete":true}"#),
        ]);
        let p = plan_volume(&v, Some(&o), &ctx);
        assert_eq!(
            p.steps,
            [VolumeStep::RemoveSnapshot {
                snapshot: "s2".into(),
                protected: false
            }]
        );
        assert_eq!(field(&p.snapshots["s1"]), "snapshots/s1/spec.delete");
        assert_eq!(p.verdict, Verdict::Ready);
        // A refused shrink never becomes a smaller image.
        let v = volume(&[("spec", r#"{"size":"1G"}"#)]);
        assert!(!plan_volume(&v, Some(&o), &ctx)
            .steps
            .iter()
            .any(is_destructive));
        // A snapshot of a volume that is missing (and cannot be cloned): error, no step.
        let v = volume(&[
            ("spec", r#"{"size":"1G","clone_from":{"template":"nope"}}"#),
            ("snapshots/s1/spec", "{}"),
        ]);
        let p = plan_volume(&v, None, &ctx);
        assert!(p.steps.is_empty());
        assert_eq!(field(&p.snapshots["s1"]), "snapshots/s1");
        // No key without a delete flag ever yields a destructive step except rollback/shrink
        // the spec asked for.
        let v = volume(&[("spec", r#"{"size":"10G"}"#), ("snapshots/s1/spec", "{}")]);
        assert!(plan_volume(&v, Some(&o), &ctx).steps.is_empty());
    }

    #[test]
    fn verdict_states() {
        assert_eq!(Verdict::Ready.state(), CephState::Ready);
        assert_eq!(Verdict::Pending.state(), CephState::Pending);
        assert_eq!(Verdict::Deleted.state(), CephState::Deleted);
        assert_eq!(
            Verdict::Error(ObjectError::new("f", "r")).state(),
            CephState::Error
        );
    }
}
