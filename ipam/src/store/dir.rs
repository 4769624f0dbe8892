//! Access to the network directory: every open relative to its descriptor and without
//! following links, its stamp, and reading the lease files (under the lock for the store,
//! without it for readers such as `cni-bridge doctor`).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use super::lease::Lease;
use crate::error::IpamError;

pub(super) const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// What `openat` did not open, said so that an operator knows what to fix.
pub(super) fn open_err(what: &str, path: &Path, errno: Errno) -> IpamError {
    // O_NOFOLLOW with O_DIRECTORY reports a link as ENOTDIR.
    let is_link = || fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_symlink());
    if errno == Errno::ELOOP || (errno == Errno::ENOTDIR && is_link()) {
        return IpamError::store(
            format!("{what} {}: it is a symbolic link; refusing to follow it", path.display()),
            errno.into(),
        );
    }
    IpamError::store(format!("{what} {}", path.display()), errno.into())
}

pub(super) fn io_ctx(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> IpamError {
    let ctx = format!("{what} {}", path.display());
    move |e| IpamError::store(ctx, e)
}

pub(super) fn stamp_of(dir: &File) -> std::io::Result<String> {
    let meta = dir.metadata()?;
    Ok(format!(
        "{} {}.{} {}.{}",
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    ))
}

/// The kernel's boot id; empty where it cannot be read.
pub fn boot_id() -> String {
    fs::read_to_string(BOOT_ID).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Flags for every open inside the network directory: never through a link, never blocking
/// on a FIFO someone planted, never inherited.
pub(super) fn nofollow() -> OFlag {
    OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK
}

pub(super) fn open_at(dir: impl AsFd, name: &str, flags: OFlag, mode: u32) -> Result<File, Errno> {
    openat(dir, name, flags | nofollow(), Mode::from_bits_truncate(mode)).map(File::from)
}

/// Reads a regular file opened without following links; `Ok(None)` when it is absent.
pub(super) fn read_regular(dir: impl AsFd, name: &str) -> Result<Option<Vec<u8>>, Errno> {
    let mut file = match open_at(dir, name, OFlag::O_RDONLY, 0) {
        Ok(file) => file,
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let is_file = file.metadata().map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?.is_file();
    if !is_file {
        return Err(Errno::EINVAL);
    }
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    Ok(Some(buf))
}

/// Writes `data` over the file's start and cuts it to that length. Unlike truncate-then-write
/// or temp-then-rename, this does not make ext4 force block allocation (auto_da_alloc) on
/// every call; the contents are the same.
pub(super) fn overwrite(file: &File, data: &[u8]) -> std::io::Result<()> {
    file.write_all_at(data, 0)?;
    file.set_len(data.len() as u64)
}

/// The lease files of an open network directory: the leases, and the addresses whose lease is
/// torn (see [`Lease::parse`]). A link or directory named like an address is not a lease.
pub(super) fn scan(dir: &File, path: &Path) -> Result<(BTreeMap<IpAddr, Lease>, Vec<IpAddr>), IpamError> {
    let listing = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let listing = if listing.is_dir() { listing } else { path.to_path_buf() };
    let mut leases = BTreeMap::new();
    let mut torn = Vec::new();
    for ent in fs::read_dir(&listing).map_err(io_ctx("reading", path))? {
        let ent = ent.map_err(io_ctx("reading", path))?;
        let Some(ip) = ent.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
            continue;
        };
        // A link or directory named like an address is never handed out (creating the
        // lease fails) and never followed.
        if !ent.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        match read_regular(dir, &ip.to_string()) {
            Ok(Some(content)) => match Lease::parse(&content) {
                Some(lease) => {
                    leases.insert(ip, lease);
                }
                None => torn.push(ip),
            },
            Ok(None) => {}
            Err(e) => return Err(open_err("reading", &path.join(ip.to_string()), e)),
        }
    }
    Ok((leases, torn))
}

/// Whether the lease files of an open network directory are exactly `leases`, knowing that
/// none changed before `since` (the index's write): what a file's creation, replacement or
/// rewrite after that leaves is a change time at or after it (the kernel's clock at the
/// change; no writer sets it), so only such files are read. A readdir and a stat per lease,
/// where [`scan`] opens and reads every one. Anything unexpected (a name not listed, a link,
/// an unreadable file) is "no": the caller scans.
pub(super) fn unchanged_since(
    dir: &File,
    path: &Path,
    leases: &BTreeMap<IpAddr, Lease>,
    since: (i64, i64),
) -> bool {
    let listing = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let listing = if listing.is_dir() { listing } else { path.to_path_buf() };
    let Ok(entries) = fs::read_dir(&listing) else { return false };
    let mut found = 0;
    for ent in entries {
        let Ok(ent) = ent else { return false };
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Ok(ip) = name.parse::<IpAddr>() else { continue };
        let Some(lease) = leases.get(&ip) else { return false };
        // lstat, as scan's check for a regular file.
        let Ok(meta) = ent.metadata() else { return false };
        if !meta.is_file() || name != ip.to_string() {
            return false;
        }
        if (meta.ctime(), meta.ctime_nsec()) >= since {
            match read_regular(dir, name) {
                Ok(Some(content)) if Lease::parse(&content).as_ref() == Some(lease) => {}
                _ => return false,
            }
        }
        found += 1;
    }
    found == leases.len()
}

/// Every lease of `<data_dir>/<network>` as its files say, read without the lock and without
/// changing anything (`cni-bridge doctor`): a torn lease is `None` (the next call reclaims it),
/// a missing directory has none.
pub fn read_leases(data_dir: &Path, network: &str) -> Result<BTreeMap<IpAddr, Option<Lease>>, IpamError> {
    let path = data_dir.join(network);
    let top = match File::open(data_dir) {
        Ok(top) => top,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io_ctx("opening", data_dir)(e)),
    };
    let dir = match open_at(&top, network, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0) {
        Ok(dir) => dir,
        Err(Errno::ENOENT) => return Ok(BTreeMap::new()),
        Err(e) => return Err(open_err("opening", &path, e)),
    };
    let (leases, torn) = scan(&dir, &path)?;
    let mut out: BTreeMap<IpAddr, Option<Lease>> = leases.into_iter().map(|(ip, l)| (ip, Some(l))).collect();
    out.extend(torn.into_iter().map(|ip| (ip, None)));
    Ok(out)
}
