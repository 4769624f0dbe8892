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

/// (exit code, checks by name -> (status, detail)). Every failure of the agent's own checks
/// says how to fix it.
fn doctor(ns: &Netns, bin: &Path, flags: &[String]) -> (i32, Vec<(String, String, String)>) {
    let mut c = Command::new(AGENT);
    c.args(["doctor", "--json", "--bin-dir"]).arg(bin).args(flags).env("RUST_LOG", "warn");
    ns.enter(&mut c);
    let out = c.output().expect("run doctor");
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    for c in &checks {
        let own = !c["check"].as_str().unwrap_or("").starts_with("bridge: ");
        if own && c["status"] == "fail" {
            assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "a failure without its fix: {c:#}");
        }
    }
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
    // The peer's pod gateway is probed: it is on the bridge its first pod makes.
    cl.add_pod(1, "rdr-q").unwrap();
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
    // Plugins installed by install-cni match its record; one changed since is named.
    let installed = tmp.0.join("bin");
    let out = Command::new(AGENT).arg("install-cni").arg("--bin-dir").arg(&installed).output().unwrap();
    assert!(out.status.success(), "install-cni: {}", String::from_utf8_lossy(&out.stderr));
    let (_, checks) = doctor(node, &installed, &f[0]);
    assert_eq!(status(&checks, "installed plugins").0, "pass", "{checks:#?}");
    let mut bytes = std::fs::read(installed.join("cni-host-local")).unwrap();
    bytes.push(0);
    std::fs::write(installed.join("cni-host-local"), bytes).unwrap();
    let (code, checks) = doctor(node, &installed, &f[0]);
    let (s, detail) = status(&checks, "installed plugins");
    assert!(
        s == "fail" && detail.contains("cni-host-local: changed since install-cni wrote it"),
        "{checks:#?}"
    );
    assert_eq!(code, 1);
}

/// A check's detail, asserting its status.
fn expect<'a>(checks: &'a [(String, String, String)], name: &str, want: &str) -> &'a str {
    let (s, detail) = status(checks, name);
    assert_eq!(s, want, "{name}: {detail}\n{checks:#?}");
    detail
}

/// Three dual-stack nodes: node-1 and node-2 share the underlay, node-3 is behind a router
/// (reached through VXLAN). Each break is made on the path from node-1, the doctor run there
/// names it, and the break is undone before the next.
#[test]
fn doctor_probes_every_peer_and_names_each_broken_path() {
    require_root("route agent doctor: the path between nodes");
    let tmp = Tmp::new("doctor-path");
    let bin: PathBuf = Path::new(AGENT).parent().expect("target dir").to_path_buf();
    assert!(
        bin.join("cni-bridge").exists(),
        "build the plugins first: cargo build -p cni-bridge -p cni-host-local"
    );
    let plugins = Plugins { dir: bin.clone(), bridge: "cni-bridge".into(), ipam: "cni-host-local".into() };
    let mut cl = Cluster::dual_stack("rdp", 3, plugins, true);
    cl.add_router();
    cl.move_off_link(2);
    let file = tmp.0.join("nodes.json");
    let entries: Vec<Value> = cl.nodes.iter().map(|n| n.nodes_file_entry()).collect();
    std::fs::write(&file, json!({ "nodes": entries }).to_string()).unwrap();
    let f: Vec<Vec<String>> = (0..3)
        .map(|i| {
            let mut f = flags(&cl.nodes[i].name, &file, &tmp.0.join(format!("cni{i}")));
            let data_dir = cl.nodes[i].conf["ipam"]["dataDir"].as_str().unwrap_or_default().to_string();
            f.extend(["--ipam-data-dir".to_string(), data_dir]);
            f
        })
        .collect();
    let mut agents: Vec<Option<Agent>> = (0..3).map(|i| Some(start(&cl.nodes[i].ns, &f[i]))).collect();
    // Pods made from the agent's own conflist, as a runtime would: its MTU is what is probed.
    let conflist = |i: usize| tmp.0.join(format!("cni{i}")).join("10-cni-route-agent.conflist");
    for i in 0..3 {
        eventually(&format!("node-{}'s conflist with the tunnel's MTU", i + 1), || {
            let text = std::fs::read_to_string(conflist(i)).unwrap_or_default();
            serde_json::from_str::<Value>(&text).is_ok_and(|v| v["plugins"][0]["mtu"] == 1450)
        });
        let list: Value = serde_json::from_str(&std::fs::read_to_string(conflist(i)).unwrap()).unwrap();
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        cl.nodes[i].conf = conf;
        cl.add_pod(i, &format!("rdpn{}", i + 1)).unwrap();
    }
    for n in &cl.nodes {
        eventually(&format!("{}: routes to both other nodes, both families", n.name), || {
            n.ns.ip(&["route", "show", "proto", "168"]).lines().count()
                + n.ns.ip(&["-6", "route", "show", "proto", "168"]).lines().count()
                == 4
        });
    }
    // Neighbour discovery on the fresh underlay waits for the links' own addresses to leave
    // duplicate address detection: until then a first IPv6 packet between nodes may be lost.
    for n in &cl.nodes {
        eventually(&format!("{}: eth0's IPv6 addresses usable", n.name), || {
            n.ns.ip(&["-6", "addr", "show", "dev", "eth0", "tentative"]).trim().is_empty()
        });
    }
    let node = &cl.nodes[0].ns;
    let peers = ["peer node-2 IPv4", "peer node-2 IPv6", "peer node-3 IPv4", "peer node-3 IPv6"];

    // Sound: every check passes, every peer's gateway answers at the pod MTU.
    let (code, checks) = doctor(node, &bin, &f[0]);
    let bad: Vec<_> = checks.iter().filter(|c| c.1 != "pass" && c.1 != "skip").collect();
    assert!(bad.is_empty() && code == 0, "a sound cluster: {bad:#?}");
    for name in peers {
        assert!(expect(&checks, name, "pass").contains("1450-byte packets with DF"), "{checks:#?}");
    }
    assert!(expect(&checks, "peer node-3 IPv4", "pass").contains("tunnel cra-vxlan4"));
    assert!(expect(&checks, "peer node-2 IPv4", "pass").contains("direct via 10.200.0.12"));
    assert!(expect(&checks, "peers probed", "pass").contains("2 peers, 4 pod gateways"));
    let tunnel = expect(&checks, "peer node-3 tunnel entries", "pass");
    assert!(tunnel.contains("fdb 0e:04:0a:c9:00:0d dst 10.201.0.13 on cra-vxlan4"), "{tunnel}");
    assert!(tunnel.contains("neighbour 10.244.3.0 lladdr 0e:04:0a:c9:00:0d"), "{tunnel}");
    expect(&checks, "source", "pass");
    expect(&checks, "source snapshot age", "pass");
    expect(&checks, "conflicting claims", "pass");

    // UDP to the VXLAN port dropped on the router between the segments: the tunnel loses
    // everything while node-3 itself answers.
    let router = cl.router.as_ref().unwrap();
    let nft = |args: &str| {
        let out = router.run("nft", &args.split(' ').collect::<Vec<_>>());
        assert!(out.status.success(), "nft {args}: {}", String::from_utf8_lossy(&out.stderr));
    };
    nft("add table inet cut");
    nft("add chain inet cut path { type filter hook forward priority 0 ; }");
    nft("add rule inet cut path udp dport 4789 drop");
    let (code, checks) = doctor(node, &bin, &f[0]);
    assert_eq!(code, 1);
    for family in ["IPv4", "IPv6"] {
        let detail = expect(&checks, &format!("peer node-3 {family}"), "fail");
        assert!(detail.contains("the tunnel loses packets") && detail.contains("10.201.0.13"), "{detail}");
        expect(&checks, &format!("peer node-2 {family}"), "pass");
    }
    nft("delete table inet cut");

    // The underlay MTU lowered on the far segment's side of the router: full-size packets
    // through the tunnel die silently, small ones pass.
    cl.underlay.ip(&["link", "set", "rt1", "mtu", "1400"]);
    let (code, checks) = doctor(node, &bin, &f[0]);
    assert_eq!(code, 1);
    let detail = expect(&checks, "peer node-3 IPv4", "fail");
    assert!(
        detail.contains("MTU black hole: packets of 1450 bytes are lost on the path to node-3"),
        "{detail}"
    );
    expect(&checks, "peer node-2 IPv4", "pass");
    cl.underlay.ip(&["link", "set", "rt1", "mtu", "1500"]);

    // A stale conflist (the agent rewrites it when its inputs change, not on a hand edit).
    let text = std::fs::read_to_string(conflist(0)).unwrap();
    std::fs::write(conflist(0), text.replace(&cl.nodes[0].pod_cidr, "10.244.77.0/24")).unwrap();
    let (code, checks) = doctor(node, &bin, &f[0]);
    assert_eq!(code, 1);
    assert!(expect(&checks, "conflist", "fail").contains("10.244.77.0/24"));
    std::fs::write(conflist(0), &text).unwrap();

    // The agent stopped, a route removed: named, and node-2's pods out of reach.
    agents[0].take().unwrap().terminate();
    node.ip(&["route", "del", &cl.nodes[1].pod_cidr]);
    let (code, checks) = doctor(node, &bin, &f[0]);
    assert_eq!(code, 1);
    assert!(expect(&checks, "routes missing or wrong", "fail").contains(&cl.nodes[1].pod_cidr));
    assert!(expect(&checks, "source snapshot age", "fail").contains("no agent answers"));
    expect(&checks, "peer node-2 IPv4", "fail");
    expect(&checks, "peer node-2 IPv6", "pass");
    agents[0] = Some(start(node, &f[0]));
    eventually("the restarted agent put the route back", || {
        node.ip(&["route", "show", "proto", "168"]).contains(&cl.nodes[1].pod_cidr)
    });

    // The agent stopped, node-3's FDB entry deleted: named per peer, and the tunnel to it dead.
    agents[0].take().unwrap().terminate();
    node.run("bridge", &["fdb", "del", "0e:04:0a:c9:00:0d", "dev", "cra-vxlan4", "dst", "10.201.0.13"]);
    let (code, checks) = doctor(node, &bin, &f[0]);
    assert_eq!(code, 1);
    let detail = expect(&checks, "peer node-3 tunnel entries", "fail");
    assert!(detail.contains("missing: fdb 0e:04:0a:c9:00:0d dst 10.201.0.13 on cra-vxlan4"), "{detail}");
    expect(&checks, "peer node-3 IPv4", "fail");
    agents[0] = Some(start(node, &f[0]));
    eventually("the restarted agent put the FDB entry back", || {
        String::from_utf8_lossy(&node.run("bridge", &["fdb", "show", "dev", "cra-vxlan4"]).stdout)
            .contains("dst 10.201.0.13")
    });
    eventually("the agent is back: doctor passes again", || doctor(node, &bin, &f[0]).0 == 0);

    // Two nodes listed that do not exist: one whose pod CIDR overlaps node-2's, one down
    // since ever (no namespace, no answer to ARP).
    let mut listed = entries.clone();
    listed.push(json!({"name": "node-0", "podCIDRs": ["10.244.2.0/25"], "addresses": ["10.200.0.98"]}));
    listed.push(json!({"name": "node-9", "podCIDRs": ["10.244.9.0/24"], "addresses": ["10.200.0.99"]}));
    let write = |nodes: &[Value]| {
        let next = tmp.0.join("nodes.next");
        std::fs::write(&next, json!({ "nodes": nodes }).to_string()).unwrap();
        std::fs::rename(&next, &file).unwrap();
    };
    write(&listed);
    let (code, checks) = doctor(node, &bin, &f[0]);
    assert_eq!(code, 1);
    let detail = expect(&checks, "conflicting claims", "fail");
    assert!(detail.contains("node-0 claims 10.244.2.0/25, overlapping node-2's 10.244.2.0/24"), "{detail}");
    assert!(expect(&checks, "peer node-0 IPv4", "fail").contains("not routed by this node"));
    assert!(expect(&checks, "peer node-9 IPv4", "fail").contains("peer unreachable"));
    expect(&checks, "peer node-2 IPv4", "pass");
    write(&entries);
    eventually("the agent dropped the route to node-9", || {
        !node.ip(&["route", "show", "proto", "168"]).contains("10.244.9.0/24")
    });

    // A peer listed but down: node-2's links down.
    cl.nodes[1].ns.ip(&["link", "set", "eth0", "down"]);
    let (code, checks) = doctor(node, &bin, &f[0]);
    assert_eq!(code, 1);
    for family in ["IPv4", "IPv6"] {
        let detail = expect(&checks, &format!("peer node-2 {family}"), "fail");
        assert!(detail.contains("peer unreachable"), "{detail}");
        expect(&checks, &format!("peer node-3 {family}"), "pass");
    }
    assert!(expect(&checks, "peers probed", "fail").contains("2 failed"));
    drop(agents);
}
