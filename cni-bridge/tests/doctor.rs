//! `cni-bridge doctor`: on a healthy node namespace every check passes; breaking one thing at a
//! time makes exactly the check about it fail (and the exit status non-zero).

mod common;

use std::path::Path;
use std::process::Command;

use cni_conformance::{require_root, Netns, Pause};
use common::*;
use serde_json::{json, Value};

struct Doctor<'a> {
    w: &'a World,
    conf: std::path::PathBuf,
}

impl Doctor<'_> {
    /// Runs the doctor in the node namespace; (exit code, the checks).
    fn run(&self, extra: &[&str]) -> (i32, Vec<Value>) {
        let mut c = Command::new(BRIDGE);
        c.args(["doctor", "--json", "--conf", self.conf.to_str().unwrap()])
            .args(["--bin-dir", self.w.plugins.dir.to_str().unwrap(), "--metrics", "127.0.0.1:9"])
            .args(extra)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        self.w.node.enter(&mut c);
        let o = c.output().unwrap();
        let checks: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!("doctor output not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout))
        });
        (o.status.code().unwrap_or(-1), checks.as_array().unwrap().clone())
    }

    /// The names of the failed checks.
    fn failing(&self, extra: &[&str]) -> Vec<String> {
        let (code, checks) = self.run(extra);
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| c["status"] == "fail")
            .map(|c| format!("{}: {}", c["check"].as_str().unwrap(), c["detail"].as_str().unwrap()))
            .collect();
        assert_eq!(code, i32::from(!failed.is_empty()), "exit status follows the failures: {failed:?}");
        for c in &checks {
            if c["status"] == "fail" {
                assert!(!c["fix"].as_str().unwrap_or("").is_empty(), "every failure names its fix: {c}");
            }
        }
        failed
    }

    /// Asserts the only failing check is `name`, and returns its detail.
    fn only_failure(&self, name: &str, extra: &[&str]) -> String {
        let f = self.failing(extra);
        assert!(
            f.len() == 1 && f[0].starts_with(&format!("{name}: ")),
            "expected only {name} to fail, got {f:?}"
        );
        f[0].clone()
    }
}

fn setup<'a>(w: &'a World, subnet: &str, extra: Value) -> (Doctor<'a>, Value) {
    let mut conf = w.conf("1.1.0", subnet, json!({"hairpinMode": true, "ipMasq": true}));
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        conf[k] = v;
    }
    let list = json!({"cniVersion": "1.1.0", "name": "testnet", "plugins": [conf.clone()]});
    let path = w.tmp.join("10-test.conflist");
    std::fs::write(&path, list.to_string()).unwrap();
    (Doctor { w, conf: path }, conf)
}

fn add(w: &World, pod: &Pause, id: &str, conf: &Value) -> String {
    let o = w.call("ADD", id, &pod.path.display().to_string(), conf);
    assert_eq!(o.code, 0, "ADD: {} {}", o.stdout, o.stderr);
    o.json["interfaces"][1]["name"].as_str().unwrap().to_string()
}

#[test]
fn a_healthy_node_passes_and_each_broken_thing_fails_its_own_check() {
    require_root("a_healthy_node_passes_and_each_broken_thing_fails_its_own_check");
    let w = World::new("doctor");
    let (d, conf) = setup(&w, "10.61.0.0/24", json!({}));
    let (pa, pb) = (Pause::new(), Pause::new());
    let veth_a = add(&w, &pa, "pod-a", &conf);
    add(&w, &pb, "pod-b", &conf);
    assert_eq!(d.failing(&[]), Vec::<String>::new(), "a fresh node is healthy");
    let node = &w.node;

    node.ip(&["link", "set", "cni0", "down"]);
    d.only_failure("bridge", &[]);
    node.ip(&["link", "set", "cni0", "up"]);

    node.ip(&["addr", "del", "10.61.0.1/24", "dev", "cni0"]);
    d.only_failure("gateway addresses", &[]);
    node.ip(&["addr", "add", "10.61.0.1/24", "dev", "cni0"]);

    let mac = node.ip_json(&["link", "show", &veth_a])[0]["address"].as_str().unwrap().to_string();
    let pinned = node.ip_json(&["link", "show", "cni0"])[0]["address"].as_str().unwrap().to_string();
    node.ip(&["link", "set", "cni0", "address", &mac]);
    d.only_failure("bridge MAC pinned", &[]);
    node.ip(&["link", "set", "cni0", "address", &pinned]);

    let bridge_cmd = |args: &[&str]| assert!(node.run("bridge", args).status.success());
    bridge_cmd(&["link", "set", "dev", &veth_a, "hairpin", "off"]);
    assert!(d.only_failure("hairpin", &[]).contains(&veth_a));
    bridge_cmd(&["link", "set", "dev", &veth_a, "hairpin", "on"]);

    node.sysctl("net.ipv4.ip_forward", "0").unwrap();
    d.only_failure("forwarding", &[]);
    node.sysctl("net.ipv4.ip_forward", "1").unwrap();

    node.ip(&["link", "set", &veth_a, "mtu", "1400"]);
    // The bridge follows its smallest port down; the other pod's port then differs from it.
    let f = d.only_failure("MTU", &[]);
    assert!(f.contains("MTU 1400") || f.contains("!= bridge 1400"), "{f}");
    node.ip(&["link", "set", &veth_a, "mtu", "1500"]);

    // A lease without a pod (as after a lost DEL), and then its masquerade entry too.
    let lease = Path::new(&w.data_dir()).join("testnet/10.61.0.200");
    std::fs::write(&lease, "gone-pod\r\neth0").unwrap();
    let f = d.failing(&[]);
    assert!(f.iter().any(|f| f.starts_with("leases vs pods: ") && f.contains("10.61.0.200")), "{f:?}");
    assert!(f.iter().any(|f| f.starts_with("masquerade entries: ") && f.contains("10.61.0.200")), "{f:?}");
    std::fs::remove_file(&lease).unwrap();

    // A pod whose lease was removed: the leak the other way.
    let ip_a = w.leases().into_iter().find(|ip| {
        std::fs::read_to_string(Path::new(&w.data_dir()).join("testnet").join(ip))
            .unwrap()
            .starts_with("pod-a")
    });
    let ip_a = ip_a.expect("pod-a's lease");
    let lease_a = Path::new(&w.data_dir()).join("testnet").join(&ip_a);
    let saved = std::fs::read(&lease_a).unwrap();
    std::fs::remove_file(&lease_a).unwrap();
    let f = d.failing(&[]);
    assert!(f.iter().any(|f| f.starts_with("leases vs pods: ") && f.contains("without a lease")), "{f:?}");
    std::fs::write(&lease_a, saved).unwrap();

    // A masquerade entry removed behind the plugin's back.
    let del =
        node.run("nft", &["delete", "element", "inet", "cni_bridge", "pods4", &format!("{{ {ip_a} }}")]);
    assert!(del.status.success(), "{}", String::from_utf8_lossy(&del.stderr));
    assert!(d.only_failure("masquerade entries", &[]).contains(&ip_a));
    let o = w.call("DEL", "pod-a", &pa.path.display().to_string(), &conf);
    assert_eq!(o.code, 0, "{}", o.stderr);
    add(&w, &pa, "pod-a", &conf);
    assert_eq!(d.failing(&[]), Vec::<String>::new(), "healthy again");

    // A NetworkPolicy table left with no agent to keep it current.
    let t = node.run("nft", &["add", "table", "inet", "cni_route_agent_policy"]);
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    assert!(d.only_failure("network policy", &[]).contains("no cni-route-agent answers"));
    assert!(node.run("nft", &["delete", "table", "inet", "cni_route_agent_policy"]).status.success());

    // kube-proxy's iptables mode present: bridged traffic must pass iptables.
    assert!(node.run("iptables", &["-t", "nat", "-N", "KUBE-SERVICES"]).status.success());
    if Path::new("/proc/sys/net/bridge").exists() {
        node.sysctl("net.bridge.bridge-nf-call-iptables", "0").unwrap();
        d.only_failure("br_netfilter", &[]);
        node.sysctl("net.bridge.bridge-nf-call-iptables", "1").unwrap();
        assert_eq!(d.failing(&[]), Vec::<String>::new());
    } else {
        d.only_failure("br_netfilter", &[]);
    }
}

#[test]
fn config_problems_fail_the_config_checks() {
    require_root("config_problems_fail_the_config_checks");
    let w = World::new("doctor-conf");
    let (d, _) = setup(&w, "10.62.0.0/24", json!({}));
    let list: Value = serde_json::from_str(&std::fs::read_to_string(&d.conf).unwrap()).unwrap();

    let mut missing = list.clone();
    missing["plugins"][0]["ipam"]["type"] = json!("no-such-ipam");
    std::fs::write(&d.conf, missing.to_string()).unwrap();
    assert!(d.failing(&[]).iter().any(|f| f.starts_with("plugins present: ") && f.contains("no-such-ipam")));

    std::fs::write(&d.conf, "{\"cniVersion\": \"1.1.0\", ").unwrap();
    let f = d.failing(&[]);
    assert!(f.len() == 1 && f[0].starts_with("conflist: "), "{f:?}");

    std::fs::write(&d.conf, json!({"cniVersion": "1.1.0", "plugins": []}).to_string()).unwrap();
    let f = d.failing(&[]);
    assert!(f.len() == 1 && f[0].contains("name") && f[0].contains("plugins"), "{f:?}");
}

#[test]
fn the_agent_metrics_and_a_pods_own_view_are_checked() {
    require_root("the_agent_metrics_and_a_pods_own_view_are_checked");
    let w = World::new("doctor-pod");
    let (d, conf) = setup(&w, "10.63.0.0/24", json!({"isDefaultGateway": true}));
    // A pod with its own mount namespace and a resolv.conf of ndots:9.
    let resolv = w.tmp.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:9\n")
        .unwrap();
    let pod = PodWithResolv::new(&resolv);
    let o = w.call("ADD", "pod-r", &pod.ns, &conf);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let f = d.only_failure("pod resolv.conf", &["--netns", &pod.ns]);
    assert!(f.contains("ndots:9"), "{f}");
    std::fs::write(&resolv, "nameserver 10.96.0.10\noptions ndots:5\n").unwrap();
    let (_, checks) = d.run(&["--netns", &pod.ns]);
    let pod_checks: Vec<&Value> =
        checks.iter().filter(|c| c["check"].as_str().unwrap().starts_with("pod ")).collect();
    assert_eq!(pod_checks.len(), 3, "{checks:?}");
    assert!(pod_checks.iter().all(|c| c["status"] == "pass"), "{pod_checks:?}");

    // An agent whose routes are not all in: served from inside the node namespace.
    let server = MetricsServer::start(
        &w.node,
        "cni_route_agent_routes_desired 3\ncni_route_agent_routes_installed 1\ncni_route_agent_ready 1\n",
    );
    let f = d.only_failure("routes to other nodes", &["--metrics", &server.addr]);
    assert!(f.contains("1 of 3"), "{f}");
    let ok = MetricsServer::start(
        &w.node,
        "cni_route_agent_routes_desired 3\ncni_route_agent_routes_installed 3\ncni_route_agent_ready 1\n",
    );
    let (_, checks) = d.run(&["--metrics", &ok.addr]);
    let routes = checks.iter().find(|c| c["check"] == "routes to other nodes").unwrap();
    assert_eq!(routes["status"], "pass", "{routes}");
}

/// A sleeping process in its own network and mount namespaces, with `resolv` bind-mounted
/// over /etc/resolv.conf; killed on drop.
struct PodWithResolv {
    child: std::process::Child,
    ns: String,
}

impl PodWithResolv {
    fn new(resolv: &Path) -> PodWithResolv {
        let ready = resolv.with_extension("ready");
        let script = format!(
            "mount --bind {} /etc/resolv.conf && touch {} && exec sleep 600",
            resolv.display(),
            ready.display()
        );
        let child = Command::new("unshare")
            .args(["--net", "--mount", "--propagation", "private", "sh", "-c", &script])
            .spawn()
            .unwrap();
        let pod = PodWithResolv { ns: format!("/proc/{}/ns/net", child.id()), child };
        // Bounded wait for the mount: the script touches the file once it is done.
        for _ in 0..1000 {
            if ready.exists() {
                return pod;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("the pod process never got ready");
    }
}

impl Drop for PodWithResolv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-connection-at-a-time /metrics server bound inside a namespace, on an ephemeral port.
struct MetricsServer {
    addr: String,
}

impl MetricsServer {
    fn start(ns: &Netns, body: &'static str) -> MetricsServer {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let f = ns.file();
        let (tx, rx) = std::sync::mpsc::channel();
        // The thread enters the namespace, so its socket lives there; it serves until the test ends.
        std::thread::spawn(move || {
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(l.local_addr().unwrap().to_string()).unwrap();
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}");
            }
        });
        MetricsServer { addr: rx.recv().unwrap() }
    }
}

#[test]
fn masquerade_entries_of_the_iptables_backend_are_checked_too() {
    require_root("masquerade_entries_of_the_iptables_backend_are_checked_too");
    let w = World::new("doctor-ipt");
    let (d, conf) = setup(&w, "10.66.0.0/24", json!({"ipMasqBackend": "iptables"}));
    let pod = Pause::new();
    add(&w, &pod, "pod-i", &conf);
    assert_eq!(d.failing(&[]), Vec::<String>::new(), "the CNIB- jump matches the lease");
    let ip = w.leases().remove(0);
    // The jump goes (as if deleted by hand); the lease stays.
    let saved = w.node.run("iptables-save", &["-t", "nat"]);
    let rule = String::from_utf8_lossy(&saved.stdout)
        .lines()
        .find(|l| l.starts_with("-A POSTROUTING") && l.contains("CNIB-"))
        .expect("the jump")
        .replacen("-A ", "", 1);
    let args: Vec<String> =
        ["-t", "nat", "-D"].iter().map(|s| s.to_string()).chain(shell_words(&rule)).collect();
    let del = w.node.run("iptables", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(del.status.success(), "{}", String::from_utf8_lossy(&del.stderr));
    assert!(d.only_failure("masquerade entries", &[]).contains(&ip));
}

/// Splits an iptables-save rule into arguments (double quotes group words).
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in s.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
