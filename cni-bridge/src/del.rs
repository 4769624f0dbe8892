//! DEL: best-effort teardown that collects errors and carries on.

use cni_proto::{crash_point, Command, Error as CniError, Request};
use rtnetlink::packet_route::link::InfoKind;

use crate::config::BridgeConf;
use crate::error::{finish, BridgeError};
use crate::firewall;
use crate::netlink::Nl;
use crate::netns;
use crate::reaping::Recorder;
use crate::run::{mark, runtime};

/// Where the pod's end of the veth can be found.
enum PodNs {
    /// CNI_NETNS is empty.
    NotGiven,
    /// The namespace is open.
    Open(std::fs::File),
    /// CNI_NETNS names no network namespace any more (removed, unmounted, replaced).
    Gone,
}

/// Removes the pod interface (and so the veth pair), the lease and the masquerade entries.
/// Succeeds when the namespace, interface or lease is already gone, and when repeated.
///
/// The rules and the pod interface go at once; the lease after both. By default DEL returns
/// once the kernel has acked the pod interface's delete, as a runtime expects of a plugin that
/// has returned: nothing of the delete is left running. With `CNI_BRIDGE_DEL_DETACH=1` the
/// delete is sent by a child process (see [`Unlinking`], [`detach_delete`]) and DEL goes on
/// once the kernel has unlisted the pair: the pair is gone 1-7 ms into the request, which then
/// waits 15-35 ms more for an RCU barrier (longer under concurrency, as the kernel runs those
/// barriers one at a time). That saves a DEL 15-20 ms of a pod teardown that takes seconds,
/// but not the kernel's work, and leaves a child for someone else to reap.
pub fn del(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    mark("start");
    let pod_ns = match req.inv.netns.as_deref() {
        None => PodNs::NotGiven,
        // Opened once: a namespace that is gone in any form still lets DEL release the rest,
        // but the plugin's own namespace is refused (CNI_IFNAME is never deleted there).
        Some(path) => match netns::open_netns(path) {
            Ok(ns) => {
                netns::refuse_own(path, &ns)?;
                PodNs::Open(ns)
            }
            // The pod was torn down first, in whatever form: the lease, the rules and the
            // host veth must still go, or kubelet retries forever and the address leaks.
            Err(e) => {
                eprintln!("cni-bridge: DEL: pod namespace gone ({e}); releasing the rest");
                PodNs::Gone
            }
        },
    };
    // Forked before any thread of this process exists. The child is given the netfilter
    // socket too: closing it after removing entries waits for an RCU grace period (~10 ms),
    // which would otherwise come at this process's exit, now that it no longer waits for
    // the veth delete's end.
    let detach = if matches!(pod_ns, PodNs::Open(_)) { detach_delete() } else { None };
    if detach.is_some() {
        if let Err(e) = firewall::netlink::open() {
            eprintln!("cni-bridge: DEL: opening the netfilter socket early: {e}");
        }
    }
    let unlinking = match (&pod_ns, detach) {
        (PodNs::Open(ns), Some(recorder)) => Some(Unlinking::start(ns, &req.inv.ifname, Some(recorder))),
        (PodNs::Open(ns), None) => Some(Unlinking::start(ns, &req.inv.ifname, None)),
        _ => None,
    };
    let owner = firewall::owner(&req.conf.name, &req.inv.container_id, &req.inv.ifname);
    let ifname = req.inv.ifname.as_str();
    std::thread::scope(|s| {
        let rules = s.spawn(|| {
            // One dump of each family's nat table serves both sweeps.
            let removed = firewall::iptables::sharing_dumps(|| {
                firewall::remove_attachment(conf.masq_backend, &owner)
                    .and_then(|()| firewall::reference::remove(&req.conf.name, &req.inv.container_id))
            })
            .map_err(CniError::from);
            crash_point("bridge-del-after-rules");
            mark("rules removed");
            removed
        });
        // Once the pod interface is gone (or could not be deleted): the rules' outcome, then
        // the lease.
        let after_link = |removed: Result<(), BridgeError>| -> Vec<CniError> {
            let mut errs: Vec<CniError> = Vec::new();
            if let Err(e) = removed {
                errs.push(e.into());
            }
            crash_point("bridge-del-after-link");
            crate::run::mark("pod interface deleted");
            match rules.join() {
                Ok(Err(e)) => errs.push(e),
                Err(_) => errs.push(BridgeError::Firewall("rule removal thread panicked".into()).into()),
                Ok(Ok(())) => {}
            }
            // The lease goes last, and only once the rules and the pod interface are gone: a
            // released address can be leased to another pod at once, whose masquerade entry
            // must not be removed as ours and whose address must not still sit on our old
            // interface. When either failed the lease is kept and DEL fails, so the runtime
            // retries.
            if errs.is_empty() {
                if let Some(plugin) = conf.ipam_type.as_deref() {
                    if let Err(e) = crate::ipam::run(plugin, Command::Del, req) {
                        errs.push(e);
                    }
                    crash_point("bridge-del-after-ipam");
                }
                crate::run::mark("IPAM DEL done");
            }
            errs
        };
        match unlinking {
            // The waiting DEL: the lease is released on a thread once the kernel has unlisted
            // the pair, while this thread is still inside the request (the RCU barrier that
            // follows the unlisting, 10-30 ms); the kernel's work runs in the sending thread,
            // so this one returns at the ack without another wake-up.
            Some(Ok((mut unlinking, Sender::Inline(send)))) => {
                let lease = s.spawn(move || after_link(unlinking.wait(ifname)));
                send.run();
                let errs = lease.join().unwrap_or_else(|_| {
                    vec![BridgeError::io("releasing the lease")(std::io::Error::other("thread panicked"))
                        .into()]
                });
                finish(errs)
            }
            Some(Ok((mut unlinking, child))) => {
                let errs = after_link(unlinking.wait(ifname));
                child.finish();
                finish(errs)
            }
            Some(Err(e)) => {
                // No child (the pids cgroup full?) or no socket: delete from here.
                eprintln!("cni-bridge: DEL: {e}; deleting the pod interface from this thread");
                finish(after_link(remove_links(req, conf, &pod_ns)))
            }
            None => finish(after_link(remove_links(req, conf, &pod_ns))),
        }
    })
}

/// Deletes the pod interface in its namespace (the host end goes with it); without the
/// namespace, the host veth prevResult names, if it is still a veth port of our bridge (the
/// namespace may live on, unreachable, holding the pair).
fn remove_links(req: &Request, conf: &BridgeConf, pod_ns: &PodNs) -> Result<(), BridgeError> {
    let host_veth = match pod_ns {
        PodNs::Open(_) => None,
        PodNs::NotGiven | PodNs::Gone => match req.conf.prev_result() {
            Ok(Some(prev)) => prev
                .interfaces
                .iter()
                .find(|i| i.sandbox.is_none() && i.name != conf.bridge && i.name.starts_with("veth"))
                .map(|i| i.name.clone()),
            _ => None,
        },
    };
    if matches!(pod_ns, PodNs::NotGiven | PodNs::Gone) && host_veth.is_none() {
        return Ok(());
    }
    runtime()?.block_on(async {
        if let PodNs::Open(ns) = pod_ns {
            return Nl::in_ns(ns)?.del_link_named(&req.inv.ifname).await;
        }
        let Some(name) = host_veth else { return Ok(()) };
        let host = Nl::here()?;
        let (Some(port), Some(bridge)) = (host.link(&name).await?, host.link(&conf.bridge).await?) else {
            return Ok(());
        };
        if port.kind == Some(InfoKind::Veth) && port.controller == Some(bridge.index) {
            host.del_link(port.index).await?;
        }
        Ok(())
    })
}

/// Whether the pod interface is deleted by a child process ([`Unlinking`]), and where that
/// child is recorded: only with `CNI_BRIDGE_DEL_DETACH=1` (an environment switch, so that a
/// runtime that scrubs its plugins' environment gets the waiting DEL), and then only while
/// children can be recorded and checked here and none recorded holds it back (a zombie, a
/// delete stuck in the kernel, too many alive: see [`crate::reaping`]).
fn detach_delete() -> Option<Recorder> {
    if std::env::var_os("CNI_BRIDGE_DEL_DETACH").is_none_or(|v| v != "1") {
        return None;
    }
    let mut recorder = Recorder::open()?;
    if let Some(hold) = recorder.hold() {
        if let Some(why) = hold.explain() {
            eprintln!("cni-bridge: DEL: waiting for the kernel's delete: {why}");
        }
        return None;
    }
    Some(recorder)
}

/// The pod interface's delete (RTM_DELLINK by name, in the pod namespace), sent by DEL
/// itself or, opted in, by a forked child. The kernel unlists the pair (addresses,
/// routes and the bridge port gone, the names free) and announces it with an RTM_DELLINK
/// notification, then, still inside the request, waits for an RCU barrier and the last
/// references before it acks. DEL goes on at the notification (or the sender's answer,
/// whichever comes first): the address is on no interface any more, so the lease may go.
/// DEL itself returns at the ack; a child is left to wait for the ack and exit on its own,
/// holding none of the runtime's pipes.
struct Unlinking {
    /// The sender's answer: the request's errno as 4 bytes (0 for the ack).
    answer: std::fs::File,
    /// Subscribed to link notifications in the pod namespace before the request is sent.
    events: rtnetlink::sys::Socket,
}

/// Who sends the delete and waits for its ack.
enum Sender {
    /// A detached child; `recorded`: whether it is in the reaping record (if not, DEL waits
    /// for it before exiting: it could not be checked).
    Child { pid: nix::unistd::Pid, recorded: bool },
    /// This process, by [`Inline::run`], before DEL returns.
    Inline(Inline),
}

/// The request ready to be sent from this process.
struct Inline {
    request: rtnetlink::sys::Socket,
    msg: Vec<u8>,
    answer: std::os::fd::OwnedFd,
}

impl Inline {
    /// Sends the delete and waits for the kernel's ack; the answer goes to the pipe.
    fn run(self) {
        use std::os::fd::AsRawFd;
        let code = request_delete(self.request.as_raw_fd(), &self.msg);
        let _ = std::io::Write::write_all(&mut std::fs::File::from(self.answer), &code.to_ne_bytes());
        crate::run::mark("kernel's delete acked");
    }
}

impl Sender {
    /// Reaps the child if it is done by now (a slow IPAM DEL), else leaves it to exit after
    /// this process; one that could not be recorded is waited for.
    fn finish(self) {
        if let Sender::Child { pid, recorded } = self {
            let flags = if recorded { Some(nix::sys::wait::WaitPidFlag::WNOHANG) } else { None };
            let _ = nix::sys::wait::waitpid(pid, flags);
        }
    }
}

const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const AF_BRIDGE: u8 = 7;
const RTNLGRP_LINK: u32 = 1;

impl Unlinking {
    /// Sends the delete from a detached child recorded in `recorder`, or without one prepares
    /// it to be sent from this process ([`Sender::Inline`]).
    fn start(
        ns: &std::fs::File,
        ifname: &str,
        recorder: Option<Recorder>,
    ) -> Result<(Unlinking, Sender), BridgeError> {
        use nix::unistd::{fork, ForkResult};
        use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};
        use std::os::fd::AsRawFd;
        let io = |what: &'static str| BridgeError::io(what);
        let (events, request) = netns::run_in(ns, || -> std::io::Result<(Socket, Socket)> {
            let mut events = Socket::new(NETLINK_ROUTE)?;
            events.bind_auto()?;
            events.add_membership(RTNLGRP_LINK)?;
            let mut request = Socket::new(NETLINK_ROUTE)?;
            request.bind_auto()?;
            Ok((events, request))
        })
        .map_err(BridgeError::io("entering the pod namespace"))?
        .map_err(io("opening a netlink socket in the pod namespace"))?;
        let mut attrs = Vec::new();
        netlink_wire::attr(&mut attrs, IFLA_IFNAME, &netlink_wire::strz(ifname));
        let flags = rtnetlink::packet_core::NLM_F_REQUEST | rtnetlink::packet_core::NLM_F_ACK;
        let msg = netlink_wire::message(RTM_DELLINK, flags, 1, &[0u8; 16], &attrs);
        let (answer, answer_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io("making a pipe")(std::io::Error::from(e)))?;
        let Some(mut recorder) = recorder else {
            let send = Inline { request, msg, answer: answer_w };
            return Ok((Unlinking { answer: answer.into(), events }, Sender::Inline(send)));
        };
        // SAFETY: the child makes only async-signal-safe calls (send, recv, write, close,
        // _exit) on memory prepared here, so it is sound even if this process had threads.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => unlink_child(request.as_raw_fd(), &msg, answer_w.as_raw_fd()),
            Ok(ForkResult::Parent { child }) => {
                let recorded = recorder.record(child.as_raw());
                if !recorded {
                    eprintln!("cni-bridge: DEL: could not record process {child}; waiting for it");
                }
                Ok((Unlinking { answer: answer.into(), events }, Sender::Child { pid: child, recorded }))
            }
            Err(e) => Err(io("forking the pod interface's delete")(std::io::Error::from(e))),
        }
    }

    /// Until the kernel has unlisted `ifname` or the request failed.
    fn wait(&mut self, ifname: &str) -> Result<(), BridgeError> {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let gone = netlink_wire::strz(ifname);
        let mut watching = true;
        let result = loop {
            let mut fds = [
                nix::libc::pollfd { fd: self.answer.as_raw_fd(), events: nix::libc::POLLIN, revents: 0 },
                nix::libc::pollfd { fd: self.events.as_raw_fd(), events: nix::libc::POLLIN, revents: 0 },
            ];
            let watched = if watching { 2 } else { 1 };
            // SAFETY: `fds` is a valid array of `watched` pollfd entries for the call.
            if unsafe { nix::libc::poll(fds.as_mut_ptr(), watched, -1) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(BridgeError::io("waiting for the pod interface's delete")(e));
            }
            if fds[0].revents != 0 {
                let mut code = [0u8; 4];
                break match self.answer.read(&mut code) {
                    Ok(4) => match i32::from_ne_bytes(code) {
                        0 | nix::libc::ENODEV => Ok(()),
                        errno => Err(BridgeError::io("deleting the pod interface")(
                            std::io::Error::from_raw_os_error(errno),
                        )),
                    },
                    Ok(_) => Err(BridgeError::io("deleting the pod interface")(std::io::Error::other(
                        format!("{ifname}: the process sending the delete ended without an answer"),
                    ))),
                    Err(e) => Err(BridgeError::io("reading the pod interface's delete answer")(e)),
                };
            }
            if watching && fds[1].revents != 0 {
                let mut buf: Vec<u8> = Vec::with_capacity(65536);
                match self.events.recv(&mut buf, 0) {
                    Ok(n) if unlisted(&buf[..n], &gone) => break Ok(()),
                    Ok(_) => {}
                    // Notifications lost (ENOBUFS): the child's answer still comes.
                    Err(_) => watching = false,
                }
            }
        };
        result
    }
}

/// Whether `buf` holds an RTM_DELLINK notification for the link named `name` (NUL included).
fn unlisted(buf: &[u8], name: &[u8]) -> bool {
    let mut found = false;
    let _ = netlink_wire::walk(buf, |kind, _, payload| {
        // ifinfomsg (16 bytes), then attributes; AF_BRIDGE ones are about bridge ports.
        if kind == RTM_DELLINK && payload.len() >= 16 && payload[0] != AF_BRIDGE {
            found |= netlink_wire::find_attr(&payload[16..], IFLA_IFNAME) == Some(name);
        }
    });
    found
}

/// Sends `msg` on `sock` and waits for its answer: the request's errno (0 for the ack).
/// Only async-signal-safe calls, no allocation: the forked child runs it too.
fn request_delete(sock: std::os::fd::RawFd, msg: &[u8]) -> i32 {
    use nix::libc;
    // SAFETY: plain syscalls on a descriptor this process owns and on local buffers.
    unsafe {
        if libc::send(sock, msg.as_ptr().cast(), msg.len(), 0) < 0 {
            return nix::errno::Errno::last_raw();
        }
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                let e = nix::errno::Errno::last_raw();
                if e == libc::EINTR {
                    continue;
                }
                return e;
            }
            // NLMSG_ERROR: header (16 bytes), then the negative errno.
            if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == netlink_wire::NLMSG_ERROR {
                return -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            }
        }
    }
}

/// The forked child: sends `msg` on `sock`, writes the request's errno (0 for the ack) to
/// `answer` and exits. Only async-signal-safe calls, no allocation.
fn unlink_child(sock: std::os::fd::RawFd, msg: &[u8], answer: std::os::fd::RawFd) -> ! {
    use nix::libc;
    // SAFETY: plain syscalls on descriptors this process owns and on local buffers.
    unsafe {
        // The runtime reads the plugin's stdout and stderr until every copy is closed.
        for fd in 0..3 {
            libc::close(fd);
        }
        let code = request_delete(sock, msg);
        libc::write(answer, (&code as *const i32).cast(), 4);
        libc::_exit(0)
    }
}
