//! Where the agent learns the nodes. Every source publishes whole snapshots on a watch
//! channel, and only when the routing-relevant content changed: a heartbeat-only update of a
//! Node never wakes the reconcile loop.

pub mod etcd;
pub mod etcd_tls;
pub mod file;
pub mod kube;
pub mod kube_policy;
pub mod path_watch;

use tokio::sync::watch;

use crate::error::AgentError;
use crate::model::Snapshot;
use crate::Metrics;

/// Publishes `snap` if it differs from the last one; counts the source event and marks the
/// source healthy either way. The first publish always wakes the agent, even with an empty
/// snapshot: until then the channel holds `None` and the agent does not sync at all.
pub fn publish(tx: &watch::Sender<Option<Snapshot>>, snap: Snapshot, metrics: &Metrics) {
    metrics.source_events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics.source.good();
    tx.send_if_modified(|cur| {
        if cur.as_ref() == Some(&snap) {
            false
        } else {
            *cur = Some(snap);
            true
        }
    });
}

/// Counts a source failure; the agent keeps working from the last good snapshot.
pub fn failed(metrics: &Metrics, error: &AgentError) {
    let kind = match error {
        AgentError::Source { kind, .. } => kind,
        AgentError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => "missing",
        AgentError::Io { .. } => "read",
        AgentError::Config(_) => "config",
        AgentError::Netlink { .. }
        | AgentError::Route(_)
        | AgentError::Masq(_)
        | AgentError::Policy(_)
        | AgentError::Overrun(_) => "other",
    };
    metrics.source.error(kind);
}
