//! Upgrades and restarts under traffic: long-lived TCP streams between pods on two nodes and
//! pods added and deleted back to back on one of them, while each node's agent is stopped
//! and started from another binary and `install-cni` replaces the plugins, several times.
//! Measured: failed ADDs, broken streams, deletions of the agent's routes; all must be 0.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cni_conformance::cluster::{Cluster, Plugins};
use cni_conformance::netns::Netns;
use cni_conformance::{invoke, require_root};
use serde_json::json;

mod common;
use common::{eventually, Tmp};

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");
const BINARIES: [&str; 3] = ["cni-route-agent", "cni-bridge", "cni-host-local"];
const ROUNDS: usize = 3;
const STREAMS: usize = 3;

/// A process this test started, killed by its PID on drop.
struct Proc(Child);

impl Proc {
    fn terminate(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two builds that differ: the second has bytes appended (an ELF runs the same with them).
fn builds(tmp: &Path) -> [PathBuf; 2] {
    let from = Path::new(AGENT).parent().expect("target dir");
    let dirs = [tmp.join("build-a"), tmp.join("build-b")];
    for (i, dir) in dirs.iter().enumerate() {
        std::fs::create_dir_all(dir).unwrap();
        for name in BINARIES {
            let mut bytes = std::fs::read(from.join(name)).expect("cargo build --workspace first");
            if i == 1 {
                bytes.extend_from_slice(b"\0upgrade-b");
            }
            std::fs::write(dir.join(name), bytes).unwrap();
            let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            std::fs::set_permissions(dir.join(name), executable).unwrap();
        }
    }
    dirs
}

fn install(build: &Path, bin: &Path) {
    let out = Command::new(build.join("cni-route-agent"))
        .args(["install-cni", "--bin-dir"])
        .arg(bin)
        .arg("--from")
        .arg(build)
        .output()
        .expect("install-cni");
    assert!(out.status.success(), "install-cni: {}", String::from_utf8_lossy(&out.stderr));
}

fn start_agent(build: &Path, node: &Netns, name: &str, file: &Path, conf: &Path) -> Proc {
    let mut c = Command::new(build.join("cni-route-agent"));
    c.args(["--node-name", name, "--source", "file", "--resync-seconds", "3600", "--nodes-file"])
        .arg(file)
        .arg("--cni-conf-dir")
        .arg(conf)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    node.enter(&mut c);
    Proc(c.spawn().expect("start agent"))
}

fn ready(ns: &Netns) -> bool {
    let f = ns.file();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let addr = "127.0.0.1:9645".parse().expect("an address");
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = write!(s, "GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200")
    })
    .join()
    .unwrap_or(false)
}

/// `ip -o monitor route` in `ns`, writing to `out`.
fn monitor(ns: &Netns, out: &Path) -> Proc {
    let mut c = Command::new("ip");
    c.args(["-o", "monitor", "route"]).stdout(std::fs::File::create(out).unwrap()).stderr(Stdio::null());
    ns.enter(&mut c);
    Proc(c.spawn().expect("ip monitor"))
}

#[test]
fn upgrades_under_traffic_fail_no_add_break_no_stream_and_delete_no_route() {
    require_root("route agent upgrade under traffic");
    let tmp = Tmp::new("upgrade");
    let builds = builds(&tmp.0);
    let bin = tmp.0.join("bin");
    install(&builds[0], &bin);
    let plugins = Plugins { dir: bin.clone(), bridge: "cni-bridge".into(), ipam: "cni-host-local".into() };
    let mut cl = Cluster::new("rup", 2, plugins, true);
    let file = tmp.0.join("nodes.json");
    let entries: Vec<_> = cl.nodes.iter().map(|n| n.nodes_file_entry()).collect();
    std::fs::write(&file, json!({ "nodes": entries }).to_string()).unwrap();
    let conf = |i: usize| tmp.0.join(format!("cni{i}"));
    let mut agents: Vec<Proc> = (0..2)
        .map(|i| start_agent(&builds[0], &cl.nodes[i].ns, &cl.nodes[i].name, &file, &conf(i)))
        .collect();
    for i in 0..2 {
        eventually("ready", || ready(&cl.nodes[i].ns));
    }
    cl.add_pod(0, "rup-a").unwrap();
    cl.add_pod(1, "rup-b").unwrap();
    let monitors: Vec<Proc> =
        (0..2).map(|i| monitor(&cl.nodes[i].ns, &tmp.0.join(format!("mon{i}")))).collect();
    let (stop, round_trips, broken, adds, failed_adds) =
        (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let failures = std::sync::Mutex::new(Vec::<String>::new());
    let (client, server) = (&cl.pods[0], &cl.pods[1]);
    let listener_ns = server.ns.file();
    let server_ip = server.ip;
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::scope(|s| {
        // The server: echoes on every stream until its client hangs up.
        s.spawn(move || {
            nix::sched::setns(listener_ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let listener = TcpListener::bind(SocketAddr::new(server_ip, 0)).expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            std::thread::scope(|conns| {
                for _ in 0..STREAMS {
                    let Ok((mut c, _)) = listener.accept() else { return };
                    conns.spawn(move || {
                        let mut buf = [0u8; 8];
                        while let Ok(n @ 1..) = c.read(&mut buf) {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        });
        let addr = rx.recv().expect("server address");
        for _ in 0..STREAMS {
            let (ns, stop, round_trips, broken, failures) =
                (client.ns.file(), &stop, &round_trips, &broken, &failures);
            s.spawn(move || {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
                c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                let mut buf = [0u8; 8];
                while !stop.load(Ordering::Relaxed) {
                    let ok = c.write_all(b"12345678").is_ok()
                        && c.read_exact(&mut buf).is_ok()
                        && &buf == b"12345678";
                    if !ok {
                        broken.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap().push("a stream broke".into());
                        return;
                    }
                    round_trips.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Pods added and deleted back to back on node-1 through the installed plugins.
        let node = &cl.nodes[0];
        let (stop, adds, failed_adds, failures) = (&stop, &adds, &failed_adds, &failures);
        s.spawn(move || {
            let path = bin.display().to_string();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let pod = Netns::new(&format!("rupc{}", i % 4));
                let id = format!("churn{i}");
                let netns = pod.path.display().to_string();
                let env = [
                    ("CNI_CONTAINERID", id.as_str()),
                    ("CNI_NETNS", &netns),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_PATH", &path),
                ];
                let plugin = bin.join("cni-bridge");
                let o = invoke(&node.ns, &plugin, "ADD", &env, &node.conf);
                adds.fetch_add(1, Ordering::Relaxed);
                if o.code != 0 {
                    failed_adds.fetch_add(1, Ordering::Relaxed);
                    failures.lock().unwrap().push(format!("ADD {id}: {} {}", o.stdout, o.stderr));
                }
                let o = invoke(&node.ns, &plugin, "DEL", &env, &node.conf);
                if o.code != 0 {
                    failures.lock().unwrap().push(format!("DEL {id}: {} {}", o.stdout, o.stderr));
                }
                i += 1;
            }
        });
        // The upgrades: each node's agent stopped and started from the other build, and the
        // plugins replaced by install-cni, while all of the above runs.
        let adds_before = adds.load(Ordering::Relaxed);
        for round in 1..=ROUNDS {
            let build = &builds[round % 2];
            for (i, agent) in std::mem::take(&mut agents).into_iter().enumerate() {
                agent.terminate();
                install(build, &tmp.0.join("bin"));
                agents.push(start_agent(build, &cl.nodes[i].ns, &cl.nodes[i].name, &file, &conf(i)));
                eventually("the new agent ready", || ready(&cl.nodes[i].ns));
            }
        }
        // The churn ran through the upgrades, not only before or after them.
        eventually("ADDs during the upgrades", || adds.load(Ordering::Relaxed) > adds_before + 2);
        let trips = round_trips.load(Ordering::Relaxed);
        eventually("the streams still flowing after the last upgrade", || {
            round_trips.load(Ordering::Relaxed) > trips
        });
        stop.store(true, Ordering::Relaxed);
    });
    drop(monitors);
    let deleted: Vec<String> = (0..2)
        .flat_map(|i| {
            std::fs::read_to_string(tmp.0.join(format!("mon{i}")))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|l| l.starts_with("Deleted") && l.contains("proto 168"))
        .collect();
    eprintln!(
        "upgrade under traffic: {ROUNDS} rounds x 2 nodes (agent restarted from another binary, plugins replaced): \
         {} ADDs, {} failed; {STREAMS} streams, {} round trips, {} broken; {} deletions of the agent's routes",
        adds.load(Ordering::Relaxed),
        failed_adds.load(Ordering::Relaxed),
        round_trips.load(Ordering::Relaxed),
        broken.load(Ordering::Relaxed),
        deleted.len()
    );
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(failed_adds.load(Ordering::Relaxed), 0);
    assert_eq!(broken.load(Ordering::Relaxed), 0);
    assert!(deleted.is_empty(), "the agent's routes were deleted: {deleted:#?}");
}
