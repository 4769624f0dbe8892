//! The NetworkPolicy conformance fixture: a dual-stack cluster of two nodes, namespaces x, y,
//! z with pods a, b, c in each (spread over both nodes), every pod serving TCP and UDP on
//! ports 80 and 81 from threads inside its namespace, one route agent per node enforcing the
//! policies of a manifest directory this fixture writes; and the probe, which connects from
//! every pod of a case to every other over IPv4 and IPv6 and compares with the expected
//! matrix (upstream's `Reachability`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cni_conformance::cluster::{Cluster, Plugins};
use cni_conformance::netns::Netns;
use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};

use crate::common::Tmp;

pub const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// Every pod serves these ports, TCP and UDP.
pub const PORTS: [u16; 2] = [80, 81];
/// The creation time of the fixture's pods (a pod made later gets a later one).
pub const CREATED: &str = "2026-01-01T00:00:00Z";
/// How long a probe waits for a connection (upstream: `agnhost connect --timeout=1s`).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a case's matrix may take to match (upstream polls each pair for 10 s).
pub const MATRIX_BOUND: Duration = Duration::from_secs(10);

pub type Labels = BTreeMap<String, String>;

/// A transport protocol a probe uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

pub fn enter(ns: &File) {
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into a test namespace");
}

/// A pod's servers: one thread per (port, protocol), blocked in accept/recv inside the pod's
/// namespace; on drop they are woken from inside the namespace and joined.
struct Servers {
    ns: File,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &Netns) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let mut threads = Vec::new();
        for port in PORTS {
            let (f, s, t) = (ns.file(), stop.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                enter(&f);
                let l = match TcpListener::bind(("::", port)) {
                    Ok(l) => l,
                    Err(e) => return drop(t.send(Err(format!("bind TCP {port}: {e}")))),
                };
                let _ = t.send(Ok(()));
                while !s.load(Ordering::SeqCst) {
                    // Accepted and closed: the client's connect is what the probe measures.
                    let _ = l.accept();
                }
            }));
            let (f, s, t) = (ns.file(), stop.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                enter(&f);
                let u = match UdpSocket::bind(("::", port)) {
                    Ok(u) => u,
                    Err(e) => return drop(t.send(Err(format!("bind UDP {port}: {e}")))),
                };
                let _ = t.send(Ok(()));
                let mut buf = [0u8; 64];
                while !s.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        drop(tx);
        for _ in 0..threads.len() {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                other => panic!("pod servers did not start: {other:?}"),
            }
        }
        Servers { ns: ns.file(), stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let f = self.ns.try_clone().expect("dup netns fd");
        let _ = std::thread::spawn(move || {
            enter(&f);
            for port in PORTS {
                let lo = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
                let _ = TcpStream::connect_timeout(&lo, Duration::from_secs(1));
                if let Ok(u) = UdpSocket::bind("[::1]:0") {
                    let _ = u.send_to(b"stop", lo);
                }
            }
        })
        .join();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A route agent we started; killed (by its PID only) on drop.
pub struct Agent {
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod the fixture knows: where it runs and what the manifests say of it.
#[derive(Clone)]
pub struct PodInfo {
    /// The name of its namespace in the simulated cluster (`Cluster::pods`).
    pub cl_name: String,
    pub node: usize,
    pub labels: Labels,
    pub v4: IpAddr,
    pub v6: IpAddr,
    pub created: String,
    /// Listed in the manifests (a pod can exist without its object, or the other way round).
    pub listed: bool,
    /// The addresses its object claims (normally its own).
    pub claims: Vec<IpAddr>,
}

pub struct Fixture {
    /// Each pod's servers, by `namespace/name`.
    servers: BTreeMap<String, Servers>,
    agents: Vec<Option<Agent>>,
    pub cl: Cluster,
    pub tmp: Tmp,
    pub pods: BTreeMap<String, PodInfo>,
    /// Labels namespaces carry besides `kubernetes.io/metadata.name`.
    pub ns_labels: BTreeMap<String, Labels>,
    /// NetworkPolicy documents (YAML).
    pub policies: Vec<String>,
    /// Other documents written as they are (e.g. malformed objects).
    pub raw_docs: Vec<String>,
    pub dir: PathBuf,
    nodes_file: PathBuf,
    last: String,
}

pub fn plugins() -> Plugins {
    let dir = Path::new(AGENT).parent().unwrap().to_path_buf();
    assert!(
        dir.join("cni-bridge").exists() && dir.join("cni-host-local").exists(),
        "build the plugins first: cargo build -p cni-bridge -p cni-host-local -p cni-route-agent"
    );
    Plugins { dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() }
}

/// Node of pod `pod` (index in POD_NAMES) of namespace `ns` (index in NAMESPACES): a
/// checkerboard, so x/a-x/b is cross-node, x/a-x/c same-node, x/a-y/a cross-node, x/a-y/b
/// same-node.
pub fn node_of(ns: usize, pod: usize) -> usize {
    (ns + pod) % 2
}

impl Fixture {
    /// The cluster, its pods and servers, the manifests (no policy) and both agents; returns
    /// once every pod reaches every other over both families.
    pub fn new(tag: &str) -> Fixture {
        let tmp = Tmp::new(&format!("netpol-{tag}"));
        let mut cl = Cluster::dual_stack(tag, 2, plugins(), false);
        let mut pods = BTreeMap::new();
        let mut servers = BTreeMap::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, name) in POD_NAMES.iter().enumerate() {
                let node = node_of(i, j);
                let cl_name = format!("{ns}-{name}");
                let p = cl.add_pod(node, &cl_name).unwrap_or_else(|e| panic!("{e}"));
                let (v4, v6) = (p.ip, p.ip6.expect("dual-stack"));
                servers.insert(format!("{ns}/{name}"), Servers::start(&p.ns));
                let labels = Labels::from([("pod".to_string(), name.to_string())]);
                pods.insert(
                    format!("{ns}/{name}"),
                    PodInfo {
                        cl_name,
                        node,
                        labels,
                        v4,
                        v6,
                        created: CREATED.into(),
                        listed: true,
                        claims: vec![v4, v6],
                    },
                );
            }
        }
        let dir = tmp.0.join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        let nodes_file = tmp.0.join("nodes.json");
        let nodes: Vec<Value> = cl.nodes.iter().map(|n| n.nodes_file_entry()).collect();
        std::fs::write(&nodes_file, json!({ "nodes": nodes }).to_string()).unwrap();
        let mut f = Fixture {
            servers,
            agents: Vec::new(),
            cl,
            tmp,
            pods,
            ns_labels: BTreeMap::new(),
            policies: Vec::new(),
            raw_docs: Vec::new(),
            dir,
            nodes_file,
            last: String::new(),
        };
        f.write();
        for node in 0..2 {
            let a = f.spawn_agent(node);
            f.agents.push(Some(a));
        }
        for node in 0..2 {
            f.wait_agent_ready(node);
        }
        let all: Vec<&str> = f.pods.keys().map(|k| k.as_str()).collect::<Vec<_>>();
        let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        f.expect("servers up", &refs, Proto::Tcp, 80, &Reach::new(&refs, true));
        f
    }

    fn spawn_agent(&self, node: usize) -> Agent {
        let n = &self.cl.nodes[node];
        let mut c = Command::new(AGENT);
        c.args(["--node-name", &n.name, "--source", "file", "--nodes-file"])
            .arg(&self.nodes_file)
            .arg("--cni-conf-dir")
            .arg(self.tmp.0.join(format!("cni{node}")))
            .arg("--policy-path")
            .arg(&self.dir)
            // A short resync: the agent's periodic checks (its policy table is there) are seen
            // within a case's bound.
            .args(["--no-portmap", "--resync-seconds", "2"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        n.ns.enter(&mut c);
        Agent { child: c.spawn().expect("start the route agent") }
    }

    /// Waits (bounded) until the agent of `node` routes to the other node (both families)
    /// and has synced its policy table once.
    fn wait_agent_ready(&self, node: usize) {
        let ns = &self.cl.nodes[node].ns;
        wait_for(&format!("the agent of node {node} routes and enforces"), Duration::from_secs(20), || {
            let routes = ns.ip(&["route", "show", "proto", "168"]).lines().count()
                + ns.ip(&["-6", "route", "show", "proto", "168"]).lines().count();
            routes >= 2 && metric(ns, "policy_syncs_total").unwrap_or(0.0) >= 1.0
        });
    }

    /// Kills the agent of `node` (only that process: SIGKILL, or SIGTERM and a clean exit
    /// when `graceful`) and leaves it down.
    pub fn stop_agent(&mut self, node: usize, graceful: bool) {
        let mut agent = self.agents[node].take().expect("the agent runs");
        if graceful {
            let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the agent");
            let status = agent.child.wait().expect("wait for the agent");
            assert!(status.success(), "the agent exits cleanly on SIGTERM: {status}");
        }
    }

    /// Replaces the manifests with `text` as they are (e.g. a half-written file), no wait.
    pub fn write_raw(&mut self, text: &str) {
        let tmp = self.dir.join(".objects.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("objects.yaml")).unwrap();
        self.last = text.to_string();
    }

    /// Starts the agent of `node` again (without waiting).
    pub fn start_agent(&mut self, node: usize) {
        assert!(self.agents[node].is_none(), "the agent of node {node} runs");
        let a = self.spawn_agent(node);
        self.agents[node] = Some(a);
    }

    /// Fails if an agent we did not stop has exited (e.g. panicked): every later case would
    /// fail for that one reason.
    pub fn check_agents(&mut self) {
        for (node, agent) in self.agents.iter_mut().enumerate() {
            if let Some(a) = agent {
                if let Ok(Some(status)) = a.child.try_wait() {
                    *agent = None;
                    panic!("the agent of node {node} exited on its own ({status}); see its stderr above");
                }
            }
        }
    }

    pub fn agent_running(&self, node: usize) -> bool {
        self.agents[node].is_some()
    }

    /// A metric of the agent of `node` (`name` without the `cni_route_agent_` prefix).
    pub fn metric(&self, node: usize, name: &str) -> Option<f64> {
        metric(&self.cl.nodes[node].ns, name)
    }

    /// The manifests: namespaces, listed pods, policies, raw documents.
    pub fn render(&self) -> String {
        let mut docs: Vec<String> = Vec::new();
        for ns in NAMESPACES {
            let mut labels = self.ns_labels.get(ns).cloned().unwrap_or_default();
            labels.insert("kubernetes.io/metadata.name".into(), ns.into());
            docs.push(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})
                    .to_string(),
            );
        }
        for (key, p) in self.pods.iter().filter(|(_, p)| p.listed) {
            let (ns, name) = key.split_once('/').unwrap();
            let mut containers = Vec::new();
            for port in PORTS {
                for proto in ["tcp", "udp"] {
                    containers.push(json!({
                        "name": format!("cont-{port}-{proto}"),
                        "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
                        "ports": [{"name": format!("serve-{port}-{proto}"), "containerPort": port,
                                   "protocol": proto.to_uppercase()}],
                    }));
                }
            }
            let ips: Vec<Value> = p.claims.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
            docs.push(
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": ns, "labels": p.labels,
                                 "creationTimestamp": p.created},
                    "spec": {"nodeName": self.cl.nodes[p.node].name, "containers": containers},
                    "status": {"phase": "Running", "podIP": p.claims.first().map(|i| i.to_string()),
                               "podIPs": ips},
                })
                .to_string(),
            );
        }
        docs.extend(self.policies.iter().cloned());
        docs.extend(self.raw_docs.iter().cloned());
        docs.join("\n---\n") + "\n"
    }

    /// Writes the manifests (one file, replaced atomically by a rename) without waiting.
    pub fn write(&mut self) -> bool {
        let text = self.render();
        if text == self.last {
            return false;
        }
        let tmp = self.dir.join(".objects.yaml.tmp");
        std::fs::write(&tmp, &text).unwrap();
        std::fs::rename(&tmp, self.dir.join("objects.yaml")).unwrap();
        self.last = text;
        true
    }

    /// Writes the manifests and waits (bounded) until every running agent has synced the
    /// new view into its node's kernel.
    pub fn apply(&mut self) {
        let before = self.syncs();
        if self.write() {
            self.wait_synced(&before);
        }
    }

    /// Puts `text` into file `name` of the manifest directory (atomically), or removes the
    /// file when `None`; waits until every running agent synced the change.
    pub fn put_file(&mut self, name: &str, text: Option<&str>) {
        let before = self.syncs();
        let path = self.dir.join(name);
        match text {
            Some(text) => {
                let tmp = self.dir.join(format!(".{name}.tmp"));
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
            None => std::fs::remove_file(&path).unwrap(),
        }
        self.wait_synced(&before);
    }

    /// `policy_syncs_total` of every running agent.
    fn syncs(&mut self) -> Vec<(usize, f64)> {
        self.check_agents();
        (0..self.agents.len())
            .filter(|&n| self.agent_running(n))
            .map(|n| (n, self.metric(n, "policy_syncs_total").unwrap_or(0.0)))
            .collect()
    }

    fn wait_synced(&self, before: &[(usize, f64)]) {
        for &(n, b) in before {
            wait_for(
                &format!("the agent of node {n} syncs the new manifests"),
                Duration::from_secs(10),
                || self.metric(n, "policy_syncs_total").unwrap_or(0.0) > b,
            );
        }
    }

    /// Back to the fixture's state: no policy, labels as created, nothing else.
    pub fn reset(&mut self) {
        self.policies.clear();
        self.raw_docs.clear();
        self.ns_labels.clear();
        for (key, p) in self.pods.iter_mut() {
            let name = key.split_once('/').unwrap().1;
            p.labels = Labels::from([("pod".to_string(), name.to_string())]);
        }
    }

    pub fn set_pod_label(&mut self, pod: &str, key: &str, value: &str) {
        self.pods.get_mut(pod).expect("a fixture pod").labels.insert(key.into(), value.into());
    }

    pub fn set_ns_label(&mut self, ns: &str, key: &str, value: &str) {
        self.ns_labels.entry(ns.into()).or_default().insert(key.into(), value.into());
    }

    pub fn ip(&self, pod: &str, v6: bool) -> IpAddr {
        let p = &self.pods[pod];
        if v6 {
            p.v6
        } else {
            p.v4
        }
    }

    /// The network namespace of a pod.
    pub fn ns_file(&self, pod: &str) -> File {
        let name = &self.pods[pod].cl_name;
        self.cl.pods.iter().find(|p| &p.name == name).expect("the pod's namespace").ns.file()
    }

    /// Adds a pod (serving as every fixture pod does) on `node`, asking IPAM for `want`
    /// (e.g. a deleted pod's addresses) when given.
    pub fn add_pod(
        &mut self,
        key: &str,
        node: usize,
        labels: Labels,
        created: &str,
        want: Option<[IpAddr; 2]>,
    ) {
        let cl_name = key.replace('/', "-");
        if let Some(ips) = want {
            self.cl.nodes[node].conf["args"] =
                json!({"cni": {"ips": [ips[0].to_string(), ips[1].to_string()]}});
        }
        let added = self.cl.add_pod(node, &cl_name).map(|p| (p.ip, p.ip6, Servers::start(&p.ns)));
        self.cl.nodes[node].conf.as_object_mut().unwrap().remove("args");
        let (v4, v6, servers) = added.unwrap_or_else(|e| panic!("{e}"));
        self.servers.insert(key.into(), servers);
        let v6 = v6.expect("dual-stack");
        self.pods.insert(
            key.into(),
            PodInfo {
                cl_name,
                node,
                labels,
                v4,
                v6,
                created: created.into(),
                listed: true,
                claims: vec![v4, v6],
            },
        );
    }

    /// Removes a pod through the plugins (its object stays unless `unlist`).
    pub fn del_pod(&mut self, key: &str, unlist: bool) {
        let name = self.pods[key].cl_name.clone();
        self.servers.remove(key);
        let index = self.cl.pods.iter().position(|p| p.name == name).expect("the pod exists");
        let out = self.cl.del_pod(index);
        assert_eq!(out.code, 0, "DEL {key}: {} {}", out.stdout, out.stderr);
        if unlist {
            self.pods.remove(key);
        }
    }

    /// One observation of the matrix over `pods` for one family: every ordered pair, probed
    /// in parallel from the `from` pod's namespace.
    pub fn observe(&self, pods: &[&str], proto: Proto, port: u16, v6: bool, timeout: Duration) -> Matrix {
        let mut handles = Vec::new();
        for from in pods {
            for to in pods {
                let ns = self.ns_file(from);
                let addr = SocketAddr::new(self.ip(to, v6), port);
                let key = (from.to_string(), to.to_string());
                handles.push((
                    key,
                    std::thread::spawn(move || {
                        enter(&ns);
                        connects(proto, addr, timeout)
                    }),
                ));
            }
        }
        let cells = handles.into_iter().map(|(k, h)| (k, h.join().expect("probe thread"))).collect();
        Matrix { pods: pods.iter().map(|s| s.to_string()).collect(), cells }
    }

    /// Probes `pods` on `proto`/`port` over IPv4 and IPv6 until both observations match
    /// `want` (pod-to-itself ignored) or [`MATRIX_BOUND`] passes; then fails with the
    /// expected and observed truth tables.
    pub fn expect(&self, what: &str, pods: &[&str], proto: Proto, port: u16, want: &Reach) {
        self.expect_families(what, pods, proto, port, want, want);
    }

    /// The same with a different expectation for IPv6.
    pub fn expect_families(
        &self,
        what: &str,
        pods: &[&str],
        proto: Proto,
        port: u16,
        want4: &Reach,
        want6: &Reach,
    ) {
        let deadline = Instant::now() + MATRIX_BOUND;
        let mut retried: Vec<String> = Vec::new();
        loop {
            let (o4, o6) = std::thread::scope(|s| {
                let h4 = s.spawn(|| self.observe(pods, proto, port, false, PROBE_TIMEOUT));
                let h6 = s.spawn(|| self.observe(pods, proto, port, true, PROBE_TIMEOUT));
                (h4.join().unwrap(), h6.join().unwrap())
            });
            let ok4 = want4.matches(&o4);
            let ok6 = want6.matches(&o6);
            if ok4 && ok6 {
                if !retried.is_empty() {
                    // Not a failure (policy changes are asynchronous), but worth seeing.
                    eprintln!(
                        "netpol: {what}: {} {port}: matched after {} retries; first mismatches: {}",
                        proto.name(),
                        retried.len(),
                        retried[0]
                    );
                }
                return;
            }
            let diff = |fam: &str, want: &Reach, got: &Matrix| -> Vec<String> {
                want.cells
                    .iter()
                    .filter(|((a, b), v)| a != b && got.cells.get(&(a.clone(), b.clone())) != Some(v))
                    .map(|((a, b), v)| format!("{a}->{b} {fam} want {v}"))
                    .collect()
            };
            let mut d = diff("IPv4", want4, &o4);
            d.extend(diff("IPv6", want6, &o6));
            retried.push(d.join(", "));
            // Polling, bounded by the deadline: a round of connects that all succeed is quick.
            std::thread::sleep(Duration::from_millis(50));
            if Instant::now() > deadline {
                let mut msg =
                    format!("{what}: {} {port}: the reachability matrix does not match\n", proto.name());
                for (fam, want, got, ok) in [("IPv4", want4, &o4, ok4), ("IPv6", want6, &o6, ok6)] {
                    msg += &format!(
                        "--- {fam} {}\nexpected:\n{}observed:\n{}comparison (X: mismatch, loopback ignored):\n{}",
                        if ok { "ok" } else { "MISMATCH" },
                        want.table(),
                        got.table(),
                        want.compare(got)
                    );
                }
                panic!("{msg}");
            }
        }
    }
}

/// Whether a connection from namespace `ns` to `addr` works (see [`connects`]).
pub fn connects_from(ns: File, proto: Proto, addr: SocketAddr, timeout: Duration) -> bool {
    std::thread::spawn(move || {
        enter(&ns);
        connects(proto, addr, timeout)
    })
    .join()
    .expect("probe thread")
}

/// Whether a connection from here to `addr` works: TCP connect, or a UDP echo.
pub fn connects(proto: Proto, addr: SocketAddr, timeout: Duration) -> bool {
    match proto {
        Proto::Tcp => TcpStream::connect_timeout(&addr, timeout).is_ok(),
        Proto::Udp => {
            let local: SocketAddr = if addr.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(u) = UdpSocket::bind(local) else { return false };
            if u.connect(addr).is_err() {
                return false;
            }
            // Two tries: a datagram is not retransmitted as a SYN is.
            let _ = u.set_read_timeout(Some(timeout / 2));
            let mut buf = [0u8; 16];
            for _ in 0..2 {
                if u.send(b"ping").is_ok() && matches!(u.recv(&mut buf), Ok(4)) {
                    return true;
                }
            }
            false
        }
    }
}

/// Upstream's `Reachability`: the expected matrix over a case's pods.
#[derive(Clone, Debug)]
pub struct Reach {
    pods: Vec<String>,
    cells: BTreeMap<(String, String), bool>,
}

/// A peer of `Reach::peer`: "" (every pod), "x" (the pods of namespace x), "x/a" (one pod).
fn peer_has(peer: &str, pod: &str) -> bool {
    peer.is_empty() || pod == peer || pod.split_once('/').is_some_and(|(ns, _)| ns == peer)
}

impl Reach {
    /// `NewReachability(pods, v)`.
    pub fn new(pods: &[&str], v: bool) -> Reach {
        let mut cells = BTreeMap::new();
        for a in pods {
            for b in pods {
                cells.insert((a.to_string(), b.to_string()), v);
            }
        }
        Reach { pods: pods.iter().map(|s| s.to_string()).collect(), cells }
    }

    /// `Expect(from, to, v)`.
    pub fn expect(mut self, from: &str, to: &str, v: bool) -> Reach {
        assert!(self.cells.contains_key(&(from.into(), to.into())), "{from} -> {to} is not in the case");
        self.cells.insert((from.into(), to.into()), v);
        self
    }

    /// `ExpectAllIngress(to, v)`: the column.
    pub fn all_ingress(self, to: &str, v: bool) -> Reach {
        self.peer("", to, v)
    }

    /// `ExpectAllEgress(from, v)`: the row.
    pub fn all_egress(self, from: &str, v: bool) -> Reach {
        self.peer(from, "", v)
    }

    /// `ExpectPeer(from, to, v)`.
    pub fn peer(mut self, from: &str, to: &str, v: bool) -> Reach {
        for ((a, b), cell) in self.cells.iter_mut() {
            if peer_has(from, a) && peer_has(to, b) {
                *cell = v;
            }
        }
        self
    }

    /// Whether `from -> to` is expected to connect.
    pub fn allows(&self, from: &str, to: &str) -> bool {
        self.cells[&(from.to_string(), to.to_string())]
    }

    fn matches(&self, m: &Matrix) -> bool {
        self.cells.iter().all(|((a, b), v)| a == b || m.cells.get(&(a.clone(), b.clone())) == Some(v))
    }

    fn table(&self) -> String {
        truth_table(&self.pods, |a, b| if self.cells[&(a.into(), b.into())] { "." } else { "X" })
    }

    fn compare(&self, m: &Matrix) -> String {
        truth_table(&self.pods, |a, b| {
            let k = (a.to_string(), b.to_string());
            if a == b || m.cells.get(&k) == self.cells.get(&k) {
                "."
            } else {
                "X"
            }
        })
    }
}

/// What a probe saw: connected or not, per (from, to).
pub struct Matrix {
    pods: Vec<String>,
    pub cells: BTreeMap<(String, String), bool>,
}

impl Matrix {
    fn table(&self) -> String {
        truth_table(&self.pods, |a, b| if self.cells[&(a.into(), b.into())] { "." } else { "X" })
    }
}

/// Upstream's truth table: a header of destinations, a row per source.
fn truth_table(pods: &[String], cell: impl Fn(&str, &str) -> &'static str) -> String {
    let mut s = String::from("-");
    for p in pods {
        s += &format!("\t{p}");
    }
    s.push('\n');
    for a in pods {
        s += a;
        for b in pods {
            s += &format!("\t{}", cell(a, b));
        }
        s.push('\n');
    }
    s
}

/// Polls `f` until it holds or `bound` passes (then panics naming `what`).
pub fn wait_for(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET /metrics on the agent's default listen address inside `ns`; one metric's value.
pub fn metric(ns: &Netns, name: &str) -> Option<f64> {
    let f = ns.file();
    let body = std::thread::spawn(move || {
        enter(&f);
        let addr: SocketAddr = "127.0.0.1:9645".parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        Some(r)
    })
    .join()
    .ok()??;
    let prefix = format!("cni_route_agent_{name} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
}

/// A NetworkPolicy document: `spec` in YAML flow style.
pub fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}"
    )
}
