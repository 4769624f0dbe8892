//! The policy engine's nft scripts are accepted by the kernel, whole and as element updates.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use cni_route_agent::policy::objects::parse_into;
use cni_route_agent::policy::{Applied, Cluster, Engine};

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
    let want = cni_route_agent::policy::compile(&cluster, "n1");
    let (script, kind) = engine.script(&want);
    assert_eq!(kind, cni_route_agent::policy::Applied::Table);
    if std::env::var_os("SHOW_SCRIPT").is_some() {
        eprintln!("{script}");
    }
    nft(&ns, &script).unwrap();
    engine.mark_applied(want);
    // A pod appears on another node, in an existing group's peer sets: elements only.
    let mut c2 = (*cluster.pods["x/c"]).clone();
    c2.name = "d".into();
    c2.ips = vec!["10.244.2.9".parse().unwrap(), "fd00:244:2::9".parse().unwrap()];
    cluster.pods.insert("x/d".into(), Arc::new(c2));
    let want = cni_route_agent::policy::compile(&cluster, "n1");
    let (script, kind) = engine.script(&want);
    assert_eq!(kind, cni_route_agent::policy::Applied::Elements, "{script}");
    nft(&ns, &script).unwrap();
    engine.mark_applied(want);
    // A local pod's labels change so that other policies select it: its new group's chains
    // are added and the emptied group's removed, in place, the table kept.
    Arc::make_mut(cluster.pods.get_mut("x/b").unwrap()).labels.insert("pod".into(), "a".into());
    let want = cni_route_agent::policy::compile(&cluster, "n1");
    let (script, kind) = engine.script(&want);
    assert_eq!(kind, cni_route_agent::policy::Applied::Rules, "{script}");
    assert!(!script.contains("delete table") && script.contains("delete chain"), "{script}");
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
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}
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
            // The first sync makes the table; each later one moves the pod between groups.
            let expected = if round == 1 { Applied::Table } else { Applied::Rules };
            assert_eq!(kind, expected);
            let u = std::net::UdpSocket::bind("10.244.1.5:0").unwrap();
            let _ = u.send_to(b"x", "10.244.1.5:9");
            assert_eq!(engine.dropped(), [0, round], "after {round} tables, one drop each");
        }
    })
    .join()
    .unwrap();
}

/// `nft list table` of `table` in `ns`, without the handles and counters that differ between
/// two tables with the same content, its sets and chains in name order (a table changed in
/// place lists what was added last at the end).
fn listing(table: &str) -> String {
    // Run from a thread inside the test's namespace: the child inherits it.
    let out = Command::new("nft").args(["list", "table", "inet", table]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).replace(table, "T");
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("\t") && !line.starts_with("\t\t") && !line.starts_with("\t}") {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks.sort();
    blocks.concat()
}

#[test]
fn changes_in_place_leave_what_a_full_replace_would() {
    require_root("changes_in_place_leave_what_a_full_replace_would");
    let ns = Netns::new("polnl");
    let mut cluster = Cluster::default();
    let mut defects = Vec::new();
    parse_into(OBJECTS, "t", &mut cluster, &mut defects).unwrap();
    let file = ns.file();
    let steps = std::thread::spawn(move || {
        nix::sched::setns(std::os::fd::AsFd::as_fd(&file), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut engine = Engine::with_table("n1", "churn");
        // Pods first, then every policy at once: each kind of set and rule made in place.
        let mut bare = cluster.clone();
        bare.policies.clear();
        let (kind, _) = engine.sync(&bare).unwrap();
        assert_eq!(kind, Applied::Table);
        let (kind, _) = engine.sync(&cluster).unwrap();
        assert_eq!(kind, Applied::Rules);
        // Churn within the groups there are: a pod with named ports added beside `a` (same
        // labels, same group), a remote pod deleted, a remote pod's labels changed.
        let mut d = (*cluster.pods["x/a"]).clone();
        d.name = "d".into();
        d.ips = vec!["10.244.1.9".parse().unwrap(), "fd00:244:1::9".parse().unwrap()];
        cluster.pods.insert("x/d".into(), Arc::new(d));
        cluster.pods.remove("x/c");
        let (kind, _) = engine.sync(&cluster).unwrap();
        assert_eq!(kind, Applied::Elements);
        assert_eq!(engine.netlink_updates, 2, "the updates went over netlink");
        let same = |cluster: &Cluster, n: u32| {
            let whole = format!("whole{n}");
            Engine::with_table("n1", &whole).sync(cluster).unwrap();
            assert_eq!(listing("churn").replace("churn", "T"), listing(&whole), "step {n}");
        };
        same(&cluster, 1);
        // A local pod into another group, and a policy changed.
        Arc::make_mut(cluster.pods.get_mut("x/b").unwrap()).labels.insert("pod".into(), "a".into());
        let (kind, _) = engine.sync(&cluster).unwrap();
        assert_eq!(kind, Applied::Rules);
        same(&cluster, 2);
        cluster.policies.remove("x/deny");
        let (kind, _) = engine.sync(&cluster).unwrap();
        assert_eq!(kind, Applied::Rules);
        assert_eq!(engine.netlink_updates, 4, "chains and sets changed over netlink too");
        same(&cluster, 3);
    });
    steps.join().unwrap();
}
