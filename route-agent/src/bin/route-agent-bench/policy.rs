//! NetworkPolicy benchmarks.
//!
//! Scale: 5,000 pods in 500 namespaces with 1,000 policies, through the manifests source (one
//! file per namespace, as a GitOps tree would hold them) into an agent in its own node
//! namespace: time to the first sync into the kernel, how long a pod added or a label changed
//! takes to reach the kernel, and the agent's memory.
//!
//! Datapath: two pods on one bridge, TCP throughput and new connections per second with no
//! policy table at all and with 100 policies selecting the pair, rounds interleaved in one run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cni_route_agent::policy::{compile, objects, Engine, TABLE};

use super::host::{ip, metric, spawn_agent, status_kb, wait_for, Ns};

const NAMESPACES: usize = 500;
const PODS_PER_NS: usize = 10;
const POLICIES_PER_NS: usize = 2;
const NODES: usize = 50;

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// The manifest of namespace `n`: the namespace, its pods (node-0 hosts every 50th), its
/// policies. `bump` relabels pod 0 or adds a pod, for the change measurements.
fn namespace_manifest(n: usize, relabel: Option<usize>, extra_pod: bool) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{team: t{}, env: {}}}}}\n",
        n % 10,
        if n % 2 == 1 { "dev" } else { "prod" }
    );
    let pods = PODS_PER_NS + usize::from(extra_pod);
    for p in 0..pods {
        let node = (n * PODS_PER_NS + p) % NODES;
        // An added pod gets an address of its own (n * 10 + 10 would be the next namespace's
        // first pod's), as a new pod does: two pods claiming one address is another case.
        let global = if p < PODS_PER_NS { n * PODS_PER_NS + p } else { NAMESPACES * PODS_PER_NS + n };
        let app = match relabel {
            Some(v) if p == 0 => format!("relabelled-{v}"),
            _ => format!("a{}", p % 5),
        };
        let (hi, lo) = (global / 250, global % 250 + 2);
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{p}, namespace: ns-{n}, labels: {{app: {app}, tier: t{}}}, creationTimestamp: '2026-01-01T00:00:00Z'}}\n\
             spec: {{nodeName: node-{node}, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}, {{name: metrics, containerPort: 9090}}]}}]}}\n\
             status: {{phase: Running, podIPs: [{{ip: 10.{}.{hi}.{lo}}}, {{ip: 'fd00:{:x}::{:x}'}}]}}\n",
            p % 3,
            100 + node,
            node,
            global
        ));
    }
    for k in 0..POLICIES_PER_NS {
        if k == 0 {
            // Ingress from the next app of the namespace and from the team's namespaces.
            y.push_str(&format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-web, namespace: ns-{n}}}\n\
                 spec:\n  podSelector: {{matchLabels: {{app: a{}}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{app: a{}}}}}\n    - namespaceSelector: {{matchLabels: {{team: t{}}}}}\n      podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [t0, t1]}}]}}\n    ports: [{{port: http}}, {{port: 443}}]\n",
                n % 5,
                (n + 1) % 5,
                (n + 3) % 10
            ));
        } else {
            // Egress to prod namespaces and one outside block.
            y.push_str(&format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: egress, namespace: ns-{n}}}\n\
                 spec:\n  podSelector: {{matchExpressions: [{{key: tier, operator: NotIn, values: [t2]}}]}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{namespaceSelector: {{matchLabels: {{env: prod}}}}}}]\n  - to: [{{ipBlock: {{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}}}]\n    ports: [{{port: 53, protocol: UDP}}, {{port: 5000, endPort: 5100}}]\n"
            ));
        }
    }
    y
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, path).expect("rename manifest");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn scale() {
    let agent = std::env::current_exe().expect("exe").with_file_name("cni-route-agent");
    let ns = Ns(format!("rab-{}", std::process::id()));
    assert!(Command::new("ip").args(["netns", "add", &ns.0]).status().expect("ip").success());
    ip(&ns.0, &["link", "set", "lo", "up"]);
    let dir = std::env::temp_dir().join(&ns.0);
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).expect("dir");
    for n in 0..NAMESPACES {
        write_atomic(&manifests.join(format!("ns-{n:03}.yaml")), &namespace_manifest(n, None, false));
    }
    std::fs::write(
        dir.join("nodes.yaml"),
        "nodes: [{name: node-0, podCIDRs: [10.100.0.0/16], addresses: [10.200.0.1]}]\n",
    )
    .expect("nodes");
    // The engine alone, in this process: the pure part of a full sync.
    let started = Instant::now();
    let (cluster, defects) = objects::load(&manifests).expect("manifests");
    let parse = started.elapsed();
    assert!(defects.is_empty(), "{defects:?}");
    let started = Instant::now();
    let want = compile(&cluster, "node-0");
    let compile_time = started.elapsed();
    let (script, _) = Engine::new("node-0").script(&want);
    let rules = script.lines().filter(|l| l.starts_with("add rule")).count();
    let elements: usize = want.elements.values().map(|s| s.len()).sum();
    eprintln!(
        "policy bench: manifests parsed in {:.0} ms, compiled in {:.0} ms ({rules} rules, {elements} elements); starting the agent",
        parse.as_secs_f64() * 1e3,
        compile_time.as_secs_f64() * 1e3
    );

    let mut cmd = Command::new(&agent);
    cmd.args(["--node-name", "node-0", "--source", "file", "--no-masquerade", "--resync-seconds", "3600"])
        .arg("--nodes-file")
        .arg(dir.join("nodes.yaml"))
        .arg("--policy-path")
        .arg(&manifests)
        .arg("--cni-conf-dir")
        .arg(dir.join("cni"))
        // BENCH_AGENT_LOG=cni_route_agent::policy=debug shows each sync's kind and time.
        .env("RUST_LOG", std::env::var("BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null());
    let start = Instant::now();
    let child = spawn_agent(&ns, cmd);
    let pid = child.0.id();
    wait_for("the first policy sync", Duration::from_secs(60), || {
        metric(&ns.0, "policy_syncs_total").unwrap_or(0.0) >= 1.0
    });
    let to_first = start.elapsed();
    let first_sync = metric(&ns.0, "policy_sync_duration_seconds").unwrap_or(f64::NAN);
    eprintln!("policy bench: first sync {:.0} ms; timing changes", first_sync * 1e3);
    // Changes: a label flip on a pod of node-0 and a pod added, alternating, each timed from
    // the file's rename to the sync's end (nft has returned: the kernel holds it).
    let mut lat = Vec::new();
    for i in 0..60 {
        let syncs = metric(&ns.0, "policy_syncs_total").unwrap_or(0.0);
        let n = (i * 7) % NAMESPACES;
        let text = if i % 2 == 0 {
            namespace_manifest(n, Some(i), false)
        } else {
            namespace_manifest(n, None, true)
        };
        let at = Instant::now();
        write_atomic(&manifests.join(format!("ns-{n:03}.yaml")), &text);
        lat.push(wait_for("a change's sync", Duration::from_secs(10), || {
            metric(&ns.0, "policy_syncs_total").unwrap_or(0.0) > syncs
        }));
        let _ = at;
        // Back to the original, not timed.
        let syncs = metric(&ns.0, "policy_syncs_total").unwrap_or(0.0);
        write_atomic(&manifests.join(format!("ns-{n:03}.yaml")), &namespace_manifest(n, None, false));
        wait_for("the restore's sync", Duration::from_secs(10), || {
            metric(&ns.0, "policy_syncs_total").unwrap_or(0.0) > syncs
        });
    }
    lat.sort();
    let rss = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "NetworkPolicy at scale: {} pods in {NAMESPACES} namespaces on {NODES} nodes, {} policies (manifests source, one file per namespace)",
        NAMESPACES * PODS_PER_NS,
        NAMESPACES * POLICIES_PER_NS
    );
    println!("command: target/release/route-agent-bench policy");
    println!("| metric | value | target | |");
    println!("|---|---|---|---|");
    println!("| node-0's table: rules / pod-set elements | {rules} / {elements} | | |");
    println!("| parse all manifests (in the bench process) | {:.0} ms | | |", parse.as_secs_f64() * 1e3);
    println!("| compile (in the bench process) | {:.0} ms | | |", compile_time.as_secs_f64() * 1e3);
    println!(
        "| first full sync into the kernel (agent's own timing: compile + nft) | {:.0} ms | < 300 ms | {} |",
        first_sync * 1e3,
        pass(first_sync < 0.3)
    );
    println!("| agent start to first sync done | {:.0} ms | | |", to_first.as_secs_f64() * 1e3);
    println!(
        "| pod added or label changed: file renamed to kernel, p50 / p99 (n={}) | {:.1} / {:.1} ms | p99 < 20 ms | {} |",
        lat.len(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        pass(percentile(&lat, 0.99) < Duration::from_millis(20))
    );
    println!(
        "| agent RSS now / peak | {:.1} / {:.1} MiB | < 64 MiB | {} |",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        pass(hwm < 64 * 1024)
    );
}

/// Runs `f` in a thread inside network namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread")
}

fn nft_in(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("nft script");
    assert!(child.wait().expect("nft").success(), "nft failed");
}

const PORT: u16 = 5201;

/// Connections per second from the client pod to the server for `d`.
fn connect_rate(client: &str, server: SocketAddr, d: Duration) -> f64 {
    in_ns(client, move || {
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < d {
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(1)).expect("connect");
            // The server closes first, so TIME_WAIT stays on its side.
            let _ = s.read(&mut [0u8; 1]);
            n += 1;
        }
        n as f64 / started.elapsed().as_secs_f64()
    })
}

/// Bytes per second from the client to the sink for `d`.
fn throughput(client: &str, sink: SocketAddr, d: Duration) -> f64 {
    in_ns(client, move || {
        let mut s = TcpStream::connect(sink).expect("connect");
        let buf = vec![0u8; 128 * 1024];
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < d {
            sent += s.write(&buf).expect("write") as u64;
        }
        sent as f64 / started.elapsed().as_secs_f64()
    })
}

fn datapath() {
    let tag = std::process::id();
    let node = Ns(format!("rpn-{tag}"));
    let pods = [Ns(format!("rpc-{tag}")), Ns(format!("rps-{tag}"))];
    for ns in [&node, &pods[0], &pods[1]] {
        assert!(Command::new("ip").args(["netns", "add", &ns.0]).status().expect("ip").success());
        ip(&ns.0, &["link", "set", "lo", "up"]);
    }
    ip(&node.0, &["link", "add", "br0", "type", "bridge"]);
    ip(&node.0, &["link", "set", "br0", "up"]);
    for (i, pod) in pods.iter().enumerate() {
        let host = format!("veth{i}");
        ip(&node.0, &["link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &pod.0]);
        ip(&node.0, &["link", "set", &host, "master", "br0", "up"]);
        ip(&pod.0, &["addr", "add", &format!("10.244.1.{}/24", i + 2), "dev", "eth0"]);
        ip(&pod.0, &["link", "set", "eth0", "up"]);
    }
    // Both sides of the comparison pass br_netfilter, so the difference is the table alone.
    in_ns(&node.0, || cni_route_agent::policy::enable_bridge_netfilter().expect("br_netfilter"));
    // The server: closes at once on the connect port, reads forever on the sink port.
    let server: SocketAddr = format!("10.244.1.3:{PORT}").parse().expect("addr");
    let sink: SocketAddr = format!("10.244.1.3:{}", PORT + 1).parse().expect("addr");
    let (l1, l2) = in_ns(&pods[1].0, move || {
        (TcpListener::bind(server).expect("bind"), TcpListener::bind(sink).expect("bind"))
    });
    std::thread::spawn(move || {
        for s in l1.incoming().flatten() {
            drop(s);
        }
    });
    std::thread::spawn(move || {
        for mut s in l2.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    // 100 policies select both pods; only the last allows the benchmark's ports, so every new
    // connection walks all of them (the worst case for a rule walk).
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: bench, labels: {app: client}}\n\
         spec: {nodeName: node-0, containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.244.1.2}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: bench, labels: {app: server}}\n\
         spec: {nodeName: node-0, containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.244.1.3}]}\n",
    );
    for k in 0..100 {
        let port = if k == 99 { format!("{PORT}, endPort: {}", PORT + 1) } else { format!("{}", 6000 + k) };
        yaml.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{k:03}, namespace: bench}}\n\
             spec:\n  podSelector: {{}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: client}}}}}}], ports: [{{port: {port}}}]}}]\n  egress: [{{to: [{{podSelector: {{matchLabels: {{app: server}}}}}}], ports: [{{port: {port}}}]}}]\n"
        ));
    }
    let mut cluster = cni_route_agent::policy::Cluster::default();
    let mut defects = Vec::new();
    objects::parse_into(&yaml, "bench", &mut cluster, &mut defects).expect("policies");
    let (script, _) = Engine::new("node-0").script(&compile(&cluster, "node-0"));
    let off = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
    // A node with no policy still tracks connections (kube-proxy's rules, the agent's own
    // masquerade): this column shows what conntrack alone costs, so the table's own cost is
    // the step from it to the last column.
    let tracked = format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\nadd table inet {TABLE}\n\
         add chain inet {TABLE} forward {{ type filter hook forward priority filter - 5; policy accept; }}\n\
         add rule inet {TABLE} forward ct state established,related accept\n"
    );
    let d = Duration::from_millis(2000);
    let rounds = 7;
    let (mut conn, mut tput) = ([Vec::new(), Vec::new(), Vec::new()], [Vec::new(), Vec::new(), Vec::new()]);
    for _ in 0..rounds {
        for (i, s) in [&off, &tracked, &script].into_iter().enumerate() {
            nft_in(&node.0, s);
            conn[i].push(connect_rate(&pods[0].0, server, d));
            tput[i].push(throughput(&pods[0].0, sink, d));
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let c: Vec<f64> = conn.iter_mut().map(med).collect();
    let t: Vec<f64> = tput.iter_mut().map(med).collect();
    println!();
    println!("NetworkPolicy datapath: two pods on one bridge, 100 policies selecting both (the allowing one last), {rounds} interleaved rounds of {} ms, medians", d.as_millis());
    // Judged against the node as it is without policies (connections tracked: kube-proxy's
    // rules, the agent's masquerade); the bare namespace is shown beside it, with its own
    // verdict, so that conntrack's share is plain.
    println!("| metric | no table | conntrack only | 100 policies | ratio to conntrack only | target | | ratio to no table | target | |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let row = |what: &str, v: [f64; 3], scale: f64, digits: usize, target: f64| {
        println!(
            "| {what} | {:.*} | {:.*} | {:.*} | {:.3} | >= {target:.2} | {} | {:.3} | >= {target:.2} | {} |",
            digits,
            v[0] * scale,
            digits,
            v[1] * scale,
            digits,
            v[2] * scale,
            v[2] / v[1],
            pass(v[2] / v[1] >= target),
            v[2] / v[0],
            pass(v[2] / v[0] >= target)
        )
    };
    row("new TCP connections per second", [c[0], c[1], c[2]], 1.0, 0, 0.90);
    row("TCP throughput (Gbit/s)", [t[0], t[1], t[2]], 8.0 / 1e9, 2, 0.95);
}

/// `route-agent-bench policy [scale|datapath]` (both by default).
pub fn main() {
    let only = std::env::args().nth(2);
    if only.as_deref() != Some("datapath") {
        scale();
    }
    if only.as_deref() != Some("scale") {
        datapath();
    }
}
