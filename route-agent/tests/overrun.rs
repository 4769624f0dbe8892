//! A netlink overrun (ENOBUFS) is a signal to resync at once: induced here by flooding the
//! agent's event socket with route notifications faster than it reads them.

use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

use cni_conformance::cluster::{Cluster, Plugins};
use cni_conformance::netns::Netns;
use cni_conformance::require_root;
use serde_json::json;

mod common;
use common::{eventually, Agent, Tmp};

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");

/// Adds `count` routes of protocol 168 through one netlink socket in 60 kB sends without
/// acks: the kernel emits their notifications back to back, faster than a reader keeps up.
fn flood_routes(ns: &Netns, count: u32) {
    use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    let f = ns.file();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut sock = Socket::new(NETLINK_ROUTE).expect("netlink socket");
        sock.bind_auto().expect("bind");
        sock.connect(&SocketAddr::new(0, 0)).expect("connect");
        // rtmsg: AF_INET, /32, table main, protocol 168, scope universe, unicast.
        let header = [2u8, 32, 0, 0, 254, 168, 0, 1, 0, 0, 0, 0];
        let mut chunk = Vec::new();
        for i in 0..count {
            let mut attrs = Vec::new();
            netlink_wire::attr(&mut attrs, 1, &[10, 99, (i / 256) as u8, (i % 256) as u8]);
            netlink_wire::attr(&mut attrs, 5, &[10, 200, 0, 1]);
            // RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, no ack.
            let msg = netlink_wire::message(24, 0x1 | 0x400 | 0x200, i + 1, &header, &attrs);
            if chunk.len() + msg.len() > 60_000 {
                sock.send(&chunk, 0).expect("send");
                chunk.clear();
            }
            chunk.extend(msg);
        }
        sock.send(&chunk, 0).expect("send");
    })
    .join()
    .expect("flood thread");
}

#[test]
fn lost_kernel_events_make_the_agent_resync_at_once_not_at_the_next_tick() {
    require_root("route agent overrun");
    let tmp = Tmp::new("overrun");
    let dir = Path::new(AGENT).parent().expect("target dir").to_path_buf();
    let cl = Cluster::new(
        "rovr",
        1,
        Plugins { dir, bridge: "cni-bridge".into(), ipam: "cni-host-local".into() },
        true,
    );
    let node = &cl.nodes[0].ns;
    let file = tmp.0.join("nodes.json");
    std::fs::write(&file, json!({"nodes": [cl.nodes[0].nodes_file_entry()]}).to_string()).unwrap();
    let log = tmp.0.join("agent.log");
    let mut c = Command::new(AGENT);
    // The tick is an hour away: only an event can make the agent look at the kernel again.
    c.args(["--node-name", "node-1", "--source", "file", "--resync-seconds", "3600", "--nodes-file"])
        .arg(&file)
        .arg("--cni-conf-dir")
        .arg(tmp.0.join("cni"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    node.enter(&mut c);
    let agent = Agent(c.spawn().expect("start agent"));
    let pid = nix::unistd::Pid::from_raw(agent.0.id() as i32);
    let conflist = tmp.0.join("cni").join("10-cni-route-agent.conflist");
    eventually("the agent synced once", || conflist.exists());
    // 20,000 routes of the agent's protocol that no node wants, added in one burst by someone
    // else. Additions wake nobody by themselves; their notifications overflow the agent's
    // event socket, and the lost events (one of them could have been a deletion of ours) must
    // make it resync, which removes these.
    // Stopped meanwhile, so that it cannot keep up however fast this machine is: the
    // notifications overflow its socket for sure, as they do on a busy node.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    flood_routes(node, 20_000);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let count = || node.ip(&["route", "show", "proto", "168"]).lines().count();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let gone = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually("the agent resynced and removed the unwanted routes", || count() == 0)
    }));
    assert!(gone.is_ok(), "{} routes left; the agent's log:\n{}", count(), log_text());
    let text = log_text();
    assert!(text.contains("kernel events lost"), "no overrun seen, the test proved nothing:\n{text}");
}
