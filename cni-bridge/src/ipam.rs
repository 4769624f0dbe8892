//! Calling the IPAM plugin. Any IPAM plugin is run as the spec says: found through
//! CNI_PATH, same environment and stdin. Our own `cni-host-local` is instead run in-process
//! on a thread: the same code writing the same files, without a second process start on
//! every ADD and DEL (`CNI_BRIDGE_EXEC_IPAM=1` forces the exec for it too).

use cni_proto::{delegate, CniResult, Command, Error as CniError, Plugin, Request};

/// The IPAM type run in-process.
const OURS: &str = "cni-host-local";

/// An IPAM call under way.
pub enum Pending {
    /// Our host-local, on a thread.
    InProcess(std::thread::JoinHandle<Result<Option<CniResult>, CniError>>),
    /// Another plugin's process.
    Exec(delegate::Pending),
}

fn in_process(ipam_type: &str) -> bool {
    ipam_type == OURS && std::env::var_os("CNI_BRIDGE_EXEC_IPAM").is_none()
}

/// Starts IPAM plugin `ipam_type` with `command` for `req`.
pub fn start(ipam_type: &str, command: Command, req: &Request) -> Result<Pending, CniError> {
    if !in_process(ipam_type) {
        return delegate::spawn(ipam_type, command, &req.inv, &req.stdin).map(Pending::Exec);
    }
    let req = req.clone();
    Ok(Pending::InProcess(std::thread::spawn(move || {
        let plugin = cni_host_local::HostLocal;
        let outcome = match command {
            Command::Add => plugin.add(&req).map(Some),
            Command::Del => plugin.del(&req).map(|_| None),
            Command::Check => plugin.check(&req).map(|_| None),
            Command::Gc => plugin.gc(&req).map(|_| None),
            Command::Status => plugin.status(&req).map(|_| None),
            Command::Version => Ok(None),
        };
        // Errors read as a delegated plugin's do: named after the plugin, same code.
        outcome.map_err(|e| CniError::Plugin {
            code: e.code(),
            msg: format!("{OURS}: {e}"),
            details: e.details(),
        })
    })))
}

impl Pending {
    /// Waits for the answer: the result for ADD, else `None`.
    pub fn wait(self) -> Result<Option<CniResult>, CniError> {
        match self {
            Pending::Exec(process) => process.wait(),
            Pending::InProcess(thread) => {
                thread.join().unwrap_or_else(|_| Err(CniError::plugin(199, "IPAM thread panicked", "")))
            }
        }
    }
}

impl Pending {
    /// Waits for an ADD's answer, with whether the plugin may now hold a lease: it answered,
    /// or (exec'd) it exited 0 even if what it printed is unusable.
    pub fn wait_add(self) -> (bool, Result<Option<CniResult>, CniError>) {
        match self {
            Pending::Exec(process) => process.wait_status(),
            in_process => {
                let answer = in_process.wait();
                (answer.is_ok(), answer)
            }
        }
    }
}

/// Runs IPAM plugin `ipam_type` with `command` to the end.
pub fn run(ipam_type: &str, command: Command, req: &Request) -> Result<Option<CniResult>, CniError> {
    start(ipam_type, command, req)?.wait()
}
