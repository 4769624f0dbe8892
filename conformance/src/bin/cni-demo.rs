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
    routed: bool,
    plugins: Plugins,
}

fn usage() -> ! {
    eprintln!(
        "usage: cni-demo [--nodes N] [--pods N] [--keep] [--static-routes] [--ipv4-only] [--routed] [--cni-path DIR] [--bridge-type T] [--ipam-type T]\n\
         Brings up N nodes x N pods in network namespaces (default 2 x 3, dual-stack), shows pods,\n\
         routes and an all-pairs connectivity matrix per family, then removes everything (unless --keep).\n\
         --routed: the last node (at least 3 nodes) sits on another subnet behind a router; the\n\
         route agents reach it through VXLAN and the others directly."
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

/// Prints the all-pairs matrix over the addresses `addr` picks; returns (as expected, not).
fn matrix(c: &Cluster, family: &str, addr: impl Fn(&Pod) -> Option<IpAddr>) -> (usize, usize) {
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
            let cell = if i != j {
                match exchange(to.ns.file(), SocketAddr::new(to_ip, 0), from.ns.file(), None) {
                    Ok(src) if src == from_ip => "ok",
                    Ok(_) => "NATed",
                    Err(_) => "FAIL",
                }
            } else if to_ip.is_ipv4() {
                let vip = SocketAddr::new(IpAddr::V4(self_vip(i)), 80);
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
    if args.static_routes || !agent_bin.exists() {
        c.static_routes();
    } else {
        match c.start_route_agents(&agent_bin) {
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

    println!("\nConnectivity: row connects to column over TCP");
    println!("  ok = reached, and the server saw the client's own pod address");
    println!("  self = reached ITSELF through its Service VIP (hairpin), FAIL = not reached");
    let (mut good, mut bad) = matrix(&c, "IPv4", |p| Some(p.ip));
    if c.dual_stack {
        let (g, b) = matrix(&c, "IPv6 (no Service VIPs: the diagonal is -)", |p| p.ip6);
        good += g;
        bad += b;
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
