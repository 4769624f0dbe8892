//! The namespaces, processes and probes both benches use (main.rs and policy.rs), apart from
//! main.rs so that policy.rs need not import the binary's root.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Node `number`'s address, on the underlay of [`node_ns`].
pub(crate) fn node_addr(number: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 200, 0, 2)) + number)
}

/// Node `number`'s pod CIDR.
pub(crate) fn pod_cidr(number: u32) -> String {
    format!(
        "{}/24",
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)) + (number << 8))
    )
}

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

/// Runs `f` on a thread inside namespace `ns` (sockets it makes stay in that namespace).
pub(crate) fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).ok()?;
    std::thread::spawn(move || {
        nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        Some(f())
    })
    .join()
    .ok()?
}

/// The agent's answer to `GET path` on its listen address in `ns`: status and whole response.
pub(crate) fn http_get(ns: &str, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let response = in_ns(ns, move || -> Option<String> {
        let mut stream =
            TcpStream::connect_timeout(&"127.0.0.1:9645".parse().ok()?, Duration::from_millis(500)).ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    })??;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response))
}

pub(crate) fn metric(ns: &str, name: &str) -> Option<f64> {
    let (_, body) = http_get(ns, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("cni_route_agent_{name} ")).and_then(|v| v.parse().ok()))
}

/// A node namespace whose `eth0` holds 10.200.0.1/16, the underlay every benchmarked node's
/// address is on. Named after the bench's pid, so that the panic hook finds it.
pub(crate) fn node_ns() -> Ns {
    let ns = Ns(format!("rab-{}", std::process::id()));
    assert!(Command::new("ip").args(["netns", "add", &ns.0]).status().expect("ip").success());
    // An underlay wide enough for every node address, on a veth pair inside the namespace.
    ip(&ns.0, &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    ip(&ns.0, &["addr", "add", "10.200.0.1/16", "dev", "eth0"]);
    for link in ["lo", "eth0", "eth0p"] {
        ip(&ns.0, &["link", "set", link, "up"]);
    }
    ns
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

/// CPU time process `pid` has used so far (user + system), in ms: what a step costs the agent
/// whatever else the machine runs, where wall time on a shared machine also counts waiting.
pub(crate) fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which may hold spaces, closed by the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // utime and stime are the 14th and 15th fields; `fields` starts at the 3rd.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) * 1000.0 / hz
}

/// The agent started, for the panic hook (0: none yet).
pub(crate) static AGENT_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Starts the agent `cmd` inside network namespace `ns`, recorded in AGENT_PID (the panic hook
/// ends it) and ended on drop.
pub(crate) fn spawn_agent(ns: &Ns, mut cmd: std::process::Command) -> Proc {
    use std::os::fd::AsFd;
    use std::os::unix::process::CommandExt;
    let ns_file = std::fs::File::open(format!("/run/netns/{}", ns.0)).expect("netns");
    // SAFETY: setns in the forked child before exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(Into::into)
        });
    }
    let child = Proc(cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "start {}: {e} (cargo build --release -p cni-route-agent)",
            cmd.get_program().to_string_lossy()
        )
    }));
    AGENT_PID.store(child.0.id(), std::sync::atomic::Ordering::SeqCst);
    child
}
