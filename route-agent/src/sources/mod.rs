//! Where the agent learns the nodes. Every source publishes whole snapshots on a watch
//! channel, and only when the routing-relevant content changed: a heartbeat-only update of a
//! Node never wakes the reconcile loop.

pub mod etcd;
pub mod etcd_tls;
pub mod file;
pub mod kube;

use tokio::sync::watch;

use crate::model::Snapshot;
use crate::Metrics;

/// Publishes `snap` if it differs from the last one; counts the source event either way.
/// The first publish always wakes the agent, even with an empty snapshot: until then the
/// agent does not sync at all, so a restart never deletes routes before the source has
/// spoken.
pub fn publish(tx: &watch::Sender<Snapshot>, snap: Snapshot, metrics: &Metrics) {
    use std::sync::atomic::Ordering;
    metrics.source_events.fetch_add(1, Ordering::Relaxed);
    if !metrics.source_ready.swap(true, Ordering::SeqCst) {
        tx.send_replace(snap);
        return;
    }
    tx.send_if_modified(|cur| {
        if *cur == snap {
            false
        } else {
            *cur = snap;
            true
        }
    });
}
