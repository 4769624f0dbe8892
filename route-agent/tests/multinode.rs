//! The agent in a simulated cluster: node namespaces on an underlay bridge, pods made by
//! cni-bridge, one agent per node fed by a shared nodes file.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cni_conformance::cluster::{Cluster, Plugins};
use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use cni_conformance::traffic::exchange;
use serde_json::json;

mod common;
use common::{eventually, Tmp};

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");
const PROTO: &str = "168";

fn plugins() -> Plugins {
    let dir = Path::new(AGENT).parent().unwrap().to_path_buf();
    assert!(dir.join("cni-bridge").exists(), "build the workspace first (cargo build --workspace)");
    Plugins { dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() }
}

/// An agent process we started, killed (by its PID) on drop.
struct Agent {
    child: Child,
}

impl Agent {
    /// One agent per node of `cl`, all reading `nodes_file`, node i writing its conflist to
    /// `dir/cni{i}`.
    fn on_every_node(cl: &Cluster, nodes_file: &Path, dir: &Path) -> Vec<Agent> {
        (0..cl.nodes.len())
            .map(|i| {
                let node = &cl.nodes[i];
                Agent::start(&node.ns, &node.name, nodes_file, &dir.join(format!("cni{i}")), &[])
            })
            .collect()
    }

    fn start(node: &Netns, name: &str, nodes_file: &Path, conf_dir: &Path, extra: &[&str]) -> Agent {
        let mut c = Command::new(AGENT);
        c.args(["--node-name", name, "--source", "file", "--nodes-file"])
            .arg(nodes_file)
            .arg("--cni-conf-dir")
            .arg(conf_dir)
            .args(["--resync-seconds", "3600"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        node.enter(&mut c);
        Agent { child: c.spawn().expect("start agent") }
    }

    /// SIGTERM (only to this PID), then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.child.wait().expect("wait")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the nodes file atomically, listing `nodes` of the cluster (by index), with an
/// optional address override.
fn write_nodes(path: &Path, cl: &Cluster, nodes: &[usize], addr_override: Option<(usize, &str)>) {
    let list: Vec<_> = nodes
        .iter()
        .map(|&i| {
            let n = &cl.nodes[i];
            let addr = match addr_override {
                Some((j, a)) if j == i => a.to_string(),
                _ => n.ip.to_string(),
            };
            json!({"name": n.name, "podCIDRs": [n.pod_cidr], "addresses": [addr]})
        })
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&json!({"nodes": list})).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The agent's routes as `dst via gw dev eth0`, whether they name a nexthop object or not.
fn agent_routes(ns: &Netns) -> Vec<String> {
    let mut v: Vec<String> = ns
        .ip(&["route", "show", "proto", PROTO])
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.iter().position(|x| *x == "nhid") {
                Some(i) => [&w[..i], &w[i + 2..]].concat().join(" "),
                None => w.join(" "),
            }
        })
        .collect();
    v.sort();
    v
}

fn expect_routes(cl: &Cluster, node: usize, want: &[usize]) {
    let mut expected: Vec<String> =
        want.iter().map(|&j| format!("{} via {} dev eth0", cl.nodes[j].pod_cidr, cl.nodes[j].ip)).collect();
    expected.sort();
    eventually(&format!("routes on {} = {expected:?}", cl.nodes[node].name), || {
        agent_routes(&cl.nodes[node].ns) == expected
    });
}

/// GET `path` on the agent's endpoint inside `ns`; returns (status line, body).
fn http_get(ns: &Netns, path: &str) -> (String, String) {
    let f = ns.file();
    let path = path.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let Ok(mut s) =
            TcpStream::connect_timeout(&"127.0.0.1:9645".parse().unwrap(), Duration::from_secs(1))
        else {
            return (String::new(), String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        let status = r.lines().next().unwrap_or("").to_string();
        let body = r.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    })
    .join()
    .unwrap()
}

fn metric(ns: &Netns, name: &str) -> Option<f64> {
    let (_, body) = http_get(ns, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("cni_route_agent_{name} ")).and_then(|v| v.parse().ok()))
}

/// Waits until each node of a three-node cluster routes to the other two: before that, a
/// node never routed has no last good route to keep, and a test of what stays would be moot.
fn expect_full_mesh(cl: &Cluster) {
    expect_routes(cl, 0, &[1, 2]);
    expect_routes(cl, 1, &[0, 2]);
    expect_routes(cl, 2, &[0, 1]);
}

fn three_node_cluster(tag: &str) -> Cluster {
    let mut cl = Cluster::new(tag, 3, plugins(), true);
    for i in 0..3 {
        cl.add_pod(i, &format!("n{}p1", i + 1)).unwrap();
    }
    cl
}

fn all_pairs(cl: &Cluster) -> Result<(), String> {
    for a in &cl.pods {
        for b in cl.pods.iter().filter(|b| b.name != a.name) {
            let r = exchange(b.ns.file(), SocketAddr::new(b.ip, 0), a.ns.file(), None);
            if r != Ok(a.ip) {
                return Err(format!("{} -> {}: {r:?}", a.name, b.name));
            }
        }
    }
    Ok(())
}

#[test]
fn routes_follow_nodes_leaving_and_joining_and_pods_talk_with_real_sources() {
    require_root("route agent multinode");
    let tmp = Tmp::new("join");
    let cl = three_node_cluster("ra");
    let file = tmp.0.join("nodes.json");
    write_nodes(&file, &cl, &[0, 1, 2], None);
    let _agents = Agent::on_every_node(&cl, &file, &tmp.0);
    expect_full_mesh(&cl);
    // This kernel has nexthop objects: one per other node, and the routes use them.
    assert_eq!(cl.nodes[0].ns.ip(&["nexthop", "show", "proto", PROTO]).lines().count(), 2);
    assert!(cl.nodes[0].ns.ip(&["route", "show", "proto", PROTO]).contains("nhid"));
    all_pairs(&cl).unwrap();
    // node-3 leaves: its route goes everywhere and its pod becomes unreachable.
    write_nodes(&file, &cl, &[0, 1], None);
    expect_routes(&cl, 0, &[1]);
    expect_routes(&cl, 1, &[0]);
    eventually("node-3's nexthop removed", || {
        cl.nodes[0].ns.ip(&["nexthop", "show", "proto", PROTO]).lines().count() == 1
    });
    let (p1, p3) = (&cl.pods[0], &cl.pods[2]);
    assert!(exchange(p3.ns.file(), SocketAddr::new(p3.ip, 0), p1.ns.file(), None).is_err());
    // It joins again.
    write_nodes(&file, &cl, &[0, 1, 2], None);
    expect_routes(&cl, 0, &[1, 2]);
    expect_routes(&cl, 1, &[0, 2]);
    all_pairs(&cl).unwrap();
}

#[test]
fn restart_removes_routes_of_nodes_gone_meanwhile_without_rewriting_the_others() {
    require_root("route agent restart");
    let tmp = Tmp::new("restart");
    let cl = three_node_cluster("rr");
    let file = tmp.0.join("nodes.json");
    write_nodes(&file, &cl, &[0, 1, 2], None);
    let conf = tmp.0.join("cni0");
    let a = Agent::start(&cl.nodes[0].ns, "node-1", &file, &conf, &[]);
    expect_routes(&cl, 0, &[1, 2]);
    assert!(a.terminate().success(), "a clean exit on SIGTERM");
    // While it is down, node-3 is removed; the routes stay (pods keep working).
    write_nodes(&file, &cl, &[0, 1], None);
    expect_routes(&cl, 0, &[1, 2]);
    let _a = Agent::start(&cl.nodes[0].ns, "node-1", &file, &conf, &[]);
    expect_routes(&cl, 0, &[1]);
    eventually("metrics answer", || metric(&cl.nodes[0].ns, "syncs_total").unwrap_or(0.0) >= 1.0);
    // One route deleted (and with nexthop objects, the node's nexthop too); nothing re-added.
    let nexthops = !cl.nodes[0].ns.ip(&["nexthop", "show", "proto", PROTO]).trim().is_empty();
    assert_eq!(
        metric(&cl.nodes[0].ns, "netlink_writes_total"),
        Some(if nexthops { 2.0 } else { 1.0 }),
        "deletes only, no re-adds (no flapping)"
    );
}

#[test]
fn a_route_deleted_by_hand_comes_back_and_a_moved_node_is_replaced() {
    require_root("route agent repair");
    let tmp = Tmp::new("repair");
    let cl = three_node_cluster("rp");
    let file = tmp.0.join("nodes.json");
    write_nodes(&file, &cl, &[0, 1, 2], None);
    let _a = Agent::start(&cl.nodes[0].ns, "node-1", &file, &tmp.0.join("cni0"), &[]);
    expect_routes(&cl, 0, &[1, 2]);
    // Resync is an hour: the repair comes from the netlink event.
    cl.nodes[0].ns.ip(&["route", "del", &cl.nodes[1].pod_cidr]);
    expect_routes(&cl, 0, &[1, 2]);
    // node-3 comes back with the same pod CIDR at a new address.
    write_nodes(&file, &cl, &[0, 1, 2], Some((2, "10.200.0.99")));
    let want = format!("{} via 10.200.0.99 dev eth0", cl.nodes[2].pod_cidr);
    eventually("route replaced with the new address", || agent_routes(&cl.nodes[0].ns).contains(&want));
    assert_eq!(agent_routes(&cl.nodes[0].ns).len(), 2);
}

#[test]
fn conflist_and_readiness_only_once_the_own_cidr_is_known_and_routes_synced() {
    require_root("route agent readiness");
    let tmp = Tmp::new("ready");
    let cl = Cluster::new("rd", 2, plugins(), true);
    cl.nodes[0].ns.ip(&["link", "set", "eth0", "mtu", "1400"]);
    let file = tmp.0.join("nodes.yaml");
    write_nodes(&file, &cl, &[1], None);
    let conf = tmp.0.join("cni0");
    let _a = Agent::start(&cl.nodes[0].ns, "node-1", &file, &conf, &[]);
    eventually("a sync ran", || metric(&cl.nodes[0].ns, "syncs_total").unwrap_or(0.0) >= 1.0);
    let conflist = conf.join("10-cni-route-agent.conflist");
    assert!(!conflist.exists(), "conflist written before the node's own pod CIDR was known");
    assert!(http_get(&cl.nodes[0].ns, "/readyz").0.contains("503"));
    assert!(http_get(&cl.nodes[0].ns, "/healthz").0.contains("200"));
    write_nodes(&file, &cl, &[0, 1], None);
    eventually("conflist written", || conflist.exists());
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(c["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
    assert_eq!(c["plugins"][0]["mtu"], 1400, "MTU of the underlay link");
    eventually("ready", || http_get(&cl.nodes[0].ns, "/readyz").0.contains("200"));
    let (_, m) = http_get(&cl.nodes[0].ns, "/metrics");
    assert!(m.contains("cni_route_agent_routes_desired 1"), "{m}");
}

#[test]
fn masquerades_only_traffic_leaving_the_cluster_and_reports_off_link_nodes() {
    require_root("route agent masquerade");
    let tmp = Tmp::new("masq");
    let mut cl = Cluster::new("rm", 2, plugins(), true);
    cl.add_pod(0, "n1p1").unwrap();
    cl.add_pod(1, "n2p1").unwrap();
    let ext = cl.external("ext", 100);
    let file = tmp.0.join("nodes.json");
    write_nodes(&file, &cl, &[0, 1], None);
    // A node on another segment: with host-gw reported, not routed (auto would tunnel).
    let mut text: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    text["nodes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "far", "podCIDRs": ["10.244.9.0/24"], "addresses": ["192.0.2.9"]}));
    std::fs::write(&file, text.to_string()).unwrap();
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            let conf = tmp.0.join(format!("c{i}"));
            Agent::start(&cl.nodes[i].ns, &cl.nodes[i].name, &file, &conf, &["--backend", "host-gw"])
        })
        .collect();
    expect_routes(&cl, 0, &[1]);
    expect_routes(&cl, 1, &[0]);
    eventually("ready", || metric(&cl.nodes[0].ns, "ready") == Some(1.0));
    assert_eq!(metric(&cl.nodes[0].ns, "nodes_off_link"), Some(1.0));
    assert_eq!(metric(&cl.nodes[0].ns, "pod_cidrs_tunnelled"), Some(0.0));
    assert!(!cl.nodes[0].ns.links().contains(&"cra-vxlan4".to_string()), "host-gw makes no tunnel");
    let (a, b) = (&cl.pods[0], &cl.pods[1]);
    let seen = exchange(ext.file(), "10.200.0.100:0".parse().unwrap(), a.ns.file(), None);
    assert_eq!(seen, Ok(IpAddr::V4(cl.nodes[0].ip)), "outside sees the node address");
    let seen = exchange(b.ns.file(), SocketAddr::new(b.ip, 0), a.ns.file(), None);
    assert_eq!(seen, Ok(a.ip), "pod to pod across nodes keeps its source");
    drop(agents);
}

#[test]
fn plain_routes_when_nexthop_objects_are_off() {
    require_root("route agent plain routes");
    let tmp = Tmp::new("plain");
    let cl = Cluster::new("rpl", 2, plugins(), true);
    let file = tmp.0.join("nodes.json");
    write_nodes(&file, &cl, &[0, 1], None);
    let _a = Agent::start(&cl.nodes[0].ns, "node-1", &file, &tmp.0.join("cni0"), &["--no-nexthops"]);
    expect_routes(&cl, 0, &[1]);
    assert!(cl.nodes[0].ns.ip(&["nexthop", "show", "proto", PROTO]).trim().is_empty());
    assert!(!cl.nodes[0].ns.ip(&["route", "show", "proto", PROTO]).contains("nhid"));
}

/// The nodes file as `write_nodes` writes it, plus extra raw entries.
fn nodes_json(cl: &Cluster, nodes: &[usize], extra: &[serde_json::Value]) -> serde_json::Value {
    let mut list: Vec<_> = nodes
        .iter()
        .map(|&i| {
            let n = &cl.nodes[i];
            json!({"name": n.name, "podCIDRs": [n.pod_cidr], "addresses": [n.ip.to_string()]})
        })
        .collect();
    list.extend(extra.iter().cloned());
    json!({ "nodes": list })
}

fn write_json(path: &Path, v: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_partially_overlapping_claim_gets_no_route_and_is_reported() {
    require_root("route agent overlap");
    let tmp = Tmp::new("overlap");
    let cl = three_node_cluster("rov");
    let file = tmp.0.join("nodes.json");
    write_nodes(&file, &cl, &[0, 1, 2], None);
    let _agents = Agent::on_every_node(&cl, &file, &tmp.0);
    expect_full_mesh(&cl);
    // node-0x claims the upper half of node-2's /24. It sorts before node-2 by name: node-2
    // keeps its CIDR because its claim is the established one.
    let x = json!({"name": "node-0x", "podCIDRs": ["10.244.2.128/25"], "addresses": ["10.200.0.99"]});
    write_json(&file, &nodes_json(&cl, &[0, 1, 2], &[x]));
    eventually("the conflict counted on node-1", || {
        metric(&cl.nodes[0].ns, "pod_cidr_conflicts") == Some(1.0)
    });
    eventually("the conflict counted on node-2", || {
        metric(&cl.nodes[1].ns, "pod_cidr_conflicts") == Some(1.0)
    });
    eventually("the conflict counted on node-3", || {
        metric(&cl.nodes[2].ns, "pod_cidr_conflicts") == Some(1.0)
    });
    expect_full_mesh(&cl);
    all_pairs(&cl).unwrap();
}

#[test]
fn a_listed_node_without_address_keeps_its_route_until_it_leaves() {
    require_root("route agent node without address");
    let tmp = Tmp::new("noaddr");
    let cl = three_node_cluster("rna");
    let file = tmp.0.join("nodes.json");
    write_nodes(&file, &cl, &[0, 1, 2], None);
    let _agents = Agent::on_every_node(&cl, &file, &tmp.0);
    // Every agent has routed every node before the trouble starts (a node never routed has no
    // last good route to keep).
    expect_full_mesh(&cl);
    // A half-written file: still valid, cut before node-3's addresses.
    let mut cut = nodes_json(&cl, &[0, 1, 2], &[]);
    cut["nodes"][2].as_object_mut().unwrap().remove("addresses");
    write_json(&file, &cut);
    eventually("reported", || metric(&cl.nodes[0].ns, "nodes_without_address") == Some(1.0));
    expect_routes(&cl, 0, &[1, 2]);
    // `addresses: []` is the same.
    cut["nodes"][2]["addresses"] = json!([]);
    cut["nodes"][1]["addresses"] = json!([]);
    write_json(&file, &cut);
    eventually("both reported", || metric(&cl.nodes[0].ns, "nodes_without_address") == Some(2.0));
    expect_routes(&cl, 0, &[1, 2]);
    all_pairs(&cl).unwrap();
    // Leaving the source is what takes a node's route away.
    write_nodes(&file, &cl, &[0, 1], None);
    expect_routes(&cl, 0, &[1]);
    assert_eq!(metric(&cl.nodes[0].ns, "nodes_without_address"), Some(0.0));
}

#[test]
fn source_failures_are_counted_keep_routes_and_fail_readiness_past_the_bound() {
    require_root("route agent source failures");
    let tmp = Tmp::new("srcfail");
    let cl = Cluster::new("rsf", 2, plugins(), true);
    let file = tmp.0.join("nodes.json");
    write_nodes(&file, &cl, &[0, 1], None);
    let _a = Agent::start(
        &cl.nodes[0].ns,
        "node-1",
        &file,
        &tmp.0.join("cni0"),
        &["--max-source-failure-seconds", "1"],
    );
    expect_routes(&cl, 0, &[1]);
    eventually("ready", || http_get(&cl.nodes[0].ns, "/readyz").0.contains("200"));
    assert_eq!(metric(&cl.nodes[0].ns, "source_snapshot_age_seconds"), Some(0.0));
    std::fs::write(&file, "nodes: [{{{ garbage").unwrap();
    eventually("garbage counted", || {
        metric(&cl.nodes[0].ns, "source_errors_total{kind=\"parse\"}") == Some(1.0)
    });
    std::fs::write(&file, "").unwrap();
    eventually("empty counted", || {
        metric(&cl.nodes[0].ns, "source_errors_total{kind=\"empty\"}") == Some(1.0)
    });
    std::fs::remove_file(&file).unwrap();
    write_nodes(&tmp.0.join("other.json"), &cl, &[0], None);
    std::fs::rename(tmp.0.join("other.json"), tmp.0.join("gone.json")).unwrap();
    eventually("readiness fails once the source failed for longer than the bound", || {
        http_get(&cl.nodes[0].ns, "/readyz").0.contains("503")
    });
    assert!(metric(&cl.nodes[0].ns, "source_snapshot_age_seconds").unwrap() > 1.0);
    expect_routes(&cl, 0, &[1]);
    write_nodes(&file, &cl, &[0, 1], None);
    eventually("ready again", || http_get(&cl.nodes[0].ns, "/readyz").0.contains("200"));
}

#[test]
fn destinations_excluded_from_masquerade_see_the_pod_address() {
    require_root("route agent masquerade exclusions");
    let tmp = Tmp::new("nomasq");
    let mut cl = Cluster::new("rnm", 1, plugins(), true);
    cl.add_pod(0, "n1p1").unwrap();
    // Two outside hosts on the underlay; only the first one's /32 is excluded.
    let (kept, masked) = (cl.external("exk", 100), cl.external("exm", 101));
    for ext in [&kept, &masked] {
        ext.ip(&["route", "add", &cl.nodes[0].pod_cidr, "via", &cl.nodes[0].ip.to_string()]);
    }
    let file = tmp.0.join("nodes.json");
    write_nodes(&file, &cl, &[0], None);
    let extra = ["--no-masquerade-cidr", "10.200.0.100/32"];
    let _a = Agent::start(&cl.nodes[0].ns, "node-1", &file, &tmp.0.join("cni0"), &extra);
    eventually("ready", || metric(&cl.nodes[0].ns, "ready") == Some(1.0));
    let pod = &cl.pods[0];
    let seen = exchange(kept.file(), "10.200.0.100:0".parse().unwrap(), pod.ns.file(), None);
    assert_eq!(seen, Ok(pod.ip), "an excluded destination sees the pod's own address");
    let seen = exchange(masked.file(), "10.200.0.101:0".parse().unwrap(), pod.ns.file(), None);
    assert_eq!(seen, Ok(IpAddr::V4(cl.nodes[0].ip)), "the others still see the node address");
}

/// The agent's IPv6 routes, as [`agent_routes`].
fn agent_routes6(ns: &Netns) -> Vec<String> {
    let mut v: Vec<String> = ns
        .ip(&["-6", "route", "show", "proto", PROTO])
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let w: Vec<&str> = match w.iter().position(|x| *x == "nhid") {
                Some(i) => [&w[..i], &w[i + 2..]].concat(),
                None => w,
            };
            // `metric 1024 pref medium` is noise here.
            w.iter().take_while(|x| **x != "metric").copied().collect::<Vec<_>>().join(" ")
        })
        .collect();
    v.sort();
    v
}

fn dual_stack_all_pairs(cl: &Cluster) -> Result<(), String> {
    for a in &cl.pods {
        for b in cl.pods.iter().filter(|b| b.name != a.name) {
            let (from, to) = (a.ip6.ok_or("no IPv6")?, b.ip6.ok_or("no IPv6")?);
            let r = exchange(b.ns.file(), SocketAddr::new(to, 0), a.ns.file(), None);
            if r != Ok(from) {
                return Err(format!("{} -> {} over IPv6: {r:?}", a.name, b.name));
            }
        }
    }
    all_pairs(cl)
}

#[test]
fn dual_stack_routes_both_families_and_reports_a_node_without_an_ipv6_address() {
    require_root("route agent dual-stack");
    let tmp = Tmp::new("dual");
    let mut cl = Cluster::dual_stack("rds", 3, plugins(), true);
    for i in 0..3 {
        cl.add_pod(i, &format!("n{}p1", i + 1)).unwrap();
    }
    let file = tmp.0.join("nodes.json");
    let all: Vec<_> = cl.nodes.iter().map(|n| n.nodes_file_entry()).collect();
    write_json(&file, &json!({ "nodes": all }));
    let _agents = Agent::on_every_node(&cl, &file, &tmp.0);
    let v6 = |j: usize| {
        let n = &cl.nodes[j];
        format!("{} via {} dev eth0", n.pod_cidr6.as_ref().unwrap(), n.ip6.unwrap())
    };
    eventually("IPv6 routes on node-1", || agent_routes6(&cl.nodes[0].ns) == [v6(1), v6(2)]);
    for i in 0..3 {
        let others: Vec<usize> = (0..3).filter(|j| *j != i).collect();
        expect_routes(&cl, i, &others);
    }
    eventually("IPv6 routes everywhere", || (0..3).all(|i| agent_routes6(&cl.nodes[i].ns).len() == 2));
    dual_stack_all_pairs(&cl).unwrap();
    // node-3 publishes only its IPv4 address: its IPv6 pods are unreachable, and said so.
    // (It had an IPv6 route, which is kept; a node that never had one shows the same count.)
    let mut listed = all.clone();
    listed[2]["addresses"] = json!([cl.nodes[2].ip.to_string()]);
    write_json(&file, &json!({ "nodes": listed }));
    eventually("counted", || metric(&cl.nodes[0].ns, "pod_cidrs_without_address") == Some(1.0));
    assert_eq!(metric(&cl.nodes[0].ns, "nodes_without_address"), Some(0.0), "it has an IPv4 address");
    assert_eq!(agent_routes6(&cl.nodes[0].ns), [v6(1), v6(2)], "the last good IPv6 route stays");
}

/// The agent's stderr while the nodes file is missing (it logs a WARN and keeps waiting).
fn stderr_of_agent_waiting_for_its_file(tag: &str, extra: &[&str]) -> String {
    let tmp = Tmp::new(tag);
    let ns = Netns::new(&format!("{tag}-n"));
    let log = tmp.0.join("stderr");
    let mut c = Command::new(AGENT);
    c.args(["--node-name", "node-1", "--source", "file", "--nodes-file"])
        .arg(tmp.0.join("absent.json"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    ns.enter(&mut c);
    let agent = Agent { child: c.spawn().expect("start agent") };
    eventually("the missing file logged", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("nodes file not usable")
    });
    drop(agent);
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal_and_come_as_json_on_request() {
    require_root("route agent log format");
    let text = stderr_of_agent_waiting_for_its_file("rlt", &[]);
    assert!(!text.contains('\u{1b}'), "ANSI escape codes in a log file:\n{text}");
    assert!(text.contains("WARN"), "{text}");
    let json = stderr_of_agent_waiting_for_its_file("rlj", &["--log-format", "json"]);
    let lines: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["fields"]["message"].as_str().is_some_and(|m| m.contains("nodes file"))),
        "{json}"
    );
}

#[test]
fn a_relative_nodes_file_is_read_and_watched() {
    require_root("route agent relative nodes file");
    let tmp = Tmp::new("relative");
    let cl = three_node_cluster("rrel");
    write_nodes(&tmp.0.join("nodes.json"), &cl, &[0, 1], None);
    let mut c = Command::new(AGENT);
    // As an operator types it: a bare file name, relative to the agent's working directory.
    c.args(["--node-name", "node-1", "--source", "file", "--nodes-file", "nodes.json"])
        .arg("--cni-conf-dir")
        .arg(tmp.0.join("cni0"))
        .args(["--resync-seconds", "3600"])
        .current_dir(&tmp.0)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cl.nodes[0].ns.enter(&mut c);
    let _a = Agent { child: c.spawn().expect("start agent") };
    expect_routes(&cl, 0, &[1]);
    // A change is seen: the watch is on the file's real directory.
    write_nodes(&tmp.0.join("nodes.json"), &cl, &[0, 1, 2], None);
    expect_routes(&cl, 0, &[1, 2]);
}

/// Sends one UDP datagram from `from` to `to` (bound in `to_ns`); whether it arrived, within a
/// bounded wait. One datagram, no retransmission: a packet the network drops stays dropped.
fn one_datagram(from: std::fs::File, to_ns: std::fs::File, to: IpAddr) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || -> Result<(), String> {
        nix::sched::setns(to_ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        let socket =
            std::net::UdpSocket::bind(SocketAddr::new(to, 0)).map_err(|e| format!("bind {to}: {e}"))?;
        tx.send(socket.local_addr().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        socket.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 8];
        socket.recv_from(&mut buf).map(|_| ()).map_err(|e| format!("no datagram reached {to}: {e}"))
    });
    let Ok(target) = rx.recv() else {
        return Err(match receiver.join() {
            Ok(Err(e)) => e,
            _ => "the receiver did not start".into(),
        });
    };
    let sent = std::thread::spawn(move || -> Result<(), String> {
        nix::sched::setns(from.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        let any: SocketAddr = if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().unwrap();
        let socket = std::net::UdpSocket::bind(any).map_err(|e| e.to_string())?;
        socket.send_to(b"hello", target).map(|_| ()).map_err(|e| format!("send to {target}: {e}"))
    })
    .join()
    .map_err(|_| "sender panicked".to_string())?;
    sent?;
    receiver.join().map_err(|_| "receiver panicked".to_string())?
}

/// Hostile: a node's first pod, on a bridge its ADD has just made, is reached over IPv6 from
/// another node before it has sent anything, round after round on a fresh bridge each time.
fn a_fresh_bridge_forwards_ipv6_to_its_first_pod_at_once(tag: &str, ipv6_only: bool) {
    let mut cl = Cluster::dual_stack(tag, 2, plugins(), true);
    if ipv6_only {
        for n in cl.nodes.iter_mut() {
            let cidr6 = n.pod_cidr6.clone().unwrap();
            n.conf["ipam"]["ranges"] = json!([[{ "subnet": cidr6 }]]);
        }
    }
    cl.static_routes();
    cl.add_pod(1, &format!("{tag}-far")).unwrap();
    // The uplinks have long been up, as on a real node: only the new bridge is fresh.
    for n in &cl.nodes {
        eventually("the uplink's addresses settled", || {
            n.ns.ip(&["-6", "addr", "show", "dev", "eth0", "tentative"]).trim().is_empty()
        });
    }
    for round in 0..6 {
        assert!(!cl.nodes[0].ns.links().contains(&"cni0".to_string()), "round {round}: a fresh node");
        let pod = cl.add_pod_as_added(0, &format!("{tag}-new{round}")).unwrap();
        let (new_ns, new_ip, new_ip6) = (pod.ns.file(), pod.ip, pod.ip6.unwrap());
        // One solicitation per packet: one the node could not send (no usable link-local on
        // the bridge) then drops the packet instead of delivering it a second later, so the
        // defect shows as a loss rather than a delay a test would have to time.
        cl.nodes[0].ns.sysctl("net.ipv6.neigh.cni0.mcast_solicit", "1").unwrap();
        let far = &cl.pods[0];
        one_datagram(far.ns.file(), new_ns, new_ip6).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let pod = cl.pods.last().unwrap();
        let far_ip6 = far.ip6.unwrap();
        let seen = exchange(pod.ns.file(), SocketAddr::new(new_ip6, 0), far.ns.file(), None);
        assert_eq!(seen, Ok(far_ip6), "round {round}: TCP over IPv6 from the other node");
        let seen = exchange(far.ns.file(), SocketAddr::new(far_ip6, 0), pod.ns.file(), None);
        assert_eq!(seen, Ok(new_ip6), "round {round}: TCP over IPv6 to the other node");
        if !ipv6_only {
            let seen = exchange(pod.ns.file(), SocketAddr::new(new_ip, 0), far.ns.file(), None);
            assert_eq!(seen, Ok(far.ip), "round {round}: TCP over IPv4 from the other node");
        }
        let out = cl.del_pod(cl.pods.len() - 1);
        assert_eq!(out.code, 0, "round {round}: DEL: {}", out.stdout);
        cl.nodes[0].ns.ip(&["link", "del", "cni0"]);
    }
}

#[test]
fn a_fresh_bridge_forwards_ipv6_to_its_first_pod_at_once_dual_stack() {
    require_root("fresh bridge dual-stack");
    a_fresh_bridge_forwards_ipv6_to_its_first_pod_at_once("rfd", false);
}

#[test]
fn a_fresh_bridge_forwards_ipv6_to_its_first_pod_at_once_ipv6_only() {
    require_root("fresh bridge IPv6-only");
    a_fresh_bridge_forwards_ipv6_to_its_first_pod_at_once("rf6", true);
}
