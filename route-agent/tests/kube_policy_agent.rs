//! End to end: an agent with the kubernetes source, in a node namespace, against the
//! stand-in API server listening inside that namespace; what the API says about Pods and
//! NetworkPolicies ends up as elements of the agent's nft table there.

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use serde_json::{json, Value};

mod common;
mod kube_api;
use common::{Agent, Tmp};
use kube_api::*;

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");

/// A listener on 127.0.0.1 inside `ns` (its socket belongs to the namespace it was made in).
fn listener_in(ns: &Netns) -> TcpListener {
    let f = ns.file();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the node namespace");
        TcpListener::bind("127.0.0.1:0").expect("bind in the node namespace")
    })
    .join()
    .expect("listener thread")
}

fn policy_table(ns: &Netns) -> String {
    let out = ns.run("nft", &["list", "table", "inet", cni_route_agent::policy::TABLE]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of set `name` in a listed table.
fn set_of<'a>(table: &'a str, name: &str) -> &'a str {
    let found = table.find(&format!("set {name} {{")).or_else(|| table.find(&format!("map {name} {{")));
    let Some(start) = found else { return "" };
    let rest = &table[start..];
    &rest[..rest.find("\n\t}").unwrap_or(rest.len())]
}

/// Polls (bounded) until the policy table in `ns` satisfies `f`.
async fn table_where(ns: &Netns, what: &str, f: impl Fn(&str) -> bool) {
    let r = tokio::time::timeout(LIMIT, async {
        loop {
            if f(&policy_table(ns)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if r.is_err() {
        panic!("timed out waiting for a policy table where {what}:\n{}", policy_table(ns));
    }
}

fn allow_clients() -> Value {
    json!({"podSelector": {"matchLabels": {"app": "web"}},
           "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}],
                        "ports": [{"port": "http"}]}]})
}

#[tokio::test]
async fn an_agent_enforces_what_the_api_server_says() {
    require_root("an_agent_enforces_what_the_api_server_says");
    let ns = Netns::new("kpol");
    // An underlay address for the node, as a real node has (both veth ends stay in the namespace).
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "peer0"]);
    ns.ip(&["link", "set", "peer0", "up"]);
    ns.ip(&["addr", "add", "10.200.0.11/24", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    let tmp = Tmp::new("kube-policy-agent");
    let mut api = StandIn::start(
        listener_in(&ns),
        &[
            (NODES, list("NodeList", 100, vec![node("n1", 90, "10.244.1.0/24", "10.200.0.11")])),
            (
                PODS,
                list(
                    "PodList",
                    100,
                    vec![
                        pod("x", "web", 90, "n1", json!({"app": "web"}), &["10.244.1.5"]),
                        pod("y", "client", 91, "n2", json!({"app": "client"}), &["10.244.2.7"]),
                    ],
                ),
            ),
            (
                NAMESPACES,
                list(
                    "NamespaceList",
                    100,
                    vec![namespace("x", 10, json!({})), namespace("y", 11, json!({}))],
                ),
            ),
            (POLICIES, list("NetworkPolicyList", 100, vec![policy("x", "allow", 50, allow_clients())])),
        ],
    );
    let (_dir, kubeconfig) = kubeconfig("policy-agent", api.port);
    let mut c = Command::new(AGENT);
    c.args(["--node-name", "n1", "--source", "kubernetes", "--kubeconfig"])
        .arg(&kubeconfig)
        .arg("--cni-conf-dir")
        .arg(tmp.0.join("cni"))
        .args(["--resync-seconds", "3600"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    ns.enter(&mut c);
    let _agent = Agent(c.spawn().expect("start the agent"));

    table_where(&ns, "the local web pod is selected and the client is its peer", |t| {
        set_of(t, "idisp4").contains("10.244.1.5") && t.contains("10.244.2.7")
    })
    .await;
    let (pods, _) = api.next_watch(PODS).await;
    let (pols, _) = api.next_watch(POLICIES).await;

    pods.send("MODIFIED", pod("y", "client", 101, "n2", json!({"app": "client"}), &["10.244.2.8"]));
    table_where(&ns, "the client's new address replaces the old", |t| {
        t.contains("10.244.2.8") && !t.contains("10.244.2.7")
    })
    .await;
    pods.send("MODIFIED", pod("y", "client", 102, "n2", json!({"app": "gone"}), &["10.244.2.8"]));
    table_where(&ns, "a relabelled client is no peer", |t| !t.contains("10.244.2.8")).await;

    pols.send("DELETED", policy("x", "allow", 103, allow_clients()));
    table_where(&ns, "no policy: the web pod is no longer selected", |t| {
        !set_of(t, "idisp4").contains("10.244.1.5")
    })
    .await;
}
