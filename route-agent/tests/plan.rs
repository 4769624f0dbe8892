//! `cni-route-agent plan`: what the next sync would do, changing nothing; compared with what
//! the next real sync then does.

use std::path::Path;
use std::process::{Command, Stdio};

use cni_conformance::cluster::{Cluster, Plugins};
use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use serde_json::{json, Value};

mod common;
use common::{eventually, metric, Agent, Tmp};

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");

fn flags(file: &Path, conf: &Path) -> Vec<String> {
    ["--node-name", "node-1", "--source", "file", "--resync-seconds", "3600", "--nodes-file"]
        .iter()
        .map(|s| s.to_string())
        .chain([file.display().to_string(), "--cni-conf-dir".into(), conf.display().to_string()])
        .collect()
}

fn plan(ns: &Netns, flags: &[String]) -> Value {
    let mut c = Command::new(AGENT);
    c.args(["plan", "--json"]).args(flags).env("RUST_LOG", "warn");
    ns.enter(&mut c);
    let out = c.output().expect("run plan");
    assert!(out.status.success(), "plan: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn start(ns: &Netns, flags: &[String]) -> Agent {
    let mut c = Command::new(AGENT);
    c.args(flags).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::inherit());
    ns.enter(&mut c);
    Agent(c.spawn().expect("start agent"))
}

/// Everything the agent could change in the node: its routes, nexthops, nft table.
fn kernel_state(ns: &Netns) -> (String, String, bool) {
    let table = ns.run("nft", &["list", "table", "inet", "cni_route_agent"]).status.success();
    (ns.ip(&["route", "show", "proto", "168"]), ns.ip(&["nexthop", "show", "proto", "168"]), table)
}

/// The agent's routes as `dst via gw`, sorted.
fn routes(ns: &Netns) -> Vec<String> {
    let mut v: Vec<String> = ns
        .ip(&["route", "show", "proto", "168"])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let via = w.iter().position(|x| *x == "via")?;
            Some(format!("{} via {}", w[0], w.get(via + 1)?))
        })
        .collect();
    v.sort();
    v
}

fn planned(p: &Value, key: &str) -> Vec<String> {
    let mut v: Vec<String> = p["routes"][key]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{} via {}", r["dst"].as_str().unwrap_or(""), r["via"].as_str().unwrap_or("")))
        .collect();
    v.sort();
    v
}

/// The netlink writes a plan announces: routes, then nexthops, created and deleted.
fn writes(p: &Value) -> u64 {
    let n = |v: &Value| v.as_array().map_or(0, Vec::len) as u64;
    n(&p["routes"]["add_or_replace"])
        + n(&p["routes"]["delete"])
        + n(&p["nexthops"]["create"])
        + n(&p["nexthops"]["delete"])
}

fn write_nodes(path: &Path, nodes: Vec<Value>) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "nodes": nodes }).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn plan_changes_nothing_and_says_what_the_next_sync_does() {
    require_root("route agent plan");
    let tmp = Tmp::new("plan");
    let dir = Path::new(AGENT).parent().expect("target dir").to_path_buf();
    let cl = Cluster::new(
        "rpn",
        3,
        Plugins { dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() },
        true,
    );
    let node = &cl.nodes[0].ns;
    let file = tmp.0.join("nodes.json");
    let mut entries: Vec<Value> = cl.nodes.iter().map(|n| n.nodes_file_entry()).collect();
    write_nodes(&file, entries.clone());
    let conf = tmp.0.join("cni");
    let f = flags(&file, &conf);

    // A node the agent never ran on.
    let before = kernel_state(node);
    let p = plan(node, &f);
    assert_eq!(kernel_state(node), before, "plan changed the kernel");
    assert!(!conf.exists(), "plan wrote the conflist");
    let want: Vec<String> =
        (1..3).map(|j| format!("{} via {}", cl.nodes[j].pod_cidr, cl.nodes[j].ip)).collect();
    assert_eq!(planned(&p, "add_or_replace"), want, "{p:#}");
    assert_eq!(p["nexthops"]["create"].as_array().map(Vec::len), Some(2), "{p:#}");
    assert_eq!(p["masquerade"]["sources"], json!([cl.nodes[0].pod_cidr]));
    let agent = start(node, &f);
    eventually("the agent's routes", || routes(node) == want);
    eventually("ready", || metric(node, "ready") == Some(1));
    assert_eq!(metric(node, "netlink_writes_total"), Some(writes(&p)), "writes planned {p:#}");
    let rules =
        String::from_utf8_lossy(&node.run("nft", &["list", "table", "inet", "cni_route_agent"]).stdout)
            .into_owned();
    assert!(rules.contains(&format!("ip saddr {} ", cl.nodes[0].pod_cidr)), "{rules}");
    // Nothing left to do: an empty plan.
    let p = plan(node, &f);
    assert_eq!(writes(&p), 0, "{p:#}");
    agent.terminate();

    // While the agent is down, node-3 leaves and node-2 moves: the plan says so, changes
    // nothing, and the restarted agent does exactly that.
    entries.truncate(2);
    entries[1]["addresses"] = json!(["10.200.0.99"]);
    write_nodes(&file, entries);
    let before = kernel_state(node);
    let p = plan(node, &f);
    assert_eq!(kernel_state(node), before, "plan changed the kernel");
    assert_eq!(planned(&p, "add_or_replace"), [format!("{} via 10.200.0.99", cl.nodes[1].pod_cidr)]);
    assert_eq!(planned(&p, "delete"), [format!("{} via {}", cl.nodes[2].pod_cidr, cl.nodes[2].ip)]);
    assert_eq!(p["nexthops"]["create"].as_array().map(Vec::len), Some(1), "{p:#}");
    assert_eq!(p["nexthops"]["delete"].as_array().map(Vec::len), Some(2), "{p:#}");
    let mut c = Command::new(AGENT);
    c.arg("plan").args(&f);
    node.enter(&mut c);
    let table = String::from_utf8_lossy(&c.output().expect("plan").stdout).into_owned();
    assert!(table.contains("routes: 1 to add or replace, 1 to delete, 0 unchanged"), "{table}");
    let _agent = start(node, &f);
    eventually("the planned routes", || {
        routes(node) == [format!("{} via 10.200.0.99", cl.nodes[1].pod_cidr)]
    });
    eventually("synced", || metric(node, "ready") == Some(1));
    assert_eq!(metric(node, "netlink_writes_total"), Some(writes(&p)), "writes planned {p:#}");
}
