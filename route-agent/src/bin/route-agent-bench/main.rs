//! Scale benchmark of cni-route-agent: N nodes through the file source into one node
//! namespace. Reports the first sync, a no-op resync's netlink writes, the agent's memory,
//! and how long one node's change takes to reach the kernel. `route-agent-bench kube N`: the
//! kubernetes source at cluster size, against an API server stand-in (kube.rs).
//! `route-agent-bench policy`: NetworkPolicy at scale and on the datapath (policy.rs). Root;
//! touches only the namespaces it makes.

mod host;
mod kube;
mod policy;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use host::{ip, metric, node_addr, pod_cidr, spawn_agent, status_kb, wait_for, AGENT_PID};

fn write_nodes(path: &Path, last: u32, moved: Option<u32>) {
    let mut yaml = String::from("nodes:\n");
    for number in 0..=last {
        let addr = if Some(number) == moved { node_addr(last + 10) } else { node_addr(number) };
        yaml.push_str(&format!(
            "- {{name: node-{number}, podCIDRs: [{}], addresses: [{addr}]}}\n",
            pod_cidr(number)
        ));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).expect("write nodes");
    std::fs::rename(&tmp, path).expect("rename nodes");
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("policy") {
        policy::main();
        return;
    }
    // The release profile aborts on panic, so no Drop runs: the hook stops the agent and
    // removes the namespace.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let pid = AGENT_PID.load(std::sync::atomic::Ordering::SeqCst);
        if pid != 0 {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let ns = format!("rab-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&ns));
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("kube-api-bench-{}", std::process::id())),
        );
    }));
    if std::env::args().nth(1).as_deref() == Some("kube") {
        kube::main(std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(5000));
        return;
    }
    // The other nodes: node-0 is the agent's own, node-1..=node-N each want a route.
    let nodes: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let agent = std::env::current_exe().expect("exe").with_file_name("cni-route-agent");
    let ns = host::node_ns();
    let dir = std::env::temp_dir().join(&ns.0);
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("nodes.yaml");
    write_nodes(&file, nodes, None);
    let mut cmd = Command::new(&agent);
    cmd.args([
        "--node-name",
        "node-0",
        "--source",
        "file",
        "--no-masquerade",
        "--resync-seconds",
        "2",
        "--nodes-file",
    ])
    .arg(&file)
    .arg("--cni-conf-dir")
    .arg(dir.join("cni"))
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null());
    let start = Instant::now();
    let child = spawn_agent(&ns, cmd);
    let pid = child.0.id();
    wait_for("all routes installed", Duration::from_secs(60), || {
        metric(&ns.0, "routes_installed") == Some(nodes as f64) && metric(&ns.0, "ready") == Some(1.0)
    });
    let to_ready = start.elapsed();
    let first_sync = metric(&ns.0, "sync_duration_seconds").unwrap_or(f64::NAN);
    let in_kernel = ip(&ns.0, &["route", "show", "proto", "168"]).lines().count();
    let writes = metric(&ns.0, "netlink_writes_total").unwrap_or(0.0);
    let syncs = metric(&ns.0, "syncs_total").unwrap_or(0.0);
    wait_for("a periodic resync", Duration::from_secs(10), || {
        metric(&ns.0, "syncs_total").unwrap_or(0.0) > syncs
    });
    let noop_writes = metric(&ns.0, "netlink_writes_total").unwrap_or(0.0) - writes;
    let noop_sync = metric(&ns.0, "sync_duration_seconds").unwrap_or(f64::NAN);
    // One node moves to a new address: time from the file change to the route in the kernel.
    let moved = nodes / 2;
    let want = format!("via {}", node_addr(nodes + 10));
    let cidr = pod_cidr(moved);
    let changed_at = Instant::now();
    write_nodes(&file, nodes, Some(moved));
    wait_for("the moved node's route", Duration::from_secs(10), || {
        ip(&ns.0, &["route", "show", &cidr]).contains(&want)
    });
    let change = changed_at.elapsed();
    // An overrun (ENOBUFS) used to fail the first sync and leave the agent not ready until the
    // next tick; any sync error at all is a failure here.
    let sync_errors = metric(&ns.0, "sync_errors_total").unwrap_or(f64::NAN);
    let rss = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    let pass = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("cni-route-agent scale benchmark: {nodes} nodes (file source), one node namespace");
    println!("command: target/release/route-agent-bench {nodes}   (kernel {})", kernel.trim());
    println!("| metric | value | target | |");
    println!("|---|---|---|---|");
    println!(
        "| routes in the kernel (proto 168) | {in_kernel} | {nodes} | {} |",
        pass(in_kernel == nodes as usize)
    );
    println!(
        "| first sync (agent's own timing) | {:.0} ms | < 1000 ms | {} |",
        first_sync * 1e3,
        pass(first_sync < 1.0)
    );
    println!(
        "| start to ready (spawn, parse, sync, conflist) | {:.0} ms | | |",
        to_ready.as_secs_f64() * 1e3
    );
    println!("| syncs with an error | {sync_errors} | 0 | {} |", pass(sync_errors == 0.0));
    println!("| no-op resync: netlink writes | {noop_writes} | 0 | {} |", pass(noop_writes == 0.0));
    println!("| no-op resync duration | {:.0} ms | | |", noop_sync * 1e3);
    println!(
        "| one node's change: file written to route in kernel | {:.0} ms | < 100 ms | {} |",
        change.as_secs_f64() * 1e3,
        pass(change < Duration::from_millis(100))
    );
    println!(
        "| agent RSS now / peak | {:.1} / {:.1} MB | < 50 MB | {} |",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        pass(hwm < 50 * 1024)
    );
}
