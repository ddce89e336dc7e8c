//! Between the pure planner (`debvisor_objects::ceph_plan`) and the driver: what Ceph has
//! (observed pools and volumes, whether a volume is in use) and carrying out one planned step.
//! The reconcilers the lead wires into the reactor call these.

use std::collections::BTreeMap;

use debvisor_objects::ceph_plan::{
    ObservedPool, ObservedSnapshot, ObservedVolume, PoolStep, VolumeStep,
};

use super::{purge_and_remove, Ceph, CephError, ImageRef, PoolInfo};

/// The pools Ceph has, by name, as the planner sees them.
pub fn observed_pools(list: &[PoolInfo]) -> BTreeMap<String, ObservedPool> {
    list.iter()
        .map(|p| {
            let o = ObservedPool {
                size: p.size,
                pg_num: p.pg_num,
            };
            (p.pool_name.clone(), o)
        })
        .collect()
}

/// The volume as Ceph has it (`None`: no such image).
pub async fn observe_volume<C: Ceph>(
    ceph: &C,
    image: &ImageRef,
) -> Result<Option<ObservedVolume>, CephError> {
    Ok(ceph.rbd_image_state(image).await?.map(|st| ObservedVolume {
        size: st.size,
        snapshots: st
            .snapshots
            .into_iter()
            .map(|(name, protected)| (name, ObservedSnapshot { protected }))
            .collect(),
    }))
}

/// Whether any client has the image open (a running VM does; `rbd status` watchers).
pub async fn volume_in_use<C: Ceph>(ceph: &C, image: &ImageRef) -> Result<bool, CephError> {
    match ceph.rbd_watchers(image).await {
        Ok(w) => Ok(!w.is_empty()),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Carry out one pool step.
pub async fn apply_pool_step<C: Ceph>(
    ceph: &C,
    pool: &str,
    step: &PoolStep,
) -> Result<(), CephError> {
    match step {
        PoolStep::Create { pg_num, size } => ceph.pool_create(pool, *pg_num, *size).await,
        PoolStep::SetSize(size) => ceph.pool_set_size(pool, *size).await,
        PoolStep::Delete => ceph.pool_delete(pool).await,
    }?;
    tracing::info!(pool, step = ?step, "ceph pool step done");
    Ok(())
}

/// Carry out one volume step. Returns the rollback token done, for the snapshot's status.
pub async fn apply_volume_step<C: Ceph>(
    ceph: &C,
    image: &ImageRef,
    step: &VolumeStep,
) -> Result<Option<String>, CephError> {
    let mut token = None;
    match step {
        VolumeStep::Create { size } => ceph.rbd_create(image, *size).await?,
        VolumeStep::Clone {
            pool,
            image: src,
            snapshot,
            size,
        } => {
            let source = ImageRef::new(pool.clone(), src.clone());
            let snaps = ceph.rbd_snap_list(&source).await?;
            match snaps.iter().find(|s| &s.name == snapshot) {
                None => {
                    return Err(CephError::Missing {
                        object: format!("clone source snapshot {}@{snapshot}", source.spec()),
                    })
                }
                // Clones of format 1 need a protected parent; harmless for format 2.
                Some(s) if !s.protected => ceph.rbd_snap_protect(&source, snapshot).await?,
                Some(_) => {}
            }
            ceph.rbd_clone(&source, snapshot, image).await?;
            let info = ceph.rbd_info(image).await?;
            if *size > info.size {
                ceph.rbd_resize(image, *size, false).await?;
            }
        }
        VolumeStep::Resize { size, shrink } => ceph.rbd_resize(image, *size, *shrink).await?,
        VolumeStep::CreateSnapshot(snap) => ceph.rbd_snap_create(image, snap).await?,
        VolumeStep::Rollback { snapshot, token: t } => {
            ceph.rbd_snap_rollback(image, snapshot).await?;
            token = Some(t.clone());
        }
        VolumeStep::RemoveSnapshot {
            snapshot,
            protected,
        } => {
            if *protected {
                ceph.rbd_snap_unprotect(image, snapshot).await?;
            }
            ceph.rbd_snap_remove(image, snapshot).await?;
        }
        VolumeStep::PurgeAndRemove => purge_and_remove(ceph, image).await?,
    }
    tracing::info!(volume = %image, step = ?step, "ceph volume step done");
    Ok(token)
}
