//! The kubernetes policy source against the stand-in API server: what it publishes is the
//! engine's whole view, only once every initial list is complete, and every watch event on
//! Pods, Namespaces and NetworkPolicies reaches it.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cni_route_agent::policy::model::{PortMatch, Protocol};
use cni_route_agent::policy::Cluster;
use cni_route_agent::sources::kube::KubeOptions;
use cni_route_agent::sources::kube_policy::run;
use cni_route_agent::Metrics;
use serde_json::{json, Value};
use tokio::sync::watch;

mod kube_api;
use kube_api::*;

type Rx = watch::Receiver<Option<Arc<Cluster>>>;

/// The first published view that satisfies `f` (bounded wait).
async fn view_where(rx: &mut Rx, what: &str, f: impl Fn(&Cluster) -> bool) -> Arc<Cluster> {
    let last = rx.clone();
    let r = tokio::time::timeout(LIMIT, rx.wait_for(|c| c.as_deref().is_some_and(&f)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for a view where {what}; last: {:#?}", last.borrow()));
    r.expect("source alive").clone().expect("published")
}

fn keys<V>(m: &std::collections::BTreeMap<String, V>) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

fn deny_all() -> Value {
    json!({"podSelector": {}, "policyTypes": ["Ingress"]})
}

fn allow_from(app: &str) -> Value {
    json!({"podSelector": {"matchLabels": {"app": "web"}},
           "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app}}}],
                        "ports": [{"port": "http"}]}]})
}

fn lists() -> Vec<(&'static str, Value)> {
    vec![
        (
            PODS,
            list(
                "PodList",
                100,
                vec![
                    pod("x", "web", 90, "n1", json!({"app": "web"}), &["10.244.1.5", "fd00:244:1::5"]),
                    pod("y", "client", 91, "n2", json!({"app": "client"}), &["10.244.2.7"]),
                ],
            ),
        ),
        (
            NAMESPACES,
            list(
                "NamespaceList",
                100,
                vec![namespace("x", 10, json!({"team": "a"})), namespace("y", 11, json!({}))],
            ),
        ),
        (
            POLICIES,
            list(
                "NetworkPolicyList",
                100,
                vec![
                    policy("x", "deny", 50, deny_all()),
                    // A rule with a bad CIDR: the rule is left out, the policy enforced.
                    policy(
                        "x",
                        "bad-cidr",
                        51,
                        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
                    ),
                    // Not a NetworkPolicy at all: counted and skipped, never a failed list.
                    policy("y", "garbage", 52, json!({"podSelector": "everything"})),
                ],
            ),
        ),
    ]
}

#[tokio::test]
async fn one_whole_view_after_all_three_lists_then_every_event_reaches_it() {
    let mut api = StandIn::on_loopback(&lists());
    api.hold(POLICIES);
    let (_dir, kubeconfig) = kubeconfig("policy-events", api.port);
    let (tx, mut rx) = watch::channel(None);
    let metrics = Arc::new(Metrics::default());
    let source = tokio::spawn(run(KubeOptions { kubeconfig: Some(kubeconfig) }, tx, metrics.clone()));

    // The pod and namespace watches start only after the source took their complete lists;
    // with the policy list still held, nothing may be published.
    let (pods, pq) = api.next_watch(PODS).await;
    let (nss, _) = api.next_watch(NAMESPACES).await;
    assert!(rx.borrow().is_none() && !rx.has_changed().unwrap(), "a partial view was published");
    assert!(pq.contains("fieldSelector=status.phase"), "finished pods are not asked for: {pq}");
    api.release(POLICIES);
    tokio::time::timeout(LIMIT, rx.changed()).await.expect("a view in time").unwrap();
    let c = rx.borrow_and_update().clone().unwrap();
    assert_eq!(keys(&c.pods), ["x/web", "y/client"]);
    assert_eq!(keys(&c.policies), ["x/bad-cidr", "x/deny"], "the undecodable policy is skipped");
    assert_eq!(c.policies["x/bad-cidr"].ingress, Some(vec![]), "its bad rule left out");
    assert_eq!(c.namespaces["x"].labels["team"], "a");
    assert_eq!(c.namespaces["y"].labels["kubernetes.io/metadata.name"], "y");
    let web = &c.pods["x/web"];
    assert_eq!((web.node.as_str(), web.ips.len(), web.ports[0].name.as_str()), ("n1", 2, "http"));
    assert_eq!(metrics.policy.malformed.load(Ordering::Relaxed), 2, "both defects counted");
    let (pols, _) = api.next_watch(POLICIES).await;

    // Policies: added, changed, deleted.
    pols.send("ADDED", policy("x", "allow", 101, allow_from("client")));
    let c = view_where(&mut rx, "x/allow is there", |c| c.policies.contains_key("x/allow")).await;
    let rule = &c.policies["x/allow"].ingress.as_ref().unwrap()[0];
    let ports = rule.ports.as_ref().unwrap();
    assert_eq!((ports[0].protocol, &ports[0].port), (Protocol::Tcp, &PortMatch::Named("http".into())));
    pols.send("MODIFIED", policy("x", "allow", 102, allow_from("other")));
    view_where(&mut rx, "x/allow changed", |c| {
        c.policies.get("x/allow").is_some_and(|p| format!("{p:?}").contains("\"other\""))
    })
    .await;
    pols.send("DELETED", policy("x", "deny", 103, deny_all()));
    view_where(&mut rx, "x/deny gone", |c| !c.policies.contains_key("x/deny")).await;

    // Pods: labels, addresses, a new one, a deleted one, a finished one.
    pods.send("MODIFIED", pod("y", "client", 104, "n2", json!({"app": "other"}), &["10.244.2.7"]));
    view_where(&mut rx, "y/client relabelled", |c| c.pods["y/client"].labels["app"] == "other").await;
    pods.send("MODIFIED", pod("y", "client", 105, "n2", json!({"app": "other"}), &["10.244.2.8"]));
    view_where(&mut rx, "y/client readdressed", |c| {
        c.pods["y/client"].ips == ["10.244.2.8".parse::<std::net::IpAddr>().unwrap()]
    })
    .await;
    pods.send("ADDED", pod("x", "db", 106, "n1", json!({"app": "db"}), &["10.244.1.9"]));
    view_where(&mut rx, "x/db added", |c| c.pods.contains_key("x/db")).await;
    pods.send("DELETED", pod("x", "db", 107, "n1", json!({"app": "db"}), &["10.244.1.9"]));
    view_where(&mut rx, "x/db deleted", |c| !c.pods.contains_key("x/db")).await;
    let mut done = pod("y", "client", 108, "n2", json!({"app": "other"}), &["10.244.2.8"]);
    done["status"]["phase"] = json!("Succeeded");
    pods.send("MODIFIED", done);
    view_where(&mut rx, "the finished pod is gone", |c| !c.pods.contains_key("y/client")).await;

    // Namespaces: labels, a new one, a deleted one.
    nss.send("MODIFIED", namespace("y", 109, json!({"team": "b"})));
    view_where(&mut rx, "y labelled", |c| c.namespaces["y"].labels.get("team").is_some_and(|t| t == "b"))
        .await;
    nss.send("ADDED", namespace("z", 110, json!({"team": "c"})));
    view_where(&mut rx, "z added", |c| c.namespaces.contains_key("z")).await;
    nss.send("DELETED", namespace("z", 111, json!({"team": "c"})));
    view_where(&mut rx, "z deleted", |c| !c.namespaces.contains_key("z")).await;

    // A burst over all three watches ends in one view that has all of it.
    pods.send("ADDED", pod("z", "a", 112, "n1", json!({"app": "a"}), &["10.244.1.10"]));
    nss.send("ADDED", namespace("z", 113, json!({})));
    pols.send("ADDED", policy("z", "deny", 114, deny_all()));
    pods.send("MODIFIED", pod("z", "a", 115, "n1", json!({"app": "b"}), &["10.244.1.10"]));
    view_where(&mut rx, "the burst", |c| {
        c.pods.get("z/a").is_some_and(|p| p.labels["app"] == "b")
            && c.namespaces.contains_key("z")
            && c.policies.contains_key("z/deny")
    })
    .await;

    // A policy changed into something malformed: counted, left out; the rest enforced.
    let before = metrics.policy.malformed.load(Ordering::Relaxed);
    pols.send("MODIFIED", policy("x", "allow", 116, json!({"podSelector": {}, "ingress": "all"})));
    let c = view_where(&mut rx, "x/allow dropped", |c| !c.policies.contains_key("x/allow")).await;
    assert_eq!(keys(&c.policies), ["x/bad-cidr", "z/deny"]);
    assert_eq!(metrics.policy.malformed.load(Ordering::Relaxed), before + 1);

    drop(rx);
    let r = tokio::time::timeout(LIMIT, source).await.expect("the source stops once nobody listens").unwrap();
    assert!(r.is_ok(), "{r:?}");
}

// A re-list (410 Gone) replaces what was deleted and added while the watch was down, and no
// view in between lacks both the old and the new pod.
#[tokio::test]
async fn a_relist_after_gone_converges_without_a_partial_view() {
    let mut api = StandIn::on_loopback(&lists());
    let (_dir, kubeconfig) = kubeconfig("policy-relist", api.port);
    let (tx, mut rx) = watch::channel(None);
    let metrics = Arc::new(Metrics::default());
    let _source = tokio::spawn(run(KubeOptions { kubeconfig: Some(kubeconfig) }, tx, metrics.clone()));
    view_where(&mut rx, "the first view", |_| true).await;
    let seen: Arc<Mutex<Vec<BTreeSet<String>>>> = Arc::default();
    {
        let (mut rx, seen) = (rx.clone(), seen.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let pods = rx.borrow_and_update().as_ref().map(|c| c.pods.keys().cloned().collect());
                seen.lock().unwrap().extend(pods);
            }
        });
    }
    let (pods, _) = api.next_watch(PODS).await;
    let (pols, _) = api.next_watch(POLICIES).await;
    api.set_list(
        PODS,
        list(
            "PodList",
            200,
            vec![
                pod("x", "web", 90, "n1", json!({"app": "web"}), &["10.244.1.5", "fd00:244:1::5"]),
                pod("y", "new", 150, "n2", json!({"app": "client"}), &["10.244.2.9"]),
            ],
        ),
    );
    api.set_list(POLICIES, list("NetworkPolicyList", 200, vec![policy("x", "deny", 50, deny_all())]));
    pods.gone();
    pols.gone();
    let c = view_where(&mut rx, "the re-listed pods and policies", |c| {
        keys(&c.pods) == ["x/web", "y/new"] && keys(&c.policies) == ["x/deny"]
    })
    .await;
    assert_eq!(c.namespaces.len(), 2, "namespaces untouched");
    let (pods, q) = api.next_watch(PODS).await;
    assert!(q.contains("resourceVersion=200"), "watching from the new list: {q}");
    for view in seen.lock().unwrap().iter() {
        assert!(
            view.contains("y/client") || view.contains("y/new"),
            "a view between the two lists lacks both: {view:?}"
        );
    }
    // And the watch after that still delivers.
    pods.send("ADDED", pod("y", "later", 201, "n2", json!({}), &["10.244.2.10"]));
    view_where(&mut rx, "y/later", |c| c.pods.contains_key("y/later")).await;
}
