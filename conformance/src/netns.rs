//! Network namespaces owned by a test, removed on drop (also when the test panics).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use nix::sched::{setns, CloneFlags};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Namespaces and pause processes alive now, for cleanup on a signal.
static LIVE: Mutex<(BTreeSet<String>, BTreeSet<u32>)> = Mutex::new((BTreeSet::new(), BTreeSet::new()));

fn live() -> std::sync::MutexGuard<'static, (BTreeSet<String>, BTreeSet<u32>)> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Empties the signal mask: a child must not inherit the signals the parent blocks for its
/// cleanup thread (std does not reset the mask on spawn). For `pre_exec`.
pub fn clear_sigmask() -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow};
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(Into::into)
}

/// Names of the namespaces this process has made and not yet removed.
pub fn live_namespaces() -> Vec<String> {
    live().0.iter().cloned().collect()
}

/// On SIGINT, SIGTERM or SIGHUP: remove every namespace and end every pause process this
/// process made (by PID, nothing else), then exit 130. Call before starting any thread.
pub fn install_signal_cleanup() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    if nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            let (names, pids) = live().clone();
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            for name in names {
                let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
            }
            eprintln!("interrupted by {sig:?}: removed every namespace this run made");
            std::process::exit(130);
        }
    });
}

/// Fails the calling test (a panic, so the runner reports it FAILED, never passed) unless we
/// are root: network namespaces need it, and a test that returns early would pass green.
pub fn require_root(test: &str) {
    if !is_root() {
        panic!("{test}: needs root for network namespaces; run scripts/test as root");
    }
}

/// Whether this process runs as root (the binaries refuse politely instead of panicking).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn unique(tag: &str) -> String {
    format!("cnit-{}-{}-{tag}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// A named namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
    /// `/run/netns/<name>`.
    pub path: PathBuf,
}

impl Netns {
    /// Creates an empty namespace (only `lo`, down).
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        let st = Command::new("ip").args(["netns", "add", &name]).status().expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        live().0.insert(name.clone());
        let ns = Netns { path: PathBuf::from(format!("/run/netns/{name}")), name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Opens the namespace file.
    pub fn file(&self) -> File {
        File::open(&self.path).expect("open netns")
    }

    /// Runs `ip -n <ns> args...` and returns stdout; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip").arg("-n").arg(&self.name).args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -j -n <ns> args...` parsed.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full_args = vec!["-j", "-d"];
        full_args.extend_from_slice(args);
        serde_json::from_str(&self.ip(&full_args)).unwrap_or(serde_json::Value::Null)
    }

    /// Names of the links in the namespace, sorted.
    pub fn links(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .ip_json(&["link", "show"])
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Makes `cmd` run inside this namespace (setns in the child before exec).
    pub fn enter(&self, cmd: &mut Command) {
        let ns_file = self.file();
        // SAFETY: pre_exec runs in the forked child; setns is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                clear_sigmask()?;
                setns(ns_file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
    }

    /// Writes a sysctl (`net.ipv4.ip_forward`) inside this namespace, from a thread that
    /// enters it: /proc/sys/net is per namespace, and no sysctl binary is needed.
    pub fn sysctl(&self, key: &str, value: &str) -> std::io::Result<()> {
        let ns_file = self.file();
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        std::thread::spawn(move || {
            setns(ns_file.as_fd(), CloneFlags::CLONE_NEWNET)?;
            std::fs::write(path, value)
        })
        .join()
        .expect("sysctl thread")
    }

    /// Runs a command inside the namespace.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.enter(&mut cmd);
        cmd.output().expect("run in netns")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.name.is_empty() || !live().0.remove(&self.name) {
            return;
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// A "pause container": a sleeping process in a fresh namespace, seen as `/proc/PID/ns/net`.
/// Killed (only this PID) and reaped on drop, which removes the namespace.
pub struct Pause {
    child: Child,
    /// `/proc/<pid>/ns/net`.
    pub path: PathBuf,
}

impl Pause {
    /// Starts the process and waits until its namespace is its own.
    pub fn new() -> Pause {
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--", "sleep", "3600"]).stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls in the forked child.
        unsafe {
            cmd.pre_exec(clear_sigmask);
        }
        let child = cmd.spawn().expect("start unshare");
        live().1.insert(child.id());
        let path = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        let own = std::fs::read_link("/proc/thread-self/ns/net").expect("own ns");
        // unshare execs sleep after switching namespace; wait for that switch (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            match std::fs::read_link(&path) {
                Ok(target) if target != own => return Pause { child, path },
                _ => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        // Not a Pause yet, so its Drop would not end the process: end it here.
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        live().1.remove(&child.id());
        panic!("pause process never entered its own namespace");
    }

    /// Opens the namespace file.
    pub fn file(&self) -> File {
        File::open(&self.path).expect("open pause netns")
    }

    /// Runs `ip args...` inside the pause namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(args);
        let ns_file = self.file();
        unsafe {
            cmd.pre_exec(move || {
                clear_sigmask()?;
                setns(ns_file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        let out = cmd.output().expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for Pause {
    fn default() -> Self {
        Pause::new()
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        live().1.remove(&self.child.id());
    }
}

/// Whether `path` names the namespace `ns` runs in (the fixture refuses such a CNI_NETNS).
pub fn same_namespace(path: &Path, ns: &Netns) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), std::fs::metadata(&ns.path)) {
        (Ok(first), Ok(second)) => first.ino() == second.ino() && first.dev() == second.dev(),
        _ => false,
    }
}
