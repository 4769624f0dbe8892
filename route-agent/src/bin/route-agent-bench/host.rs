//! The namespaces, processes and probes both benches use (main.rs and policy.rs), apart from
//! main.rs so that policy.rs need not import the binary's root.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub(crate) struct Ns(pub(crate) String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub(crate) struct Proc(pub(crate) Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").arg("-n").arg(ns).args(args).output().expect("ip");
    assert!(out.status.success(), "ip -n {ns} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn metric(ns: &str, name: &str) -> Option<f64> {
    let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).ok()?;
    let body = std::thread::spawn(move || -> Option<String> {
        nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let mut stream =
            TcpStream::connect_timeout(&"127.0.0.1:9645".parse().ok()?, Duration::from_millis(500)).ok()?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    })
    .join()
    .ok()??;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("cni_route_agent_{name} ")).and_then(|v| v.parse().ok()))
}

pub(crate) fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("timed out: {what}");
}

pub(crate) fn status_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The agent started, for the panic hook (0: none yet).
pub(crate) static AGENT_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
