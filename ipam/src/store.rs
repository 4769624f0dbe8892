//! The lease store, byte-compatible with the reference host-local:
//! `<dataDir>/<network>/<ip>` holds `<containerid>\r\n<ifname>` (mode 0600),
//! `last_reserved_ip.<set>` the round-robin cursor, and `lock` is taken with flock.
//!
//! Beside those, `.cni-index/leases` maps every address to its attachment so DEL and CHECK
//! read one file instead of every lease. The index records the network directory's
//! inode/mtime/ctime as it was after our last change: any other writer (the reference
//! plugin) creating or removing a lease changes them, and the index is rebuilt from the
//! lease files. It also records the kernel's boot id: leases it lists from an earlier boot
//! belong to namespaces that no longer exist and are reclaimed.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::IpamError;

const INDEX_DIR: &str = ".cni-index";
const INDEX_FILE: &str = "leases";
const INDEX_MAGIC: &str = "cni-host-local-index 1";
const LAST_PREFIX: &str = "last_reserved_ip.";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Who holds an address; `ifname` is empty for leases written before the reference
/// recorded interface names (pre-0.8.0), which match any interface of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The container id.
    pub id: String,
    /// The interface name.
    pub ifname: String,
}

impl Lease {
    fn parse(content: &str) -> Lease {
        let t = content.trim();
        match t.split_once("\r\n") {
            Some((id, ifname)) => Lease { id: id.trim().to_string(), ifname: ifname.trim().to_string() },
            None => Lease { id: t.to_string(), ifname: String::new() },
        }
    }
}

/// One network's leases, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
    leases: BTreeMap<IpAddr, Lease>,
    /// The index as it is on disk; written back only when `leases` differs or `stale`.
    on_disk: Option<BTreeMap<IpAddr, Lease>>,
    stale: bool,
    boot_id: String,
}

fn io_ctx(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> IpamError {
    let ctx = format!("{what} {}", p.display());
    move |e| IpamError::store(ctx, e)
}

fn dir_stamp(dir: &Path) -> std::io::Result<String> {
    let m = fs::metadata(dir)?;
    Ok(format!("{} {}.{} {}.{}", m.ino(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

/// The kernel's boot id; empty where it cannot be read.
pub fn boot_id() -> String {
    fs::read_to_string(BOOT_ID).map(|s| s.trim().to_string()).unwrap_or_default()
}

struct IndexFile {
    boot: String,
    stamp: String,
    leases: BTreeMap<IpAddr, Lease>,
}

fn read_index(path: &Path) -> Option<IndexFile> {
    let text = fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != INDEX_MAGIC {
        return None;
    }
    let boot = lines.next()?.strip_prefix("boot ")?.to_string();
    let stamp = lines.next()?.strip_prefix("stamp ")?.to_string();
    let mut leases = BTreeMap::new();
    for l in lines {
        let mut f = l.split(' ');
        match f.next()? {
            "lease" => {}
            // Complete only with the end line, and only if it counts what was read.
            "end" => {
                return (f.next()?.parse::<usize>().ok()? == leases.len()).then_some(IndexFile {
                    boot,
                    stamp,
                    leases,
                })
            }
            _ => return None,
        }
        let ip: IpAddr = f.next()?.parse().ok()?;
        let id = f.next()?.to_string();
        let ifname = f.next().unwrap_or("").to_string();
        leases.insert(ip, Lease { id, ifname });
    }
    None
}

/// Writes `data` over the file's start and cuts it to that length. Unlike truncate-then-write
/// or temp-then-rename, this does not make ext4 force block allocation (auto_da_alloc) on
/// every call; the contents are the same.
fn overwrite(p: &Path, data: &[u8], mode: u32) -> Result<(), IpamError> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(p)
        .map_err(io_ctx("opening", p))?;
    f.write_all_at(data, 0).map_err(io_ctx("writing", p))?;
    f.set_len(data.len() as u64).map_err(io_ctx("writing", p))
}

impl Store {
    /// Whether the network's directory exists (DEL and GC of a network never used write nothing).
    pub fn exists(data_dir: &Path, network: &str) -> bool {
        data_dir.join(network).is_dir()
    }

    /// Opens (creating) `<data_dir>/<network>`, takes its lock and loads the index.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, IpamError> {
        let dir = data_dir.join(network);
        fs::DirBuilder::new().recursive(true).mode(0o755).create(&dir).map_err(io_ctx("creating", &dir))?;
        let lock_path = dir.join("lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&lock_path)
            .map_err(io_ctx("opening", &lock_path))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| IpamError::store(format!("locking {}", lock_path.display()), e.into()))?;
        let mut s = Store {
            dir,
            _lock: lock,
            leases: BTreeMap::new(),
            on_disk: None,
            stale: false,
            boot_id: boot_id(),
        };
        s.load()?;
        Ok(s)
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join(INDEX_DIR).join(INDEX_FILE)
    }

    fn load(&mut self) -> Result<(), IpamError> {
        let Some(idx) = read_index(&self.index_path()) else {
            return self.rescan();
        };
        self.on_disk = Some(idx.leases.clone());
        if !idx.boot.is_empty() && !self.boot_id.is_empty() && idx.boot != self.boot_id {
            self.reclaim_earlier_boot(&idx.leases);
            self.stale = true;
            return self.rescan();
        }
        if dir_stamp(&self.dir).ok().as_deref() != Some(idx.stamp.as_str()) {
            return self.rescan();
        }
        self.leases = idx.leases;
        Ok(())
    }

    /// Removes the leases an index from an earlier boot lists, where the lease file still
    /// says the same attachment (another writer may have reused the address since).
    fn reclaim_earlier_boot(&mut self, old: &BTreeMap<IpAddr, Lease>) {
        for (ip, lease) in old {
            let p = self.dir.join(ip.to_string());
            let Ok(content) = fs::read_to_string(&p) else {
                continue;
            };
            if Lease::parse(&content) == *lease {
                match fs::remove_file(&p) {
                    Ok(()) => eprintln!(
                        "cni-host-local: reclaimed {ip} of {}/{}: leased before the last reboot",
                        lease.id, lease.ifname
                    ),
                    Err(e) => eprintln!("cni-host-local: cannot reclaim {}: {e}", p.display()),
                }
            }
        }
    }

    /// Rebuilds the index from the lease files (what the reference does on every call).
    pub fn rescan(&mut self) -> Result<(), IpamError> {
        let mut leases = BTreeMap::new();
        for ent in fs::read_dir(&self.dir).map_err(io_ctx("reading", &self.dir))? {
            let ent = ent.map_err(io_ctx("reading", &self.dir))?;
            let Some(ip) = ent.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
                continue;
            };
            if !ent.file_type().map(|t| t.is_file()).unwrap_or(false) {
                continue;
            }
            if let Ok(content) = fs::read_to_string(ent.path()) {
                leases.insert(ip, Lease::parse(&content));
            }
        }
        self.leases = leases;
        self.stale = true;
        Ok(())
    }

    /// Every lease.
    pub fn leases(&self) -> &BTreeMap<IpAddr, Lease> {
        &self.leases
    }

    /// The addresses held by (id, ifname); failing those, by a legacy lease of id alone.
    pub fn lookup(&self, id: &str, ifname: &str) -> Vec<IpAddr> {
        let by = |want: &str| -> Vec<IpAddr> {
            self.leases.iter().filter(|(_, l)| l.id == id && l.ifname == want).map(|(ip, _)| *ip).collect()
        };
        let exact = by(ifname);
        if exact.is_empty() {
            by("")
        } else {
            exact
        }
    }

    /// Whether `ip` is leased.
    pub fn is_leased(&self, ip: IpAddr) -> bool {
        self.leases.contains_key(&ip)
    }

    /// Creates the lease file for `ip` if no one holds it; `false` if someone does.
    pub fn reserve(&mut self, ip: IpAddr, id: &str, ifname: &str) -> Result<bool, IpamError> {
        if self.leases.contains_key(&ip) {
            return Ok(false);
        }
        let p = self.dir.join(ip.to_string());
        let mut f = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_ctx("creating", &p)(e)),
        };
        if let Err(e) = f.write_all(format!("{}\r\n{}", id.trim(), ifname).as_bytes()) {
            let _ = fs::remove_file(&p);
            return Err(io_ctx("writing", &p)(e));
        }
        self.leases.insert(ip, Lease { id: id.trim().to_string(), ifname: ifname.to_string() });
        Ok(true)
    }

    /// Removes the lease of `ip` (already gone is fine).
    pub fn release(&mut self, ip: IpAddr) -> Result<(), IpamError> {
        let p = self.dir.join(ip.to_string());
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_ctx("removing", &p)(e)),
        }
        self.leases.remove(&ip);
        Ok(())
    }

    fn last_path(&self, set: usize) -> PathBuf {
        self.dir.join(format!("{LAST_PREFIX}{set}"))
    }

    /// The raw round-robin cursor of range set `set`, if any.
    pub fn last_reserved_raw(&self, set: usize) -> Option<String> {
        fs::read_to_string(self.last_path(set)).ok()
    }

    /// The round-robin cursor of range set `set`.
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        self.last_reserved_raw(set).and_then(|s| s.trim().parse().ok())
    }

    /// Sets (or with `None` removes) the cursor of range set `set`.
    pub fn set_last_reserved(&mut self, set: usize, value: Option<&str>) -> Result<(), IpamError> {
        let p = self.last_path(set);
        match value {
            Some(v) => overwrite(&p, v.as_bytes(), 0o600),
            None => match fs::remove_file(&p) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io_ctx("removing", &p)(e)),
                _ => Ok(()),
            },
        }
    }

    /// Writes the index back if it changed (the lock is still held).
    pub fn commit(&mut self) -> Result<(), IpamError> {
        if !self.stale && self.on_disk.as_ref() == Some(&self.leases) {
            return Ok(());
        }
        let idx_dir = self.dir.join(INDEX_DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&idx_dir)
            .map_err(io_ctx("creating", &idx_dir))?;
        // Stamp after every change to the network directory, before writing inside the index
        // directory (which does not touch the network directory).
        let stamp = dir_stamp(&self.dir).map_err(io_ctx("reading", &self.dir))?;
        let mut text = format!("{INDEX_MAGIC}\nboot {}\nstamp {stamp}\n", self.boot_id);
        for (ip, l) in &self.leases {
            if l.ifname.is_empty() {
                text.push_str(&format!("lease {ip} {}\n", l.id));
            } else {
                text.push_str(&format!("lease {ip} {} {}\n", l.id, l.ifname));
            }
        }
        text.push_str(&format!("end {}\n", self.leases.len()));
        // In place, not temp-and-rename: a torn write lacks the end line and is rebuilt
        // from the lease files on the next call.
        overwrite(&idx_dir.join(INDEX_FILE), text.as_bytes(), 0o600)?;
        self.on_disk = Some(self.leases.clone());
        self.stale = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lease_files_are_byte_compatible() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path(), "net").unwrap();
        assert!(s.reserve(ip("10.0.0.2"), "abc", "eth0").unwrap());
        assert!(!s.reserve(ip("10.0.0.2"), "other", "eth0").unwrap());
        s.set_last_reserved(0, Some("10.0.0.2")).unwrap();
        s.commit().unwrap();
        let p = t.path().join("net/10.0.0.2");
        assert_eq!(fs::read(&p).unwrap(), b"abc\r\neth0");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read(t.path().join("net/last_reserved_ip.0")).unwrap(), b"10.0.0.2");
        assert!(t.path().join("net/lock").exists());
    }

    #[test]
    fn index_is_trusted_until_another_writer_changes_the_directory() {
        let t = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(t.path(), "net").unwrap();
            s.reserve(ip("10.0.0.2"), "a", "eth0").unwrap();
            s.commit().unwrap();
        }
        // A foreign writer (the reference plugin) adds a lease behind the index's back.
        fs::write(t.path().join("net/10.0.0.3"), "b\r\neth0").unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.lookup("b", "eth0"), vec![ip("10.0.0.3")]);
        assert_eq!(s.lookup("a", "eth0"), vec![ip("10.0.0.2")]);
    }

    #[test]
    fn a_torn_index_is_rebuilt_from_the_lease_files() {
        let t = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(t.path(), "net").unwrap();
            s.reserve(ip("10.0.0.2"), "a", "eth0").unwrap();
            s.reserve(ip("10.0.0.3"), "b", "eth0").unwrap();
            s.commit().unwrap();
        }
        let idx = t.path().join("net").join(INDEX_DIR).join(INDEX_FILE);
        let text = fs::read_to_string(&idx).unwrap();
        assert!(text.ends_with("end 2\n"), "{text}");
        // A write cut short after the first lease: still a valid-looking prefix.
        let cut = &text[..text.find("lease 10.0.0.3").unwrap()];
        fs::write(&idx, cut).unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.lookup("b", "eth0"), vec![ip("10.0.0.3")], "the torn index was trusted");
    }

    #[test]
    fn legacy_id_only_leases_match_any_interface() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("net")).unwrap();
        fs::write(t.path().join("net/10.0.0.9"), "old\n").unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.lookup("old", "eth1"), vec![ip("10.0.0.9")]);
    }

    #[test]
    fn leases_from_an_earlier_boot_are_reclaimed_others_kept() {
        let t = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(t.path(), "net").unwrap();
            s.reserve(ip("10.0.0.2"), "a", "eth0").unwrap();
            s.commit().unwrap();
        }
        let idx = t.path().join("net").join(INDEX_DIR).join(INDEX_FILE);
        let text = fs::read_to_string(&idx).unwrap();
        let earlier =
            text.replace(&format!("boot {}", boot_id()), "boot 00000000-0000-0000-0000-000000000000");
        assert_ne!(text, earlier, "the index records the boot id");
        fs::write(&idx, earlier).unwrap();
        // A lease the index does not list (another writer's) is not ours to judge.
        fs::write(t.path().join("net/10.0.0.7"), "x\r\neth0").unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert!(s.lookup("a", "eth0").is_empty());
        assert!(!t.path().join("net/10.0.0.2").exists());
        assert_eq!(s.lookup("x", "eth0"), vec![ip("10.0.0.7")]);
    }
}
