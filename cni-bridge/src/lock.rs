//! The per-bridge lock (and the masquerade maps' lock, [`masquerade`]). An ADD that made the bridge and then fails deletes it only while it
//! has no ports; a parallel ADD between finding the bridge and attaching its veth has no port
//! on it yet. So ADD holds this lock from looking the bridge up (or creating it) until its
//! port is attached, and a rollback holds it across its "no ports?" check and the delete.
//!
//! An flock on a file under `/run/cni-bridge/locks` (per boot, like the bridge), named after
//! the network namespace's inode and the bridge: bridges of one name in different namespaces
//! are different bridges. Released by the kernel when the process dies, so a killed ADD never
//! holds it. The files stay (a few bytes of tmpfs per bridge and namespace): removing one
//! while another process waits on it would split the lock.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

use crate::error::BridgeError;

const LOCK_DIR: &str = "/run/cni-bridge/locks";

/// The lock of one bridge, held until dropped.
pub type BridgeLock = Flock<File>;

/// The inode of the calling thread's network namespace: locks are per namespace.
fn namespace() -> Result<u64, BridgeError> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(BridgeError::io("reading this network namespace's identity"))
}

/// The lock file of bridge `name` in the calling thread's network namespace.
pub fn path(name: &str) -> Result<PathBuf, BridgeError> {
    Ok(PathBuf::from(LOCK_DIR).join(format!("bridge-{}-{name}", namespace()?)))
}

/// Takes the lock of bridge `name`, waiting for it.
pub fn bridge(name: &str) -> Result<BridgeLock, BridgeError> {
    take(path(name)?)
}

/// Takes the lock of the namespace's masquerade maps, waiting for it. Their elements are keyed
/// by address and shared by every network of the node: a removal lists the elements of an
/// owner, then deletes by key, and an ADD of another network may take over a key in between
/// (the same address in an overlapping subnet). Held across a removal's listing and delete and
/// across an ADD's replacement of an element, never on an ADD's plain insert (which cannot
/// take over a key).
pub fn masquerade() -> Result<BridgeLock, BridgeError> {
    take(PathBuf::from(LOCK_DIR).join(format!("masquerade-{}", namespace()?)))
}

fn take(path: PathBuf) -> Result<BridgeLock, BridgeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(LOCK_DIR)
        .map_err(BridgeError::io("creating /run/cni-bridge/locks"))?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(BridgeError::io("opening a lock under /run/cni-bridge/locks"))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| BridgeError::io("taking a lock")(e.into()))
}
