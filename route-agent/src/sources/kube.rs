//! The `kubernetes` source: Node objects from the API server, watched (list, then watch) into
//! a local cache. A node's pod CIDRs come from `spec.podCIDRs` (else `spec.podCIDR`), its
//! address per family from `status.addresses` (InternalIP, else ExternalIP).
//!
//! Needs RBAC `list` and `watch` on `nodes` (cluster-wide; the usual ClusterRole also grants `get`).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, NodeAddress};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config, Resource};
use serde::{Deserialize, Deserializer};
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

/// The metadata fields the source reads: the name, and the resourceVersion the watcher
/// resumes from.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaView {
    name: Option<String>,
    resource_version: Option<String>,
}

fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Option::<MetaView>::deserialize(d)?;
    Ok(m.map(|m| ObjectMeta { name: m.name, resource_version: m.resource_version, ..Default::default() })
        .unwrap_or_default())
}

/// A Node as far as routing reads it. A kubelet's Node is 10-15 kB of JSON (images, managed
/// fields, conditions) of which routing needs about 100 bytes: serde skips the rest without
/// allocating it, so a page of 500 Nodes decodes without building 500 full objects.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeView {
    #[serde(default, deserialize_with = "slim_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<NodeSpecView>,
    #[serde(default)]
    status: Option<NodeStatusView>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct NodeSpecView {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct NodeStatusView {
    addresses: Option<Vec<NodeAddress>>,
}

impl Resource for NodeView {
    type DynamicType = ();
    type Scope = <Node as k8s_openapi::Resource>::Scope;
    fn kind(_: &()) -> Cow<'_, str> {
        <Node as k8s_openapi::Resource>::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        <Node as k8s_openapi::Resource>::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        <Node as k8s_openapi::Resource>::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        <Node as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A Node's routing view; `None` for a Node without a name.
fn node_info(node: &NodeView) -> Option<NodeInfo> {
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

/// The nodes as the watch has them, converted on arrival: only [`NodeInfo`]s are kept, no
/// Node objects (no reflector store).
#[derive(Debug, Default)]
struct Nodes {
    live: Snapshot,
    /// During a (re-)list: the names it returned so far.
    relisting: Option<BTreeSet<String>>,
    /// Whether `live` changed since it was last published.
    changed: bool,
}

/// What an event asks of the publisher.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Nothing to publish: a partial list, or an update routing does not read (a heartbeat).
    Quiet,
    /// This node changed, was added or deleted, and nothing else: the published view is
    /// updated in place. At 20,000 nodes a copy of the whole view took longer than the rest
    /// of the source's work on an event.
    One(String),
    /// A list ended: the view is whole and may differ anywhere from the published one.
    Whole,
}

impl Nodes {
    /// The node's name if its routing view changed.
    fn upsert(&mut self, node: &NodeView) -> Option<String> {
        let info = node_info(node)?;
        if let Some(seen) = &mut self.relisting {
            seen.insert(info.name.clone());
        }
        if self.live.get(&info.name) == Some(&info) {
            return None;
        }
        let name = info.name.clone();
        self.live.insert(name.clone(), info);
        self.changed = true;
        Some(name)
    }

    fn handle(&mut self, ev: Event<NodeView>) -> Outcome {
        match ev {
            // Before the first InitDone the view is partial, and publishing it would read as
            // "nodes deleted" and take their routes away. A re-list updates in place and
            // removes what it did not see only at its end, so nothing goes out meanwhile.
            Event::Init => {
                self.relisting = Some(BTreeSet::new());
                Outcome::Quiet
            }
            Event::InitApply(n) => {
                self.upsert(&n);
                Outcome::Quiet
            }
            Event::InitDone => {
                if let Some(seen) = self.relisting.take() {
                    // What the list did not return was deleted while nobody watched.
                    let before = self.live.len();
                    self.live.retain(|name, _| seen.contains(name));
                    self.changed |= self.live.len() != before;
                }
                Outcome::Whole
            }
            Event::Apply(n) => self.upsert(&n).map_or(Outcome::Quiet, Outcome::One),
            Event::Delete(n) => match n.metadata.name {
                Some(name) if self.live.remove(&name).is_some() => {
                    self.changed = true;
                    Outcome::One(name)
                }
                _ => Outcome::Quiet,
            },
        }
    }
}

/// Publishes the cluster's nodes once the initial list is complete, then on every
/// routing-relevant change; runs until the channel closes.
pub async fn run(
    opts: KubeOptions,
    tx: watch::Sender<Option<Snapshot>>,
    metrics: Arc<Metrics>,
) -> Result<(), AgentError> {
    let api: Api<NodeView> = Api::all(client(&opts).await?);
    let events = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut nodes = Nodes::default();
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
            // The API answers, though the view is partial: the source is healthy.
            Some(Ok(ev @ (Event::Init | Event::InitApply(_)))) => {
                nodes.handle(ev);
                metrics.source.good();
            }
            Some(Ok(ev)) => {
                let done = matches!(ev, Event::InitDone);
                match nodes.handle(ev) {
                    // `publish` compares the whole view with the last one; a heartbeat is
                    // known to change nothing without that.
                    Outcome::Quiet => counted(&metrics),
                    Outcome::One(name) => {
                        nodes.changed = false;
                        counted(&metrics);
                        let info = nodes.live.get(&name).cloned();
                        tx.send_if_modified(|published| match published {
                            Some(view) => {
                                match info {
                                    Some(info) => view.insert(name, info),
                                    None => view.remove(&name),
                                };
                                true
                            }
                            // Apply and Delete come only after a list, which published.
                            None => {
                                *published = Some(nodes.live.clone());
                                true
                            }
                        });
                    }
                    Outcome::Whole => {
                        nodes.changed = false;
                        publish(&tx, nodes.live.clone(), &metrics);
                    }
                }
                if done && !std::mem::replace(&mut listed, true) {
                    tracing::info!(nodes = nodes.live.len(), "listed the Nodes");
                }
            }
        }
    }
}

/// A Node event that changed nothing routing reads: counted, and the source is healthy.
fn counted(metrics: &Metrics) {
    metrics.source_events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics.source.good();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(v: serde_json::Value) -> NodeView {
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
        assert!(node_info(&NodeView::default()).is_none(), "no name");
        let i = node_info(&node(serde_json::json!({"metadata": {"name": "bare"}}))).unwrap();
        assert_eq!(i, NodeInfo { name: "bare".into(), pod_cidrs: vec![], ipv4: None, ipv6: None });
        let n = node(
            serde_json::json!({"metadata": {"name": "x"}, "spec": {"podCIDRs": ["nope", "10.1.0.0/16"]}}),
        );
        assert_eq!(node_info(&n).unwrap().pod_cidrs.len(), 1, "unparsable CIDR skipped");
    }

    #[test]
    fn the_view_reads_what_the_full_node_has() {
        let full = serde_json::json!({
            "kind": "Node", "apiVersion": "v1",
            "metadata": {"name": "a", "resourceVersion": "7", "managedFields": [{"manager": "kubelet"}],
                         "annotations": {"big": "x"}, "labels": {"kubernetes.io/os": "linux"}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"],
                     "providerID": "p", "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.1"},
                                     {"type": "Hostname", "address": "a"}],
                       "images": [{"names": ["i"], "sizeBytes": 1}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let typed: Node = serde_json::from_value(full.clone()).unwrap();
        let view = node(full);
        assert_eq!(view.metadata.resource_version.as_deref(), Some("7"), "the watcher resumes from it");
        assert_eq!(view.meta().name, typed.metadata.name);
        let i = node_info(&view).unwrap();
        let got: Vec<String> = i.pod_cidrs.iter().map(|c| c.to_string()).collect();
        assert_eq!(got, ["10.244.1.0/24", "fd00:244:1::/64"]);
        assert_eq!(i.ipv4.unwrap().to_string(), "10.200.0.1");
        let nulls =
            node(serde_json::json!({"metadata": {"name": "n"}, "spec": null, "status": {"addresses": null}}));
        assert_eq!(node_info(&nulls).unwrap().pod_cidrs, vec![]);
    }

    #[test]
    fn heartbeats_are_quiet_and_a_relist_removes_only_at_its_end() {
        let n = |name: &str, ip: &str| {
            node(serde_json::json!({"metadata": {"name": name}, "spec": {"podCIDR": "10.244.1.0/24"},
                                    "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}))
        };
        let mut nodes = Nodes::default();
        assert_eq!(nodes.handle(Event::Init), Outcome::Quiet);
        assert_eq!(nodes.handle(Event::InitApply(n("a", "10.0.0.1"))), Outcome::Quiet);
        assert_eq!(nodes.handle(Event::InitApply(n("b", "10.0.0.2"))), Outcome::Quiet);
        assert_eq!(nodes.handle(Event::InitDone), Outcome::Whole);
        nodes.changed = false;
        assert_eq!(nodes.handle(Event::Apply(n("a", "10.0.0.1"))), Outcome::Quiet, "a heartbeat");
        assert_eq!(nodes.handle(Event::Apply(n("a", "10.0.0.9"))), Outcome::One("a".into()));
        nodes.changed = false;
        assert_eq!(nodes.handle(Event::Init), Outcome::Quiet);
        assert_eq!(nodes.handle(Event::InitApply(n("a", "10.0.0.9"))), Outcome::Quiet);
        assert_eq!(nodes.live.len(), 2, "b stays until the re-list ends");
        assert_eq!(nodes.handle(Event::InitDone), Outcome::Whole);
        assert!(nodes.changed && nodes.live.keys().eq(["a"]), "b was deleted meanwhile");
        nodes.changed = false;
        assert_eq!(nodes.handle(Event::Delete(n("x", "10.0.0.3"))), Outcome::Quiet, "unknown node");
        assert_eq!(nodes.handle(Event::Delete(n("a", "10.0.0.9"))), Outcome::One("a".into()));
    }
}
