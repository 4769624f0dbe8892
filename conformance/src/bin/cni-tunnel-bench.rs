//! `cni-tunnel-bench`: TCP throughput between pods routed directly vs through the route
//! agent's VXLAN tunnel, side by side, in a simulated cluster: node-1 and node-2 on one
//! segment, node-3 behind a router. A bounded measurement (a fixed number of bytes per
//! run, the best of a few runs), not a test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cni_conformance::cluster::{Cluster, Plugins, Pod};
use cni_conformance::is_root;
use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};

struct Args {
    plugins: Plugins,
    mib: usize,
    runs: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: cni-tunnel-bench [--cni-path DIR] [--mib N] [--runs N]\n\
         TCP throughput pod to pod: direct route vs VXLAN (N MiB per run, default 256; best of\n\
         --runs, default 3). DIR holds cni-bridge, cni-host-local and cni-route-agent."
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let exe_dir =
        std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from)).unwrap_or_default();
    let mut a = Args {
        plugins: Plugins { dir: exe_dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() },
        mib: 256,
        runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--cni-path" => a.plugins.dir = PathBuf::from(val()),
            "--mib" => a.mib = val().parse().unwrap_or_else(|_| usage()),
            "--runs" => a.runs = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if a.mib == 0 || a.mib > 16384 || a.runs == 0 || a.runs > 20 {
        usage();
    }
    a
}

/// Agents we started, killed by their PIDs on drop.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for a in &mut self.0 {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

fn start_agents(c: &Cluster, bin: &Path, backend: &str) -> Result<Agents, String> {
    let nodes: Vec<Value> = c.nodes.iter().map(|n| n.nodes_file_entry()).collect();
    let file = c.state_dir().join("nodes.json");
    std::fs::write(&file, json!({ "nodes": nodes }).to_string()).map_err(|e| e.to_string())?;
    let mut agents = Agents(Vec::new());
    for n in &c.nodes {
        let mut cmd = Command::new(bin);
        cmd.args(["--node-name", &n.name, "--source", "file", "--no-portmap", "--backend", backend])
            .arg("--nodes-file")
            .arg(&file)
            .arg("--cni-conf-dir")
            .arg(c.state_dir().join(format!("cni-{}", n.name)))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        n.ns.enter(&mut cmd);
        agents.0.push(cmd.spawn().map_err(|e| format!("starting {}: {e}", bin.display()))?);
    }
    Ok(agents)
}

/// Waits (bounded) until node-1 routes `pod` out of `dev`.
fn wait_route(c: &Cluster, pod: &Pod, dev: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let want = format!("dev {dev} ");
    while !c.nodes[0].ns.ip(&["route", "get", &pod.ip.to_string()]).contains(&want) {
        if Instant::now() > deadline {
            return Err(format!("node-1 never routed {} via {dev}", pod.ip));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Sends `bytes` from `client` to a sink in `server`; returns MB/s (10^6 bytes).
fn throughput(server: &Pod, client: &Pod, bytes: usize) -> Result<f64, String> {
    let (tx, rx) = mpsc::channel();
    let (sf, ip) = (server.ns.file(), server.ip);
    let sink = std::thread::spawn(move || -> Result<usize, String> {
        setns(sf.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        let l = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| e.to_string())?;
        tx.send(l.local_addr().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    let addr: SocketAddr = rx.recv().map_err(|_| "the sink did not start".to_string())?;
    let cf = client.ns.file();
    let source = std::thread::spawn(move || -> Result<Duration, String> {
        setns(cf.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let buf = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            s.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
        // The sink has everything once it sees the end.
        let _ = s.read(&mut [0u8; 1]);
        Ok(start.elapsed())
    });
    let elapsed = source.join().map_err(|_| "sender panicked".to_string())??;
    let got = sink.join().map_err(|_| "sink panicked".to_string())??;
    if got != bytes {
        return Err(format!("sent {bytes} bytes, {got} arrived"));
    }
    Ok(bytes as f64 / elapsed.as_secs_f64() / 1e6)
}

fn best(server: &Pod, client: &Pod, args: &Args) -> Result<f64, String> {
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        runs.push(throughput(server, client, args.mib << 20)?);
    }
    Ok(runs.into_iter().fold(0.0, f64::max))
}

fn run(args: &Args) -> Result<(), String> {
    let bin = args.plugins.dir.join("cni-route-agent");
    let mut c = Cluster::new("tunbench", 3, args.plugins.clone(), false);
    // What the agent's conflist gives pods once a peer is tunnelled: every path is measured
    // with the same pod MTU.
    for n in &mut c.nodes {
        n.conf["mtu"] = json!(1450);
    }
    for i in 0..3 {
        c.add_pod(i, &format!("tb{}", i + 1))?;
    }
    c.add_router();
    c.move_off_link(2);
    let (p1, p2, p3) = (&c.pods[0], &c.pods[1], &c.pods[2]);
    println!("TCP pod to pod, {} MiB per run, best of {} (MB/s = 10^6 bytes/s)", args.mib, args.runs);
    println!("  {:<56} {:>8}", "PATH", "MB/s");
    let row = |what: &str, mbps: f64| println!("  {what:<56} {mbps:>8.0}");
    {
        let _agents = start_agents(&c, &bin, "auto")?;
        wait_route(&c, p2, "eth0")?;
        wait_route(&c, p3, "cra-vxlan4")?;
        row("node-1 -> node-2, same segment, direct route", best(p2, p1, args)?);
        row("node-1 -> node-3, other subnet, VXLAN + router hop", best(p3, p1, args)?);
    }
    let _agents = start_agents(&c, &bin, "vxlan")?;
    wait_route(&c, p2, "cra-vxlan4")?;
    row("node-1 -> node-2, same segment, VXLAN (--backend vxlan)", best(p2, p1, args)?);
    let mtu = c.nodes[0].ns.ip_json(&["link", "show", "dev", "cra-vxlan4"])[0]["mtu"].clone();
    println!("  (underlay MTU 1500, VXLAN device MTU {mtu}, pod MTU 1450; veth pairs on one machine:");
    println!("   compare the rows, not the absolute numbers)");
    Ok(())
}

fn main() -> ExitCode {
    let args = parse();
    if !is_root() {
        eprintln!("cni-tunnel-bench: needs root (it creates network namespaces)");
        return ExitCode::from(1);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cni-tunnel-bench: {e}");
            ExitCode::from(1)
        }
    }
}
