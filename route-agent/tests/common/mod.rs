//! What the route agent's integration tests share.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A scratch directory under the target dir, unique per test process and tag, removed on
/// drop (also when the test panics).
pub struct Tmp(pub PathBuf);

impl Tmp {
    pub fn new(tag: &str) -> Tmp {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's scratch directory");
        Tmp(dir)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (bounded, 10 s) until `f` holds: the agents converge asynchronously.
#[allow(dead_code)] // not every test crate that includes this module polls
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

/// An agent process a test started: killed by its PID on drop, also when the test fails.
#[allow(dead_code)] // not every test crate that includes this module starts an agent
pub struct Agent(pub std::process::Child);

#[allow(dead_code)]
impl Agent {
    /// Stops the agent as kubelet would (SIGTERM), waits for it, and says how it ended.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.0.wait().expect("wait for the agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body of the agent's `/metrics` at its default address inside `ns` (empty when it does
/// not answer).
#[allow(dead_code)] // not every test crate that includes this module reads metrics
pub fn metrics(ns: &cni_conformance::netns::Netns) -> String {
    use std::io::{Read, Write};
    let f = ns.file();
    std::thread::spawn(move || {
        nix::sched::setns(std::os::fd::AsFd::as_fd(&f), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let addr = "127.0.0.1:9645".parse().expect("an address");
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
    })
    .join()
    .unwrap_or_default()
}

/// One of the agent's metrics (`cni_route_agent_<name>`, without labels) inside `ns`.
#[allow(dead_code)]
pub fn metric(ns: &cni_conformance::netns::Netns, name: &str) -> Option<u64> {
    metrics(ns).lines().find_map(|l| l.strip_prefix(&format!("cni_route_agent_{name} "))?.parse().ok())
}
