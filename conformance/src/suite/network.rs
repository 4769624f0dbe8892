//! The pod network end to end: pod to pod, Services through kube-proxy-style rules (ClusterIP,
//! hairpin, NodePort with both traffic policies), and several nodes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::check::{ensure, Check, Ctx};
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

fn cluster(ctx: &Ctx, tag: &str, nodes: usize, hairpin: bool) -> Cluster {
    Cluster::new(tag, nodes, ctx.target.clone(), hairpin)
}

/// Routes between the nodes: from `cni-route-agent` when it sits beside the plugins, else
/// static. The agents (ours to end) are returned.
fn routes(ctx: &Ctx, cluster: &Cluster) -> Result<Agents, String> {
    let bin = ctx.target.dir.join("cni-route-agent");
    if bin.exists() {
        cluster.start_route_agents(&bin).map(Agents)
    } else {
        cluster.static_routes();
        Ok(Agents(vec![]))
    }
}

/// Route agents this check started, ended (by PID) when it ends.
struct Agents(Vec<std::process::Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for agent in &mut self.0 {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

fn pods(cluster: &mut Cluster, per_node: usize) -> Result<(), String> {
    for node in 0..cluster.nodes.len() {
        for pod in 1..=per_node {
            cluster.add_pod(node, &format!("n{}p{pod}", node + 1))?;
        }
    }
    Ok(())
}

fn pod_to_pod(ctx: &Ctx) -> Result<(), String> {
    let mut cluster = cluster(ctx, "p2p", 1, true);
    pods(&mut cluster, 2)?;
    let (client, server) = (&cluster.pods[0], &cluster.pods[1]);
    ensure(
        exchange(server.ns.file(), SocketAddr::new(server.ip, 0), client.ns.file(), None) == Ok(client.ip),
        || "a -> b".into(),
    )?;
    ensure(
        exchange(client.ns.file(), SocketAddr::new(client.ip, 0), server.ns.file(), None) == Ok(server.ip),
        || "b -> a".into(),
    )?;
    let gw: IpAddr = "10.244.1.1".parse().expect("literal");
    let seen = exchange(cluster.nodes[0].ns.file(), SocketAddr::new(gw, 0), client.ns.file(), None);
    ensure(seen == Ok(client.ip), || format!("pod -> gateway: {seen:?}"))
}

fn cluster_ip(ctx: &Ctx) -> Result<(), String> {
    let mut cluster = cluster(ctx, "cip", 1, true);
    pods(&mut cluster, 3)?;
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let endpoints = [SocketAddr::new(cluster.pods[0].ip, 8080), SocketAddr::new(cluster.pods[1].ip, 8080)];
    cluster.service("web", vip, 80, &endpoints);
    let servers = vec![(cluster.pods[0].ns.file(), endpoints[0]), (cluster.pods[1].ns.file(), endpoints[1])];
    let counts = spread(servers, cluster.pods[2].ns.file(), SocketAddr::new(IpAddr::V4(vip), 80), 24);
    ensure(counts.iter().sum::<usize>() == 24, || format!("not every connection answered: {counts:?}"))?;
    ensure(counts.iter().all(|n| *n > 0), || format!("an endpoint was never chosen: {counts:?}"))
}

fn hairpin(ctx: &Ctx, on: bool) -> Result<(), String> {
    let mut cluster = cluster(ctx, if on { "hpon" } else { "hpoff" }, 1, on);
    pods(&mut cluster, 1)?;
    let pod = &cluster.pods[0];
    let vip = Ipv4Addr::new(10, 96, 0, 20);
    cluster.service("self", vip, 80, &[SocketAddr::new(pod.ip, 8080)]);
    let seen = exchange(
        pod.ns.file(),
        SocketAddr::new(pod.ip, 8080),
        pod.ns.file(),
        Some(SocketAddr::new(IpAddr::V4(vip), 80)),
    );
    if on {
        ensure(seen.is_ok(), || format!("could not reach itself: {seen:?}"))
    } else {
        ensure(seen.is_err(), || "reached itself without hairpin mode".into())
    }
}

fn node_port_cluster(ctx: &Ctx) -> Result<(), String> {
    let mut cluster = cluster(ctx, "npc", 2, true);
    let _agents = routes(ctx, &cluster)?;
    cluster.add_pod(1, "n2p1")?;
    let endpoint = SocketAddr::new(cluster.pods[0].ip, 8080);
    cluster.service("np", Ipv4Addr::new(10, 96, 0, 30), 80, &[endpoint]);
    cluster.node_port("np", 30080, &[(1, endpoint)], false);
    let client = cluster.external("client", 100);
    let node1 = cluster.nodes[0].ip;
    let seen = exchange(
        cluster.pods[0].ns.file(),
        endpoint,
        client.file(),
        Some(SocketAddr::new(IpAddr::V4(node1), 30080)),
    );
    ensure(seen == Ok(IpAddr::V4(node1)), || format!("the pod saw {seen:?}, want the node address {node1}"))
}

fn node_port_local(ctx: &Ctx) -> Result<(), String> {
    let mut cluster = cluster(ctx, "npl", 2, true);
    let _agents = routes(ctx, &cluster)?;
    cluster.add_pod(1, "n2p1")?;
    let endpoint = SocketAddr::new(cluster.pods[0].ip, 8080);
    cluster.service("npl", Ipv4Addr::new(10, 96, 0, 31), 80, &[endpoint]);
    cluster.node_port("npl", 30081, &[(1, endpoint)], true);
    let client = cluster.external("client", 101);
    let client_ip: IpAddr = "10.200.0.101".parse().expect("literal");
    let node2 = IpAddr::V4(cluster.nodes[1].ip);
    let seen =
        exchange(cluster.pods[0].ns.file(), endpoint, client.file(), Some(SocketAddr::new(node2, 30081)));
    ensure(seen == Ok(client_ip), || {
        format!("via the node with the endpoint, the pod saw {seen:?}, want {client_ip}")
    })?;
    let node1 = IpAddr::V4(cluster.nodes[0].ip);
    let seen =
        exchange(cluster.pods[0].ns.file(), endpoint, client.file(), Some(SocketAddr::new(node1, 30081)));
    ensure(seen.is_err(), || format!("a node without endpoints forwarded: {seen:?}"))
}

fn multi_node(ctx: &Ctx) -> Result<(), String> {
    let mut cluster = cluster(ctx, "mn", 3, true);
    let _agents = routes(ctx, &cluster)?;
    pods(&mut cluster, 2)?;
    for client in &cluster.pods {
        for server in cluster.pods.iter().filter(|server| server.name != client.name) {
            let seen = exchange(server.ns.file(), SocketAddr::new(server.ip, 0), client.ns.file(), None);
            ensure(seen == Ok(client.ip), || format!("{} -> {}: {seen:?}", client.name, server.name))?;
        }
    }
    Ok(())
}
