//! The lease store, byte-compatible with the reference host-local:
//! `<dataDir>/<network>/<ip>` holds `<containerid>\r\n<ifname>` (mode 0600),
//! `last_reserved_ip.<set>` the round-robin cursor, and `lock` is taken with flock.
//!
//! Beside those, `.cni-index/leases` maps every address to its attachment so DEL and CHECK
//! read one file instead of every lease. The index records the network directory's
//! inode/mtime/ctime as it was after our last change: any other writer (the reference
//! plugin) creating or removing a lease changes them, and the index is rebuilt from the
//! lease files. A change in the same clock tick as our commit leaves them unchanged, so the
//! index is trusted outright only when it was written in a later tick than the directory's
//! last change; otherwise (nearly every call after a change) the lease files changed since
//! the index was written, by their change time, are read and compared. It also records the
//! kernel's boot id: leases it lists from an earlier boot belong to namespaces that no longer
//! exist and are reclaimed.
//!
//! Everything inside the network directory is opened relative to the directory's descriptor
//! and without following symbolic links: a link planted there would otherwise make a root
//! process write wherever it points.
//!
//! The lease file format is in lease.rs, the index format in index.rs, directory access in
//! dir.rs; this file keeps the locked store and what the allocator needs of it ([`Leases`]).

mod dir;
mod index;
mod lease;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

pub use dir::{boot_id, read_leases};
pub use index::{parse_index, render_index, IndexFile};
pub use lease::Lease;

use crate::error::IpamError;
use dir::{io_ctx, open_at, open_err, overwrite, read_regular, scan, stamp_of, unchanged_since};
use index::INDEX_MAGIC;

const INDEX_DIR: &str = ".cni-index";
const INDEX_FILE: &str = "leases";
const LAST_PREFIX: &str = "last_reserved_ip.";

/// One network's leases, locked for as long as this value lives.
pub struct Store {
    /// The network directory's path, for messages only: every access goes through `dir`.
    path: PathBuf,
    dir: File,
    _lock: Flock<File>,
    leases: BTreeMap<IpAddr, Lease>,
    /// The index as it is on disk; written back only when `leases` differs or `stale`.
    on_disk: Option<BTreeMap<IpAddr, Lease>>,
    /// The index file, when it was found intact: marked before our first change.
    index: Option<File>,
    marked: bool,
    stale: bool,
    boot_id: String,
}

impl Store {
    /// Whether the network's directory exists (DEL and GC of a network never used write nothing).
    pub fn exists(data_dir: &Path, network: &str) -> bool {
        fs::symlink_metadata(data_dir.join(network)).is_ok()
    }

    /// Opens (creating) `<data_dir>/<network>`, takes its lock and loads the index.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, IpamError> {
        let path = data_dir.join(network);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(data_dir)
            .map_err(io_ctx("creating", data_dir))?;
        let top = File::open(data_dir).map_err(io_ctx("opening", data_dir))?;
        match mkdirat(&top, network, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(open_err("creating", &path, e)),
        }
        let dir = open_at(&top, network, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)
            .map_err(|e| open_err("opening", &path, e))?;
        let lock_path = path.join("lock");
        let lock_file = open_at(&dir, "lock", OFlag::O_RDWR | OFlag::O_CREAT, 0o644)
            .map_err(|e| open_err("opening", &lock_path, e))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| IpamError::store(format!("locking {}", lock_path.display()), e.into()))?;
        let mut store = Store {
            path,
            dir,
            _lock: lock,
            leases: BTreeMap::new(),
            on_disk: None,
            index: None,
            marked: false,
            stale: false,
            boot_id: boot_id(),
        };
        store.load()?;
        Ok(store)
    }

    fn index_path(&self) -> PathBuf {
        self.path.join(INDEX_DIR).join(INDEX_FILE)
    }

    /// The index file opened for reading and writing, if it is a regular file reached
    /// without links.
    fn open_index(&self) -> Option<(File, Vec<u8>)> {
        let idx_dir = open_at(&self.dir, INDEX_DIR, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0).ok()?;
        // Read-only where it cannot be written (CHECK on a read-only filesystem still works;
        // a change then fails when marking the index).
        let mut file = open_at(&idx_dir, INDEX_FILE, OFlag::O_RDWR, 0)
            .or_else(|_| open_at(&idx_dir, INDEX_FILE, OFlag::O_RDONLY, 0))
            .ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).ok()?;
        Some((file, buf))
    }

    fn load(&mut self) -> Result<(), IpamError> {
        let opened = self.open_index();
        let parsed = opened.as_ref().and_then(|(_, b)| std::str::from_utf8(b).ok()).and_then(parse_index);
        let (Some((file, _)), Some(idx)) = (opened, parsed) else {
            if fs::symlink_metadata(self.path.join(INDEX_DIR)).is_ok() {
                eprintln!(
                    "cni-host-local: {} is damaged or incomplete; rebuilding it from the lease files",
                    self.index_path().display()
                );
            }
            return self.rescan();
        };
        self.index = Some(file);
        self.on_disk = Some(idx.leases.clone());
        if !idx.boot.is_empty() && !self.boot_id.is_empty() && idx.boot != self.boot_id {
            // Only an intact index (the checksum held) says which leases predate the reboot.
            self.reclaim_earlier_boot(&idx.leases)?;
            return self.rescan();
        }
        if stamp_of(&self.dir).ok().as_deref() != Some(idx.stamp.as_str()) {
            return self.rescan();
        }
        match self.index_written_after_dir() {
            Some((true, _)) => {}
            // The index was written in the tick of the directory's last change (a commit
            // follows its own change by microseconds, so nearly every call after a change).
            Some((false, written)) if unchanged_since(&self.dir, &self.path, &idx.leases, written) => {}
            _ => return self.rescan(),
        }
        self.leases = idx.leases;
        Ok(())
    }

    /// Whether the index was written in a later clock tick than the directory's last change,
    /// and when it was written. Another writer's change in the very tick of our commit leaves
    /// the directory's stamp as the index recorded it; only an index written in a later tick
    /// proves that the stamp covers every change since. Equal times count as not covered: the
    /// lease files changed since the index was written are then read ([`unchanged_since`]).
    fn index_written_after_dir(&self) -> Option<(bool, (i64, i64))> {
        let (Some(index), Ok(dir)) = (&self.index, self.dir.metadata()) else { return None };
        let index = index.metadata().ok()?;
        let written = (index.mtime(), index.mtime_nsec());
        Some((written > (dir.ctime(), dir.ctime_nsec()), written))
    }

    /// Makes the on-disk index fail its checksum before the first change of this call, so a
    /// call killed between that change and [`Store::commit`] leaves an index the next call
    /// rebuilds (the directory's timestamps alone can miss a change made in the same clock tick).
    fn before_change(&mut self) -> Result<(), IpamError> {
        if let (Some(f), false) = (&self.index, self.marked) {
            f.write_all_at(b"#", 0).map_err(io_ctx("marking", &self.index_path()))?;
            self.marked = true;
            self.stale = true;
            cni_proto::crash_point("ipam-index-marked");
        }
        Ok(())
    }

    /// After a failed call has undone its changes: unmarks the index if it again lists exactly
    /// the leases there are, so the failed call leaves the directory's files as they were
    /// (the directory's stamp has changed, so the next call still checks the lease files).
    pub fn abandon(&mut self) {
        if let (Some(f), true) = (&self.index, self.marked) {
            if self.on_disk.as_ref() == Some(&self.leases)
                && f.write_all_at(&INDEX_MAGIC.as_bytes()[..1], 0).is_ok()
            {
                self.marked = false;
            }
        }
    }

    fn read_lease(&self, name: &str) -> Result<Option<Vec<u8>>, Errno> {
        read_regular(&self.dir, name)
    }

    fn unlink(&mut self, name: &str) -> Result<(), IpamError> {
        self.before_change()?;
        match unlinkat(&self.dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(open_err("removing", &self.path.join(name), e)),
        }
    }

    /// Removes a torn lease (see [`Lease::parse`]), saying so on stderr.
    fn reclaim_torn(&mut self, ip: IpAddr) -> Result<(), IpamError> {
        self.unlink(&ip.to_string())?;
        eprintln!("cni-host-local: reclaimed {ip}: its lease file was empty or torn (a writer was killed)");
        Ok(())
    }

    /// Removes the leases an index from an earlier boot lists, where the lease file still
    /// says the same attachment (another writer may have reused the address since).
    fn reclaim_earlier_boot(&mut self, old: &BTreeMap<IpAddr, Lease>) -> Result<(), IpamError> {
        for (ip, lease) in old {
            let name = ip.to_string();
            let Ok(Some(content)) = self.read_lease(&name) else {
                continue;
            };
            if Lease::parse(&content).as_ref() == Some(lease) {
                self.unlink(&name)?;
                eprintln!(
                    "cni-host-local: reclaimed {ip} of {}/{}: leased before the last reboot",
                    lease.id, lease.ifname
                );
            }
        }
        Ok(())
    }

    /// Rebuilds the index from the lease files (what the reference does on every call),
    /// reclaiming torn ones.
    pub fn rescan(&mut self) -> Result<(), IpamError> {
        let (leases, torn) = scan(&self.dir, &self.path)?;
        self.leases = leases;
        self.stale = true;
        for ip in torn {
            self.reclaim_torn(ip)?;
        }
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
        self.before_change()?;
        let name = ip.to_string();
        let path = self.path.join(&name);
        let create = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
        let file = match open_at(&self.dir, &name, create, 0o600) {
            Ok(file) => file,
            Err(Errno::EEXIST) => {
                // A file the index did not list: learn it, or reclaim it when torn.
                match self.read_lease(&name) {
                    Ok(Some(content)) => match Lease::parse(&content) {
                        Some(lease) => {
                            self.leases.insert(ip, lease);
                            return Ok(false);
                        }
                        None => self.reclaim_torn(ip)?,
                    },
                    Ok(None) => {}
                    Err(_) => return Ok(false),
                }
                match open_at(&self.dir, &name, create, 0o600) {
                    Ok(file) => file,
                    Err(Errno::EEXIST) => return Ok(false),
                    Err(e) => return Err(open_err("creating", &path, e)),
                }
            }
            Err(e) => return Err(open_err("creating", &path, e)),
        };
        cni_proto::crash_point("ipam-lease-created");
        if let Err(e) = file.write_all_at(Lease::render(id, ifname).as_bytes(), 0) {
            let _ = unlinkat(&self.dir, name.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(io_ctx("writing", &path)(e));
        }
        cni_proto::crash_point("ipam-lease-written");
        self.leases.insert(ip, Lease { id: id.trim().to_string(), ifname: ifname.to_string() });
        Ok(true)
    }

    /// Removes the lease of `ip` (already gone is fine) if its file still names the holder we
    /// know. The index can be behind a change another writer made within one tick of the
    /// directory's clock (the reference releasing it and leasing it to another pod): then
    /// the file is learnt instead of removed, which would give a live pod's address away.
    pub fn release(&mut self, ip: IpAddr) -> Result<(), IpamError> {
        if !self.confirm(ip) {
            return Ok(());
        }
        self.unlink(&ip.to_string())?;
        cni_proto::crash_point("ipam-lease-removed");
        self.leases.remove(&ip);
        Ok(())
    }

    /// Whether the lease file of `ip` still names the holder the index says; if it names
    /// another, the index learns it (and is rewritten on commit). A file that is gone or torn
    /// does not contradict the index.
    pub fn confirm(&mut self, ip: IpAddr) -> bool {
        let Ok(Some(content)) = self.read_lease(&ip.to_string()) else {
            return true;
        };
        match Lease::parse(&content) {
            Some(actual) if self.leases.get(&ip) != Some(&actual) => {
                self.stale = true;
                self.leases.insert(ip, actual);
                false
            }
            _ => true,
        }
    }

    /// The raw round-robin cursor of range set `set`, if any.
    pub fn last_reserved_raw(&self, set: usize) -> Result<Option<String>, IpamError> {
        let name = format!("{LAST_PREFIX}{set}");
        match read_regular(&self.dir, &name) {
            Ok(v) => Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned())),
            Err(e) => Err(open_err("reading", &self.path.join(name), e)),
        }
    }

    /// The round-robin cursor of range set `set`.
    pub fn last_reserved(&self, set: usize) -> Result<Option<IpAddr>, IpamError> {
        Ok(self.last_reserved_raw(set)?.and_then(|s| s.trim().parse().ok()))
    }

    /// Sets (or with `None` removes) the cursor of range set `set`.
    pub fn set_last_reserved(&mut self, set: usize, value: Option<&str>) -> Result<(), IpamError> {
        let name = format!("{LAST_PREFIX}{set}");
        let path = self.path.join(&name);
        match value {
            Some(v) => {
                let file = open_at(&self.dir, &name, OFlag::O_WRONLY | OFlag::O_CREAT, 0o600)
                    .map_err(|e| open_err("opening", &path, e))?;
                overwrite(&file, v.as_bytes()).map_err(io_ctx("writing", &path))?;
                cni_proto::crash_point("ipam-cursor-written");
                Ok(())
            }
            None => match unlinkat(&self.dir, name.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(open_err("removing", &path, e)),
            },
        }
    }

    /// The index directory, replacing whatever else (a file, a link) holds its name: the
    /// index is a cache, so a damaged one is repaired rather than refused.
    fn index_dir(&self) -> Result<File, IpamError> {
        let path = self.path.join(INDEX_DIR);
        for _ in 0..2 {
            match mkdirat(&self.dir, INDEX_DIR, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(open_err("creating", &path, e)),
            }
            match open_at(&self.dir, INDEX_DIR, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0) {
                Ok(f) => return Ok(f),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    eprintln!("cni-host-local: {} is not a directory; replacing it", path.display());
                    unlinkat(&self.dir, INDEX_DIR, UnlinkatFlags::NoRemoveDir)
                        .map_err(|e| open_err("removing", &path, e))?;
                }
                Err(e) => return Err(open_err("opening", &path, e)),
            }
        }
        Err(IpamError::store(format!("creating {}", path.display()), ErrorKind::AlreadyExists.into()))
    }

    fn index_file(&self) -> Result<File, IpamError> {
        let path = self.index_path();
        let idx_dir = self.index_dir()?;
        for _ in 0..2 {
            match open_at(&idx_dir, INDEX_FILE, OFlag::O_RDWR | OFlag::O_CREAT, 0o600) {
                Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => return Ok(f),
                Ok(_) | Err(Errno::ELOOP | Errno::EISDIR) => {
                    eprintln!("cni-host-local: {} is not a regular file; replacing it", path.display());
                    let gone = match unlinkat(&idx_dir, INDEX_FILE, UnlinkatFlags::NoRemoveDir) {
                        Err(Errno::EISDIR) => fs::remove_dir_all(&path),
                        other => other.map_err(std::io::Error::from),
                    };
                    gone.map_err(io_ctx("removing", &path))?;
                }
                Err(e) => return Err(open_err("opening", &path, e)),
            }
        }
        Err(IpamError::store(format!("creating {}", path.display()), ErrorKind::AlreadyExists.into()))
    }

    /// Writes the index back if it changed (the lock is still held).
    pub fn commit(&mut self) -> Result<(), IpamError> {
        if !self.stale && self.on_disk.as_ref() == Some(&self.leases) {
            return Ok(());
        }
        // The index read at open is written in place; otherwise opening may create
        // `.cni-index`, which changes the network directory: stamp after.
        let file = match self.index.take() {
            Some(file) => file,
            None => self.index_file()?,
        };
        let stamp = stamp_of(&self.dir).map_err(io_ctx("reading", &self.path))?;
        let text =
            render_index(&IndexFile { boot: self.boot_id.clone(), stamp, leases: self.leases.clone() });
        // In place, not temp-and-rename: a torn write fails the checksum and is rebuilt from
        // the lease files on the next call.
        overwrite(&file, text.as_bytes()).map_err(io_ctx("writing", &self.index_path()))?;
        cni_proto::crash_point("ipam-index-written");
        self.on_disk = Some(self.leases.clone());
        self.index = Some(file);
        self.marked = false;
        self.stale = false;
        Ok(())
    }
}

/// What the allocator needs of a store, as the reference's `backend.Store` interface: the
/// locked directory ([`Store`]) in the plugin, a map in the allocator's tests.
pub trait Leases {
    /// The addresses held by (id, ifname); failing those, by a legacy lease of id alone.
    fn lookup(&self, id: &str, ifname: &str) -> Vec<IpAddr>;
    /// Whether `ip` is leased.
    fn is_leased(&self, ip: IpAddr) -> bool;
    /// Leases `ip` to (id, ifname); `false` when it is taken.
    fn reserve(&mut self, ip: IpAddr, id: &str, ifname: &str) -> Result<bool, IpamError>;
    /// Frees `ip`.
    fn release(&mut self, ip: IpAddr) -> Result<(), IpamError>;
    /// The round-robin cursor of range set `set`.
    fn last_reserved(&self, set: usize) -> Result<Option<IpAddr>, IpamError>;
    /// Moves (or, with `None`, removes) the cursor of range set `set`.
    fn set_last_reserved(&mut self, set: usize, value: Option<&str>) -> Result<(), IpamError>;
}

impl Leases for Store {
    fn lookup(&self, id: &str, ifname: &str) -> Vec<IpAddr> {
        Store::lookup(self, id, ifname)
    }
    fn is_leased(&self, ip: IpAddr) -> bool {
        Store::is_leased(self, ip)
    }
    fn reserve(&mut self, ip: IpAddr, id: &str, ifname: &str) -> Result<bool, IpamError> {
        Store::reserve(self, ip, id, ifname)
    }
    fn release(&mut self, ip: IpAddr) -> Result<(), IpamError> {
        Store::release(self, ip)
    }
    fn last_reserved(&self, set: usize) -> Result<Option<IpAddr>, IpamError> {
        Store::last_reserved(self, set)
    }
    fn set_last_reserved(&mut self, set: usize, value: Option<&str>) -> Result<(), IpamError> {
        Store::set_last_reserved(self, set, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Another writer (the reference host-local) adds a lease in the same clock tick as our
    /// last index commit: the directory's stamp is then the one the index recorded. Made
    /// deterministic by hand: the index rewritten with the directory's stamp after the foreign
    /// lease, and its own time set to the directory's change time (the same tick).
    #[test]
    fn a_foreign_lease_written_in_the_tick_of_our_commit_is_seen() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path(), "net").unwrap();
        assert!(s.reserve(ip("10.0.0.2"), "ours", "eth0").unwrap());
        s.commit().unwrap();
        drop(s);
        let net = t.path().join("net");
        fs::write(net.join("10.0.0.3"), Lease::render("theirs", "eth0")).unwrap();
        let dir = File::open(&net).unwrap();
        let index_path = net.join(INDEX_DIR).join(INDEX_FILE);
        let mut idx = parse_index(&fs::read_to_string(&index_path).unwrap()).unwrap();
        idx.stamp = stamp_of(&dir).unwrap();
        fs::write(&index_path, render_index(&idx)).unwrap();
        index_in_the_dirs_tick(&net);
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.lookup("theirs", "eth0"), [ip("10.0.0.3")], "the foreign lease, for DEL and CHECK");
        assert_eq!(s.lookup("ours", "eth0"), [ip("10.0.0.2")]);
    }

    /// Sets the index's modification time to the directory's change time: the index written
    /// in the tick of the directory's last change, made deterministic.
    fn index_in_the_dirs_tick(net: &Path) {
        let meta = File::open(net).unwrap().metadata().unwrap();
        let ctime =
            std::time::UNIX_EPOCH + std::time::Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32);
        let index_path = net.join(INDEX_DIR).join(INDEX_FILE);
        File::options().write(true).open(index_path).unwrap().set_modified(ctime).unwrap();
    }

    /// The next call after a commit in the tick of its own change (nearly every call) trusts
    /// the index once the lease files are as it says, without reading them all.
    #[test]
    fn an_index_written_in_the_tick_of_its_change_is_trusted_when_the_files_agree() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path(), "net").unwrap();
        assert!(s.reserve(ip("10.0.0.2"), "a", "eth0").unwrap());
        assert!(s.reserve(ip("10.0.0.3"), "b", "eth0").unwrap());
        s.commit().unwrap();
        drop(s);
        index_in_the_dirs_tick(&t.path().join("net"));
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.index_written_after_dir().map(|(after, _)| after), Some(false), "the tick is ambiguous");
        assert!(!s.stale, "rescanned though nothing changed");
        assert_eq!(s.lookup("b", "eth0"), [ip("10.0.0.3")]);
    }

    /// Another writer's change in the tick of our commit that keeps the names (a lease
    /// removed and made again for someone else, or rewritten) is seen as well.
    #[test]
    fn a_lease_replaced_in_the_tick_of_our_commit_is_seen() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path(), "net").unwrap();
        assert!(s.reserve(ip("10.0.0.2"), "ours", "eth0").unwrap());
        s.commit().unwrap();
        drop(s);
        let net = t.path().join("net");
        index_in_the_dirs_tick(&net);
        fs::write(net.join("10.0.0.2"), Lease::render("theirs", "eth0")).unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.lookup("theirs", "eth0"), [ip("10.0.0.2")]);
        assert!(s.lookup("ours", "eth0").is_empty());
    }

    /// What `cni-bridge doctor` sees: the files as they are, a torn one as torn (not an owner
    /// "abc\r" as a split on "\r\n" made of it), nothing written, no lock taken.
    #[test]
    fn read_leases_reads_without_changing_anything() {
        let t = tempfile::tempdir().unwrap();
        assert!(read_leases(t.path(), "net").unwrap().is_empty(), "no directory: no leases");
        let net = t.path().join("net");
        fs::create_dir(&net).unwrap();
        fs::write(net.join("10.0.0.2"), Lease::render("abc", "eth0")).unwrap();
        fs::write(net.join("10.0.0.3"), "legacy").unwrap();
        fs::write(net.join("10.0.0.4"), b"abc\r\n\0\0").unwrap();
        let got = read_leases(t.path(), "net").unwrap();
        assert_eq!(got[&ip("10.0.0.2")], Some(Lease { id: "abc".into(), ifname: "eth0".into() }));
        assert_eq!(got[&ip("10.0.0.3")], Some(Lease { id: "legacy".into(), ifname: String::new() }));
        assert_eq!(got[&ip("10.0.0.4")], None);
        let mut names: Vec<_> = fs::read_dir(&net).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["10.0.0.2", "10.0.0.3", "10.0.0.4"]);
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
        assert!(parse_index(&text).is_some(), "{text}");
        // A write cut short at any byte is never trusted.
        for cut in 0..text.len() {
            assert!(parse_index(&text[..cut]).is_none(), "trusted a cut at {cut}: {:?}", &text[..cut]);
        }
        let cut = &text[..text.find("lease 10.0.0.3").unwrap()];
        fs::write(&idx, cut).unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.lookup("b", "eth0"), vec![ip("10.0.0.3")], "the torn index was trusted");
    }

    #[test]
    fn an_edited_index_fails_its_checksum() {
        let mut leases = BTreeMap::new();
        leases.insert(ip("10.0.0.2"), Lease { id: "a".into(), ifname: "eth0".into() });
        leases.insert(ip("10.0.0.3"), Lease { id: "b".into(), ifname: "eth0".into() });
        let idx = IndexFile { boot: "b00t".into(), stamp: "1 2.3 4.5".into(), leases };
        let text = render_index(&idx);
        assert_eq!(parse_index(&text).as_ref(), Some(&idx));
        let one_char = text.replacen("b00t", "b01t", 1);
        assert!(parse_index(&one_char).is_none());
        let dropped = text.replace("lease 10.0.0.3 b eth0\n", "").replace("end 2 ", "end 1 ");
        assert_ne!(dropped, text);
        assert!(parse_index(&dropped).is_none());
        // The end line exactly as rendered (found by the property test: a checksum digit
        // changed from `f` to `F` parsed to the same number).
        let (body, end) = text.split_at(text.rfind("end ").unwrap());
        let sum = end.split(' ').nth(2).unwrap().trim_end();
        assert!(parse_index(&format!("{body}end 2 {}\n", sum.to_uppercase())).is_none());
        assert!(parse_index(&format!("{body}end 02 {sum}\n")).is_none());
        assert!(parse_index(&format!("{body}end +2 {sum}\n")).is_none());
    }

    #[test]
    fn foreign_ids_with_spaces_survive_the_index() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("net")).unwrap();
        fs::write(t.path().join("net/10.0.0.9"), "odd id\r\nif 0").unwrap();
        fs::write(t.path().join("net/10.0.0.8"), "50%").unwrap();
        Store::open(t.path(), "net").unwrap().commit().unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.lookup("odd id", "if 0"), vec![ip("10.0.0.9")]);
        assert_eq!(s.lookup("50%", "eth0"), vec![ip("10.0.0.8")]);
    }

    #[test]
    fn torn_leases_are_reclaimed_under_the_lock() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("net")).unwrap();
        fs::write(t.path().join("net/10.0.0.2"), "").unwrap();
        fs::write(t.path().join("net/10.0.0.3"), b"\0\0\0\0").unwrap();
        fs::write(t.path().join("net/10.0.0.4"), "live\r\neth0").unwrap();
        let mut s = Store::open(t.path(), "net").unwrap();
        assert!(!t.path().join("net/10.0.0.2").exists() && !t.path().join("net/10.0.0.3").exists());
        assert_eq!(s.lookup("live", "eth0"), vec![ip("10.0.0.4")]);
        s.commit().unwrap();
        drop(s);
        // One torn behind a trusted index (killed in the same clock tick as the last commit).
        fs::write(t.path().join("net/10.0.0.5"), "").unwrap();
        let mut s = Store::open(t.path(), "net").unwrap();
        assert!(s.reserve(ip("10.0.0.5"), "new", "eth0").unwrap(), "the torn lease blocked its address");
        assert_eq!(fs::read(t.path().join("net/10.0.0.5")).unwrap(), b"new\r\neth0");
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
        let mut parsed = parse_index(&fs::read_to_string(&idx).unwrap()).unwrap();
        assert_eq!(parsed.boot, boot_id(), "the index records the boot id");
        parsed.boot = "00000000-0000-0000-0000-000000000000".into();
        fs::write(&idx, render_index(&parsed)).unwrap();
        // A lease the index does not list (another writer's) is not ours to judge.
        fs::write(t.path().join("net/10.0.0.7"), "x\r\neth0").unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert!(s.lookup("a", "eth0").is_empty());
        assert!(!t.path().join("net/10.0.0.2").exists());
        assert_eq!(s.lookup("x", "eth0"), vec![ip("10.0.0.7")]);
    }

    #[test]
    fn a_damaged_index_never_reclaims_after_a_reboot() {
        let t = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(t.path(), "net").unwrap();
            s.reserve(ip("10.0.0.2"), "a", "eth0").unwrap();
            s.commit().unwrap();
        }
        let idx = t.path().join("net").join(INDEX_DIR).join(INDEX_FILE);
        let text = fs::read_to_string(&idx).unwrap();
        let mut boot = boot_id().into_bytes();
        boot[0] = if boot[0] == b'0' { b'1' } else { b'0' };
        fs::write(&idx, text.replace(&boot_id(), std::str::from_utf8(&boot).unwrap())).unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.lookup("a", "eth0"), vec![ip("10.0.0.2")], "a live lease was reclaimed");
    }
}
