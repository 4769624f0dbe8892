//! The kubernetes policy source: watches Pods, Namespaces and NetworkPolicies (all
//! namespaces) and publishes the policy engine's view of them.
//!
//! Memory: objects are decoded into slim views that keep only what [`Pod::from_api`],
//! [`Namespace::from_api`] and [`Policy::from_api`] read (serde skips the rest without
//! allocating it: managed fields, annotations, images, conditions...), converted on arrival,
//! and only the compact structs are kept; there is no reflector store. Pods that finished are
//! not asked for at all (a field selector), their addresses are free again.
//!
//! Consistency: nothing is published before all three initial lists are complete (a partial
//! view would open or close pods wrongly); a re-list (410 Gone) updates in place and removes
//! what it did not see only at its end, and nothing is published meanwhile. Bursts of events
//! are coalesced: a view goes out after [`QUIET`] without events, or [`MAX_DELAY`] after the
//! first unpublished change.
//!
//! Needs RBAC `list` and `watch` on [`RESOURCES`].

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace as ApiNamespace, Pod as ApiPod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy as ApiPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use serde::{Deserialize, Deserializer};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::AgentError;
use crate::policy::model::{Defect, Namespace, Pod, Policy};
use crate::policy::Cluster;
use crate::sources::kube::KubeOptions;
use crate::Metrics;

/// What the source lists and watches, as RBAC names it: (API group, resource).
pub const RESOURCES: [(&str, &str); 3] =
    [("", "pods"), ("", "namespaces"), ("networking.k8s.io", "networkpolicies")];

/// A view goes out once the watches have been quiet this long...
pub const QUIET: Duration = Duration::from_millis(5);
/// ...or this long after the first change it carries, whichever comes first.
pub const MAX_DELAY: Duration = Duration::from_millis(100);

/// Pods whose phase is final hold no address: the API server leaves them out (and sends a
/// deletion when a pod finishes).
const LIVE_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// The metadata fields the engine reads (and the resourceVersion the watcher resumes from).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaView {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    resource_version: Option<String>,
}

fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Option::<MetaView>::deserialize(d)?;
    Ok(m.map(|m| ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels,
        creation_timestamp: m.creation_timestamp,
        resource_version: m.resource_version,
        ..Default::default()
    })
    .unwrap_or_default())
}

/// A Pod as far as policy reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodView {
    #[serde(default, deserialize_with = "slim_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<PodSpecView>,
    #[serde(default)]
    status: Option<PodStatusView>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecView {
    node_name: Option<String>,
    host_network: Option<bool>,
    containers: Option<Vec<ContainerView>>,
    init_containers: Option<Vec<ContainerView>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ContainerView {
    ports: Option<Vec<ContainerPort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusView {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIP>>,
}

impl PodView {
    /// The compact pod; `None` for one policy cannot concern.
    pub fn compact(&self) -> Option<Pod> {
        let containers = |c: &Option<Vec<ContainerView>>| -> Vec<Container> {
            c.iter().flatten().map(|c| Container { ports: c.ports.clone(), ..Default::default() }).collect()
        };
        let api = ApiPod {
            metadata: self.metadata.clone(),
            spec: self.spec.as_ref().map(|s| PodSpec {
                node_name: s.node_name.clone(),
                host_network: s.host_network,
                containers: containers(&s.containers),
                init_containers: s.init_containers.as_ref().map(|_| containers(&s.init_containers)),
                ..Default::default()
            }),
            status: self.status.as_ref().map(|s| PodStatus {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
                pod_ips: s.pod_ips.clone(),
                ..Default::default()
            }),
        };
        Pod::from_api(&api)
    }
}

/// A Namespace: its name and labels.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NamespaceView {
    #[serde(default, deserialize_with = "slim_meta")]
    metadata: ObjectMeta,
}

impl NamespaceView {
    /// The compact namespace.
    pub fn compact(&self) -> Option<Namespace> {
        Namespace::from_api(&ApiNamespace { metadata: self.metadata.clone(), ..Default::default() })
    }
}

/// A NetworkPolicy whose spec is decoded only when converted, so one that does not decode
/// is a malformed object to report, not a watch error that hides it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PolicyView {
    #[serde(default, deserialize_with = "slim_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<serde_json::Value>,
}

/// A converted policy (`None`: nothing of it is enforceable) and what was malformed in it.
pub type PolicyEntry = (Option<Arc<Policy>>, Vec<Defect>);

impl PolicyView {
    /// The compact policy and its defects.
    pub fn compact(&self) -> Option<PolicyEntry> {
        let key = key(&self.metadata)?;
        let spec = match self.spec.clone().map(serde_json::from_value::<NetworkPolicySpec>).transpose() {
            Ok(spec) => spec,
            // As the file source does: unparseable as a NetworkPolicy at all, so nothing it
            // would deny or allow is known; counted and skipped.
            Err(e) => {
                return Some((None, vec![Defect { object: key, message: format!("NetworkPolicy: {e}") }]))
            }
        };
        let (policy, defects) = Policy::from_api(&ApiPolicy { metadata: self.metadata.clone(), spec });
        Some((policy.map(Arc::new), defects))
    }
}

macro_rules! view_of {
    ($view:ty, $api:ty) => {
        impl Resource for $view {
            type DynamicType = ();
            type Scope = <$api as k8s_openapi::Resource>::Scope;
            fn kind(_: &()) -> Cow<'_, str> {
                <$api as k8s_openapi::Resource>::KIND.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                <$api as k8s_openapi::Resource>::GROUP.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                <$api as k8s_openapi::Resource>::VERSION.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                <$api as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
view_of!(PodView, ApiPod);
view_of!(NamespaceView, ApiNamespace);
view_of!(PolicyView, ApiPolicy);

/// `namespace/name` of a namespaced object (as [`Pod::key`] and [`Policy::key`]).
fn key(m: &ObjectMeta) -> Option<String> {
    Some(format!("{}/{}", m.namespace.as_deref().unwrap_or("default"), m.name.as_deref()?))
}

/// The name of a namespace.
fn name(m: &ObjectMeta) -> Option<String> {
    m.name.clone()
}

/// One kind's compact objects and the state of its list.
#[derive(Debug)]
struct Kind<T> {
    live: BTreeMap<String, T>,
    /// During a (re-)list: the keys it returned so far.
    relisting: Option<BTreeSet<String>>,
    /// A list completed once.
    listed: bool,
}

impl<T> Default for Kind<T> {
    fn default() -> Self {
        Kind { live: BTreeMap::new(), relisting: None, listed: false }
    }
}

impl<T: PartialEq> Kind<T> {
    fn upsert(&mut self, key: String, value: Option<T>) -> bool {
        match value {
            Some(v) if self.live.get(&key) == Some(&v) => false,
            Some(v) => {
                self.live.insert(key, v);
                true
            }
            None => self.live.remove(&key).is_some(),
        }
    }

    /// Applies one watcher event; whether the compact view changed.
    fn handle<K: Resource>(
        &mut self,
        ev: Event<K>,
        key: fn(&ObjectMeta) -> Option<String>,
        convert: impl Fn(&K) -> Option<T>,
    ) -> bool {
        match ev {
            Event::Init => {
                self.relisting = Some(BTreeSet::new());
                false
            }
            Event::InitApply(o) | Event::Apply(o) => {
                let Some(k) = key(o.meta()) else { return false };
                if let Some(seen) = &mut self.relisting {
                    seen.insert(k.clone());
                }
                self.upsert(k, convert(&o))
            }
            Event::InitDone => {
                self.listed = true;
                match self.relisting.take() {
                    Some(seen) => {
                        // What the list did not return was deleted while we did not watch.
                        let before = self.live.len();
                        self.live.retain(|k, _| seen.contains(k));
                        self.live.len() != before
                    }
                    None => false,
                }
            }
            Event::Delete(o) => key(o.meta()).is_some_and(|k| self.live.remove(&k).is_some()),
        }
    }
}

/// Everything the source holds between publishes.
#[derive(Debug, Default)]
struct State {
    pods: Kind<Arc<Pod>>,
    namespaces: Kind<Arc<Namespace>>,
    policies: Kind<PolicyEntry>,
    /// Unpublished changes: when the first and the last came.
    pending: Option<(Instant, Instant)>,
    published: bool,
    /// Policies changed since defects were last reported.
    policies_changed: bool,
    reported: BTreeMap<String, String>,
}

/// One event of one of the three watches.
enum Change {
    Pod(Result<Event<PodView>, watcher::Error>),
    Namespace(Result<Event<NamespaceView>, watcher::Error>),
    Policy(Result<Event<PolicyView>, watcher::Error>),
}

fn warn(resource: &str, e: &watcher::Error) {
    match e {
        // The resourceVersion is too old: the watcher lists again; routine.
        watcher::Error::WatchError(s) if s.code == 410 => {
            tracing::info!(resource, "watch expired (410 Gone); listing again")
        }
        _ => tracing::warn!(resource, %e, "policy watch failed; retrying with backoff"),
    }
}

impl State {
    /// Every list complete, no re-list under way: the view is whole.
    fn whole(&self) -> bool {
        let kinds = [
            (self.pods.listed, self.pods.relisting.is_none()),
            (self.namespaces.listed, self.namespaces.relisting.is_none()),
            (self.policies.listed, self.policies.relisting.is_none()),
        ];
        kinds.iter().all(|(listed, idle)| *listed && *idle)
    }

    fn handle(&mut self, change: Change) {
        let changed = match change {
            Change::Pod(Ok(ev)) => self.pods.handle(ev, key, |p| p.compact().map(Arc::new)),
            Change::Namespace(Ok(ev)) => self.namespaces.handle(ev, name, |n| n.compact().map(Arc::new)),
            Change::Policy(Ok(ev)) => {
                let c = self.policies.handle(ev, key, PolicyView::compact);
                self.policies_changed |= c;
                c
            }
            Change::Pod(Err(e)) => {
                warn("pods", &e);
                false
            }
            Change::Namespace(Err(e)) => {
                warn("namespaces", &e);
                false
            }
            Change::Policy(Err(e)) => {
                warn("networkpolicies", &e);
                false
            }
        };
        if changed {
            let now = Instant::now();
            let first = self.pending.map_or(now, |(first, _)| first);
            self.pending = Some((first, now));
        }
    }

    /// When to publish: `None` while there is nothing to publish or the view is not whole.
    fn due(&self) -> Option<Instant> {
        if !self.whole() {
            return None;
        }
        if !self.published {
            // The initial lists just completed: at once.
            return Some(Instant::now());
        }
        self.pending.map(|(first, last)| (last + QUIET).min(first + MAX_DELAY))
    }

    fn cluster(&self) -> Cluster {
        Cluster {
            pods: self.pods.live.clone(),
            namespaces: self.namespaces.live.clone(),
            policies: self
                .policies
                .live
                .iter()
                .filter_map(|(k, (p, _))| Some((k.clone(), p.clone()?)))
                .collect(),
        }
    }

    fn publish(&mut self, tx: &watch::Sender<Option<Arc<Cluster>>>, metrics: &Metrics) {
        if self.policies_changed || !self.published {
            let defects: Vec<Defect> =
                self.policies.live.values().flat_map(|(_, d)| d.iter().cloned()).collect();
            crate::policy::report(&defects, &mut self.reported, metrics);
            self.policies_changed = false;
        }
        let cluster = self.cluster();
        if !self.published {
            tracing::info!(
                pods = cluster.pods.len(),
                namespaces = cluster.namespaces.len(),
                policies = cluster.policies.len(),
                "listed the Pods, Namespaces and NetworkPolicies"
            );
        }
        self.published = true;
        self.pending = None;
        tx.send_if_modified(|cur| {
            if cur.as_deref() == Some(&cluster) {
                false
            } else {
                *cur = Some(Arc::new(cluster));
                true
            }
        });
    }
}

/// Publishes the cluster's policy view on `tx` once the initial lists are complete, then
/// after every change (coalesced), until the channel closes.
pub async fn run(
    opts: KubeOptions,
    tx: watch::Sender<Option<Arc<Cluster>>>,
    metrics: Arc<Metrics>,
) -> Result<(), AgentError> {
    let client = super::kube::client(&opts).await?;
    let pods =
        watcher::watcher(Api::<PodView>::all(client.clone()), watcher::Config::default().fields(LIVE_PODS))
            .default_backoff()
            .map(Change::Pod);
    let namespaces = watcher::watcher(Api::<NamespaceView>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(Change::Namespace);
    let policies = watcher::watcher(Api::<PolicyView>::all(client), watcher::Config::default())
        .default_backoff()
        .map(Change::Policy);
    let events = futures::stream::select(pods, futures::stream::select(namespaces, policies));
    let mut events = std::pin::pin!(events);
    let mut state = State::default();
    loop {
        let due = state.due();
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                state.publish(&tx, &metrics);
            }
            ev = events.next() => match ev {
                Some(change) => state.handle(change),
                None => return Err(AgentError::source("watch", "the policy watches ended")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn full_pod() -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x", "resourceVersion": "7", "uid": "u",
                         "creationTimestamp": "2025-01-01T00:00:00Z", "labels": {"app": "web"},
                         "annotations": {"big": "x"}, "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "n1", "hostNetwork": false,
                     "containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 80}],
                                     "env": [{"name": "E", "value": "v"}]}],
                     "initContainers": [{"name": "i", "image": "i", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5",
                       "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}],
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0, "image": "i", "imageID": "x"}]}
        })
    }

    #[test]
    fn the_slim_pod_converts_as_the_full_one() {
        let full: ApiPod = serde_json::from_value(full_pod()).unwrap();
        let view: PodView = serde_json::from_value(full_pod()).unwrap();
        assert_eq!(view.compact(), Pod::from_api(&full));
        assert_eq!(view.compact().unwrap().ports.len(), 2);
        assert_eq!(view.metadata.resource_version.as_deref(), Some("7"), "the watcher resumes from it");
        assert!(view.metadata.annotations.is_none() && view.metadata.managed_fields.is_none());
        let bare: PodView = serde_json::from_value(json!({"metadata": {"name": "b"}})).unwrap();
        assert_eq!(bare.compact().unwrap().key(), "default/b");
        let done: PodView =
            serde_json::from_value(json!({"metadata": {"name": "b"}, "status": {"phase": "Failed"}}))
                .unwrap();
        assert_eq!(done.compact(), None);
    }

    #[test]
    fn a_policy_that_does_not_decode_is_a_defect_not_an_error() {
        let v: PolicyView = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": "everything", "ingress": []}
        }))
        .unwrap();
        let (p, d) = v.compact().unwrap();
        assert!(p.is_none());
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].object, "x/p");
        let v: PolicyView = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "nope"}}]}]}
        }))
        .unwrap();
        let (p, d) = v.compact().unwrap();
        assert_eq!(p.unwrap().ingress, Some(vec![]), "the bad rule is left out");
        assert_eq!(d.len(), 1);
    }

    fn pod(name: &str, labels: serde_json::Value) -> PodView {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "x", "labels": labels}}))
            .unwrap()
    }

    #[test]
    fn only_changes_of_what_policy_reads_count_and_a_relist_drops_the_unseen() {
        let mut k: Kind<Pod> = Kind::default();
        let h = |k: &mut Kind<Pod>, ev| k.handle(ev, key, PodView::compact);
        assert!(!h(&mut k, Event::Init));
        assert!(h(&mut k, Event::InitApply(pod("a", json!({"l": "1"})))));
        assert!(h(&mut k, Event::InitApply(pod("b", json!({})))));
        assert!(!h(&mut k, Event::InitDone));
        assert!(k.listed && k.relisting.is_none());
        assert!(!h(&mut k, Event::Apply(pod("a", json!({"l": "1"})))), "same compact pod: no change");
        assert!(h(&mut k, Event::Apply(pod("a", json!({"l": "2"})))));
        assert!(h(&mut k, Event::Delete(pod("a", json!({})))));
        assert!(!h(&mut k, Event::Delete(pod("a", json!({})))), "already gone");
        // A re-list that no longer has b, and has c.
        h(&mut k, Event::Init);
        assert!(h(&mut k, Event::InitApply(pod("c", json!({})))));
        assert_eq!(k.live.len(), 2, "b stays until the list is complete");
        assert!(h(&mut k, Event::InitDone));
        assert_eq!(k.live.keys().collect::<Vec<_>>(), ["x/c"]);
    }

    #[test]
    fn nothing_is_due_before_every_list_is_complete() {
        let mut s = State::default();
        s.handle(Change::Pod(Ok(Event::Init)));
        s.handle(Change::Pod(Ok(Event::InitApply(pod("a", json!({}))))));
        s.handle(Change::Pod(Ok(Event::InitDone)));
        s.handle(Change::Namespace(Ok(Event::Init)));
        s.handle(Change::Namespace(Ok(Event::InitDone)));
        assert_eq!(s.due(), None, "policies not listed yet");
        s.handle(Change::Policy(Ok(Event::Init)));
        assert_eq!(s.due(), None);
        s.handle(Change::Policy(Ok(Event::InitDone)));
        assert!(s.due().is_some());
        s.published = true;
        s.pending = None;
        assert_eq!(s.due(), None, "nothing new");
        s.handle(Change::Pod(Ok(Event::Init)));
        s.handle(Change::Pod(Ok(Event::InitApply(pod("b", json!({}))))));
        assert_eq!(s.due(), None, "a re-list is under way");
        s.handle(Change::Pod(Ok(Event::InitDone)));
        assert!(s.due().is_some());
    }

    #[test]
    fn a_burst_is_due_after_quiet_or_at_most_max_delay_after_its_first_change() {
        let mut s = State::default();
        for c in [
            Change::Pod(Ok(Event::InitDone)),
            Change::Namespace(Ok(Event::InitDone)),
            Change::Policy(Ok(Event::InitDone)),
        ] {
            s.handle(c);
        }
        s.published = true;
        let t0 = Instant::now();
        s.pending = Some((t0, t0));
        assert_eq!(s.due(), Some(t0 + QUIET));
        let late = t0 + MAX_DELAY;
        s.pending = Some((t0, late));
        assert_eq!(s.due(), Some(t0 + MAX_DELAY), "a steady stream still publishes");
    }

    #[test]
    fn resources_are_what_the_views_ask_for() {
        let asked = [
            (PodView::group(&()), PodView::plural(&())),
            (NamespaceView::group(&()), NamespaceView::plural(&())),
            (PolicyView::group(&()), PolicyView::plural(&())),
        ];
        for ((g, r), (group, plural)) in RESOURCES.iter().zip(asked) {
            assert_eq!((*g, *r), (&*group, &*plural));
        }
        assert_eq!(PodView::url_path(&(), None), "/api/v1/pods");
        assert_eq!(PolicyView::url_path(&(), None), "/apis/networking.k8s.io/v1/networkpolicies");
    }
}
