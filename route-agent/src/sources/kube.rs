//! The `kubernetes` source: Node objects from the API server, watched (list, then watch) into
//! a local cache. A node's pod CIDRs come from `spec.podCIDRs` (else `spec.podCIDR`), its
//! address per family from `status.addresses` (InternalIP, else ExternalIP).
//!
//! Needs RBAC `list` and `watch` on `nodes` (cluster-wide; the usual ClusterRole also grants `get`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config, ResourceExt};
use tokio::sync::watch;

use crate::error::AgentError;
use crate::model::{NodeInfo, Snapshot};
use crate::sources::publish;
use crate::Metrics;

/// Settings of the `kubernetes` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// A kubeconfig file; `None`: $KUBECONFIG / ~/.kube/config, else the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
}

pub(crate) async fn client(opts: &KubeOptions) -> Result<Client, AgentError> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| AgentError::Config(format!("kubeconfig {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| AgentError::Config(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => Config::infer().await.map_err(|e| AgentError::Config(format!("kubernetes client: {e}")))?,
    };
    Client::try_from(config).map_err(|e| AgentError::Config(format!("kubernetes client: {e}")))
}

/// Keeps only what routing reads: Node objects can be over 15 kB (images, managed fields), and
/// every agent caches every node.
fn trim(n: &mut Node) {
    n.managed_fields_mut().clear();
    n.annotations_mut().clear();
    n.spec = n.spec.take().map(|s| NodeSpec {
        pod_cidr: s.pod_cidr,
        pod_cidrs: s.pod_cidrs,
        ..Default::default()
    });
    n.status = n.status.take().map(|s| NodeStatus { addresses: s.addresses, ..Default::default() });
}

/// A Node's routing view; `None` for a Node without a name.
fn node_info(node: &Node) -> Option<NodeInfo> {
    let name = node.metadata.name.as_deref()?;
    let spec = node.spec.as_ref();
    let mut raw: Vec<&str> =
        spec.and_then(|s| s.pod_cidrs.as_ref()).into_iter().flatten().map(String::as_str).collect();
    if raw.is_empty() {
        raw.extend(spec.and_then(|s| s.pod_cidr.as_deref()));
    }
    let cidrs = raw
        .into_iter()
        .filter_map(|c| match c.parse::<IpNetwork>() {
            Ok(n) => IpNetwork::new(n.network(), n.prefix()).ok(),
            Err(e) => {
                tracing::warn!(node = name, cidr = c, %e, "ignoring an unparsable pod CIDR");
                None
            }
        })
        .collect();
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
    // InternalIPs first, so `with_addresses` takes an ExternalIP only for a family without one.
    let addrs: Vec<IpAddr> = ["InternalIP", "ExternalIP"]
        .iter()
        .flat_map(|kind| addresses.iter().filter(move |a| a.type_ == *kind))
        .filter_map(|a| match a.address.parse() {
            Ok(ip) => Some(ip),
            Err(e) => {
                tracing::warn!(node = name, address = %a.address, %e, "ignoring an unparsable node address");
                None
            }
        })
        .collect();
    Some(NodeInfo::with_addresses(name, cidrs, &addrs))
}

/// The label of `source_errors_total` for a watcher error.
fn error_kind(e: &watcher::Error) -> &'static str {
    match e {
        watcher::Error::InitialListFailed(_) => "list",
        // 410 Gone: the resourceVersion is too old; the watcher lists again.
        watcher::Error::WatchError(status) if status.code == 410 => "gone",
        watcher::Error::WatchError(_) => "watch_error",
        watcher::Error::WatchStartFailed(_) | watcher::Error::WatchFailed(_) => "watch",
        watcher::Error::NoResourceVersion => "watch_error",
    }
}

fn snapshot(store: &Store<Node>) -> Snapshot {
    store.state().iter().filter_map(|n| node_info(n)).map(|n| (n.name.clone(), n)).collect()
}

/// Publishes the cluster's nodes once the initial list is complete, then on every
/// routing-relevant change; runs until the channel closes.
pub async fn run(
    opts: KubeOptions,
    tx: watch::Sender<Option<Snapshot>>,
    metrics: Arc<Metrics>,
) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client(&opts).await?);
    let (store, writer) = reflector::store();
    let events =
        watcher::watcher(nodes, watcher::Config::default()).default_backoff().modify(trim).reflect(writer);
    let mut events = std::pin::pin!(events);
    let mut listed = false;
    loop {
        let ev = tokio::select! {
            _ = tx.closed() => return Ok(()),
            ev = events.next() => ev,
        };
        match ev {
            None => return Err(AgentError::source("watch", "the Node watch ended")),
            Some(Err(e)) => {
                metrics.source.error(error_kind(&e));
                tracing::warn!(%e, "Node watch failed; retrying with backoff");
            }
            // Before the first InitDone the store is empty or partial, and publishing it would
            // read as "nodes deleted" and take their routes away. A re-list fills a buffer that
            // replaces the store only at InitDone, so there is nothing new to publish either.
            // The API answers again, though: the source is healthy.
            Some(Ok(Event::Init | Event::InitApply(_))) => metrics.source.good(),
            // The watcher yields Apply and Delete only after the first InitDone.
            Some(Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_))) => {
                if !std::mem::replace(&mut listed, true) {
                    tracing::info!(nodes = store.len(), "listed the Nodes");
                }
                publish(&tx, snapshot(&store), &metrics);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pod_cidrs_win_over_pod_cidr_and_are_normalized() {
        let n = node(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"podCIDR": "10.9.9.0/24", "podCIDRs": ["10.244.1.7/24", "fd00:244:1::9/64"]},
        }));
        let i = node_info(&n).unwrap();
        let got: Vec<String> = i.pod_cidrs.iter().map(|c| c.to_string()).collect();
        assert_eq!(got, ["10.244.1.0/24", "fd00:244:1::/64"]);
        let n = node(serde_json::json!({"metadata": {"name": "b"}, "spec": {"podCIDR": "10.244.2.1/24"}}));
        assert_eq!(node_info(&n).unwrap().pod_cidrs[0].to_string(), "10.244.2.0/24");
    }

    #[test]
    fn internal_ip_preferred_per_family() {
        let n = node(serde_json::json!({
            "metadata": {"name": "a"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "a"},
                {"type": "ExternalIP", "address": "203.0.113.1"},
                {"type": "ExternalIP", "address": "2001:db8::1"},
                {"type": "InternalIP", "address": "10.200.0.1"},
                {"type": "InternalIP", "address": "not-an-ip"},
            ]},
        }));
        let i = node_info(&n).unwrap();
        assert_eq!(i.ipv4.unwrap().to_string(), "10.200.0.1");
        assert_eq!(i.ipv6.unwrap().to_string(), "2001:db8::1", "ExternalIP when no v6 InternalIP");
        let n = node(serde_json::json!({
            "metadata": {"name": "d"},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "fd00:200::4"},
                {"type": "InternalIP", "address": "10.200.0.4"},
            ]},
        }));
        let i = node_info(&n).unwrap();
        assert_eq!(
            (i.ipv4.unwrap().to_string(), i.ipv6.unwrap().to_string()),
            ("10.200.0.4".into(), "fd00:200::4".into())
        );
    }

    #[test]
    fn missing_fields() {
        assert!(node_info(&Node::default()).is_none(), "no name");
        let i = node_info(&node(serde_json::json!({"metadata": {"name": "bare"}}))).unwrap();
        assert_eq!(i, NodeInfo { name: "bare".into(), pod_cidrs: vec![], ipv4: None, ipv6: None });
        let n = node(
            serde_json::json!({"metadata": {"name": "x"}, "spec": {"podCIDRs": ["nope", "10.1.0.0/16"]}}),
        );
        assert_eq!(node_info(&n).unwrap().pod_cidrs.len(), 1, "unparsable CIDR skipped");
    }

    #[test]
    fn trim_keeps_what_routing_reads() {
        let mut n = node(serde_json::json!({
            "metadata": {"name": "a", "resourceVersion": "7", "managedFields": [{"manager": "kubelet"}],
                         "annotations": {"big": "x"}},
            "spec": {"podCIDRs": ["10.244.1.0/24"], "providerID": "p"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.1"}],
                       "images": [{"names": ["i"], "sizeBytes": 1}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }));
        let before = node_info(&n);
        trim(&mut n);
        assert_eq!(node_info(&n), before);
        assert!(n.metadata.managed_fields.is_none_or(|m| m.is_empty()));
        assert_eq!(n.metadata.resource_version.as_deref(), Some("7"));
        let s = n.status.unwrap();
        assert!(s.images.is_none() && s.conditions.is_none());
    }
}
