//! `cni-demo`: a small simulated cluster in network namespaces, its pod network made by the
//! CNI plugins, and what a user wants to see of it: pods, routes, and who reaches whom.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use cni_conformance::cluster::{Cluster, Plugins, Pod};
use cni_conformance::is_root;
use cni_conformance::traffic::exchange_within;
use std::time::Duration;

struct Args {
    nodes: usize,
    pods: usize,
    keep: bool,
    static_routes: bool,
    ipv4_only: bool,
    routed: bool,
    policy: bool,
    plugins: Plugins,
}

fn usage() -> ! {
    eprintln!(
        "usage: cni-demo [--nodes N] [--pods N] [--keep] [--static-routes] [--ipv4-only] [--routed] [--policy] [--cni-path DIR] [--bridge-type T] [--ipam-type T]\n\
         Brings up N nodes x N pods in network namespaces (default 2 x 3, dual-stack), shows pods,\n\
         routes and an all-pairs connectivity matrix per family, then removes everything (unless --keep).\n\
         --routed: the last node (at least 3 nodes) sits on another subnet behind a router; the\n\
         route agents reach it through VXLAN and the others directly.\n\
         --policy: pods are frontend, backend and db on every node; the matrix is shown again after\n\
         a default-deny ingress NetworkPolicy plus one rule letting frontends reach backends."
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let exe_dir =
        std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from)).unwrap_or_default();
    let mut a = Args {
        nodes: 2,
        pods: 3,
        keep: false,
        static_routes: false,
        ipv4_only: false,
        routed: false,
        policy: false,
        plugins: Plugins { dir: exe_dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() },
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--nodes" => a.nodes = val().parse().unwrap_or_else(|_| usage()),
            "--pods" => a.pods = val().parse().unwrap_or_else(|_| usage()),
            "--keep" => a.keep = true,
            "--static-routes" => a.static_routes = true,
            "--ipv4-only" => a.ipv4_only = true,
            "--routed" => a.routed = true,
            "--policy" => a.policy = true,
            "--cni-path" => a.plugins.dir = PathBuf::from(val()),
            "--bridge-type" => a.plugins.bridge = val(),
            "--ipam-type" => a.plugins.ipam = val(),
            _ => usage(),
        }
    }
    if a.routed {
        a.nodes = a.nodes.max(3);
    }
    if a.nodes == 0 || a.nodes > 50 || a.pods == 0 || a.pods > 50 {
        usage();
    }
    a
}

fn self_vip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 1 + (k / 250) as u8, 1 + (k % 250) as u8)
}

/// The role of pod `p` of a node under `--policy`.
fn role(pod: &Pod) -> &'static str {
    match pod.name.rsplit_once("-p").and_then(|(_, n)| n.parse::<usize>().ok()).unwrap_or(1) % 3 {
        1 => "frontend",
        2 => "backend",
        _ => "db",
    }
}

/// Prints the all-pairs matrix over the addresses `addr` picks, each cell judged against
/// `allowed(from, to)`; returns (as expected, not).
fn matrix(
    c: &Cluster,
    family: &str,
    addr: impl Fn(&Pod) -> Option<IpAddr>,
    allowed: impl Fn(&Pod, &Pod) -> bool,
) -> (usize, usize) {
    // A denied connection shows only as no answer: wait less for it than for a slow one.
    let timeout = Duration::from_millis(700);
    println!("\n  {family}");
    print!("  {:<8}", "");
    for p in &c.pods {
        print!(" {:<7}", p.name);
    }
    println!();
    let (mut good, mut bad) = (0, 0);
    for (i, from) in c.pods.iter().enumerate() {
        print!("  {:<8}", from.name);
        for (j, to) in c.pods.iter().enumerate() {
            let (Some(from_ip), Some(to_ip)) = (addr(from), addr(to)) else {
                print!(" {:<7}", "-");
                continue;
            };
            let want = allowed(from, to);
            let cell = if i != j {
                match exchange_within(to.ns.file(), SocketAddr::new(to_ip, 0), from.ns.file(), None, timeout)
                {
                    Ok(src) if src == from_ip && want => "ok",
                    Ok(_) if !want => "LEAK",
                    Ok(_) => "NATed",
                    Err(_) if !want => "deny",
                    Err(_) => "FAIL",
                }
            } else if to_ip.is_ipv4() {
                let vip = SocketAddr::new(IpAddr::V4(self_vip(i)), 80);
                match exchange_within(
                    to.ns.file(),
                    SocketAddr::new(to_ip, 8080),
                    from.ns.file(),
                    Some(vip),
                    timeout,
                ) {
                    Ok(_) => "self",
                    Err(_) => "FAIL",
                }
            } else {
                print!(" {:<7}", "-");
                continue;
            };
            if matches!(cell, "ok" | "self" | "deny") {
                good += 1;
            } else {
                bad += 1;
            }
            print!(" {cell:<7}");
        }
        println!();
    }
    (good, bad)
}

/// The demo's objects for the policy engine: namespace `demo`, every pod with its role label
/// and addresses, and `policies` (YAML documents).
fn manifests(c: &Cluster, policies: &str) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n");
    for p in &c.pods {
        let ips: Vec<String> =
            std::iter::once(p.ip).chain(p.ip6).map(|ip| format!("{{ip: '{ip}'}}")).collect();
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: demo, labels: {{app: {}}}}}\n\
             spec: {{nodeName: {}, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{}]}}\n",
            p.name,
            role(p),
            c.nodes[p.node].name,
            ips.join(", ")
        ));
    }
    y.push_str(policies);
    y
}

const DEMO_POLICIES: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: demo}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-to-backend, namespace: demo}
spec:
  podSelector: {matchLabels: {app: backend}}
  ingress: [{from: [{podSelector: {matchLabels: {app: frontend}}}]}]
";

/// Writes the manifests atomically (the agents re-read on rename).
fn write_manifests(dir: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(".objects.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("objects.yaml"))
}

/// Waits (bounded) until every node's policy table holds `comment` or, with `None`, holds no
/// policy rule.
fn wait_for_policy(c: &Cluster, comment: Option<&str>) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    c.nodes.iter().all(|n| loop {
        let out = n.ns.run("nft", &["list", "table", "inet", "cni_route_agent_policy"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let done = match comment {
            Some(want) => text.contains(want),
            None => out.status.success() && !text.contains("comment \""),
        };
        if done {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    })
}

fn main() -> ExitCode {
    let args = parse();
    if !is_root() {
        eprintln!("cni-demo: needs root (it creates network namespaces)");
        return ExitCode::from(1);
    }
    println!(
        "Bringing up {} nodes x {} pods in network namespaces, {} (plugins: {} + {} from {})",
        args.nodes,
        args.pods,
        if args.ipv4_only { "IPv4 only" } else { "dual-stack" },
        args.plugins.bridge,
        args.plugins.ipam,
        args.plugins.dir.display()
    );
    let mut c = if args.ipv4_only {
        Cluster::new("cnidemo", args.nodes, args.plugins.clone(), true)
    } else {
        Cluster::dual_stack("cnidemo", args.nodes, args.plugins.clone(), true)
    };
    c.keep = args.keep;
    if args.routed {
        c.add_router();
        c.move_off_link(args.nodes - 1);
    }
    let agent_bin = args.plugins.dir.join("cni-route-agent");
    let mut agents = Vec::new();
    if args.routed && (args.static_routes || !agent_bin.exists()) {
        eprintln!("--routed needs the route agent (no --static-routes)");
        return ExitCode::from(2);
    }
    if args.policy && (args.static_routes || !agent_bin.exists()) {
        eprintln!("--policy needs the route agent (no --static-routes)");
        return ExitCode::from(2);
    }
    let policy_dir = c.state_dir().join("policy");
    let mut agent_args = Vec::new();
    if args.policy {
        if let Err(e) = std::fs::create_dir_all(&policy_dir).and_then(|_| write_manifests(&policy_dir, "")) {
            eprintln!("{}: {e}", policy_dir.display());
            return ExitCode::from(1);
        }
        agent_args = vec!["--policy-path".to_string(), policy_dir.display().to_string()];
    }
    if args.static_routes || !agent_bin.exists() {
        c.static_routes();
    } else {
        match c.start_route_agents_with(&agent_bin, &agent_args) {
            Ok(a) => agents = a,
            Err(e) => {
                eprintln!("route agents: {e}");
                return ExitCode::from(1);
            }
        }
    }
    for n in 0..args.nodes {
        for p in 1..=args.pods {
            if let Err(e) = c.add_pod(n, &format!("n{}-p{p}", n + 1)) {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        }
    }
    // Every pod gets a ClusterIP Service whose only endpoint is itself, on every node, as
    // kube-proxy would install it: the diagonal of the matrix is a pod reaching itself.
    for (k, p) in c.pods.iter().enumerate() {
        c.service(&format!("self{k}"), self_vip(k), 80, &[SocketAddr::new(p.ip, 8080)]);
    }

    println!("\nPods");
    println!("  {:<8} {:<8} {:<15} {:<22} {:<14} HAIRPIN", "NODE", "POD", "IPv4", "IPv6", "HOST VETH");
    for p in &c.pods {
        let node = &c.nodes[p.node];
        let info = node.ns.ip_json(&["link", "show", "dev", &p.veth]);
        let hairpin = match info[0]["linkinfo"]["info_slave_data"]["hairpin"].as_bool() {
            Some(true) => "on",
            Some(false) => "off",
            None => "?",
        };
        let ip6 = p.ip6.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "  {:<8} {:<8} {:<15} {:<22} {:<14} {hairpin}",
            node.name,
            p.name,
            p.ip.to_string(),
            ip6,
            p.veth
        );
    }

    println!("\nRoutes");
    for (i, n) in c.nodes.iter().enumerate() {
        println!("  {} ({}, pods {}):", n.name, n.addresses().join(", "), n.pod_cidrs().join(", "));
        for r in c.routes(i) {
            // The agent's routes (proto 168): through the VXLAN device or direct.
            let mark = if r.contains("dev cra-vxlan") {
                "   <- VXLAN tunnel"
            } else if r.contains("proto 168") {
                "   <- direct"
            } else {
                ""
            };
            println!("    {r}{mark}");
        }
        if args.routed {
            let out = n.ns.run("bridge", &["fdb", "show", "dev", "cra-vxlan4"]);
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                println!("    fdb: {line}");
            }
        }
    }

    if args.policy {
        // The pods as the policy engine sees them, with no policy yet.
        if let Err(e) = write_manifests(&policy_dir, &manifests(&c, "")) {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
        if !wait_for_policy(&c, None) {
            eprintln!("the route agents did not create their policy tables");
            return ExitCode::from(1);
        }
    }
    println!("\nConnectivity: row connects to column over TCP");
    println!("  ok = reached, and the server saw the client's own pod address");
    println!("  self = reached ITSELF through its Service VIP (hairpin), FAIL = not reached");
    let all = |_: &Pod, _: &Pod| true;
    let (mut good, mut bad) = matrix(&c, "IPv4", |p| Some(p.ip), all);
    if c.dual_stack {
        let (g, b) = matrix(&c, "IPv6 (no Service VIPs: the diagonal is -)", |p| p.ip6, all);
        good += g;
        bad += b;
    }
    if args.policy {
        println!("\nNetworkPolicy (namespace demo): pods by role");
        for p in &c.pods {
            println!("  {:<8} {}", p.name, role(p));
        }
        println!("{}", DEMO_POLICIES.trim_start_matches("---\n"));
        if let Err(e) = write_manifests(&policy_dir, &manifests(&c, DEMO_POLICIES)) {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
        if !wait_for_policy(&c, Some("demo/frontend-to-backend")) {
            eprintln!("the route agents did not apply the policies");
            return ExitCode::from(1);
        }
        println!("Connectivity under the policies: only frontends reach backends");
        println!("  deny = dropped by policy as expected, LEAK = reached though denied");
        let rule = |from: &Pod, to: &Pod| role(to) == "backend" && role(from) == "frontend";
        let (g, b) = matrix(&c, "IPv4", |p| Some(p.ip), rule);
        good += g;
        bad += b;
        if c.dual_stack {
            let (g, b) = matrix(&c, "IPv6", |p| p.ip6, rule);
            good += g;
            bad += b;
        }
    }
    println!("\n{good} of {} connections as expected", good + bad);

    if !args.keep {
        // Processes this demo started, ended by their PIDs.
        for mut a in agents.drain(..) {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
    if args.keep {
        let names = c.namespace_names();
        let down = c.state_dir().join("down.sh");
        let mut script = String::from("#!/bin/sh\n# Removes exactly what this cni-demo run made.\n");
        for n in &names {
            script.push_str(&format!("ip netns del {n}\n"));
        }
        for a in &agents {
            script.push_str(&format!("kill {}  # cni-route-agent started by this demo\n", a.id()));
        }
        script.push_str(&format!("rm -rf {}\n", c.state_dir().display()));
        let _ = std::fs::write(&down, script);
        println!("\nKept. Explore, e.g.:");
        println!("  ip netns exec {} ip route", c.nodes[0].ns.name);
        println!("  ip netns exec {} bridge -d link", c.nodes[0].ns.name);
        println!("  ip netns exec {} iptables-save -t nat", c.nodes[0].ns.name);
        println!("  ip netns exec {} ip addr", c.pods[0].ns.name);
        println!("Remove it all with:\n  sh {}", down.display());
    } else {
        let n_ns = c.namespace_names().len();
        drop(c);
        println!("Torn down: every pod DELeted through the plugin, {n_ns} namespaces removed.");
    }
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
