//! A simulated cluster in namespaces: an underlay namespace with a bridge joining N node
//! namespaces (no link to the machine's interfaces), pods attached by the CNI plugins under
//! test, routes between nodes, and kube-proxy-style Service rules. Everything is removed on
//! drop: pods are DELeted through the plugin first, then the namespaces go.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::netns::Netns;
use crate::plugin::{invoke, Out};
use crate::world::lease_files;
pub use crate::world::Plugins;

/// A pod: its namespace and what ADD returned.
pub struct Pod {
    /// Name, e.g. `n1-p2`.
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// Its address (IPv4 in a dual-stack cluster).
    pub ip: IpAddr,
    /// Its IPv6 address in a dual-stack cluster.
    pub ip6: Option<IpAddr>,
    /// Host end of its veth.
    pub veth: String,
    /// Index of its node.
    pub node: usize,
    /// The ADD result.
    pub result: Value,
}

/// A node: namespace, underlay address, pod CIDR.
pub struct Node {
    /// Name, e.g. `node-1`.
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// Address on the underlay.
    pub ip: Ipv4Addr,
    /// Pod CIDR, e.g. `10.244.1.0/24`.
    pub pod_cidr: String,
    /// IPv6 address on the underlay in a dual-stack cluster, e.g. `fd00:200::11`.
    pub ip6: Option<Ipv6Addr>,
    /// IPv6 pod CIDR in a dual-stack cluster, e.g. `fd00:10:244:1::/64`.
    pub pod_cidr6: Option<String>,
    /// The bridge config it uses.
    pub conf: Value,
}

impl Node {
    /// Its pod CIDRs, IPv4 first.
    pub fn pod_cidrs(&self) -> Vec<String> {
        std::iter::once(self.pod_cidr.clone()).chain(self.pod_cidr6.clone()).collect()
    }

    /// Its underlay addresses, IPv4 first.
    pub fn addresses(&self) -> Vec<String> {
        std::iter::once(self.ip.to_string()).chain(self.ip6.map(|a| a.to_string())).collect()
    }

    /// Its entry in a route agent nodes file.
    pub fn nodes_file_entry(&self) -> Value {
        json!({"name": self.name, "podCIDRs": self.pod_cidrs(), "addresses": self.addresses()})
    }
}

/// The cluster.
pub struct Cluster {
    /// Underlay namespace holding the bridge `ul0`.
    pub underlay: Netns,
    /// The nodes `node-1`, `node-2`... in order, joined by the underlay bridge.
    pub nodes: Vec<Node>,
    /// Pods, in creation order.
    pub pods: Vec<Pod>,
    /// The plugins ADD and DEL run on every node.
    pub plugins: Plugins,
    /// Lease directories live here.
    pub state: PathBuf,
    /// Keep everything on drop (the demo's `--keep`).
    pub keep: bool,
    /// Nodes and pods have IPv6 addresses too.
    pub dual_stack: bool,
    /// The router between the underlay and the far segment, once [`Cluster::add_router`] made it.
    pub router: Option<Netns>,
}

/// The underlay subnet's first node address is .11.
pub const UNDERLAY_PREFIX: &str = "10.200.0";
/// The IPv6 underlay subnet (a /64): node i is `fd00:200::<10+i>`.
pub const UNDERLAY_PREFIX6: &str = "fd00:200::";
/// The far segment behind the router ([`Cluster::add_router`]): a node moved there is
/// `10.201.0.<10+i>` (and `fd00:201::<10+i>`).
pub const FAR_PREFIX: &str = "10.201.0";
/// The far segment's IPv6 subnet (a /64).
pub const FAR_PREFIX6: &str = "fd00:201::";

impl Cluster {
    /// Makes `node_count` nodes on an underlay; node i gets pod CIDR 10.244.i.0/24.
    pub fn new(tag: &str, node_count: usize, plugins: Plugins, hairpin: bool) -> Cluster {
        Cluster::build(tag, node_count, plugins, hairpin, false)
    }

    /// Like [`Cluster::new`], dual-stack: node i also gets `fd00:200::<10+i>/64` on the
    /// underlay and pod CIDR `fd00:10:244:i::/64`, and every pod an address of each family.
    pub fn dual_stack(tag: &str, node_count: usize, plugins: Plugins, hairpin: bool) -> Cluster {
        Cluster::build(tag, node_count, plugins, hairpin, true)
    }

    fn build(tag: &str, node_count: usize, plugins: Plugins, hairpin: bool, dual_stack: bool) -> Cluster {
        let underlay = Netns::new(&format!("{tag}-ul"));
        underlay.ip(&["link", "add", "ul0", "type", "bridge"]);
        underlay.ip(&["link", "set", "ul0", "up"]);
        let state = std::env::temp_dir().join(format!("{}-{}", underlay.name, "state"));
        std::fs::create_dir_all(&state).expect("state dir");
        let mut nodes = Vec::new();
        for number in 1..=node_count {
            let ns = Netns::new(&format!("{tag}-node{number}"));
            let port = format!("n{number}");
            // Created from inside the underlay namespace with the node end moved straight
            // into the node: never a link in the root namespace.
            underlay.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
            underlay.ip(&["link", "set", &port, "master", "ul0", "up"]);
            let ip = Ipv4Addr::new(10, 200, 0, 10 + number as u8);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            let ip6: Option<Ipv6Addr> = dual_stack
                .then(|| format!("{UNDERLAY_PREFIX6}{}", 10 + number).parse().expect("an IPv6 address"));
            if let Some(ip6) = ip6 {
                // No duplicate address detection on a private underlay: usable at once.
                ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
                ns.sysctl("net.ipv6.conf.all.forwarding", "1").expect("enable IPv6 forwarding in the node");
            }
            ns.ip(&["link", "set", "eth0", "up"]);
            // Service traffic between pods on one bridge goes through iptables (kube-proxy's
            // requirement, and what makes hairpin matter).
            // Absent without br_netfilter; the Service checks then fail and say what they miss.
            let _ = ns.sysctl("net.bridge.bridge-nf-call-iptables", "1");
            // A node forwards (kubelet/kube-proxy set this on real nodes).
            ns.sysctl("net.ipv4.ip_forward", "1").expect("enable forwarding in the node namespace");
            let pod_cidr = format!("10.244.{number}.0/24");
            let pod_cidr6 = dual_stack.then(|| format!("fd00:10:244:{number:x}::/64"));
            let mut conf = json!({
                "cniVersion": "1.0.0",
                "name": "podnet",
                "type": plugins.bridge,
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "hairpinMode": hairpin,
                "ipam": {"type": plugins.ipam, "subnet": pod_cidr,
                         "dataDir": state.join(format!("node{number}")).display().to_string()}
            });
            if let Some(cidr6) = &pod_cidr6 {
                let ipam = &mut conf["ipam"];
                ipam["ranges"] = json!([[{"subnet": pod_cidr}], [{"subnet": cidr6}]]);
                ipam.as_object_mut().expect("an object").remove("subnet");
            }
            nodes.push(Node { name: format!("node-{number}"), ns, ip, pod_cidr, ip6, pod_cidr6, conf });
        }
        Cluster { underlay, nodes, pods: Vec::new(), plugins, state, keep: false, dual_stack, router: None }
    }

    /// A second segment (bridge `ul1` in the underlay namespace) and a router namespace joining
    /// it to the underlay (`.1` on each side); every node gets its default route via the router,
    /// as a data centre fabric would provide. Nodes stay on the underlay until
    /// [`Cluster::move_off_link`].
    pub fn add_router(&mut self) {
        let router = Netns::new(&format!("{}-rt", self.underlay.name));
        self.underlay.ip(&["link", "add", "ul1", "type", "bridge"]);
        self.underlay.ip(&["link", "set", "ul1", "up"]);
        let legs =
            [("rt0", "ul0", UNDERLAY_PREFIX, UNDERLAY_PREFIX6), ("rt1", "ul1", FAR_PREFIX, FAR_PREFIX6)];
        for (i, (port, bridge, v4, v6)) in legs.iter().enumerate() {
            let leg = format!("r{i}");
            self.underlay.ip(&[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                &leg,
                "netns",
                &router.name,
            ]);
            self.underlay.ip(&["link", "set", port, "master", bridge, "up"]);
            router.ip(&["addr", "add", &format!("{v4}.1/24"), "dev", &leg]);
            if self.dual_stack {
                router.ip(&["addr", "add", &format!("{v6}1/64"), "dev", &leg, "nodad"]);
            }
            router.ip(&["link", "set", &leg, "up"]);
        }
        router.sysctl("net.ipv4.ip_forward", "1").expect("enable forwarding in the router");
        if self.dual_stack {
            router.sysctl("net.ipv6.conf.all.forwarding", "1").expect("enable IPv6 forwarding in the router");
        }
        self.router = Some(router);
        for i in 0..self.nodes.len() {
            self.default_route(i, UNDERLAY_PREFIX, UNDERLAY_PREFIX6);
        }
    }

    fn default_route(&self, node: usize, v4: &str, v6: &str) {
        let ns = &self.nodes[node].ns;
        ns.ip(&["route", "replace", "default", "via", &format!("{v4}.1")]);
        if self.dual_stack {
            ns.ip(&["-6", "route", "replace", "default", "via", &format!("{v6}1")]);
        }
    }

    /// Moves node `node` (0-based) to the far segment behind the router: its underlay port
    /// joins `ul1` and its addresses become `10.201.0.<10+i>` (`fd00:201::<10+i>`). Pods and
    /// their bridge stay as they are; the caller tells the route agents (nodes file).
    pub fn move_off_link(&mut self, node: usize) {
        self.readdress(node, "ul1", FAR_PREFIX, FAR_PREFIX6);
    }

    /// Moves node `node` back onto the underlay segment, at its original addresses.
    pub fn move_on_link(&mut self, node: usize) {
        self.readdress(node, "ul0", UNDERLAY_PREFIX, UNDERLAY_PREFIX6);
    }

    fn readdress(&mut self, node: usize, bridge: &str, v4: &str, v6: &str) {
        assert!(self.router.is_some(), "add_router first");
        let host = 11 + node;
        let n = &self.nodes[node];
        n.ns.ip(&["addr", "flush", "dev", "eth0", "scope", "global"]);
        self.underlay.ip(&["link", "set", &format!("n{}", node + 1), "master", bridge]);
        let ip: Ipv4Addr = format!("{v4}.{host}").parse().expect("an IPv4 address");
        n.ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        let ip6: Option<Ipv6Addr> =
            self.dual_stack.then(|| format!("{v6}{host}").parse().expect("an IPv6 address"));
        if let Some(ip6) = ip6 {
            n.ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
        }
        self.nodes[node].ip = ip;
        self.nodes[node].ip6 = ip6;
        self.default_route(node, v4, v6);
    }

    /// Static routes: every node reaches every other node's pod CIDR via that node's address.
    pub fn static_routes(&self) {
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|other| other.name != node.name) {
                node.ns.ip(&[
                    "route",
                    "replace",
                    &other.pod_cidr,
                    "via",
                    &other.ip.to_string(),
                    "proto",
                    "static",
                ]);
                if let (Some(cidr6), Some(ip6)) = (&other.pod_cidr6, other.ip6) {
                    node.ns.ip(&["route", "replace", cidr6, "via", &ip6.to_string(), "proto", "static"]);
                }
            }
        }
    }

    fn call(&self, node: usize, cmd: &str, id: &str, netns: &str, conf: &Value) -> Out {
        let path = self.plugins.dir.display().to_string();
        let env = [
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", path.as_str()),
        ];
        invoke(&self.nodes[node].ns, &self.plugins.main_plugin(), cmd, &env, conf)
    }

    /// Adds a pod on node `node` (0-based) through the plugins.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<&Pod, String> {
        self.add_pod_with(node, name, true)
    }

    /// Like [`Cluster::add_pod`], but the pod is handed back the moment ADD returns, with no
    /// wait for the bridge's IPv6 addresses: for tests of what ADD itself promises.
    pub fn add_pod_as_added(&mut self, node: usize, name: &str) -> Result<&Pod, String> {
        self.add_pod_with(node, name, false)
    }

    fn add_pod_with(&mut self, node: usize, name: &str, settle: bool) -> Result<&Pod, String> {
        let ns = Netns::new(name);
        let conf = self.nodes[node].conf.clone();
        let out = self.call(node, "ADD", name, &ns.path.display().to_string(), &conf);
        if out.code != 0 {
            return Err(format!("ADD {name}: {} {}", out.stdout, out.stderr));
        }
        let ips: Vec<IpAddr> = out.json["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        let ip = *ips.iter().find(|a| a.is_ipv4()).or(ips.first()).ok_or("no address")?;
        let ip6 = ips.iter().find(|a| a.is_ipv6()).copied();
        if self.dual_stack && ip6.is_none() {
            return Err(format!("ADD {name}: no IPv6 address in {}", out.stdout));
        }
        let veth = out.json["interfaces"][1]["name"].as_str().unwrap_or("").to_string();
        if ip6.is_some() && settle {
            self.wait_gateway_usable(node)?;
        }
        self.pods.push(Pod { name: name.to_string(), ns, ip, ip6, veth, node, result: out.json });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Waits (bounded) until the bridge's IPv6 gateway address has left duplicate address
    /// detection: a tentative gateway drops the pods' first IPv6 packets. Returns at once once
    /// the bridge adds it without DAD.
    fn wait_gateway_usable(&self, node: usize) -> Result<(), String> {
        let ns = &self.nodes[node].ns;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !ns.ip(&["-6", "addr", "show", "dev", "cni0", "tentative"]).trim().is_empty() {
            if std::time::Instant::now() > deadline {
                return Err(format!("{}: the bridge's IPv6 address stays tentative", self.nodes[node].name));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }

    /// DELs a pod through the plugins and removes its namespace.
    pub fn del_pod(&mut self, index: usize) -> Out {
        let pod = self.pods.remove(index);
        let conf = self.nodes[pod.node].conf.clone();
        self.call(pod.node, "DEL", &pod.name, &pod.ns.path.display().to_string(), &conf)
    }

    /// Installs, on every node, kube-proxy-style rules for a ClusterIP `vip:port` spread over
    /// `endpoints` (`-m statistic --mode random`), with KUBE-MARK-MASQ (0x4000) for hairpin
    /// traffic and MASQUERADE in POSTROUTING for marked packets.
    pub fn service(&self, name: &str, vip: Ipv4Addr, port: u16, endpoints: &[SocketAddr]) {
        let svc = format!("KUBE-SVC-{}", name.to_uppercase());
        for node in &self.nodes {
            // Declaring a chain in `iptables-restore --noflush` flushes it: the shared chains
            // are declared once, with their rules; each Service only adds its own.
            let base = node.ns.run("iptables", &["-t", "nat", "-C", "PREROUTING", "-j", "KUBE-SERVICES"]);
            let mut rules = String::from("*nat\n");
            if !base.status.success() {
                rules
                    .push_str(":KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
            }
            rules.push_str(&format!(":{svc} - [0:0]\n"));
            for (position, _) in endpoints.iter().enumerate() {
                rules.push_str(&format!(":KUBE-SEP-{}-{position} - [0:0]\n", name.to_uppercase()));
            }
            if !base.status.success() {
                rules.push_str("-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n");
                rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
                rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
                rules.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
                rules.push_str("-A KUBE-POSTROUTING -j MASQUERADE\n");
            }
            rules.push_str(&format!("-A KUBE-SERVICES -d {vip}/32 -p tcp --dport {port} -j {svc}\n"));
            let n_ep = endpoints.len();
            for (position, ep) in endpoints.iter().enumerate() {
                let sep = format!("KUBE-SEP-{}-{position}", name.to_uppercase());
                if position + 1 < n_ep {
                    let prob = 1.0 / (n_ep - position) as f64;
                    rules.push_str(&format!(
                        "-A {svc} -m statistic --mode random --probability {prob:.5} -j {sep}\n"
                    ));
                } else {
                    rules.push_str(&format!("-A {svc} -j {sep}\n"));
                }
                rules.push_str(&format!("-A {sep} -s {}/32 -j KUBE-MARK-MASQ\n", ep.ip()));
                rules.push_str(&format!("-A {sep} -p tcp -j DNAT --to-destination {ep}\n"));
            }
            rules.push_str("COMMIT\n");
            restore(&node.ns, &rules, &node.name);
        }
    }

    /// One `cni-route-agent` per node namespace (file source listing every node); waits until
    /// each node has a route to every other node's pod CIDR. The caller owns the processes.
    pub fn start_route_agents(&self, bin: &Path) -> Result<Vec<std::process::Child>, String> {
        self.start_route_agents_with(bin, &[])
    }

    /// [`Cluster::start_route_agents`] with more arguments for every agent.
    pub fn start_route_agents_with(
        &self,
        bin: &Path,
        extra: &[String],
    ) -> Result<Vec<std::process::Child>, String> {
        let nodes: Vec<Value> = self.nodes.iter().map(Node::nodes_file_entry).collect();
        let file = self.state.join("nodes.json");
        std::fs::write(&file, json!({ "nodes": nodes }).to_string()).map_err(|e| e.to_string())?;
        let mut agents = Vec::new();
        for node in &self.nodes {
            let mut cmd = std::process::Command::new(bin);
            cmd.args(["--node-name", &node.name, "--source", "file", "--no-portmap", "--nodes-file"])
                .arg(&file)
                .arg("--cni-conf-dir")
                .arg(self.state.join(format!("cni-{}", node.name)))
                .args(extra)
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null());
            node.ns.enter(&mut cmd);
            agents.push(cmd.spawn().map_err(|e| format!("starting {}: {e}", bin.display()))?);
        }
        let families = if self.dual_stack { 2 } else { 1 };
        let want = (self.nodes.len() - 1) * families;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        for node in &self.nodes {
            let count = || {
                node.ns.ip(&["route", "show", "proto", "168"]).lines().count()
                    + node.ns.ip(&["-6", "route", "show", "proto", "168"]).lines().count()
            };
            while count() < want {
                if std::time::Instant::now() > deadline {
                    for mut agent in agents {
                        let _ = agent.kill();
                        let _ = agent.wait();
                    }
                    return Err(format!("{}: the route agent did not install the routes", node.name));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        Ok(agents)
    }

    /// A host outside the cluster on the underlay (`10.200.0.<host>`), e.g. a NodePort client.
    pub fn external(&self, name: &str, host: u8) -> Netns {
        let ns = Netns::new(name);
        let port = format!("x{host}");
        self.underlay.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
        self.underlay.ip(&["link", "set", &port, "master", "ul0", "up"]);
        ns.ip(&["addr", "add", &format!("{UNDERLAY_PREFIX}.{host}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns
    }

    /// kube-proxy-style NodePort `port` for Service `name` (whose ClusterIP rules
    /// [`Cluster::service`] installed). `local`: externalTrafficPolicy=Local, i.e. each node
    /// forwards only to its own endpoints without SNAT and drops when it has none; otherwise
    /// any endpoint, SNATed to the node's address.
    pub fn node_port(&self, name: &str, port: u16, endpoints: &[(usize, SocketAddr)], local: bool) {
        let up = name.to_uppercase();
        for (index, node) in self.nodes.iter().enumerate() {
            let has = node.ns.run("iptables", &["-t", "nat", "-n", "-L", "KUBE-NODEPORTS"]);
            let mut rules = String::from("*nat\n");
            if !has.status.success() {
                rules.push_str(":KUBE-NODEPORTS - [0:0]\n");
            }
            rules.push_str(&format!(":KUBE-EXT-{up} - [0:0]\n"));
            if !has.status.success() {
                rules.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
            }
            rules.push_str(&format!("-A KUBE-NODEPORTS -p tcp --dport {port} -j KUBE-EXT-{up}\n"));
            let mine: Vec<&SocketAddr> =
                endpoints.iter().filter(|(node, _)| *node == index).map(|(_, e)| e).collect();
            if local {
                rules.push_str(&format!(":KUBE-SVL-{up} - [0:0]\n-A KUBE-EXT-{up} -j KUBE-SVL-{up}\n"));
                for (position, ep) in mine.iter().enumerate() {
                    if position + 1 < mine.len() {
                        let probability = 1.0 / (mine.len() - position) as f64;
                        rules.push_str(&format!(
                            "-A KUBE-SVL-{up} -p tcp -m statistic --mode random --probability {probability:.5} -j DNAT --to-destination {ep}\n"
                        ));
                    } else {
                        rules.push_str(&format!("-A KUBE-SVL-{up} -p tcp -j DNAT --to-destination {ep}\n"));
                    }
                }
            } else {
                rules.push_str(&format!(
                    "-A KUBE-EXT-{up} -j KUBE-MARK-MASQ\n-A KUBE-EXT-{up} -j KUBE-SVC-{up}\n"
                ));
            }
            rules.push_str("COMMIT\n");
            if local && mine.is_empty() {
                // kube-proxy's "has no local endpoints" rule.
                rules.push_str(&format!(
                    "*filter\n-A INPUT -p tcp --dport {port} -m addrtype --dst-type LOCAL -j DROP\n\
                     -A FORWARD -p tcp --dport {port} -m addrtype --dst-type LOCAL -j DROP\nCOMMIT\n"
                ));
            }
            restore(&node.ns, &rules, &node.name);
        }
    }

    /// The routes of a node (`ip route` lines; then `ip -6 route` in a dual-stack cluster).
    pub fn routes(&self, node: usize) -> Vec<String> {
        let ns = &self.nodes[node].ns;
        let mut out: Vec<String> = ns.ip(&["route", "show"]).lines().map(str::to_string).collect();
        if self.dual_stack {
            // Every link has its link-local route: noise here.
            let v6 = ns.ip(&["-6", "route", "show"]);
            out.extend(v6.lines().filter(|l| !l.starts_with("fe80::")).map(str::to_string));
        }
        out
    }

    /// The lease files left in every node's data dir.
    pub fn leases(&self) -> usize {
        (1..=self.nodes.len())
            .map(|number| lease_files(&self.state.join(format!("node{number}")), "podnet").len())
            .sum()
    }

    /// The names of every namespace of the cluster (for `--keep` instructions).
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names = vec![self.underlay.name.clone()];
        names.extend(self.router.iter().map(|r| r.name.clone()));
        names.extend(self.nodes.iter().map(|n| n.ns.name.clone()));
        names.extend(self.pods.iter().map(|p| p.ns.name.clone()));
        names
    }

    /// Where the state lives.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }
}

fn restore(ns: &Netns, rules: &str, who: &str) {
    use std::io::Write;
    let mut cmd = std::process::Command::new("iptables-restore");
    cmd.args(["--noflush", "-w"]).stdin(std::process::Stdio::piped());
    ns.enter(&mut cmd);
    let mut child = cmd.spawn().expect("iptables-restore");
    child.stdin.take().expect("piped").write_all(rules.as_bytes()).expect("write rules");
    assert!(child.wait().expect("wait").success(), "iptables-restore in {who} failed:\n{rules}");
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            // Leave namespaces and leases in place: the guards must not remove them.
            for pod in self.pods.drain(..) {
                std::mem::forget(pod.ns);
            }
            for node in self.nodes.drain(..) {
                std::mem::forget(node.ns);
            }
            let underlay =
                std::mem::replace(&mut self.underlay, Netns { name: String::new(), path: PathBuf::new() });
            std::mem::forget(underlay);
            if let Some(router) = self.router.take() {
                std::mem::forget(router);
            }
            return;
        }
        while !self.pods.is_empty() {
            let out = self.del_pod(self.pods.len() - 1);
            if out.code != 0 {
                eprintln!("cluster teardown: DEL failed: {} {}", out.stdout, out.stderr);
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}
