//! The `kubernetes` source against a stand-in for the API server on 127.0.0.1 (no
//! kube-apiserver can be installed here, see `kube_api/`): it serves a Node list, then a
//! watch stream whose events the test sends one by one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cni_route_agent::model::{NodeInfo, Snapshot};
use cni_route_agent::sources::kube::{run, KubeOptions};
use cni_route_agent::Metrics;
use serde_json::{json, Value};
use tokio::sync::watch;

mod kube_api;
use kube_api::{kubeconfig, StandIn, Watch, LIMIT, NODES};

/// Real-looking Node JSON, bulky fields included, as a kubelet would leave it.
fn node(name: &str, rv: u32, cidrs: &[&str], addrs: &[(&str, &str)], heartbeat: &str) -> Value {
    let mut spec = json!({"providerID": format!("kind://docker/kind/{name}")});
    if let Some(first) = cidrs.first() {
        spec["podCIDR"] = json!(first);
    }
    if cidrs.len() > 1 {
        spec["podCIDRs"] = json!(cidrs);
    }
    let mut addresses: Vec<Value> = addrs.iter().map(|(t, a)| json!({"type": t, "address": a})).collect();
    addresses.push(json!({"type": "Hostname", "address": name}));
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": format!("0b6a1f3e-0000-4000-8000-{:012}", name.len()),
            "resourceVersion": rv.to_string(),
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            "managedFields": [{
                "manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                "time": heartbeat, "fieldsType": "FieldsV1",
                "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {"f:lastHeartbeatTime": {}}}}}
            }]
        },
        "spec": spec,
        "status": {
            "capacity": {"cpu": "8", "memory": "32781340Ki", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "32678940Ki", "pods": "110"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": heartbeat,
                 "lastTransitionTime": "2025-01-01T00:00:00Z", "reason": "KubeletHasSufficientMemory",
                 "message": "kubelet has sufficient memory available"},
                {"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat,
                 "lastTransitionTime": "2025-01-01T00:00:10Z", "reason": "KubeletReady",
                 "message": "kubelet is posting ready status"}
            ],
            "addresses": addresses,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "6.1.0",
                "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://1.7.24",
                "kubeletVersion": "v1.33.1", "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": "amd64"
            },
            "images": [
                {"names": ["registry.k8s.io/etcd@sha256:aa", "registry.k8s.io/etcd:3.5.21-0"], "sizeBytes": 57680541},
                {"names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 320368}
            ]
        }
    })
}

fn node_a(rv: u32, heartbeat: &str) -> Value {
    node(
        "node-a",
        rv,
        &["10.244.1.0/24", "fd00:10:244:1::/64"],
        &[("InternalIP", "10.200.0.11"), ("ExternalIP", "203.0.113.11"), ("ExternalIP", "2001:db8::11")],
        heartbeat,
    )
}

fn node_b(rv: u32, ip: &str) -> Value {
    node("node-b", rv, &["10.244.2.0/24"], &[("InternalIP", ip)], "2025-06-01T10:00:00Z")
}

fn info(name: &str, cidrs: &[&str], v4: Option<&str>, v6: Option<&str>) -> (String, NodeInfo) {
    let n = NodeInfo {
        name: name.into(),
        pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        ipv4: v4.map(|a| a.parse().unwrap()),
        ipv6: v6.map(|a| a.parse().unwrap()),
    };
    (name.into(), n)
}

/// A bounded wait for a condition another task makes true.
async fn until(what: &str, cond: impl Fn() -> bool) {
    tokio::time::timeout(LIMIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn next_snapshot(rx: &mut watch::Receiver<Option<Snapshot>>) -> Snapshot {
    tokio::time::timeout(LIMIT, rx.changed()).await.expect("a new snapshot in time").expect("source alive");
    rx.borrow_and_update().clone().expect("published")
}

// Current-thread runtime on purpose: `publish` counts the event and sends the snapshot with no
// await in between, so once the test sees the count, it also sees whether a snapshot was sent.
#[tokio::test]
async fn lists_then_follows_the_watch_and_ignores_heartbeats() {
    let list = json!({
        "kind": "NodeList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "100"},
        "items": [node_a(90, "2025-06-01T10:00:00Z"), node_b(91, "10.200.0.12")]
    });
    let mut api = StandIn::on_loopback(&[(NODES, list)]);
    let (_dir, kubeconfig) = kubeconfig("follows", api.port);
    let (tx, mut rx) = watch::channel(None);
    let metrics = Arc::new(Metrics::default());
    let source = tokio::spawn(run(KubeOptions { kubeconfig: Some(kubeconfig) }, tx, metrics.clone()));
    let events = || metrics.source_events.load(Ordering::Relaxed);

    let a =
        info("node-a", &["10.244.1.0/24", "fd00:10:244:1::/64"], Some("10.200.0.11"), Some("2001:db8::11"));
    let mut want: Snapshot =
        [a.clone(), info("node-b", &["10.244.2.0/24"], Some("10.200.0.12"), None)].into();
    assert_eq!(next_snapshot(&mut rx).await, want, "the initial list, in one snapshot");
    assert_eq!(events(), 1, "nothing published before the list was complete");

    let (watch, _) = api.next_watch(NODES).await;
    {
        let q = api.queries_of(NODES);
        assert!(q[0].contains("limit=500") && !q[0].contains("watch"), "a plain list first: {q:?}");
        let w = q.iter().find(|q| q.contains("watch=true")).unwrap();
        assert!(w.contains("resourceVersion=100") && !w.contains("sendInitialEvents"), "{w}");
    }

    // A bookmark is no Node event; a heartbeat is one, but changes nothing routing reads.
    watch.send(
        "BOOKMARK",
        json!({"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": "101"}}),
    );
    watch.send("MODIFIED", node_a(102, "2025-06-01T10:05:00Z"));
    until("the heartbeat to be counted", || events() == 2).await;
    assert!(!rx.has_changed().unwrap(), "a heartbeat-only update woke the agent");

    watch.send("MODIFIED", node_b(103, "10.200.0.22"));
    want.insert("node-b".into(), info("node-b", &["10.244.2.0/24"], Some("10.200.0.22"), None).1);
    assert_eq!(next_snapshot(&mut rx).await, want, "the address change is the next snapshot");
    assert_eq!(events(), 3);

    let c = node(
        "node-c",
        104,
        &["10.244.3.0/24", "fd00:10:244:3::/64"],
        &[("InternalIP", "fd00:200::13"), ("InternalIP", "10.200.0.13")],
        "2025-06-01T10:06:00Z",
    );
    watch.send("ADDED", c);
    let c =
        info("node-c", &["10.244.3.0/24", "fd00:10:244:3::/64"], Some("10.200.0.13"), Some("fd00:200::13"));
    want.insert(c.0, c.1);
    assert_eq!(next_snapshot(&mut rx).await, want, "an added node appears");

    watch.send("DELETED", node_a(105, "2025-06-01T10:05:00Z"));
    want.remove("node-a");
    assert_eq!(next_snapshot(&mut rx).await, want, "a deleted node disappears");
    assert_eq!(events(), 5);

    drop(rx);
    let r = tokio::time::timeout(LIMIT, source).await.expect("the source stops once nobody listens").unwrap();
    assert!(r.is_ok(), "{r:?}");
}

fn node_list(rv: u32, items: Vec<Value>) -> Value {
    json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items})
}

/// The watch request the source makes next, and its query.
async fn next_watch(api: &mut StandIn) -> (Watch, String) {
    api.next_watch(NODES).await
}

// Each case ends in the snapshot the API holds, and a re-list of unchanged nodes publishes
// nothing: a snapshot missing a node for a moment would take its routes away and back.
#[tokio::test]
async fn converges_through_gone_bookmarks_dropped_streams_and_deletes_while_down() {
    let b = || node_b(91, "10.200.0.12");
    let mut api =
        StandIn::on_loopback(&[(NODES, node_list(100, vec![node_a(90, "2025-06-01T10:00:00Z"), b()]))]);
    let (_dir, kubeconfig) = kubeconfig("robust", api.port);
    let (tx, mut rx) = watch::channel(None);
    let metrics = Arc::new(Metrics::default());
    let _source = tokio::spawn(run(KubeOptions { kubeconfig: Some(kubeconfig) }, tx, metrics.clone()));
    let events = || metrics.source_events.load(Ordering::Relaxed);
    let a =
        info("node-a", &["10.244.1.0/24", "fd00:10:244:1::/64"], Some("10.200.0.11"), Some("2001:db8::11"));
    let both: Snapshot = [a.clone(), info("node-b", &["10.244.2.0/24"], Some("10.200.0.12"), None)].into();
    assert_eq!(next_snapshot(&mut rx).await, both);

    // A bookmark moves the resourceVersion the watch resumes from after a dropped stream.
    let (w1, q) = next_watch(&mut api).await;
    assert!(q.contains("allowWatchBookmarks=true"), "{q}");
    w1.send("BOOKMARK", json!({"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": "150"}}));
    drop(w1);
    let (w2, q) = next_watch(&mut api).await;
    assert!(q.contains("resourceVersion=150"), "resumed from the bookmark: {q}");
    assert!(!rx.has_changed().unwrap(), "a dropped stream changes nothing");

    // 410 Gone: the source lists again; the same nodes publish nothing new.
    api.set_list(NODES, node_list(200, vec![node_a(90, "2025-06-01T10:00:00Z"), b()]));
    let before = events();
    w2.gone();
    let (w3, q) = next_watch(&mut api).await;
    assert!(q.contains("resourceVersion=200"), "watching from the new list: {q}");
    until("the re-list to be published", || events() > before).await;
    assert!(!rx.has_changed().unwrap(), "a re-list of the same nodes woke the agent");
    assert_eq!(metrics.source.errors("gone"), 1);

    // node-b is deleted while the watch is down; the resumed watch is too old, so the list
    // is what tells.
    api.set_list(NODES, node_list(300, vec![node_a(90, "2025-06-01T10:00:00Z")]));
    drop(w3);
    let (w4, _) = next_watch(&mut api).await;
    w4.gone();
    assert_eq!(
        next_snapshot(&mut rx).await,
        Snapshot::from([a.clone()]),
        "the node deleted meanwhile is gone"
    );
    assert_eq!(metrics.source.errors("gone"), 2);

    // And the watch after all that still delivers.
    let (w5, q) = next_watch(&mut api).await;
    assert!(q.contains("resourceVersion=300"), "{q}");
    w5.send("ADDED", node_b(301, "10.200.0.12"));
    assert_eq!(next_snapshot(&mut rx).await, both, "converged");
    assert_eq!(metrics.source.snapshot_age(), Some(Duration::ZERO), "healthy again");
}

// A cluster larger than a page: the API server answers in pages of 500 (`limit`, then
// `continue`), and the source publishes once, the whole of it, after the last page.
#[tokio::test]
async fn a_list_of_several_pages_is_published_once_whole() {
    let nodes: Vec<Value> = (0..1200u32)
        .map(|i| {
            node(
                &format!("n-{i}"),
                i,
                &[&format!("10.{}.{}.0/24", 100 + i / 256, i % 256)],
                &[("InternalIP", &format!("10.200.{}.{}", i / 256, i % 256))],
                "2025-06-01T10:00:00Z",
            )
        })
        .collect();
    let mut api = StandIn::on_loopback(&[(NODES, node_list(5000, nodes))]);
    let (_dir, kubeconfig) = kubeconfig("pages", api.port);
    let (tx, mut rx) = watch::channel(None);
    let metrics = Arc::new(Metrics::default());
    let _source = tokio::spawn(run(KubeOptions { kubeconfig: Some(kubeconfig) }, tx, metrics.clone()));
    let snap = next_snapshot(&mut rx).await;
    assert_eq!(snap.len(), 1200);
    assert_eq!(snap["n-1199"].ipv4.unwrap().to_string(), "10.200.4.175");
    assert_eq!(metrics.source_events.load(Ordering::Relaxed), 1, "one snapshot for the three pages");
    let (_w, q) = next_watch(&mut api).await;
    assert!(q.contains("resourceVersion=5000"), "{q}");
    let lists: Vec<String> =
        api.queries_of(NODES).into_iter().filter(|q| !q.contains("watch=true")).collect();
    assert_eq!(lists.len(), 3, "{lists:?}");
    assert!(lists[1].contains("continue=500") && lists[2].contains("continue=1000"), "{lists:?}");
}
