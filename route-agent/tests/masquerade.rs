//! The agent's masquerade: fully random source ports where the kernel has them, and
//! conntrack's insertion failures (the SNAT race they avoid) on /metrics.

use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use cni_conformance::cluster::{Cluster, Plugins};
use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use cni_conformance::traffic::exchange;
use serde_json::json;

mod common;
use common::{eventually, metric, Agent, Tmp};

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");

fn plugins() -> Plugins {
    let dir = Path::new(AGENT).parent().expect("target dir").to_path_buf();
    assert!(dir.join("cni-bridge").exists(), "build the workspace first (cargo build --workspace)");
    Plugins { dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() }
}

fn start(cl: &Cluster, tmp: &Tmp, extra: &[&str]) -> Agent {
    let file = tmp.0.join("nodes.json");
    std::fs::write(&file, json!({"nodes": [cl.nodes[0].nodes_file_entry()]}).to_string()).unwrap();
    let mut c = Command::new(AGENT);
    c.args(["--node-name", "node-1", "--source", "file", "--resync-seconds", "3600", "--nodes-file"])
        .arg(&file)
        .arg("--cni-conf-dir")
        .arg(tmp.0.join("cni"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cl.nodes[0].ns.enter(&mut c);
    Agent(c.spawn().expect("start agent"))
}

/// conntrack's insert_failed in `ns`, summed over the CPUs, read by a process inside it.
fn insert_failed(ns: &Netns) -> u64 {
    let text = String::from_utf8_lossy(&ns.run("cat", &["/proc/net/stat/nf_conntrack"]).stdout).into_owned();
    let mut lines = text.lines();
    let at = lines.next().unwrap_or("").split_whitespace().position(|h| h == "insert_failed").unwrap();
    lines.map(|l| u64::from_str_radix(l.split_whitespace().nth(at).unwrap(), 16).unwrap()).sum()
}

#[test]
fn masquerade_picks_ports_fully_at_random_and_metrics_show_conntrack_insert_failures() {
    require_root("route agent fully random masquerade");
    let tmp = Tmp::new("masqrand");
    let mut cl = Cluster::new("rmr", 1, plugins(), true);
    cl.add_pod(0, "rmr-p").unwrap();
    let ext = cl.external("rmr-ext", 100);
    let node = &cl.nodes[0].ns;
    let agent = start(&cl, &tmp, &[]);
    eventually("ready", || metric(node, "ready") == Some(1));
    let rules =
        String::from_utf8_lossy(&node.run("nft", &["list", "table", "inet", "cni_route_agent"]).stdout)
            .into_owned();
    assert!(rules.contains("masquerade fully-random"), "{rules}");
    assert_eq!(metric(node, "masquerade_fully_random"), Some(1));
    let pod = &cl.pods[0];
    let seen = exchange(ext.file(), "10.200.0.100:0".parse().unwrap(), pod.ns.file(), None);
    assert_eq!(seen, Ok(IpAddr::V4(cl.nodes[0].ip)), "still masqueraded");
    // The counter is the kernel's, for the agent's namespace (no race is provoked here).
    assert_eq!(metric(node, "conntrack_insert_failed_total"), Some(insert_failed(node)));
    assert!(metric(node, "conntrack_drop_total").is_some());
    drop(agent);

    let _agent = start(&cl, &tmp, &["--no-masquerade-fully-random"]);
    eventually("ready without fully random ports", || metric(node, "masquerade_fully_random") == Some(0));
    eventually("the plain rule", || {
        let r =
            String::from_utf8_lossy(&node.run("nft", &["list", "table", "inet", "cni_route_agent"]).stdout)
                .into_owned();
        r.contains("masquerade\n") && !r.contains("fully-random")
    });
}
