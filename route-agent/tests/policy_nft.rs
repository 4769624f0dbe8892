//! The policy engine's nft scripts are accepted by the kernel, whole and as element updates.

use std::io::Write;
use std::process::{Command, Stdio};

use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use cni_route_agent::policy::objects::parse_into;
use cni_route_agent::policy::{Cluster, Engine};

fn nft(ns: &Netns, script: &str) -> Result<(), String> {
    let mut c = Command::new("nft");
    c.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    ns.enter(&mut c);
    let mut child = c.spawn().map_err(|e| e.to_string())?;
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}\n--- script ---\n{script}", String::from_utf8_lossy(&out.stderr)))
    }
}

const OBJECTS: &str = include_str!("policy_nft.yaml");

#[test]
fn every_kind_of_rule_loads_and_pod_churn_is_element_updates() {
    require_root("every_kind_of_rule_loads_and_pod_churn_is_element_updates");
    let ns = Netns::new("polnft");
    let mut cluster = Cluster::default();
    let mut defects = Vec::new();
    parse_into(OBJECTS, "t", &mut cluster, &mut defects).unwrap();
    assert!(defects.is_empty(), "{defects:?}");
    let mut engine = Engine::with_table("n1", "polt");
    let want = cni_route_agent::policy::compile(&cluster, "n1", "polt");
    let (script, kind) = engine.script(&want);
    assert_eq!(kind, cni_route_agent::policy::Applied::Table);
    if std::env::var_os("SHOW_SCRIPT").is_some() {
        eprintln!("{script}");
    }
    nft(&ns, &script).unwrap();
    engine.mark_applied(want);
    // A pod's labels change and another pod appears: elements only.
    cluster.pods.get_mut("x/b").unwrap().labels.insert("pod".into(), "a".into());
    let mut c2 = cluster.pods["x/c"].clone();
    c2.name = "d".into();
    c2.ips = vec!["10.244.1.9".parse().unwrap(), "fd00:244:1::9".parse().unwrap()];
    cluster.pods.insert("x/d".into(), c2);
    let want = cni_route_agent::policy::compile(&cluster, "n1", "polt");
    let (script, kind) = engine.script(&want);
    assert_eq!(kind, cni_route_agent::policy::Applied::Elements, "{script}");
    nft(&ns, &script).unwrap();
}

/// The drop counters survive table replacements exactly: each replaced table's count is
/// carried over once (it used to be carried over with everything carried before, doubling
/// the total on every policy change until the addition overflowed and the agent panicked).
#[test]
fn dropped_packets_add_up_across_table_replacements() {
    require_root("dropped_packets_add_up_across_table_replacements");
    let ns = Netns::new("poldrop");
    let f = ns.file();
    std::thread::spawn(move || {
        // The engine's nft runs inherit this thread's namespace.
        nix::sched::setns(std::os::fd::AsFd::as_fd(&f), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let pods = "\
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIPs: [{ip: 10.244.1.5}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress, namespace: x}
spec: {podSelector: {}, policyTypes: [Egress], egress: []}
";
        let extra = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: other, namespace: x}
spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Ingress]}
";
        let mut clusters = Vec::new();
        for text in [pods.to_string(), format!("{pods}{extra}")] {
            let mut cluster = Cluster::default();
            parse_into(&text, "t", &mut cluster, &mut Vec::new()).unwrap();
            clusters.push(cluster);
        }
        // The pod's address on lo: what it sends to itself passes the input hook, where
        // its egress isolation drops it, one datagram one drop.
        let st = Command::new("ip").args(["addr", "add", "10.244.1.5/32", "dev", "lo"]).status().unwrap();
        assert!(st.success());
        let mut engine = Engine::with_table("n1", "poldrop");
        for round in 1..=6u64 {
            let (kind, _) = engine.sync(&clusters[(round % 2) as usize]).unwrap();
            assert_eq!(kind, cni_route_agent::policy::Applied::Table);
            let u = std::net::UdpSocket::bind("10.244.1.5:0").unwrap();
            let _ = u.send_to(b"x", "10.244.1.5:9");
            assert_eq!(engine.dropped(), [0, round], "after {round} tables, one drop each");
        }
    })
    .join()
    .unwrap();
}

/// `nft list table` of `table` in `ns`, without the handles and counters that differ between
/// two tables with the same content.
fn listing(ns: &Netns, table: &str) -> String {
    let out = ns.run("nft", &["list", "table", "inet", table]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).replace(table, "T")
}

#[test]
fn element_updates_over_netlink_leave_what_a_full_replace_would() {
    require_root("element_updates_over_netlink_leave_what_a_full_replace_would");
    let ns = Netns::new("polnl");
    let mut cluster = Cluster::default();
    let mut defects = Vec::new();
    parse_into(OBJECTS, "t", &mut cluster, &mut defects).unwrap();
    let file = ns.file();
    let steps = std::thread::spawn(move || {
        nix::sched::setns(std::os::fd::AsFd::as_fd(&file), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut engine = Engine::with_table("n1", "churn");
        let (kind, _) = engine.sync(&cluster).unwrap();
        assert_eq!(kind, cni_route_agent::policy::Applied::Table);
        // Churn: a relabel, a pod with named ports added, a pod deleted, an address moved.
        cluster.pods.get_mut("x/b").unwrap().labels.insert("pod".into(), "a".into());
        let mut d = cluster.pods["x/a"].clone();
        d.name = "d".into();
        d.ips = vec!["10.244.1.9".parse().unwrap(), "fd00:244:1::9".parse().unwrap()];
        cluster.pods.insert("x/d".into(), d);
        cluster.pods.remove("x/c");
        let (kind, _) = engine.sync(&cluster).unwrap();
        assert_eq!(kind, cni_route_agent::policy::Applied::Elements);
        assert_eq!(engine.netlink_updates, 1, "the update went over netlink");
        // The same cluster written whole into another table.
        let mut fresh = Engine::with_table("n1", "whole");
        fresh.sync(&cluster).unwrap();
    });
    steps.join().unwrap();
    assert_eq!(listing(&ns, "churn"), listing(&ns, "whole"));
}
