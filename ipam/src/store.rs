//! The lease store, byte-compatible with the reference host-local:
//! `<dataDir>/<network>/<ip>` holds `<containerid>\r\n<ifname>` (mode 0600),
//! `last_reserved_ip.<set>` the round-robin cursor, and `lock` is taken with flock.
//!
//! Beside those, `.cni-index/leases` maps every address to its attachment so DEL and CHECK
//! read one file instead of every lease. The index records the network directory's
//! inode/mtime/ctime as it was after our last change: any other writer (the reference
//! plugin) creating or removing a lease changes them, and the index is rebuilt from the
//! lease files. A change in the same clock tick as our commit leaves them unchanged, so the
//! index is trusted only when it was written in a later tick than the directory's last change. It also records the kernel's boot id: leases it lists from an earlier boot
//! belong to namespaces that no longer exist and are reclaimed.
//!
//! Everything inside the network directory is opened relative to the directory's descriptor
//! and without following symbolic links: a link planted there would otherwise make a root
//! process write wherever it points.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, Flock, FlockArg, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::error::IpamError;

const INDEX_DIR: &str = ".cni-index";
const INDEX_FILE: &str = "leases";
const INDEX_MAGIC: &str = "cni-host-local-index 2";
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
    /// Parses a lease file. `None` for a torn lease: empty (a writer killed between creating
    /// and writing it) or holding NUL bytes (unwritten blocks after a power loss). Every writer
    /// (ours and the reference) writes under the lock, so a torn lease seen under the lock is
    /// the remnant of a dead writer, not a write in progress.
    pub fn parse(content: &[u8]) -> Option<Lease> {
        if content.contains(&0) {
            return None;
        }
        let text = String::from_utf8_lossy(content);
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return None;
        }
        Some(match trimmed.split_once("\r\n") {
            Some((id, ifname)) => Lease { id: id.trim().to_string(), ifname: ifname.trim().to_string() },
            None => Lease { id: trimmed.to_string(), ifname: String::new() },
        })
    }

    /// The reference's lease file content.
    pub fn render(id: &str, ifname: &str) -> String {
        format!("{}\r\n{}", id.trim(), ifname)
    }
}

/// The index file's content: what [`render_index`] writes and [`parse_index`] accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFile {
    /// The kernel's boot id when it was written.
    pub boot: String,
    /// The network directory's stamp after the writer's last change.
    pub stamp: String,
    /// Every lease of the network, by address, as the index recorded it.
    pub leases: BTreeMap<IpAddr, Lease>,
}

/// 64-bit FNV-1a: detects accidental damage (an edited character, a dropped line) in a few
/// lines of code; the index is a cache, not a defence against someone who can write to it.
fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, data);
    std::hash::Hasher::finish(&h)
}

/// Field encoding for index lines: ids and interface names of foreign leases may hold spaces
/// or be empty, which would shift the fields of a space-separated line.
fn encode_field(field: &str) -> String {
    if field.is_empty() {
        return "%".into();
    }
    let mut out = String::with_capacity(field.len());
    for byte in field.bytes() {
        if byte <= b' ' || byte >= 0x7f || byte == b'%' {
            out.push_str(&format!("%{byte:02x}"));
        } else {
            out.push(byte as char);
        }
    }
    out
}

fn decode_field(field: &str) -> Option<String> {
    if field == "%" {
        return Some(String::new());
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut pos = 0;
    while pos < bytes.len() {
        if bytes[pos] == b'%' {
            let hex = field.get(pos + 1..pos + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            pos += 3;
        } else {
            out.push(bytes[pos]);
            pos += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The index file: a header, one line per lease, and `end <count> <checksum>` over everything
/// before the end line. A torn write or an edit anywhere fails the checksum.
pub fn render_index(idx: &IndexFile) -> String {
    let mut text =
        format!("{INDEX_MAGIC}\nboot {}\nstamp {}\n", encode_field(&idx.boot), encode_field(&idx.stamp));
    for (ip, l) in &idx.leases {
        text.push_str(&format!("lease {ip} {} {}\n", encode_field(&l.id), encode_field(&l.ifname)));
    }
    let sum = fnv1a64(text.as_bytes());
    text.push_str(&format!("end {} {sum:016x}\n", idx.leases.len()));
    text
}

/// Parses an index file; `None` unless it is complete and intact.
pub fn parse_index(text: &str) -> Option<IndexFile> {
    let body_len = text.strip_suffix('\n')?.rfind('\n')? + 1;
    let (body, end) = text.split_at(body_len);
    let mut end_fields = end.strip_suffix('\n')?.split(' ');
    if end_fields.next()? != "end" {
        return None;
    }
    // Exactly as rendered: `F` for `f` or `01` for `1` would parse to the same numbers.
    let (count_field, sum_field) = (end_fields.next()?, end_fields.next()?);
    let count: usize = count_field.parse().ok()?;
    let sum = fnv1a64(body.as_bytes());
    if end_fields.next().is_some() || count_field != count.to_string() || sum_field != format!("{sum:016x}") {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != INDEX_MAGIC {
        return None;
    }
    let boot = decode_field(lines.next()?.strip_prefix("boot ")?)?;
    let stamp = decode_field(lines.next()?.strip_prefix("stamp ")?)?;
    let mut leases = BTreeMap::new();
    for line in lines {
        let mut fields = line.split(' ');
        if fields.next()? != "lease" {
            return None;
        }
        let ip: IpAddr = fields.next()?.parse().ok()?;
        let id = decode_field(fields.next()?)?;
        let ifname = decode_field(fields.next()?)?;
        if fields.next().is_some() || leases.insert(ip, Lease { id, ifname }).is_some() {
            return None;
        }
    }
    (leases.len() == count).then_some(IndexFile { boot, stamp, leases })
}

/// What `openat` did not open, said so that an operator knows what to fix.
fn open_err(what: &str, path: &Path, errno: Errno) -> IpamError {
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

fn io_ctx(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> IpamError {
    let ctx = format!("{what} {}", path.display());
    move |e| IpamError::store(ctx, e)
}

fn stamp_of(dir: &File) -> std::io::Result<String> {
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
fn nofollow() -> OFlag {
    OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK
}

fn open_at(dir: impl AsFd, name: &str, flags: OFlag, mode: u32) -> Result<File, Errno> {
    openat(dir, name, flags | nofollow(), Mode::from_bits_truncate(mode)).map(File::from)
}

/// Reads a regular file opened without following links; `Ok(None)` when it is absent.
fn read_regular(dir: impl AsFd, name: &str) -> Result<Option<Vec<u8>>, Errno> {
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
fn overwrite(file: &File, data: &[u8]) -> std::io::Result<()> {
    file.write_all_at(data, 0)?;
    file.set_len(data.len() as u64)
}

/// The lease files of an open network directory: the leases, and the addresses whose lease is
/// torn (see [`Lease::parse`]). A link or directory named like an address is not a lease.
fn scan(dir: &File, path: &Path) -> Result<(BTreeMap<IpAddr, Lease>, Vec<IpAddr>), IpamError> {
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
        if stamp_of(&self.dir).ok().as_deref() != Some(idx.stamp.as_str()) || !self.index_postdates_dir() {
            return self.rescan();
        }
        self.leases = idx.leases;
        Ok(())
    }

    /// Whether the index was written in a later clock tick than the directory's last change.
    /// Another writer's change in the very tick of our commit leaves the directory's stamp as
    /// the index recorded it; only an index written in a later tick proves that the stamp
    /// covers every change since. Equal times count as not covered: a rescan, which rewrites
    /// the index at the next commit (usually in a later tick).
    fn index_postdates_dir(&self) -> bool {
        let (Some(index), Ok(dir)) = (&self.index, self.dir.metadata()) else { return false };
        let Ok(index) = index.metadata() else { return false };
        (index.mtime(), index.mtime_nsec()) > (dir.ctime(), dir.ctime_nsec())
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
        let meta = dir.metadata().unwrap();
        let ctime =
            std::time::UNIX_EPOCH + std::time::Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32);
        File::options().write(true).open(&index_path).unwrap().set_modified(ctime).unwrap();
        let s = Store::open(t.path(), "net").unwrap();
        assert_eq!(s.lookup("theirs", "eth0"), [ip("10.0.0.3")], "the foreign lease, for DEL and CHECK");
        assert_eq!(s.lookup("ours", "eth0"), [ip("10.0.0.2")]);
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
