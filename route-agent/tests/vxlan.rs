//! The VXLAN backend in a simulated cluster: node-1 and node-2 share the underlay segment,
//! node-3 sits on another subnet behind a router namespace. In `--backend auto` the on-link
//! pair is routed directly and node-3 through the VXLAN device.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cni_conformance::cluster::{Cluster, Plugins, Pod};
use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use cni_conformance::traffic::exchange;
use serde_json::{json, Value};

mod common;
use common::{eventually, Agent, Tmp};

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");
const DEV: &str = "cra-vxlan4";

fn plugins() -> Plugins {
    let dir = Path::new(AGENT).parent().unwrap().to_path_buf();
    assert!(dir.join("cni-bridge").exists(), "build the workspace first (cargo build --workspace)");
    Plugins { dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() }
}

/// How the cluster is set up and the agents started.
#[derive(Clone, Copy, Default)]
struct Setup {
    dual_stack: bool,
    /// The nodes file lists only IPv6 pod CIDRs and addresses (an IPv6-only cluster).
    v6_only: bool,
    /// More agent arguments.
    args: &'static [&'static str],
}

impl Agent {
    fn start(cl: &Cluster, node: usize, dir: &Path, args: &[&str]) -> Agent {
        let n = &cl.nodes[node];
        let mut c = Command::new(AGENT);
        c.args(["--node-name", &n.name, "--source", "file", "--no-portmap", "--nodes-file"])
            .arg(dir.join("nodes.json"))
            .arg("--cni-conf-dir")
            .arg(dir.join(format!("cni{node}")))
            .args(["--resync-seconds", "3600"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        n.ns.enter(&mut c);
        Agent(c.spawn().expect("start agent"))
    }
}

fn write_nodes(dir: &Path, cl: &Cluster, v6_only: bool) {
    let nodes: Vec<Value> = cl
        .nodes
        .iter()
        .map(|n| match (v6_only, &n.pod_cidr6, n.ip6) {
            (true, Some(cidr6), Some(ip6)) => {
                json!({"name": n.name, "podCIDRs": [cidr6], "addresses": [ip6]})
            }
            _ => n.nodes_file_entry(),
        })
        .collect();
    let tmp = dir.join("nodes.tmp");
    std::fs::write(&tmp, json!({ "nodes": nodes }).to_string()).unwrap();
    std::fs::rename(&tmp, dir.join("nodes.json")).unwrap();
}

/// `ip route get` of `dst` in node `node`.
fn route_get(cl: &Cluster, node: usize, dst: IpAddr) -> String {
    cl.nodes[node].ns.ip(&["route", "get", &dst.to_string()])
}

/// Every pod reaches every other over TCP in each family, seen with its own address.
fn all_pairs(cl: &Cluster) -> Result<(), String> {
    for a in &cl.pods {
        for b in cl.pods.iter().filter(|b| b.name != a.name) {
            for (from, to) in [(Some(a.ip), Some(b.ip)), (a.ip6, b.ip6)] {
                let (Some(from), Some(to)) = (from, to) else { continue };
                let r = exchange(b.ns.file(), SocketAddr::new(to, 0), a.ns.file(), None);
                if r != Ok(from) {
                    return Err(format!("{} -> {} ({to}): {r:?}", a.name, b.name));
                }
            }
        }
    }
    Ok(())
}

fn tx_packets(ns: &Netns, dev: &str) -> u64 {
    let v = ns.ip_json(&["-s", "link", "show", "dev", dev]);
    v[0]["stats64"]["tx"]["packets"].as_u64().expect("tx packets")
}

fn conflist_mtu(dir: &Path, node: usize) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(format!("cni{node}/10-cni-route-agent.conflist"))).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["plugins"][0]["mtu"].as_u64()
}

fn ready(ns: &Netns) -> bool {
    let f = ns.file();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let Ok(mut s) =
            TcpStream::connect_timeout(&"127.0.0.1:9645".parse().unwrap(), Duration::from_secs(1))
        else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(s, "GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200")
    })
    .join()
    .unwrap()
}

/// Three nodes with a pod each, node-3 behind the router, one agent per node.
fn mixed(tag: &str, setup: Setup, tmp: &Tmp) -> (Cluster, Vec<Agent>) {
    let mut cl = if setup.dual_stack {
        Cluster::dual_stack(tag, 3, plugins(), true)
    } else {
        Cluster::new(tag, 3, plugins(), true)
    };
    for i in 0..3 {
        cl.add_pod(i, &format!("{tag}n{}p", i + 1)).unwrap();
    }
    cl.add_router();
    cl.move_off_link(2);
    write_nodes(&tmp.0, &cl, setup.v6_only);
    let agents = (0..3).map(|i| Agent::start(&cl, i, &tmp.0, setup.args)).collect();
    let per_node = if setup.dual_stack && !setup.v6_only { 4 } else { 2 };
    for n in &cl.nodes {
        eventually(&format!("{}: routes to both other nodes", n.name), || {
            let count = n.ns.ip(&["route", "show", "proto", "168"]).lines().count()
                + n.ns.ip(&["-6", "route", "show", "proto", "168"]).lines().count();
            count == per_node
        });
    }
    (cl, agents)
}

#[test]
fn on_link_pair_routes_directly_off_link_node_goes_through_vxlan_both_families() {
    require_root("vxlan mixed topology");
    let tmp = Tmp::new("vxmix");
    let (cl, mut agents) = mixed("vxm", Setup { dual_stack: true, ..Setup::default() }, &tmp);
    let pod = |i: usize| -> &Pod { &cl.pods[i] };
    // Direct between the on-link pair, the tunnel to and from node-3, in both families.
    for (from, to, dev) in
        [(0, 1, "eth0"), (1, 0, "eth0"), (0, 2, DEV), (1, 2, DEV), (2, 0, DEV), (2, 1, DEV)]
    {
        for dst in [pod(to).ip, pod(to).ip6.unwrap()] {
            let r = route_get(&cl, from, dst);
            assert!(r.contains(&format!("dev {dev} ")), "node-{} to {dst}: {r}", from + 1);
        }
    }
    for (family, route) in
        [("-4", "10.244.3.0/24 via 10.244.3.0"), ("-6", "fd00:10:244:3::/64 via fd00:10:244:3::")]
    {
        let r = cl.nodes[0].ns.ip(&[family, "route", "show", "proto", "168"]);
        let line = r.lines().find(|l| l.starts_with(route)).unwrap_or_else(|| panic!("no {route}: {r}"));
        assert!(line.contains(&format!("dev {DEV} ")) && line.contains("onlink"), "{line}");
    }
    // Unicast: an FDB entry per remote VTEP with its underlay address, neighbours per CIDR.
    let fdb = String::from_utf8(cl.nodes[0].ns.run("bridge", &["fdb", "show", "dev", DEV]).stdout).unwrap();
    assert!(fdb.contains("0e:04:0a:c9:00:0d dst 10.201.0.13") && fdb.contains("permanent"), "{fdb}");
    assert!(!fdb.contains("00:00:00:00:00:00"), "no flooding entry: {fdb}");
    let neigh = cl.nodes[0].ns.ip(&["neigh", "show", "dev", DEV]);
    assert!(neigh.contains("10.244.3.0 lladdr 0e:04:0a:c9:00:0d PERMANENT"), "{neigh}");
    // Node-2 reaches node-3 too; node-3 tunnels to both.
    assert!(cl.nodes[2].ns.ip(&["neigh", "show", "dev", DEV]).lines().count() >= 4);
    // MTU: the device and the conflist take the 50 bytes off eth0's 1500.
    let link = cl.nodes[0].ns.ip_json(&["link", "show", "dev", DEV]);
    assert_eq!(link[0]["mtu"], 1450);
    assert_eq!(link[0]["linkinfo"]["info_data"]["id"], 168);
    assert_eq!(link[0]["linkinfo"]["info_data"]["port"], 4789);
    for node in 0..3 {
        eventually("conflist MTU 1450", || conflist_mtu(&tmp.0, node) == Some(1450));
    }
    all_pairs(&cl).unwrap();
    // Entries deleted by hand come back by event (the resync is an hour away).
    let ns = &cl.nodes[0].ns;
    ns.run("bridge", &["fdb", "del", "0e:04:0a:c9:00:0d", "dev", DEV, "dst", "10.201.0.13"]);
    ns.ip(&["neigh", "del", "10.244.3.0", "dev", DEV]);
    eventually("the FDB entry is back", || {
        String::from_utf8_lossy(&ns.run("bridge", &["fdb", "show", "dev", DEV]).stdout)
            .contains("dst 10.201.0.13")
    });
    eventually("the neighbour is back", || {
        ns.ip(&["neigh", "show", "dev", DEV]).contains("10.244.3.0 lladdr")
    });
    // The on-link pair's traffic does not touch the tunnel; node-3's does.
    let before = tx_packets(&cl.nodes[0].ns, DEV);
    exchange(pod(1).ns.file(), SocketAddr::new(pod(1).ip, 0), pod(0).ns.file(), None).unwrap();
    exchange(pod(1).ns.file(), SocketAddr::new(pod(1).ip6.unwrap(), 0), pod(0).ns.file(), None).unwrap();
    assert_eq!(tx_packets(&cl.nodes[0].ns, DEV), before, "on-link traffic went through the tunnel");
    exchange(pod(2).ns.file(), SocketAddr::new(pod(2).ip, 0), pod(0).ns.file(), None).unwrap();
    assert!(tx_packets(&cl.nodes[0].ns, DEV) > before);

    // A restart changes nothing: no deletion, no new device, no re-added entries.
    let ns = &cl.nodes[0].ns;
    let index = ns.ip_json(&["link", "show", "dev", DEV])[0]["ifindex"].clone();
    let mut mon = Command::new("ip");
    mon.args(["-o", "monitor", "link", "route", "neigh", "nexthop"]).stdout(Stdio::piped());
    ns.enter(&mut mon);
    let mut mon = mon.spawn().expect("ip monitor");
    let (tx, rx) = mpsc::channel();
    let out = mon.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The monitor listens once it reports a marker route (it may subscribe only after the
    // first ones, so the marker comes and goes until seen).
    const MARK: &str = "198.51.100.77";
    const END: &str = "198.51.100.78";
    let mut listening = false;
    for attempt in 0..50 {
        ns.ip(&["route", if attempt % 2 == 0 { "add" } else { "del" }, MARK, "dev", "lo"]);
        if rx.recv_timeout(Duration::from_millis(200)).is_ok_and(|l| l.contains(MARK)) {
            listening = true;
            break;
        }
    }
    assert!(listening, "ip monitor saw nothing");
    assert!(agents.remove(0).terminate().success(), "the agent exits cleanly on SIGTERM");
    let again = Agent::start(&cl, 0, &tmp.0, &[]);
    eventually("node-1's restarted agent is ready", || ready(ns));
    ns.ip(&["route", "add", END, "dev", "lo"]);
    let mut seen = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(5)).expect("ip monitor ended");
        if line.contains(END) {
            break;
        }
        seen.push(line);
    }
    let _ = mon.kill();
    let _ = mon.wait();
    let ours: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains(DEV) || l.contains("proto 168") || l.contains("nhid") || l.contains("nexthop"))
        .collect();
    assert!(ours.is_empty(), "the restart changed the kernel: {ours:#?}");
    assert_eq!(ns.ip_json(&["link", "show", "dev", DEV])[0]["ifindex"], index);
    all_pairs(&cl).unwrap();
    drop(again);
}

/// An established connection, echoed by a server thread in the other pod.
struct Conn {
    stream: TcpStream,
    server_saw: IpAddr,
}

fn connect(server: &Pod, client: &Pod) -> Conn {
    let (tx, rx) = mpsc::channel();
    let (sf, ip) = (server.ns.file(), server.ip);
    std::thread::spawn(move || {
        nix::sched::setns(sf.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
        tx.send(Ok(l.local_addr().unwrap())).unwrap();
        let (mut s, peer) = l.accept().unwrap();
        tx.send(Err(peer.ip())).unwrap();
        let mut buf = [0u8; 4];
        while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
    });
    let Ok(addr) = rx.recv().unwrap() else { panic!("no listener") };
    let cf = client.ns.file();
    let stream = std::thread::spawn(move || {
        nix::sched::setns(cf.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap()
    })
    .join()
    .unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let Err(server_saw) = rx.recv().unwrap() else { panic!("no accept") };
    Conn { stream, server_saw }
}

impl Conn {
    fn echo(&mut self, msg: &[u8; 4]) -> Result<(), String> {
        self.stream.write_all(msg).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        self.stream.read_exact(&mut buf).map_err(|e| e.to_string())?;
        (&buf == msg).then_some(()).ok_or_else(|| "bad echo".to_string())
    }
}

#[test]
fn a_node_moving_on_link_switches_to_direct_routes_and_keeps_its_connections() {
    require_root("vxlan to direct");
    let tmp = Tmp::new("vxmove");
    let (mut cl, _agents) = mixed("vxv", Setup::default(), &tmp);
    assert!(route_get(&cl, 0, cl.pods[2].ip).contains(&format!("dev {DEV} ")));
    let mut conn = connect(&cl.pods[2], &cl.pods[0]);
    assert_eq!(conn.server_saw, cl.pods[0].ip, "the pod keeps its source address across the tunnel");
    conn.echo(b"tun1").unwrap();
    cl.move_on_link(2);
    write_nodes(&tmp.0, &cl, false);
    for (from, to) in [(0, 2), (1, 2), (2, 0), (2, 1)] {
        let via = format!("via {} dev eth0", cl.nodes[to].ip);
        eventually(&format!("node-{} routes to node-{} directly", from + 1, to + 1), || {
            route_get(&cl, from, cl.pods[to].ip).contains(&via)
        });
    }
    // The same connection carries on, now without the tunnel.
    conn.echo(b"dir1").unwrap();
    for n in &cl.nodes {
        eventually(&format!("{}: the unused VXLAN device is gone", n.name), || {
            !n.ns.links().contains(&DEV.into())
        });
    }
    for node in 0..3 {
        eventually("conflist MTU back to 1500", || conflist_mtu(&tmp.0, node) == Some(1500));
    }
    conn.echo(b"dir2").unwrap();
    all_pairs(&cl).unwrap();
    // And off-link again: back through the tunnel, same connection.
    cl.move_off_link(2);
    write_nodes(&tmp.0, &cl, false);
    for (from, to) in [(0, 2), (1, 2), (2, 0), (2, 1)] {
        eventually(&format!("node-{} tunnels to node-{} again", from + 1, to + 1), || {
            route_get(&cl, from, cl.pods[to].ip).contains(&format!("dev {DEV} "))
        });
    }
    conn.echo(b"tun2").unwrap();
    all_pairs(&cl).unwrap();
}

#[test]
fn an_ipv6_only_cluster_tunnels_over_the_ipv6_underlay() {
    require_root("vxlan over IPv6");
    let tmp = Tmp::new("vx6");
    let setup = Setup { dual_stack: true, v6_only: true, ..Setup::default() };
    let (cl, _agents) = mixed("vx6", setup, &tmp);
    let dev6 = "cra-vxlan6";
    let r = route_get(&cl, 0, cl.pods[2].ip6.unwrap());
    assert!(r.contains(&format!("dev {dev6} ")), "{r}");
    assert!(route_get(&cl, 0, cl.pods[1].ip6.unwrap()).contains("dev eth0 "));
    let link = cl.nodes[0].ns.ip_json(&["link", "show", "dev", dev6]);
    assert_eq!(link[0]["mtu"], 1430, "70 bytes off for the IPv6 underlay");
    let info = &link[0]["linkinfo"]["info_data"];
    assert!(info["local6"] == "fd00:200::11" || info["local"] == "fd00:200::11", "{info}");
    assert!(!cl.nodes[0].ns.links().contains(&DEV.to_string()), "no IPv4 underlay to tunnel over");
    let fdb = String::from_utf8(cl.nodes[0].ns.run("bridge", &["fdb", "show", "dev", dev6]).stdout).unwrap();
    assert!(fdb.contains("dst fd00:201::13"), "{fdb}");
    eventually("conflist MTU 1430", || conflist_mtu(&tmp.0, 0) == Some(1430));
    for a in &cl.pods {
        for b in cl.pods.iter().filter(|b| b.name != a.name) {
            let (from, to) = (a.ip6.unwrap(), b.ip6.unwrap());
            let seen = exchange(b.ns.file(), SocketAddr::new(to, 0), a.ns.file(), None);
            assert_eq!(seen, Ok(from), "{} -> {}", a.name, b.name);
        }
    }
}

#[test]
fn vxlan_mtu_always_takes_the_overhead_off_while_every_node_is_on_link() {
    require_root("vxlan MTU always");
    let tmp = Tmp::new("vxmtu");
    let mut cl = Cluster::new("vxa", 2, plugins(), true);
    cl.add_pod(0, "vxan1p").unwrap();
    write_nodes(&tmp.0, &cl, false);
    let _agents: Vec<Agent> = (0..2)
        .map(|i| Agent::start(&cl, i, &tmp.0, if i == 0 { &["--vxlan-mtu-always"] } else { &[] }))
        .collect();
    eventually("conflists written", || {
        conflist_mtu(&tmp.0, 0).is_some() && conflist_mtu(&tmp.0, 1).is_some()
    });
    assert_eq!(conflist_mtu(&tmp.0, 0), Some(1450));
    assert_eq!(conflist_mtu(&tmp.0, 1), Some(1500), "without the flag: the underlay's");
    assert!(!cl.nodes[0].ns.links().contains(&DEV.to_string()), "no tunnel while nobody needs it");
}

#[test]
fn a_tunnel_that_cannot_be_made_fails_the_sync_but_not_the_direct_routes() {
    require_root("vxlan failure");
    let tmp = Tmp::new("vxfail");
    let mut cl = Cluster::new("vxf", 2, plugins(), true);
    cl.add_pod(0, "vxfn1p").unwrap();
    cl.add_pod(1, "vxfn2p").unwrap();
    // Another VXLAN device already holds the VNI and port: ours cannot be created.
    let ns = &cl.nodes[0].ns;
    ns.ip(&["link", "add", "squat", "type", "vxlan", "id", "168", "dstport", "4789", "local", "10.200.0.11"]);
    let mut nodes: Vec<Value> = cl.nodes.iter().map(|n| n.nodes_file_entry()).collect();
    nodes.push(json!({"name": "far", "podCIDRs": ["10.244.9.0/24"], "addresses": ["192.0.2.9"]}));
    std::fs::write(tmp.0.join("nodes.json"), json!({ "nodes": nodes }).to_string()).unwrap();
    let _agent = Agent::start(&cl, 0, &tmp.0, &[]);
    let direct = format!("{} nhid", cl.nodes[1].pod_cidr);
    eventually("the direct route to node-2", || ns.ip(&["route", "show", "proto", "168"]).contains(&direct));
    assert!(!ns.links().contains(&DEV.to_string()));
    assert!(
        !ns.ip(&["route", "show", "proto", "168"]).contains("10.244.9.0/24"),
        "no route without its device"
    );
    assert!(!ready(ns), "the failed tunnel shows in /readyz");
}

/// GET `path` on the agent in `ns`: the whole response.
fn get(ns: &Netns, path: &str) -> String {
    let f = ns.file();
    let path = path.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let Ok(mut s) =
            TcpStream::connect_timeout(&"127.0.0.1:9645".parse().unwrap(), Duration::from_secs(1))
        else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r
    })
    .join()
    .unwrap()
}

fn metric(ns: &Netns, name: &str) -> Option<f64> {
    get(ns, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cni_route_agent_{name} ")).and_then(|v| v.parse().ok()))
}

/// A tunnelled node that loses its address: unlike a direct route, its route cannot be kept
/// usefully (its VTEP entries go with the address, and the device with its last peer). It is
/// reported as unreachable, as a direct route's loss is: a metric, a line on /readyz (which
/// stays 200: a peer's trouble must not take this node out of service), and the log.
#[test]
fn a_tunnelled_node_losing_its_address_is_reported_as_unreachable() {
    require_root("vxlan node without address");
    let tmp = Tmp::new("vxna");
    let (cl, _agents) = mixed("vxna", Setup::default(), &tmp);
    eventually("ready", || ready(&cl.nodes[0].ns));
    assert_eq!(metric(&cl.nodes[0].ns, "pod_cidrs_unreachable"), Some(0.0));
    let mut nodes: Vec<Value> = cl.nodes.iter().map(|n| n.nodes_file_entry()).collect();
    nodes[2]["addresses"] = json!([]);
    let file = tmp.0.join("nodes.tmp");
    std::fs::write(&file, json!({ "nodes": nodes }).to_string()).unwrap();
    std::fs::rename(&file, tmp.0.join("nodes.json")).unwrap();
    eventually("reported in the metrics", || metric(&cl.nodes[0].ns, "pod_cidrs_unreachable") == Some(1.0));
    assert_eq!(metric(&cl.nodes[0].ns, "pod_cidrs_without_address"), Some(1.0));
    let readyz = get(&cl.nodes[0].ns, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 200") || readyz.starts_with("HTTP/1.0 200"), "{readyz}");
    assert!(
        readyz.contains("10.244.3.0/24") && readyz.contains("node-3") && readyz.contains("unreachable"),
        "{readyz}"
    );
}
