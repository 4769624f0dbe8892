//! Where the agent learns the nodes. Every source publishes whole snapshots on a watch
//! channel, and only when the routing-relevant content changed: a heartbeat-only update of a
//! Node never wakes the reconcile loop.

pub mod etcd;
pub mod file;
pub mod kube;

use tokio::sync::watch;

use crate::model::Snapshot;
use crate::Metrics;

/// Publishes `snap` if it differs from the last one; counts the source event either way.
pub fn publish(tx: &watch::Sender<Snapshot>, snap: Snapshot, metrics: &Metrics) {
    metrics.source_events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tx.send_if_modified(|cur| {
        if *cur == snap {
            false
        } else {
            *cur = snap;
            true
        }
    });
}
