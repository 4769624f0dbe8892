//! Network namespaces: validating CNI_NETNS, and running a short synchronous step inside one
//! on the current thread, always switching back.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::fstatfs;

use crate::error::BridgeError;

const NSFS_MAGIC: i64 = 0x6e73_6673;

// NS_GET_NSTYPE from linux/nsfs.h: _IO(0xb7, 0x3).
nix::ioctl_none!(ns_get_nstype, 0xb7, 3);

/// The namespace this thread is in now.
pub fn current() -> std::io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

fn same(first: &File, second: &File) -> bool {
    match (first.metadata(), second.metadata()) {
        (Ok(first_meta), Ok(second_meta)) => {
            first_meta.dev() == second_meta.dev() && first_meta.ino() == second_meta.ino()
        }
        _ => false,
    }
}

/// Opens a path a runtime named as a namespace without blocking: a FIFO planted there would
/// otherwise hang ADD and DEL for ever (the checks after the open then refuse it).
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(path)
}

/// Opens CNI_NETNS; it must be a network namespace other than the one the plugin runs in.
pub fn open_pod(path: &Path) -> Result<File, BridgeError> {
    let file = open_netns(path)?;
    refuse_own(path, &file)?;
    Ok(file)
}

/// Opens `path` if it is a network namespace (of any process, this one's included).
pub fn open_netns(path: &Path) -> Result<File, BridgeError> {
    let bad = |why: String| BridgeError::Netns(format!("{}: {why}", path.display()));
    let file = open_nonblocking(path).map_err(|e| bad(e.to_string()))?;
    let fs_stat = fstatfs(file.as_fd()).map_err(|e| bad(e.to_string()))?;
    if fs_stat.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(bad("not a network namespace".into()));
    }
    // An nsfs file can be another kind of namespace (mnt, pid...): ask the kernel which.
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let kind =
        unsafe { ns_get_nstype(std::os::fd::AsRawFd::as_raw_fd(&file)) }.map_err(|e| bad(e.to_string()))?;
    if kind != CloneFlags::CLONE_NEWNET.bits() {
        return Err(bad("not a network namespace".into()));
    }
    Ok(file)
}

/// Error 4 when `ns` (opened from `path`) is the namespace the plugin runs in: CNI_IFNAME
/// must never be created in or deleted from the host.
pub fn refuse_own(path: &Path, ns: &File) -> Result<(), BridgeError> {
    let bad = |why: String| BridgeError::Netns(format!("{}: {why}", path.display()));
    let own = current().map_err(|e| bad(e.to_string()))?;
    if same(ns, &own) {
        return Err(bad("is the namespace the plugin runs in".into()));
    }
    Ok(())
}

/// Runs `work` with this thread inside `ns`, then switches back. `work` must not await: on a
/// current-thread runtime nothing else runs on this thread meanwhile.
pub fn run_in<T>(ns: &File, work: impl FnOnce() -> T) -> std::io::Result<T> {
    let home = current()?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
    let out = work();
    if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
        // Carrying on in the wrong namespace could change the pod where the host was meant.
        eprintln!("cni-bridge: cannot return to the host namespace: {e}");
        std::process::abort();
    }
    Ok(out)
}

/// Writes a sysctl under /proc/sys in the current thread's namespace, skipping equal values.
pub fn sysctl(key: &str, value: &str) -> Result<(), BridgeError> {
    let path = format!("/proc/sys/{key}");
    if std::fs::read_to_string(&path).map(|v| v.trim() == value).unwrap_or(false) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| BridgeError::Sysctl(format!("writing {value} to {path}: {e}")))
}

/// The IPv6 multicast groups joined in the current thread's namespace, as `(ifindex, group)`.
/// The kernel joins an address's solicited-node group on a work queue after the address is
/// added; until then neighbour solicitations for the address go unanswered. Netlink has no
/// message for this table in the crates we use, so it is read where `ip maddr` reads it.
pub fn ipv6_groups() -> std::io::Result<Vec<(u32, std::net::Ipv6Addr)>> {
    let table = std::fs::read_to_string("/proc/thread-self/net/igmp6")?;
    Ok(table.lines().filter_map(parse_igmp6_line).collect())
}

/// One line of igmp6: `index name group-in-32-hex-digits users flags timer`.
fn parse_igmp6_line(line: &str) -> Option<(u32, std::net::Ipv6Addr)> {
    let mut fields = line.split_whitespace();
    let index = fields.next()?.parse().ok()?;
    let group = fields.nth(1)?;
    let bits = u128::from_str_radix(group, 16).ok().filter(|_| group.len() == 32)?;
    Some((index, bits.into()))
}

/// The solicited-node multicast group of `address` (RFC 4291 2.7.1): where neighbours ask
/// for it.
pub fn solicited_node(address: std::net::Ipv6Addr) -> std::net::Ipv6Addr {
    let low = u128::from(address) & 0xff_ffff;
    (0xff02_0000_0000_0000_0000_0001_ff00_0000u128 | low).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn igmp6_lines_and_solicited_node_groups() {
        let line = "5    cni0            ff0200000000000000000001ff000001     1 04 0";
        let want: std::net::Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
        assert_eq!(parse_igmp6_line(line), Some((5, want)));
        assert_eq!(parse_igmp6_line("5 cni0 ff02 1 04 0"), None, "a group is 32 hex digits");
        assert_eq!(parse_igmp6_line(""), None);
        assert_eq!(solicited_node("fd00:44::1".parse().unwrap()), want);
        let far: std::net::Ipv6Addr = "2001:db8::ab:cdef:1234".parse().unwrap();
        assert_eq!(solicited_node(far), "ff02::1:ffef:1234".parse::<std::net::Ipv6Addr>().unwrap());
    }
}
