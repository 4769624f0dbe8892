//! `cni-demo`: a small simulated cluster in network namespaces, its pod network made by the
//! CNI plugins, and what a user wants to see of it: pods, routes, and who reaches whom.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use cni_conformance::cluster::{Cluster, Plugins, Pod};
use cni_conformance::is_root;
use cni_conformance::traffic::exchange;

struct Args {
    nodes: usize,
    pods: usize,
    keep: bool,
    static_routes: bool,
    ipv4_only: bool,
    plugins: Plugins,
}

fn usage() -> ! {
    eprintln!(
        "usage: cni-demo [--nodes N] [--pods N] [--keep] [--static-routes] [--ipv4-only] [--cni-path DIR] [--bridge-type T] [--ipam-type T]\n\
         Brings up N nodes x N pods in network namespaces (default 2 x 3, dual-stack), shows pods,\n\
         routes and an all-pairs connectivity matrix per family, then removes everything (unless --keep)."
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let exe_dir =
        std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from)).unwrap_or_default();
    let mut args = Args {
        nodes: 2,
        pods: 3,
        keep: false,
        static_routes: false,
        ipv4_only: false,
        plugins: Plugins { dir: exe_dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() },
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let mut val = || words.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--nodes" => args.nodes = val().parse().unwrap_or_else(|_| usage()),
            "--pods" => args.pods = val().parse().unwrap_or_else(|_| usage()),
            "--keep" => args.keep = true,
            "--static-routes" => args.static_routes = true,
            "--ipv4-only" => args.ipv4_only = true,
            "--cni-path" => args.plugins.dir = PathBuf::from(val()),
            "--bridge-type" => args.plugins.bridge = val(),
            "--ipam-type" => args.plugins.ipam = val(),
            _ => usage(),
        }
    }
    if args.nodes == 0 || args.nodes > 50 || args.pods == 0 || args.pods > 50 {
        usage();
    }
    args
}

fn self_vip(pod_index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 1 + (pod_index / 250) as u8, 1 + (pod_index % 250) as u8)
}

/// Prints the all-pairs matrix over the addresses `addr` picks; returns (as expected, not).
fn matrix(cluster: &Cluster, family: &str, addr: impl Fn(&Pod) -> Option<IpAddr>) -> (usize, usize) {
    println!("\n  {family}");
    print!("  {:<8}", "");
    for pod in &cluster.pods {
        print!(" {:<7}", pod.name);
    }
    println!();
    let (mut good, mut bad) = (0, 0);
    for (from_index, from) in cluster.pods.iter().enumerate() {
        print!("  {:<8}", from.name);
        for (to_index, to) in cluster.pods.iter().enumerate() {
            let (Some(from_ip), Some(to_ip)) = (addr(from), addr(to)) else {
                print!(" {:<7}", "-");
                continue;
            };
            let cell = if from_index != to_index {
                match exchange(to.ns.file(), SocketAddr::new(to_ip, 0), from.ns.file(), None) {
                    Ok(src) if src == from_ip => "ok",
                    Ok(_) => "NATed",
                    Err(_) => "FAIL",
                }
            } else if to_ip.is_ipv4() {
                let vip = SocketAddr::new(IpAddr::V4(self_vip(from_index)), 80);
                match exchange(to.ns.file(), SocketAddr::new(to_ip, 8080), from.ns.file(), Some(vip)) {
                    Ok(_) => "self",
                    Err(_) => "FAIL",
                }
            } else {
                print!(" {:<7}", "-");
                continue;
            };
            if cell == "ok" || cell == "self" {
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
    let mut cluster = if args.ipv4_only {
        Cluster::new("cnidemo", args.nodes, args.plugins.clone(), true)
    } else {
        Cluster::dual_stack("cnidemo", args.nodes, args.plugins.clone(), true)
    };
    cluster.keep = args.keep;
    let agent_bin = args.plugins.dir.join("cni-route-agent");
    let mut agents = Vec::new();
    if args.static_routes || !agent_bin.exists() {
        cluster.static_routes();
    } else {
        match cluster.start_route_agents(&agent_bin) {
            Ok(started) => agents = started,
            Err(error) => {
                eprintln!("route agents: {error}");
                return ExitCode::from(1);
            }
        }
    }
    for node in 0..args.nodes {
        for pod in 1..=args.pods {
            if let Err(error) = cluster.add_pod(node, &format!("n{}-p{pod}", node + 1)) {
                eprintln!("{error}");
                return ExitCode::from(1);
            }
        }
    }
    // Every pod gets a ClusterIP Service whose only endpoint is itself, on every node, as
    // kube-proxy would install it: the diagonal of the matrix is a pod reaching itself.
    for (index, pod) in cluster.pods.iter().enumerate() {
        cluster.service(&format!("self{index}"), self_vip(index), 80, &[SocketAddr::new(pod.ip, 8080)]);
    }

    println!("\nPods");
    println!("  {:<8} {:<8} {:<15} {:<22} {:<14} HAIRPIN", "NODE", "POD", "IPv4", "IPv6", "HOST VETH");
    for pod in &cluster.pods {
        let node = &cluster.nodes[pod.node];
        let info = node.ns.ip_json(&["link", "show", "dev", &pod.veth]);
        let hairpin = match info[0]["linkinfo"]["info_slave_data"]["hairpin"].as_bool() {
            Some(true) => "on",
            Some(false) => "off",
            None => "?",
        };
        let ip6 = pod.ip6.map(|ip6| ip6.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "  {:<8} {:<8} {:<15} {:<22} {:<14} {hairpin}",
            node.name,
            pod.name,
            pod.ip.to_string(),
            ip6,
            pod.veth
        );
    }

    println!("\nRoutes");
    for (index, node) in cluster.nodes.iter().enumerate() {
        println!("  {} ({}, pods {}):", node.name, node.addresses().join(", "), node.pod_cidrs().join(", "));
        for route in cluster.routes(index) {
            println!("    {route}");
        }
    }

    println!("\nConnectivity: row connects to column over TCP");
    println!("  ok = reached, and the server saw the client's own pod address");
    println!("  self = reached ITSELF through its Service VIP (hairpin), FAIL = not reached");
    let (mut good, mut bad) = matrix(&cluster, "IPv4", |pod| Some(pod.ip));
    if cluster.dual_stack {
        let (good_v6, bad_v6) = matrix(&cluster, "IPv6 (no Service VIPs: the diagonal is -)", |pod| pod.ip6);
        good += good_v6;
        bad += bad_v6;
    }
    println!("\n{good} of {} connections as expected", good + bad);

    if !args.keep {
        // Processes this demo started, ended by their PIDs.
        for mut agent in agents.drain(..) {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
    if args.keep {
        let names = cluster.namespace_names();
        let down = cluster.state_dir().join("down.sh");
        let mut script = String::from("#!/bin/sh\n# Removes exactly what this cni-demo run made.\n");
        for node in &names {
            script.push_str(&format!("ip netns del {node}\n"));
        }
        for agent in &agents {
            script.push_str(&format!("kill {}  # cni-route-agent started by this demo\n", agent.id()));
        }
        script.push_str(&format!("rm -rf {}\n", cluster.state_dir().display()));
        let _ = std::fs::write(&down, script);
        println!("\nKept. Explore, e.g.:");
        println!("  ip netns exec {} ip route", cluster.nodes[0].ns.name);
        println!("  ip netns exec {} bridge -d link", cluster.nodes[0].ns.name);
        println!("  ip netns exec {} iptables-save -t nat", cluster.nodes[0].ns.name);
        println!("  ip netns exec {} ip addr", cluster.pods[0].ns.name);
        println!("Remove it all with:\n  sh {}", down.display());
    } else {
        let n_ns = cluster.namespace_names().len();
        drop(cluster);
        println!("Torn down: every pod DELeted through the plugin, {n_ns} namespaces removed.");
    }
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
