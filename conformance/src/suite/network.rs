//! The pod network end to end: pod to pod, Services through kube-proxy-style rules (ClusterIP,
//! hairpin, NodePort with both traffic policies), and several nodes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{ensure, Check, Ctx};
use crate::cluster::Cluster;
use crate::traffic::{exchange, spread};

pub(super) fn checks() -> Vec<Check> {
    vec![
        ("pods reach each other and the gateway with their own source address", pod_to_pod),
        ("ClusterIP with two endpoints: a pod reaches both through the VIP", cluster_ip),
        ("hairpin on: a pod reaches itself through its Service VIP", |c| hairpin(c, true)),
        ("hairpin off: a pod does not reach itself through its Service VIP", |c| hairpin(c, false)),
        ("NodePort across two nodes is SNATed to the node address", node_port_cluster),
        (
            "NodePort with externalTrafficPolicy=Local keeps the client address, drops without endpoints",
            node_port_local,
        ),
        ("three nodes (routes by cni-route-agent if present): every pod pair connects with its own source address", multi_node),
    ]
}

fn cluster(c: &Ctx, tag: &str, nodes: usize, hairpin: bool) -> Cluster {
    Cluster::new(tag, nodes, c.target.clone(), hairpin)
}

/// Routes between the nodes: from `cni-route-agent` when it sits beside the plugins, else
/// static. The agents (ours to end) are returned.
fn routes(c: &Ctx, cl: &Cluster) -> Result<Agents, String> {
    let bin = c.target.dir.join("cni-route-agent");
    if bin.exists() {
        cl.start_route_agents(&bin).map(Agents)
    } else {
        cl.static_routes();
        Ok(Agents(vec![]))
    }
}

/// Route agents this check started, ended (by PID) when it ends.
struct Agents(Vec<std::process::Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for a in &mut self.0 {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

fn pods(cl: &mut Cluster, per_node: usize) -> Result<(), String> {
    for n in 0..cl.nodes.len() {
        for p in 1..=per_node {
            cl.add_pod(n, &format!("n{}p{p}", n + 1))?;
        }
    }
    Ok(())
}

fn pod_to_pod(c: &Ctx) -> Result<(), String> {
    let mut cl = cluster(c, "p2p", 1, true);
    pods(&mut cl, 2)?;
    let (a, b) = (&cl.pods[0], &cl.pods[1]);
    ensure(exchange(b.ns.file(), SocketAddr::new(b.ip, 0), a.ns.file(), None) == Ok(a.ip), || {
        "a -> b".into()
    })?;
    ensure(exchange(a.ns.file(), SocketAddr::new(a.ip, 0), b.ns.file(), None) == Ok(b.ip), || {
        "b -> a".into()
    })?;
    let gw: IpAddr = "10.244.1.1".parse().expect("literal");
    let seen = exchange(cl.nodes[0].ns.file(), SocketAddr::new(gw, 0), a.ns.file(), None);
    ensure(seen == Ok(a.ip), || format!("pod -> gateway: {seen:?}"))
}

fn cluster_ip(c: &Ctx) -> Result<(), String> {
    let mut cl = cluster(c, "cip", 1, true);
    pods(&mut cl, 3)?;
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let eps = [SocketAddr::new(cl.pods[0].ip, 8080), SocketAddr::new(cl.pods[1].ip, 8080)];
    cl.service("web", vip, 80, &eps);
    let servers = vec![(cl.pods[0].ns.file(), eps[0]), (cl.pods[1].ns.file(), eps[1])];
    let counts = spread(servers, cl.pods[2].ns.file(), SocketAddr::new(IpAddr::V4(vip), 80), 24);
    ensure(counts.iter().sum::<usize>() == 24, || format!("not every connection answered: {counts:?}"))?;
    ensure(counts.iter().all(|n| *n > 0), || format!("an endpoint was never chosen: {counts:?}"))
}

fn hairpin(c: &Ctx, on: bool) -> Result<(), String> {
    let mut cl = cluster(c, if on { "hpon" } else { "hpoff" }, 1, on);
    pods(&mut cl, 1)?;
    let p = &cl.pods[0];
    let vip = Ipv4Addr::new(10, 96, 0, 20);
    cl.service("self", vip, 80, &[SocketAddr::new(p.ip, 8080)]);
    let r = exchange(
        p.ns.file(),
        SocketAddr::new(p.ip, 8080),
        p.ns.file(),
        Some(SocketAddr::new(IpAddr::V4(vip), 80)),
    );
    if on {
        ensure(r.is_ok(), || format!("could not reach itself: {r:?}"))
    } else {
        ensure(r.is_err(), || "reached itself without hairpin mode".into())
    }
}

fn node_port_cluster(c: &Ctx) -> Result<(), String> {
    let mut cl = cluster(c, "npc", 2, true);
    let _agents = routes(c, &cl)?;
    cl.add_pod(1, "n2p1")?;
    let ep = SocketAddr::new(cl.pods[0].ip, 8080);
    cl.service("np", Ipv4Addr::new(10, 96, 0, 30), 80, &[ep]);
    cl.node_port("np", 30080, &[(1, ep)], false);
    let client = cl.external("client", 100);
    let node1 = cl.nodes[0].ip;
    let r =
        exchange(cl.pods[0].ns.file(), ep, client.file(), Some(SocketAddr::new(IpAddr::V4(node1), 30080)));
    ensure(r == Ok(IpAddr::V4(node1)), || format!("the pod saw {r:?}, want the node address {node1}"))
}

fn node_port_local(c: &Ctx) -> Result<(), String> {
    let mut cl = cluster(c, "npl", 2, true);
    let _agents = routes(c, &cl)?;
    cl.add_pod(1, "n2p1")?;
    let ep = SocketAddr::new(cl.pods[0].ip, 8080);
    cl.service("npl", Ipv4Addr::new(10, 96, 0, 31), 80, &[ep]);
    cl.node_port("npl", 30081, &[(1, ep)], true);
    let client = cl.external("client", 101);
    let client_ip: IpAddr = "10.200.0.101".parse().expect("literal");
    let node2 = IpAddr::V4(cl.nodes[1].ip);
    let r = exchange(cl.pods[0].ns.file(), ep, client.file(), Some(SocketAddr::new(node2, 30081)));
    ensure(r == Ok(client_ip), || {
        format!("via the node with the endpoint, the pod saw {r:?}, want {client_ip}")
    })?;
    let node1 = IpAddr::V4(cl.nodes[0].ip);
    let r = exchange(cl.pods[0].ns.file(), ep, client.file(), Some(SocketAddr::new(node1, 30081)));
    ensure(r.is_err(), || format!("a node without endpoints forwarded: {r:?}"))
}

fn multi_node(c: &Ctx) -> Result<(), String> {
    let mut cl = cluster(c, "mn", 3, true);
    let _agents = routes(c, &cl)?;
    pods(&mut cl, 2)?;
    for a in &cl.pods {
        for b in cl.pods.iter().filter(|b| b.name != a.name) {
            let r = exchange(b.ns.file(), SocketAddr::new(b.ip, 0), a.ns.file(), None);
            ensure(r == Ok(a.ip), || format!("{} -> {}: {r:?}", a.name, b.name))?;
        }
    }
    Ok(())
}
