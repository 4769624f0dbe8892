//! `cni-route-agent doctor` on a namespace cluster: healthy, then one thing broken at a time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cni_conformance::cluster::{Cluster, Plugins};
use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use serde_json::{json, Value};

mod common;
use common::{eventually, Agent, Tmp};

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");

fn flags(name: &str, file: &Path, conf: &Path) -> Vec<String> {
    ["--node-name", name, "--source", "file", "--no-portmap", "--resync-seconds", "3600", "--nodes-file"]
        .iter()
        .map(|s| s.to_string())
        .chain([file.display().to_string(), "--cni-conf-dir".into(), conf.display().to_string()])
        .collect()
}

fn start(ns: &Netns, flags: &[String]) -> Agent {
    let mut c = Command::new(AGENT);
    c.args(flags).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::inherit());
    ns.enter(&mut c);
    Agent(c.spawn().expect("start agent"))
}

/// (exit code, checks by name -> (status, detail)).
fn doctor(ns: &Netns, bin: &Path, flags: &[String]) -> (i32, Vec<(String, String, String)>) {
    let mut c = Command::new(AGENT);
    c.args(["doctor", "--json", "--bin-dir"]).arg(bin).args(flags).env("RUST_LOG", "warn");
    ns.enter(&mut c);
    let out = c.output().expect("run doctor");
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let checks = checks
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
            (s("check"), s("status"), s("detail"))
        })
        .collect();
    (out.status.code().unwrap_or(-1), checks)
}

fn status<'a>(checks: &'a [(String, String, String)], name: &str) -> (&'a str, &'a str) {
    checks
        .iter()
        .find(|c| c.0 == name)
        .map(|c| (c.1.as_str(), c.2.as_str()))
        .unwrap_or_else(|| panic!("no check {name:?} in {checks:#?}"))
}

const OWN: [&str; 7] = [
    "this node in the source",
    "routes missing or wrong",
    "routes stale",
    "nexthops missing",
    "nexthops stale",
    "conflist",
    "masquerade table",
];

#[test]
fn doctor_passes_a_sound_node_and_names_each_broken_thing() {
    require_root("route agent doctor");
    let tmp = Tmp::new("doctor");
    let bin: PathBuf = Path::new(AGENT).parent().expect("target dir").to_path_buf();
    let mut cl = Cluster::new(
        "rdr",
        2,
        Plugins { dir: bin.clone(), bridge: "cni-bridge".into(), ipam: "cni-host-local".into() },
        true,
    );
    let file = tmp.0.join("nodes.json");
    let entries: Vec<Value> = cl.nodes.iter().map(|n| n.nodes_file_entry()).collect();
    std::fs::write(&file, json!({ "nodes": entries }).to_string()).unwrap();
    // The conflist names the leases the cluster's pods use.
    let f: Vec<Vec<String>> = (0..2)
        .map(|i| {
            let mut f = flags(&cl.nodes[i].name, &file, &tmp.0.join(format!("cni{i}")));
            let data_dir = cl.nodes[i].conf["ipam"]["dataDir"].as_str().unwrap_or_default().to_string();
            f.extend(["--ipam-data-dir".to_string(), data_dir]);
            f
        })
        .collect();
    let a1 = start(&cl.nodes[0].ns, &f[0]);
    let _a2 = start(&cl.nodes[1].ns, &f[1]);
    let conflist = tmp.0.join("cni0").join("10-cni-route-agent.conflist");
    eventually("node-1's conflist", || conflist.exists());
    cl.add_pod(0, "rdr-p").unwrap();
    let node = &cl.nodes[0].ns;

    let (code, checks) = doctor(node, &bin, &f[0]);
    for name in OWN {
        assert_eq!(status(&checks, name).0, "pass", "{name}: {checks:#?}");
    }
    assert!(checks.iter().any(|c| c.0.starts_with("bridge: ")), "cni-bridge doctor's checks: {checks:#?}");
    assert_eq!(code, 0, "a sound node: {checks:#?}");

    // The agent down: a route removed by hand stays missing, and doctor names it.
    a1.terminate();
    node.ip(&["route", "del", &cl.nodes[1].pod_cidr]);
    let (code, checks) = doctor(node, &bin, &f[0]);
    assert_eq!(code, 1);
    let (s, detail) = status(&checks, "routes missing or wrong");
    assert!(s == "fail" && detail.contains(&cl.nodes[1].pod_cidr), "{checks:#?}");
    // A stale conflist: another range.
    let text = std::fs::read_to_string(&conflist).unwrap();
    std::fs::write(&conflist, text.replace(&cl.nodes[0].pod_cidr, "10.244.77.0/24")).unwrap();
    let (_, checks) = doctor(node, &bin, &f[0]);
    let (s, detail) = status(&checks, "conflist");
    assert!(s == "fail" && detail.contains("10.244.77.0/24"), "{checks:#?}");
    // The masquerade table gone.
    node.run("nft", &["delete", "table", "inet", "cni_route_agent"]);
    let (_, checks) = doctor(node, &bin, &f[0]);
    assert_eq!(status(&checks, "masquerade table").0, "fail", "{checks:#?}");
    // The agent back: everything it owns is repaired, and doctor agrees.
    let _a1 = start(node, &f[0]);
    eventually("doctor's own checks pass again", || {
        let (_, checks) = doctor(node, &bin, &f[0]);
        OWN.iter().all(|name| status(&checks, name).0 == "pass")
    });
}
