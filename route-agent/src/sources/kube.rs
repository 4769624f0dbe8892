//! The `kubernetes` source: Node objects from the API server (to be implemented).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::error::AgentError;
use crate::model::Snapshot;
use crate::Metrics;

/// Settings of the `kubernetes` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// A kubeconfig file; `None`: in-cluster config, else $KUBECONFIG / ~/.kube/config.
    pub kubeconfig: Option<PathBuf>,
}

/// Publishes the cluster's nodes now and on every routing-relevant change.
pub async fn run(
    _opts: KubeOptions,
    _tx: watch::Sender<Snapshot>,
    _metrics: Arc<Metrics>,
) -> Result<(), AgentError> {
    Err(AgentError::Source("the kubernetes source is not implemented yet".into()))
}
