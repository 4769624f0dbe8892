//! `cni-bench`: our `cni-bridge` + `cni-host-local` against the reference `bridge` +
//! `host-local`, alternating call by call in one run, inside namespaces this process makes.
//!
//! One node namespace (only `lo`, up) stands for the host; this process enters it on the main
//! thread before any other thread exists, so every plugin is spawned from inside it. Pod
//! namespaces are made with `ip netns add` before anything is timed. Everything (namespaces,
//! IPAM data dirs) is removed at the end, on error, on panic (the release profile aborts, so
//! a panic hook does it) and on SIGINT/SIGTERM/SIGHUP. The root network namespace is never
//! touched: no links, addresses, routes, sysctls or firewall rules there.
//!
//! This process is a child subreaper: a process a plugin leaves behind (cni-bridge's opt-in
//! detached DEL leaves one finishing the kernel's delete) becomes its child, and is waited for
//! before the next call is timed and before a throughput clock stops, so both implementations
//! are measured on finished work and neither's leftovers land in the other's figures.
//!
//! Failing a target is reported, not an error: the exit code is non-zero only when something
//! did not work (a plugin call failed, a namespace could not be made...).

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use rtnetlink::LinkVeth;
use serde_json::{json, Value};

/// PATH given to the plugins (they look for `nft`, `iptables` there).
const PLUGIN_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// The bridge both implementations use (one at a time: every ADD is deleted before the next).
const BRIDGE: &str = "cnibench0";
const SUBNET: &str = "10.77.0.0/16";
const NETWORK: &str = "cnibench";
/// Untimed iterations before the timed ones (bridge creation, nft table, iptables chains,
/// page cache).
const WARMUP: usize = 3;
/// Throughput runs per implementation and round, in the order ours, reference, reference,
/// ours (reference first in odd rounds).
const CONC_RUNS: usize = 2;

const USAGE: &str = "\
usage: cni-bench [--ours DIR] [--reference DIR] [--iterations N] [--rounds N]
                 [--concurrency-adds N] [--workers N] [--json]

  --ours DIR             dir holding cni-bridge and cni-host-local (default target/release)
  --reference DIR        dir holding the reference bridge and host-local (default /usr/lib/cni)
  --iterations N         timed ADD/DEL iterations per round, implementation and variant
                         (default 100)
  --rounds N             rounds, each a sequential block and a throughput block, ours and
                         reference interleaved in both; the table gives every figure per round
                         as a min-max spread, so one noisy round shows as such (default 3)
  --concurrency-adds N   ADDs in the throughput test (default 100)
  --workers N            concurrent plugin calls in the throughput test (default 8)
  --json                 print the results as JSON on stdout (the table goes to stderr)

Needs root. Works only inside namespaces it makes; exits non-zero only on errors.";

// ---------------------------------------------------------------------------------------------
// Arguments

struct Args {
    ours: PathBuf,
    reference: PathBuf,
    iterations: usize,
    rounds: usize,
    concurrency_adds: usize,
    workers: usize,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        ours: PathBuf::from("target/release"),
        reference: PathBuf::from("/usr/lib/cni"),
        iterations: 100,
        rounds: 3,
        concurrency_adds: 100,
        workers: 8,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline.clone().or_else(|| it.next()).ok_or_else(|| format!("{name} needs a value"))
        };
        let count = |name: &str, v: String| -> Result<usize, String> {
            match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{name}: want a positive integer, got {v:?}")),
            }
        };
        match flag.as_str() {
            "--ours" => a.ours = PathBuf::from(value("--ours")?),
            "--reference" => a.reference = PathBuf::from(value("--reference")?),
            "--iterations" => a.iterations = count("--iterations", value("--iterations")?)?,
            "--rounds" => a.rounds = count("--rounds", value("--rounds")?)?,
            "--concurrency-adds" => {
                a.concurrency_adds = count("--concurrency-adds", value("--concurrency-adds")?)?
            }
            "--workers" => a.workers = count("--workers", value("--workers")?)?,
            "--json" if inline.is_none() => a.json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// Clean-up: everything this process made, removed once, whichever way it ends.

struct Made {
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
}

static MADE: Mutex<Made> = Mutex::new(Made { netns: Vec::new(), dirs: Vec::new() });

fn made() -> std::sync::MutexGuard<'static, Made> {
    MADE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every namespace and dir made so far (newest first). Holds the lock throughout, so
/// a second caller (signal thread, panic hook) waits until the first is done.
fn cleanup() {
    // try_lock with a bound: the panic hook may run on a thread that holds the lock.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut g = loop {
        match MADE.try_lock() {
            Ok(g) => break g,
            Err(TryLockError::Poisoned(p)) => break p.into_inner(),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(TryLockError::WouldBlock) => return,
        }
    };
    let names: Vec<String> = g.netns.drain(..).rev().collect();
    if !names.is_empty() {
        let script: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
        let _ = pipe_to("ip", &["-force", "-batch", "-"], script.as_bytes());
        for n in &names {
            if Path::new("/run/netns").join(n).exists() {
                let _ = Command::new("ip")
                    .args(["netns", "del", n])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    for d in g.dirs.drain(..).rev() {
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// Write end of the self-pipe the signal handler writes the signal number to.
static SIG_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: nix::libc::c_int) {
    let fd = SIG_PIPE.load(Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe; `b` outlives the call.
    unsafe {
        nix::libc::write(fd, (&b as *const u8).cast(), 1);
    }
}

/// On SIGINT/SIGTERM/SIGHUP: clean up and exit. A handler (not a blocked mask, which spawned
/// plugins would inherit) writes to a pipe; exec resets handlers, so the plugins see default
/// dispositions. Returns the read end for [`wait_signals`].
fn catch_signals() -> Result<File, String> {
    use std::os::fd::IntoRawFd;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    SIG_PIPE.store(w.into_raw_fd(), Ordering::Relaxed);
    let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only calls write(2).
        unsafe { sigaction(s, &act) }.map_err(|e| format!("sigaction {s:?}: {e}"))?;
    }
    Ok(File::from(r))
}

/// The thread that waits for a caught signal (spawned once in the node namespace; a signal
/// caught before it starts waits in the pipe).
fn wait_signals(mut r: File) {
    use std::io::Read;
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        if r.read_exact(&mut b).is_ok() {
            eprintln!("cni-bench: signal {}: cleaning up", b[0]);
            cleanup();
            std::process::exit(128 + i32::from(b[0]));
        }
    });
}

/// Runs `prog args` with `stdin` through the runner the plugins use; Ok if it exited 0.
fn pipe_to(prog: &str, args: &[&str], stdin: &[u8]) -> Result<(), String> {
    netlink_wire::process::run(prog, args, Some(stdin)).map(|_| ()).map_err(|e| e.to_string())
}

/// Makes the named namespaces in one `ip -batch` (registered first, so a partial failure is
/// cleaned up too).
fn make_netns(names: &[String]) -> Result<(), String> {
    made().netns.extend(names.iter().cloned());
    let script: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
    pipe_to("ip", &["-batch", "-"], script.as_bytes())
}

fn run_ok(prog: &str, args: &[&str]) -> Result<String, String> {
    netlink_wire::process::run(prog, args, None).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Plugins

/// One implementation: where its binaries are and its configs.
struct Impl {
    /// "ours" / "reference".
    label: &'static str,
    /// Short tag for container ids.
    tag: &'static str,
    bridge_bin: PathBuf,
    cni_path: String,
    conf_plain: Value,
    conf_masq: Value,
}

impl Impl {
    fn new(
        label: &'static str,
        tag: &'static str,
        dir: &Path,
        bridge_type: &str,
        ipam_type: &str,
        data_dir: &Path,
    ) -> Impl {
        let conf = |masq: bool| {
            json!({
                "cniVersion": "1.0.0",
                "name": NETWORK,
                "type": bridge_type,
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": masq,
                "ipam": {
                    "type": ipam_type,
                    "subnet": SUBNET,
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data_dir.display().to_string(),
                }
            })
        };
        Impl {
            label,
            tag,
            bridge_bin: dir.join(bridge_type),
            cni_path: dir.display().to_string(),
            conf_plain: conf(false),
            conf_masq: conf(true),
        }
    }

    fn conf(&self, masq: bool) -> &Value {
        if masq {
            &self.conf_masq
        } else {
            &self.conf_plain
        }
    }

    /// ADD; the time of the whole call and the result, which must carry an IP.
    fn add(&self, masq: bool, id: &str, netns: &str) -> Result<(Duration, Value), String> {
        let stdin = self.conf(masq).to_string();
        let (d, o) = self.call("ADD", id, netns, stdin.as_bytes())?;
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let ip = v["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<IpAddr>().ok());
        match ip {
            Some(IpAddr::V4(a)) if a.octets()[..2] == [10, 77] => Ok((d, v)),
            _ => Err(format!(
                "{} ADD {id}: result has no IP in {SUBNET}: {}",
                self.label,
                String::from_utf8_lossy(&o.stdout)
            )),
        }
    }

    /// DEL with the ADD result as prevResult (as a runtime does).
    fn del(&self, masq: bool, id: &str, netns: &str, prev: &Value) -> Result<Duration, String> {
        let mut conf = self.conf(masq).clone();
        conf["prevResult"] = prev.clone();
        let stdin = conf.to_string();
        Ok(self.call("DEL", id, netns, stdin.as_bytes())?.0)
    }

    fn call(&self, cmd: &str, id: &str, netns: &str, stdin: &[u8]) -> Result<(Duration, Output), String> {
        let (d, o) = spawn_plugin(
            &self.bridge_bin,
            cmd,
            &[
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", &self.cni_path),
            ],
            stdin,
        )?;
        if !o.status.success() {
            return Err(format!(
                "{} {cmd} {id} failed ({}): stdout: {} stderr: {}",
                self.label,
                o.status,
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok((d, o))
    }

    /// VERSION: the cost of starting the process and answering.
    fn version(&self) -> Result<Duration, String> {
        let (d, o) = spawn_plugin(&self.bridge_bin, "VERSION", &[], br#"{"cniVersion":"1.0.0"}"#)?;
        if !o.status.success() || !String::from_utf8_lossy(&o.stdout).contains("1.0.0") {
            return Err(format!(
                "{} VERSION failed ({}): {} {}",
                self.label,
                o.status,
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(d)
    }
}

/// Spawns `bin` as a runtime does (clean env, config on stdin), timing spawn to exit.
fn spawn_plugin(
    bin: &Path,
    cmd: &str,
    env: &[(&str, &str)],
    stdin: &[u8],
) -> Result<(Duration, Output), String> {
    let mut c = Command::new(bin);
    c.env_clear()
        .env("CNI_COMMAND", cmd)
        .env("PATH", PLUGIN_PATH)
        .envs(env.iter().copied())
        // cni-bridge's opt-in detached delete, measured when the bench is run with it.
        .envs(std::env::var_os("CNI_BRIDGE_DEL_DETACH").map(|v| ("CNI_BRIDGE_DEL_DETACH", v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = c.spawn().map_err(|e| format!("spawning {}: {e}", bin.display()))?;
    if let Some(mut i) = child.stdin.take() {
        // A plugin that exits without reading fails on its exit status, not here.
        let _ = i.write_all(stdin);
    }
    let o = child.wait_with_output().map_err(|e| format!("waiting for {}: {e}", bin.display()))?;
    Ok((t.elapsed(), o))
}

// ---------------------------------------------------------------------------------------------
// Measurements

#[derive(Default)]
struct Lat {
    add: Vec<Duration>,
    del: Vec<Duration>,
    /// DEL until the last process it left has ended (the same as `del` when it left none).
    del_done: Vec<Duration>,
}

/// What the sequential phase measures: [impl][variant] ADD/DEL, and the two floors.
#[derive(Default)]
struct Seq {
    lat: [[Lat; 2]; 2],
    version: [Vec<Duration>; 2],
    veth: Vec<Duration>,
    port: Vec<Duration>,
    /// The pod's end of a veth whose other end is a bridge port, deleted in the pod's
    /// namespace: what a DEL asks of the kernel.
    pod_port: Vec<Duration>,
}

impl Seq {
    /// Pools `other`'s samples into these.
    fn extend(&mut self, other: &Seq) {
        for (k, v) in impl_variant_pairs() {
            self.lat[k][v].add.extend_from_slice(&other.lat[k][v].add);
            self.lat[k][v].del.extend_from_slice(&other.lat[k][v].del);
            self.lat[k][v].del_done.extend_from_slice(&other.lat[k][v].del_done);
        }
        for k in 0..2 {
            self.version[k].extend_from_slice(&other.version[k]);
        }
        self.veth.extend_from_slice(&other.veth);
        self.port.extend_from_slice(&other.port);
        self.pod_port.extend_from_slice(&other.pod_port);
    }
}

/// Every (implementation, variant) index pair.
fn impl_variant_pairs() -> impl Iterator<Item = (usize, usize)> {
    (0..2).flat_map(|k| (0..2).map(move |v| (k, v)))
}

/// One round's sequential block, and its throughput block's wall times per implementation.
#[derive(Default)]
struct Round {
    seq: Seq,
    conc_add: [Duration; 2],
    conc_del: [Duration; 2],
    /// ADDs (and so DELs) per implementation in the throughput figures.
    conc_calls: usize,
    /// [`VethFloor::parallel`] of `conc_calls` pairs (in `CONC_RUNS` runs).
    conc_floor: Duration,
    /// [`VethFloor::parallel_in_pods`] of `conc_calls` pairs (in `CONC_RUNS` runs).
    conc_floor_pod: Duration,
}

/// Sequential ADD/DEL, ours and reference alternating (and swapping who goes first) each
/// iteration, both variants per iteration; the floors (VERSION of both, one veth delete) are
/// sampled in the same iterations, so that all see the same conditions on the machine.
fn sequential(
    imps: &[Impl; 2],
    pod: &str,
    iterations: usize,
    warmup: usize,
    round: usize,
) -> Result<Seq, String> {
    let floor = VethFloor::new()?;
    let pod_file = File::open(pod).map_err(|e| format!("opening {pod}: {e}"))?;
    let in_pod = floor.handle_in(&pod_file)?;
    let mut out = Seq::default();
    let total = warmup + iterations;
    let t0 = Instant::now();
    for i in 0..total {
        let timed = i >= warmup;
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for &k in &order {
            let d = imps[k].version()?;
            if timed {
                out.version[k].push(d);
            }
        }
        let d = floor.sample(false)?;
        let dp = floor.sample(true)?;
        let dpod = floor.sample_in_pod(&pod_file, &in_pod)?;
        if timed {
            out.veth.push(d);
            out.port.push(dp);
            out.pod_port.push(dpod);
        }
        for (v, masq) in [false, true].into_iter().enumerate() {
            for &k in &order {
                let imp = &imps[k];
                let id = format!("cnib-{}-{}-{round}-{i}", imp.tag, if masq { "m" } else { "p" });
                let (add, res) = imp.add(masq, &id, pod)?;
                wait_leftovers()?;
                let del = imp.del(masq, &id, pod, &res)?;
                // Untimed for the next call, counted for this DEL's finished work.
                let left = Instant::now();
                wait_leftovers()?;
                let del_done = del + left.elapsed();
                if timed {
                    out.lat[k][v].add.push(add);
                    out.lat[k][v].del.push(del);
                    out.lat[k][v].del_done.push(del_done);
                }
            }
        }
        if (i + 1) % 25 == 0 || i + 1 == total {
            eprintln!(
                "  round {round}: sequential: {}/{total} iterations ({:.0} s)",
                i + 1,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(out)
}

/// Processes the plugins left behind and this process waited for (it is their subreaper).
static LEFTOVERS: AtomicUsize = AtomicUsize::new(0);

/// Waits for every child of this process: only the processes plugins left behind, when no
/// plugin call is running (a plugin's own process is waited for by its caller).
fn wait_leftovers() -> Result<(), String> {
    use nix::sys::wait::waitpid;
    loop {
        match waitpid(None::<nix::unistd::Pid>, None) {
            Ok(_) => {
                LEFTOVERS.fetch_add(1, Ordering::Relaxed);
            }
            Err(nix::errno::Errno::ECHILD) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("waiting for processes plugins left: {e}")),
        }
    }
}

/// Runs `f(0..n)` on `workers` threads; the wall time until every call and every process the
/// calls left behind have ended, or the first error.
fn parallel(
    n: usize,
    workers: usize,
    f: &(dyn Fn(usize) -> Result<(), String> + Sync),
) -> Result<Duration, String> {
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers.min(n) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    break;
                }
                if let Err(e) = f(k) {
                    failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    next.store(n, Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    let waited = wait_leftovers();
    let d = t.elapsed();
    waited?;
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(d),
    }
}

/// `pods.len()` ADDs (one per pod) on `workers` threads, then DEL of them all; wall times.
fn concurrent(
    imp: &Impl,
    pods: &[String],
    workers: usize,
    round: usize,
) -> Result<(Duration, Duration), String> {
    let n = pods.len();
    let results: Vec<Mutex<Option<Value>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let id = |k: usize| format!("cnib-{}-c{round}-{k}", imp.tag);
    let add = parallel(n, workers, &|k| {
        let (_, v) = imp.add(false, &id(k), &netns_path(&pods[k]))?;
        *results[k].lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
        Ok(())
    })?;
    let del = parallel(n, workers, &|k| {
        let prev = results[k].lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or(Value::Null);
        imp.del(false, &id(k), &netns_path(&pods[k]), &prev).map(|_| ())
    })?;
    Ok((add, del))
}

/// Deleting a veth pair (both ends in the node namespace) over an open netlink socket: only
/// the RTM_DELLINK request and its ack are timed.
struct VethFloor {
    rt: tokio::runtime::Runtime,
    h: rtnetlink::Handle,
}

impl VethFloor {
    const A: &'static str = "cnibfloor0";
    const B: &'static str = "cnibfloor1";

    fn new() -> Result<VethFloor, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let h = rt.block_on(async {
            let (conn, h, _) = rtnetlink::new_connection().map_err(|e| format!("netlink socket: {e}"))?;
            tokio::spawn(conn);
            Ok::<_, String>(h)
        })?;
        Ok(VethFloor { rt, h })
    }

    const BR: &'static str = "cnibfloorbr";

    /// One delete; with `on_bridge`, one end is an up port of a bridge first, as a pod's host
    /// veth is: removing a bridge port costs the kernel another synchronize_net().
    fn sample(&self, on_bridge: bool) -> Result<Duration, String> {
        let idx = self.make_pair(Self::A, Self::B, on_bridge)?;
        self.rt.block_on(async {
            let t = Instant::now();
            self.h.link().del(idx).execute().await.map_err(|e| format!("deleting {}: {e}", Self::A))?;
            Ok(t.elapsed())
        })
    }

    /// The floor bridge's index, made if absent.
    async fn bridge(&self) -> Result<u32, String> {
        let h = &self.h;
        let _ = h.link().add(rtnetlink::LinkBridge::new(Self::BR).build()).execute().await;
        let m = h.link().get().match_name(Self::BR.to_string()).execute().try_next().await;
        Ok(m.map_err(|e| format!("looking up {}: {e}", Self::BR))?.ok_or("no floor bridge")?.header.index)
    }

    /// A netlink handle whose socket is in the namespace `ns` (made on a thread of its own, so
    /// that this one stays in the node namespace).
    fn handle_in(&self, ns: &File) -> Result<rtnetlink::Handle, String> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| format!("entering a pod: {e}"))?;
                let _in_rt = self.rt.enter();
                let (conn, h, _) = rtnetlink::new_connection().map_err(|e| format!("netlink socket: {e}"))?;
                self.rt.spawn(conn);
                Ok(h)
            })
            .join()
            .map_err(|_| "the thread entering a pod panicked".to_string())?
        })
    }

    /// Makes veth pair `a`/`b` as a pod's is: `a` an up port of the floor bridge in the node
    /// namespace, `b` up in the pod namespace `pod` (`in_pod`: a socket there). `b` is set up
    /// apart: a veth end set up before its peer exists is refused (ENOTCONN).
    fn make_pod_pair(&self, a: &str, b: &str, pod: &File, in_pod: &rtnetlink::Handle) -> Result<(), String> {
        use rtnetlink::packet_route::link::{InfoData, InfoVeth};
        use std::os::fd::AsRawFd;
        self.rt.block_on(async {
            let br = self.bridge().await?;
            let peer = rtnetlink::LinkUnspec::new_with_name(b).setns_by_fd(pod.as_raw_fd()).build();
            let pair =
                LinkVeth::new(a, b).set_info_data(InfoData::Veth(InfoVeth::Peer(peer))).controller(br).up();
            self.h
                .link()
                .add(pair.build())
                .execute()
                .await
                .map_err(|e| format!("creating veth {a}/{b}, {b} in a pod: {e}"))?;
            let up = rtnetlink::LinkUnspec::new_with_name(b).up().build();
            in_pod.link().set(up).execute().await.map_err(|e| format!("setting {b} up in a pod: {e}"))
        })
    }

    /// What a DEL asks of the kernel, alone: the pod's end of a pair whose other end is a
    /// bridge port, deleted by name in the pod's namespace over `in_pod` (a socket there).
    fn sample_in_pod(&self, pod: &File, in_pod: &rtnetlink::Handle) -> Result<Duration, String> {
        const A: &str = "cnibpodf0";
        const B: &str = "cnibpodf1";
        self.make_pod_pair(A, B, pod, in_pod)?;
        self.rt.block_on(async {
            let t = Instant::now();
            del_named(in_pod, B).await?;
            Ok(t.elapsed())
        })
    }

    /// [`VethFloor::parallel`] as DELs do it: `pods.len()` pairs, each made by
    /// [`VethFloor::make_pod_pair`] with its pod end in its own pod, deleted in the pod's
    /// namespace by `workers` threads, each delete entering the namespace and opening a socket
    /// there as a plugin process does; the wall time.
    fn parallel_in_pods(&self, pods: &[String], workers: usize) -> Result<Duration, String> {
        let name = |k: usize, end: char| format!("cnibpp{k}{end}");
        for (k, pod) in pods.iter().enumerate() {
            let f = File::open(netns_path(pod)).map_err(|e| format!("opening {pod}: {e}"))?;
            let in_pod = self.handle_in(&f)?;
            self.make_pod_pair(&name(k, 'a'), &name(k, 'b'), &f, &in_pod)?;
        }
        parallel(pods.len(), workers, &|k| {
            let pod = &pods[k];
            let f = File::open(netns_path(pod)).map_err(|e| format!("opening {pod}: {e}"))?;
            // This worker thread is this parallel run's own; it ends with the run.
            setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| format!("entering {pod}: {e}"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("tokio runtime: {e}"))?;
            rt.block_on(async {
                let (conn, h, _) = rtnetlink::new_connection().map_err(|e| format!("netlink socket: {e}"))?;
                tokio::spawn(conn);
                del_named(&h, &name(k, 'b')).await
            })
        })
    }

    /// Makes veth pair `a`/`b` in the node namespace (with `on_bridge`, `a` an up port of the
    /// floor bridge); the index of `a`.
    fn make_pair(&self, a: &str, b: &str, on_bridge: bool) -> Result<u32, String> {
        let h = &self.h;
        self.rt.block_on(async {
            let br = if on_bridge {
                let _ = h.link().add(rtnetlink::LinkBridge::new(Self::BR).build()).execute().await;
                let m = h.link().get().match_name(Self::BR.to_string()).execute().try_next().await;
                Some(
                    m.map_err(|e| format!("looking up {}: {e}", Self::BR))?
                        .ok_or("no floor bridge")?
                        .header
                        .index,
                )
            } else {
                None
            };
            h.link()
                .add(LinkVeth::new(a, b).build())
                .execute()
                .await
                .map_err(|e| format!("creating veth {a}/{b} in the node namespace: {e}"))?;
            let idx = h
                .link()
                .get()
                .match_name(a.to_string())
                .execute()
                .try_next()
                .await
                .map_err(|e| format!("looking up {a}: {e}"))?
                .ok_or_else(|| format!("{a} not found after creating it"))?
                .header
                .index;
            if let Some(br) = br {
                let up = rtnetlink::LinkUnspec::new_with_index(idx).controller(br).up().build();
                h.link().set(up).execute().await.map_err(|e| format!("attaching {a}: {e}"))?;
            }
            Ok(idx)
        })
    }

    /// The kernel's own parallel rate, the ceiling for any plugin's DEL throughput: `n` pairs,
    /// one end of each an up bridge port, deleted by `workers` threads over netlink (a socket
    /// per delete, as each plugin process has), no process started; the wall time.
    fn parallel(&self, n: usize, workers: usize) -> Result<Duration, String> {
        let idx: Vec<u32> = (0..n)
            .map(|k| self.make_pair(&format!("cnibpf{k}a"), &format!("cnibpf{k}b"), true))
            .collect::<Result<_, _>>()?;
        parallel(n, workers, &|k| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("tokio runtime: {e}"))?;
            rt.block_on(async {
                let (conn, h, _) = rtnetlink::new_connection().map_err(|e| format!("netlink socket: {e}"))?;
                tokio::spawn(conn);
                h.link().del(idx[k]).execute().await.map_err(|e| format!("deleting cnibpf{k}a: {e}"))
            })
        })
    }
}

/// RTM_DELLINK of the link named `name`, as cni-bridge's DEL sends it.
async fn del_named(h: &rtnetlink::Handle, name: &str) -> Result<(), String> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut req = h.link().del(0);
    req.message_mut().attributes.push(LinkAttribute::IfName(name.to_string()));
    req.execute().await.map_err(|e| format!("deleting {name}: {e}"))
}

fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

/// Nearest-rank percentile, in ms.
fn pct(v: &[Duration], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Report

struct Row {
    metric: String,
    unit: &'static str,
    ours: Option<f64>,
    reference: Option<f64>,
    /// The same figure for each round alone: (ours, reference).
    rounds: Vec<(Option<f64>, Option<f64>)>,
    target: String,
    pass: Option<bool>,
    /// How many rounds meet the target on their own figures.
    rounds_pass: usize,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        match (self.ours, self.reference) {
            (Some(o), Some(r)) if r > 0.0 => Some(o / r),
            _ => None,
        }
    }

    /// "min–max" over the rounds of ours (`k` 0) or the reference (1).
    fn spread(&self, k: usize) -> String {
        let v: Vec<f64> = self.rounds.iter().filter_map(|r| if k == 0 { r.0 } else { r.1 }).collect();
        if v.is_empty() {
            return "—".into();
        }
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| (l.min(*x), h.max(*x)));
        let num = |x: f64| fmt_val(Some(x), self.unit).split(' ').next().unwrap_or("").to_string();
        format!("{}–{} {}", num(lo), num(hi), self.unit)
    }
}

fn fmt_val(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "—".into(),
        Some(x) if unit == "ms" && x < 1.0 => format!("{x:.3} ms"),
        Some(x) if unit == "ms" && x < 100.0 => format!("{x:.2} ms"),
        Some(x) if unit == "ms" => format!("{x:.1} ms"),
        Some(x) => format!("{x:.1} {unit}"),
    }
}

fn table(rows: &[Row]) -> String {
    let head = [
        "metric",
        "ours",
        "reference",
        "ratio",
        "ours, per round",
        "reference, per round",
        "target",
        "result",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.metric.clone(),
                fmt_val(r.ours, r.unit),
                fmt_val(r.reference, r.unit),
                r.ratio().map_or("—".into(), |x| format!("{x:.2}×")),
                r.spread(0),
                r.spread(1),
                r.target.clone(),
                match r.pass {
                    Some(p) => format!(
                        "{} ({}/{} rounds)",
                        if p { "PASS" } else { "FAIL" },
                        r.rounds_pass,
                        r.rounds.len()
                    ),
                    None => "info".into(),
                },
            ]
        })
        .collect();
    let mut w = head.map(|h| h.chars().count());
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String]| -> String {
        let parts: Vec<String> = c
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s}{}", " ".repeat(w[i] - s.chars().count())))
            .collect();
        format!("| {} |\n", parts.join(" | "))
    };
    let mut out = line(&head.map(String::from));
    let sep: Vec<String> = w.iter().map(|n| "-".repeat(*n)).collect();
    out += &format!("|-{}-|\n", sep.join("-|-"));
    for c in &cells {
        out += &line(c);
    }
    out
}

/// A figure of one implementation (0 ours, 1 reference) in a round (or all rounds pooled).
type Figure<'a> = Box<dyn Fn(&Round, usize) -> Option<f64> + 'a>;
/// A target: its text and whether (ours, reference) of that round meet it.
type Check<'a> = Box<dyn Fn(&Round, Option<f64>, Option<f64>) -> (String, bool) + 'a>;

/// One row of the report before it is computed.
struct Def<'a> {
    metric: String,
    unit: &'static str,
    figure: Figure<'a>,
    /// Whether the reference has this figure too.
    both: bool,
    check: Option<Check<'a>>,
}

/// ours / reference `≤` (`at_most`) or `≥` `factor`.
fn ratio_check<'a>(at_most: bool, factor: f64) -> Option<Check<'a>> {
    Some(Box::new(move |_, o, r| {
        let x = o.unwrap_or(f64::NAN) / r.unwrap_or(f64::NAN);
        let op = if at_most { "≤" } else { "≥" };
        (format!("{op} {factor}× reference"), if at_most { x <= factor } else { x >= factor })
    }))
}

/// ours ≤ a floor's p50 (measured in the same round) + `margin` ms.
fn floor_check<'a>(name: &'static str, margin: f64, floor: impl Fn(&Round) -> f64 + 'a) -> Option<Check<'a>> {
    Some(Box::new(move |rd, o, _| {
        let limit = floor(rd) + margin;
        (format!("≤ {name} p50 + {margin} ms = {limit:.2} ms"), o.is_some_and(|x| x <= limit))
    }))
}

/// The pooled row of `def` over `all`, with each round's figures and verdict.
fn compute(def: &Def, all: &Round, rounds: &[Round]) -> Row {
    let both = |rd: &Round| ((def.figure)(rd, 0), if def.both { (def.figure)(rd, 1) } else { None });
    let (ours, reference) = both(all);
    let per: Vec<(Option<f64>, Option<f64>)> = rounds.iter().map(both).collect();
    let (target, pass) = match &def.check {
        Some(c) => {
            let (t, p) = c(all, ours, reference);
            (t, Some(p))
        }
        None => ("—".into(), None),
    };
    let rounds_pass = match &def.check {
        Some(c) => rounds.iter().zip(&per).filter(|(rd, (o, r))| c(rd, *o, *r).1).count(),
        None => 0,
    };
    Row {
        metric: def.metric.clone(),
        unit: def.unit,
        ours,
        reference,
        rounds: per,
        target,
        pass,
        rounds_pass,
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn machine() -> (usize, String, String) {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    (nproc, kernel, cpu)
}

/// The 1-, 5- and 15-minute load averages (others' work on the machine skews the numbers).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn package_version(pkg: &str) -> Option<String> {
    let o = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", pkg])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Main

fn require_bins(dir: &Path, names: &[&str]) -> Result<PathBuf, String> {
    let dir = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for n in names {
        if !dir.join(n).is_file() {
            return Err(format!("{} has no {n}", dir.display()));
        }
    }
    Ok(dir)
}

fn run(args: &Args) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (it makes network namespaces)".into());
    }
    let ours_dir = require_bins(&args.ours, &["cni-bridge", "cni-host-local"])?;
    let ref_dir = require_bins(&args.reference, &["bridge", "host-local"])?;
    let command: Vec<String> = std::env::args().map(|a| shell_quote(&a)).collect();
    let command = command.join(" ");
    let pid = std::process::id();

    let sig_pipe = catch_signals()?;
    // Whatever a plugin leaves running becomes this process's child, to be waited for.
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| format!("becoming a child subreaper: {e}"))?;

    // The node namespace, entered by this (still the only) thread.
    let node = format!("cnib-{pid}-node");
    make_netns(std::slice::from_ref(&node))?;
    let f = File::open(netns_path(&node)).map_err(|e| format!("opening {node}: {e}"))?;
    setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| format!("entering {node}: {e}"))?;
    drop(f);
    // From here on, `ip` without -n acts in the node namespace.
    run_ok("ip", &["link", "set", "lo", "up"])?;

    wait_signals(sig_pipe);

    // Pods: one for the sequential runs (reused: each ADD is deleted before the next), one per
    // ADD of the throughput test. All made before anything is timed.
    let seq_pod = format!("cnib-{pid}-seq");
    let conc_pods: Vec<String> = (0..args.concurrency_adds).map(|k| format!("cnib-{pid}-p{k}")).collect();
    let mut all = vec![seq_pod.clone()];
    all.extend(conc_pods.iter().cloned());
    make_netns(&all)?;

    let tmp = std::env::temp_dir();
    let data = [tmp.join(format!("cnib-{pid}-ours")), tmp.join(format!("cnib-{pid}-ref"))];
    for d in &data {
        made().dirs.push(d.clone());
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let imps = [
        Impl::new("ours", "o", &ours_dir, "cni-bridge", "cni-host-local", &data[0]),
        Impl::new("reference", "r", &ref_dir, "bridge", "host-local", &data[1]),
    ];

    let n = args.iterations;
    let load_before = loadavg();
    let t0 = Instant::now();
    eprintln!(
        "cni-bench: {} rounds, each: sequential ADD/DEL, plain and ipMasq, with the VERSION and \
         veth-delete floors ({n} timed iterations; {WARMUP} warm-up in the first), then \
         throughput: {} ADDs and their DELs at concurrency {}, {CONC_RUNS} runs each",
        args.rounds, args.concurrency_adds, args.workers
    );
    let mut rounds: Vec<Round> = Vec::new();
    let mut loads = Vec::new();
    for round in 0..args.rounds {
        loads.push(loadavg());
        let warmup = if round == 0 { WARMUP } else { 0 };
        let seq = sequential(&imps, &netns_path(&seq_pod), n, warmup, round)?;
        let mut rd = Round { seq, conc_calls: CONC_RUNS * args.concurrency_adds, ..Round::default() };
        // ours, reference, reference, ours; the reference first in odd rounds.
        let first = round % 2;
        for run in 0..2 * CONC_RUNS {
            let k = if run % 4 == 0 || run % 4 == 3 { first } else { 1 - first };
            let (a, d) = concurrent(&imps[k], &conc_pods, args.workers, round * 2 * CONC_RUNS + run)?;
            eprintln!(
                "  round {round}: {}: {} ADDs in {:.2} s, DEL in {:.2} s",
                imps[k].label,
                args.concurrency_adds,
                a.as_secs_f64(),
                d.as_secs_f64()
            );
            rd.conc_add[k] += a;
            rd.conc_del[k] += d;
        }
        let floor = VethFloor::new()?;
        for _ in 0..CONC_RUNS {
            rd.conc_floor += floor.parallel(args.concurrency_adds, args.workers)?;
            rd.conc_floor_pod += floor.parallel_in_pods(&conc_pods, args.workers)?;
        }
        eprintln!(
            "  round {round}: floor: {} bridge-port veth deletes at concurrency {} in {:.2} s \
             (node side), {:.2} s (pod side)",
            rd.conc_calls,
            args.workers,
            rd.conc_floor.as_secs_f64(),
            rd.conc_floor_pod.as_secs_f64()
        );
        rounds.push(rd);
    }
    let elapsed = t0.elapsed();
    let mut all = Round::default();
    for rd in &rounds {
        all.seq.extend(&rd.seq);
        for k in 0..2 {
            all.conc_add[k] += rd.conc_add[k];
            all.conc_del[k] += rd.conc_del[k];
        }
        all.conc_floor += rd.conc_floor;
        all.conc_floor_pod += rd.conc_floor_pod;
        all.conc_calls += rd.conc_calls;
    }

    let lat = |variant: usize, del: bool, p: f64| -> Figure {
        Box::new(move |rd: &Round, k: usize| {
            let l = &rd.seq.lat[k][variant];
            Some(pct(if del { &l.del } else { &l.add }, p))
        })
    };
    // DEL's finished work: until the last process it left has ended.
    let done = |variant: usize, p: f64| -> Figure {
        Box::new(move |rd: &Round, k: usize| Some(pct(&rd.seq.lat[k][variant].del_done, p)))
    };
    let per_s = |del: bool| -> Figure {
        Box::new(move |rd: &Round, k: usize| {
            let d = if del { rd.conc_del[k] } else { rd.conc_add[k] };
            Some(rd.conc_calls as f64 / d.as_secs_f64())
        })
    };
    let def = |metric: &str, unit: &'static str, figure: Figure<'static>, both: bool, check| Def {
        metric: metric.into(),
        unit,
        figure,
        both,
        check,
    };
    let c = args.workers;
    let defs = vec![
        def("ADD p50", "ms", lat(0, false, 50.0), true, ratio_check(true, 0.33)),
        def("ADD p99", "ms", lat(0, false, 99.0), true, ratio_check(true, 1.0)),
        def("DEL p50 (to its last process's end)", "ms", done(0, 50.0), true, ratio_check(true, 1.0)),
        def("DEL p99 (to its last process's end)", "ms", done(0, 99.0), true, ratio_check(true, 1.0)),
        def("DEL p50 (to its return)", "ms", lat(0, true, 50.0), true, None),
        def("ipMasq ADD p50", "ms", lat(1, false, 50.0), true, ratio_check(true, 0.2)),
        def("ipMasq ADD p99", "ms", lat(1, false, 99.0), true, ratio_check(true, 1.0)),
        def("ipMasq DEL p50 (to its last process's end)", "ms", done(1, 50.0), true, ratio_check(true, 0.3)),
        def("ipMasq DEL p99 (to its last process's end)", "ms", done(1, 99.0), true, ratio_check(true, 1.0)),
        def(
            &format!("ADD throughput, {} ADDs at concurrency {c}", args.concurrency_adds),
            "adds/s",
            per_s(false),
            true,
            ratio_check(false, 3.0),
        ),
        def(
            &format!("DEL throughput of those, completed deletes, concurrency {c}"),
            "dels/s",
            per_s(true),
            true,
            ratio_check(false, 1.0),
        ),
        def(
            &format!("floor: pod-side bridge-port veth deletes/s at concurrency {c} (netlink)"),
            "dels/s",
            Box::new(|rd: &Round, _| Some(rd.conc_calls as f64 / rd.conc_floor_pod.as_secs_f64())),
            false,
            None,
        ),
        def(
            &format!("floor: node-side bridge-port veth deletes/s at concurrency {c} (netlink)"),
            "dels/s",
            Box::new(|rd: &Round, _| Some(rd.conc_calls as f64 / rd.conc_floor.as_secs_f64())),
            false,
            None,
        ),
        def(
            "floor: VERSION call p50 (process start)",
            "ms",
            Box::new(|rd: &Round, k: usize| Some(pct(&rd.seq.version[k], 50.0))),
            true,
            None,
        ),
        def(
            "floor: veth-pair delete p50 (netlink)",
            "ms",
            Box::new(|rd: &Round, _| Some(pct(&rd.seq.veth, 50.0))),
            false,
            None,
        ),
        def(
            "floor: veth delete, one end a bridge port, p50",
            "ms",
            Box::new(|rd: &Round, _| Some(pct(&rd.seq.port, 50.0))),
            false,
            None,
        ),
        def(
            "floor: pod-side delete of a bridge-port veth, p50 (what DEL asks)",
            "ms",
            Box::new(|rd: &Round, _| Some(pct(&rd.seq.pod_port, 50.0))),
            false,
            None,
        ),
        def(
            "ADD p50 vs our VERSION floor",
            "ms",
            lat(0, false, 50.0),
            false,
            floor_check("VERSION", 3.0, |rd: &Round| pct(&rd.seq.version[0], 50.0)),
        ),
        def(
            "DEL p50 (to its last process's end) vs the kernel's pod-side delete",
            "ms",
            done(0, 50.0),
            false,
            floor_check("pod-side floor", 1.0, |rd: &Round| pct(&rd.seq.pod_port, 50.0)),
        ),
    ];
    let rows: Vec<Row> = defs.iter().map(|d| compute(d, &all, &rounds)).collect();

    let (nproc, kernel, cpu) = machine();
    let ref_ver = package_version("containernetworking-plugins");
    let mut text = String::new();
    text += &format!(
        "machine: nproc {nproc}, kernel {kernel}, cpu {cpu}; load average {load_before} before, {} after\n",
        loadavg()
    );
    text += &format!("command: {command}\n");
    text += &format!(
        "ours: {} (cni-bridge, cni-host-local); reference: {} (bridge, host-local{})\n",
        ours_dir.display(),
        ref_dir.display(),
        ref_ver.as_deref().map_or(String::new(), |v| format!(", containernetworking-plugins {v}"))
    );
    text += &format!(
        "config: cniVersion 1.0.0, bridge {BRIDGE}, isGateway, host-local {SUBNET} (+ default route), \
         ipMasq off / on (ours: nftables, reference: iptables {})\n",
        run_ok("iptables", &["--version"])
            .map(|s| s.trim().trim_start_matches("iptables ").to_string())
            .unwrap_or_else(|_| "?".into())
    );
    text += &format!(
        "samples: {} rounds of {n} timed iterations (+{WARMUP} warm-up in the first), each: \
         VERSION of both, one veth delete, ADD+DEL plain and ipMasq of both, ours and reference \
         alternating; then throughput, {CONC_RUNS} runs each (ours, ref, ref, ours; the reference \
         first in odd rounds); load average at each round's start: {}; total {:.0} s\n",
        args.rounds,
        loads.join(" | "),
        elapsed.as_secs_f64()
    );
    text += &format!(
        "processes the plugins left behind, waited for before the next timed call or the end of \
         a throughput clock: {}; CNI_BRIDGE_DEL_DETACH={}\n\n",
        LEFTOVERS.load(Ordering::Relaxed),
        std::env::var("CNI_BRIDGE_DEL_DETACH").unwrap_or_else(|_| "(unset: DEL waits)".into())
    );
    text += &table(&rows);
    text += "\nratio = ours / reference, over all rounds pooled; per round: the lowest and highest \
             round's own figure; result: the pooled verdict and how many rounds pass on their own. \
             Targets are reported, not enforced (exit code 0).\n";

    if args.json {
        eprint!("{text}");
        let j = json!({
            "machine": {"nproc": nproc, "kernel": kernel, "cpu": cpu},
            "command": command,
            "ours": ours_dir.display().to_string(),
            "reference": ref_dir.display().to_string(),
            "reference_version": ref_ver,
            "iterations": n,
            "concurrency_adds": args.concurrency_adds,
            "workers": args.workers,
            "rounds": args.rounds,
            "throughput_runs_per_round": CONC_RUNS,
            "loadavg_per_round": loads,
            "seconds": elapsed.as_secs_f64(),
            "processes_left_behind": LEFTOVERS.load(Ordering::Relaxed),
            "loadavg_before": load_before,
            "metrics": rows.iter().map(|r| json!({
                "metric": r.metric,
                "unit": r.unit,
                "ours": r.ours,
                "reference": r.reference,
                "ratio": r.ratio(),
                "target": r.target,
                "pass": r.pass,
                "rounds": r.rounds.iter().map(|(o, f)| json!({"ours": o, "reference": f})).collect::<Vec<_>>(),
                "rounds_pass": r.pass.map(|_| r.rounds_pass),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&j).unwrap_or_else(|_| j.to_string()));
    } else {
        print!("{text}");
    }
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cni-bench: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    // The release profile aborts on panic, so no Drop runs: clean up from the hook.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        cleanup();
    }));
    let code = match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cni-bench: error: {e}");
            1
        }
    };
    cleanup();
    std::process::exit(code);
}
