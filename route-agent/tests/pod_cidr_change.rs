//! A node whose pod CIDRs change under running pods (a node re-joins, the cluster CIDR is
//! re-carved): the agent's conflist follows, new pods get the new range at once, pods of the
//! old range keep working until they go, and the old gateway addresses leave the bridge then.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use cni_conformance::cluster::{Cluster, Plugins};
use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use cni_conformance::traffic::exchange;
use ipnetwork::IpNetwork;
use serde_json::{json, Value};

mod common;
use common::{eventually, Agent, Tmp};

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");

fn plugins() -> Plugins {
    let dir = Path::new(AGENT).parent().expect("target dir").to_path_buf();
    assert!(dir.join("cni-bridge").exists(), "build the workspace first (cargo build --workspace)");
    Plugins { dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() }
}

impl Agent {
    fn start(node: &Netns, name: &str, nodes_file: &Path, conf_dir: &Path, data_dir: &Path) -> Agent {
        let mut c = Command::new(AGENT);
        c.args(["--node-name", name, "--source", "file", "--no-portmap", "--resync-seconds", "3600"])
            .arg("--nodes-file")
            .arg(nodes_file)
            .arg("--cni-conf-dir")
            .arg(conf_dir)
            .arg("--ipam-data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        node.enter(&mut c);
        Agent(c.spawn().expect("start agent"))
    }
}

fn write_json(path: &Path, v: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The single-plugin config a runtime derives from the agent's conflist for cni-bridge.
fn conf_from_conflist(path: &Path) -> Option<Value> {
    let list: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    Some(conf)
}

fn subnets(conf: &Value) -> Vec<String> {
    conf["ipam"]["ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|set| set[0]["subnet"].as_str().map(str::to_string))
        .collect()
}

/// The global addresses on the node's cni0, as `addr/prefix`.
fn bridge_addresses(ns: &Netns) -> Vec<String> {
    let out = ns.ip(&["-o", "addr", "show", "dev", "cni0", "scope", "global"]);
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "inet" || *x == "inet6")?;
            w.get(i + 1).map(|a| a.to_string())
        })
        .collect();
    v.sort();
    v
}

fn in_net(ip: IpAddr, net: &str) -> bool {
    net.parse::<IpNetwork>().map(|n| n.contains(ip)).unwrap_or(false)
}

#[test]
fn a_pod_cidr_change_serves_new_pods_from_the_new_range_and_keeps_the_old_pods_until_they_go() {
    require_root("route agent pod CIDR change");
    let tmp = Tmp::new("cidrchange");
    let mut cl = Cluster::dual_stack("rpc", 2, plugins(), true);
    let ext = cl.external("rpc-ext", 100);
    let file = tmp.0.join("nodes.json");
    let mut entries: Vec<Value> = cl.nodes.iter().map(|n| n.nodes_file_entry()).collect();
    write_json(&file, &json!({ "nodes": entries }));
    let data_dir = tmp.0.join("ipam");
    let conflist = |i: usize| tmp.0.join(format!("cni{i}")).join("10-cni-route-agent.conflist");
    let _agents: Vec<Agent> = (0..2)
        .map(|i| {
            let node = &cl.nodes[i];
            Agent::start(&node.ns, &node.name, &file, &tmp.0.join(format!("cni{i}")), &data_dir)
        })
        .collect();
    eventually("node-1's conflist", || conf_from_conflist(&conflist(0)).is_some());
    cl.nodes[0].conf = conf_from_conflist(&conflist(0)).unwrap();
    let (old_v4, old_v6) = (cl.nodes[0].pod_cidr.clone(), cl.nodes[0].pod_cidr6.clone().unwrap());
    assert_eq!(subnets(&cl.nodes[0].conf), [old_v4.clone(), old_v6.clone()]);
    cl.add_pod(0, "rpc-old").unwrap();
    cl.add_pod(1, "rpc-n2").unwrap();

    // The node re-joins with other pod CIDRs.
    let (new_v4, new_v6) = ("10.244.21.0/24".to_string(), "fd00:10:244:21::/64".to_string());
    entries[0]["podCIDRs"] = json!([new_v4, new_v6]);
    write_json(&file, &json!({ "nodes": entries }));
    eventually("the conflist names the new ranges", || {
        conf_from_conflist(&conflist(0)).is_some_and(|c| subnets(&c) == [new_v4.clone(), new_v6.clone()])
    });
    cl.nodes[0].conf = conf_from_conflist(&conflist(0)).unwrap();
    // ADDs right away, several: none may fail, all get the new range.
    for name in ["rpc-new", "rpc-new2"] {
        let pod = cl.add_pod(0, name).unwrap_or_else(|e| panic!("ADD after the CIDR change: {e}"));
        assert!(in_net(pod.ip, &new_v4), "{name} got {} outside {new_v4}", pod.ip);
        assert!(in_net(pod.ip6.unwrap(), &new_v6), "{name} got {:?} outside {new_v6}", pod.ip6);
    }
    let (old, n2, new) = (&cl.pods[0], &cl.pods[1], &cl.pods[2]);
    assert!(in_net(old.ip, &old_v4) && in_net(old.ip6.unwrap(), &old_v6));
    // New pods reach the other node's pods (its agent routes the new range), both families.
    for (from, to) in [(new.ip, n2.ip), (new.ip6.unwrap(), n2.ip6.unwrap())] {
        eventually(&format!("{from} -> {to} across nodes"), || {
            exchange(n2.ns.file(), SocketAddr::new(to, 0), new.ns.file(), None) == Ok(from)
        });
    }
    // Old and new pods on the node reach each other through the bridge's two gateways.
    for (a, b) in [(old, new), (new, old)] {
        for (from, to) in [(a.ip, b.ip), (a.ip6.unwrap(), b.ip6.unwrap())] {
            let seen = exchange(b.ns.file(), SocketAddr::new(to, 0), a.ns.file(), None);
            assert_eq!(seen, Ok(from), "{} -> {} on the node", a.name, b.name);
        }
    }
    // The old pod's traffic leaving the cluster is still masqueraded.
    eventually("the old pod reaches the outside, masqueraded", || {
        exchange(ext.file(), "10.200.0.100:0".parse().unwrap(), old.ns.file(), None)
            == Ok(IpAddr::V4(cl.nodes[0].ip))
    });
    let gw = |net: &str| {
        let n: IpNetwork = net.parse().unwrap();
        let first = match n.network() {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
        };
        format!("{first}/{}", n.prefix())
    };
    let mut both = vec![gw(&old_v4), gw(&new_v4), gw(&old_v6), gw(&new_v6)];
    both.sort();
    assert_eq!(bridge_addresses(&cl.nodes[0].ns), both, "both ranges' gateways while both have pods");

    // The last pod of the old range goes: its gateways leave the bridge, nothing else does.
    let out = cl.del_pod(0);
    assert_eq!(out.code, 0, "DEL of the old pod: {} {}", out.stdout, out.stderr);
    let mut only_new = vec![gw(&new_v4), gw(&new_v6)];
    only_new.sort();
    eventually("the old gateways leave the bridge", || bridge_addresses(&cl.nodes[0].ns) == only_new);
    let pod = cl.add_pod(0, "rpc-new3").unwrap_or_else(|e| panic!("ADD after the old range went: {e}"));
    assert!(in_net(pod.ip, &new_v4));
    let (new, n2) = (&cl.pods[1], &cl.pods[0]);
    let seen = exchange(n2.ns.file(), SocketAddr::new(n2.ip6.unwrap(), 0), new.ns.file(), None);
    assert_eq!(seen, Ok(new.ip6.unwrap()), "the new pods keep working");
}
