//! Whether the children of opt-in detached DELs are being reaped, and finish.
//!
//! A detached DEL ([`crate::del`], `CNI_BRIDGE_DEL_DETACH=1`) returns while its child still
//! waits for the kernel; the child is then reparented to the nearest ancestor that made itself
//! a child subreaper, or else to init, which must reap it. systemd as PID 1 and tini reap every
//! orphan, and so do the containerd shims for a container's processes; containerd itself is no
//! child subreaper, and a PID 1 that never reaps (containerd, k3s or a Go daemon as a
//! container's init without `--init`, a `sleep` as a pid namespace's init) collects one zombie
//! per detached child. A child can also stay blocked in the kernel (state D) with no error
//! anywhere, as DEL has already reported success. So each detached child is recorded here, and
//! DEL detaches only while no recorded child is a zombie of another process than its DEL, none
//! has been blocked in the kernel for [`STUCK_MS`], and fewer than [`MAX_LIVE`] are alive: a
//! burst of DELs where nothing reaps leaves at most [`MAX_LIVE`] zombies (plus one per DEL
//! running at the same instant). Where children cannot be recorded and checked, DEL does not
//! detach.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Where the children are recorded: per boot, one file per pid namespace (PIDs are), named
/// `detached-children-<pid namespace inode>`.
const RECORD_DIR: &str = "/run/cni-bridge";

/// Past this size the record keeps only the lines of processes that still exist.
const RECORD_MAX: u64 = 4096;

/// How long a child may be blocked in the kernel (state D) before its delete counts as
/// stuck: the kernel's delete ends 15-40 ms after DEL (up to ~60 ms at concurrency 8).
pub const STUCK_MS: u64 = 200;

/// Recorded children alive at once (any state) past which DEL waits itself: the bound on the
/// zombies a burst can leave before the first of them is seen.
pub const MAX_LIVE: usize = 4;

/// Why DEL must not detach now.
#[derive(Debug, PartialEq)]
pub enum Hold {
    /// A recorded child is a zombie of `parent` (pid), which is not the DEL that forked it.
    Zombie { pid: i32, parent: i32 },
    /// A recorded child has been blocked in the kernel for `ms` or more.
    Stuck { pid: i32, ms: u64 },
    /// [`MAX_LIVE`] recorded children are still alive (the normal case in a burst).
    Busy,
}

impl Hold {
    /// A line for stderr when the hold means something is wrong on the node.
    pub fn explain(&self) -> Option<String> {
        let comm = |pid: i32| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{} (pid {pid})", name.trim())
        };
        match self {
            Hold::Zombie { pid, parent } => Some(format!(
                "process {pid}, left by an earlier DEL, is still a zombie of {}, which has not \
                 reaped it (a parent that does not reap the children it did not start keeps every \
                 detached DEL waiting)",
                comm(*parent)
            )),
            Hold::Stuck { pid, ms } => Some(format!(
                "process {pid}, left by an earlier DEL, has been blocked in the kernel for {ms} ms \
                 or more: its delete of a pod interface has not ended"
            )),
            Hold::Busy => None,
        }
    }
}

/// The hold the recorded children still alive (`(entry, its stat)`) put on a DEL that
/// starts at `now` (clock ticks since boot, `ticks` a second). Zombies first: they are what
/// never goes away.
fn hold(alive: &[(Entry, Stat)], now: u64, ticks: u64) -> Option<Hold> {
    let stuck_ticks = (STUCK_MS * ticks).div_ceil(1000);
    let zombie = alive.iter().rev().find(|(e, s)| s.state == 'Z' && s.ppid != e.del);
    if let Some((e, s)) = zombie {
        return Some(Hold::Zombie { pid: e.pid, parent: s.ppid });
    }
    let stuck = alive.iter().find(|(e, s)| s.state == 'D' && now.saturating_sub(e.start) >= stuck_ticks);
    if let Some((e, _)) = stuck {
        let ms = now.saturating_sub(e.start) * 1000 / ticks.max(1);
        return Some(Hold::Stuck { pid: e.pid, ms });
    }
    (alive.len() >= MAX_LIVE).then_some(Hold::Busy)
}

/// A process as `/proc/<pid>/stat` shows it: state, parent, start time in clock ticks
/// since boot.
#[derive(Debug, PartialEq)]
struct Stat {
    state: char,
    ppid: i32,
    start: u64,
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name is in parentheses and may hold spaces or ')': fields follow the last.
    let mut rest = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    // Field 22 (starttime) is the 20th after the command name.
    let start = rest.nth(17)?.parse().ok()?;
    Some(Stat { state, ppid, start })
}

fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// One line of the record: the child, its start time, and the DEL that forked it (while
/// that DEL lives, a zombie child is its own, not a sign of a parent that never reaps).
#[derive(Debug, PartialEq)]
struct Entry {
    pid: i32,
    start: u64,
    del: i32,
}

fn parse_entry(line: &str) -> Option<Entry> {
    let mut fields = line.split(' ');
    let entry = Entry {
        pid: fields.next()?.parse().ok()?,
        start: fields.next()?.parse().ok()?,
        del: fields.next()?.parse().ok()?,
    };
    fields.next().is_none().then_some(entry)
}

impl Entry {
    /// The process, if it is still the one recorded (not a later one given its PID).
    fn alive(&self) -> Option<Stat> {
        stat(self.pid).filter(|s| s.start == self.start)
    }
}

/// The record, open for appending, and this process as /proc shows it. Opened before the
/// fork, so that a DEL that could not record its child does not detach at all.
pub struct Recorder {
    file: File,
    me: Stat,
}

impl Recorder {
    /// Opens the record; `None` when children cannot be recorded and checked here.
    pub fn open() -> Option<Recorder> {
        let pid_ns = std::fs::metadata("/proc/self/ns/pid").ok()?;
        Recorder::open_at(&Path::new(RECORD_DIR).join(format!("detached-children-{}", pid_ns.ino())))
    }

    fn open_at(path: &Path) -> Option<Recorder> {
        // PIDs from fork() must be the ones /proc shows (not so under another pid
        // namespace's /proc): then /proc/self is this process.
        let own = std::fs::read_link("/proc/self").ok()?;
        if own.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
        let me = stat(std::process::id() as i32)?;
        std::fs::create_dir_all(path.parent()?).ok()?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .ok()?;
        Some(Recorder { file, me })
    }

    /// Whether a recorded child keeps this DEL from detaching, and why. Ages are counted
    /// from this DEL's start, on the same /proc clock as the children's; a /proc read per line
    /// (the record is trimmed to a few KB; the read of a process that is gone fails at once).
    pub fn hold(&mut self) -> Option<Hold> {
        let alive: Vec<(Entry, Stat)> =
            self.entries().into_iter().filter_map(|e| e.alive().map(|s| (e, s))).collect();
        hold(&alive, self.me.start, ticks_per_second())
    }

    fn entries(&mut self) -> Vec<Entry> {
        let mut bytes = Vec::new();
        let _ = self.file.rewind().and_then(|()| self.file.read_to_end(&mut bytes));
        String::from_utf8_lossy(&bytes).lines().filter_map(parse_entry).collect()
    }

    /// Records the detached child `pid`; `false` if it could not be.
    pub fn record(&mut self, pid: i32) -> bool {
        let Some(child) = stat(pid) else { return false };
        if self.file.metadata().is_ok_and(|m| m.len() > RECORD_MAX) {
            // Only the lines of processes that still exist matter. A parallel DEL's line
            // may be lost here; the next unreaped child is found all the same.
            let kept: String = self
                .entries()
                .iter()
                .filter(|e| e.alive().is_some())
                .map(|e| format!("{} {} {}\n", e.pid, e.start, e.del))
                .collect();
            let _ = self.file.set_len(0);
            let _ = self.file.write_all(kept.as_bytes());
        }
        // One short append per child: concurrent DELs do not interleave within a line.
        let line = format!("{pid} {} {}\n", child.start, std::process::id());
        self.file.write_all(line.as_bytes()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_record_lines_parse() {
        let line = "42 (a b) c)) Z 7 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0";
        assert_eq!(parse_stat(line), Some(Stat { state: 'Z', ppid: 7, start: 12345 }));
        assert_eq!(parse_stat("42 (x) R"), None);
        assert_eq!(parse_entry("3 845455 77"), Some(Entry { pid: 3, start: 845455, del: 77 }));
        assert_eq!(parse_entry("3 845455"), None, "a torn line");
        assert_eq!(parse_entry("3 845455 77 9"), None);
        assert_eq!(parse_entry("not a line"), None);
    }

    #[test]
    fn a_record_of_live_processes_names_no_zombie_and_is_kept_short() {
        let me = std::process::id() as i32;
        let dir = std::env::temp_dir().join(format!("cni-reaping-{me}"));
        let path = dir.join("record");
        let mut r = Recorder::open_at(&path).expect("this process can record");
        assert!(r.record(me));
        assert!(r.record(me));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        assert_eq!(r.hold(), None, "two live processes running");
        assert!(!r.record(i32::MAX), "no such process");
        // A PID reused by another process (a different start time) is not the child.
        let start = stat(me).unwrap().start;
        std::fs::write(&path, format!("{me} {} 1\n1 0 1\nnot a line\n", start + 1)).unwrap();
        assert_eq!(r.hold(), None);
        // Past the cap, the lines of processes that are gone go.
        let gone: String = (0..400).map(|i| format!("{} 1 1\n", 4_000_000 + i)).collect();
        std::fs::write(&path, format!("{gone}{me} {start} 1\n")).unwrap();
        assert!(r.record(me));
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept.lines().count(), 2, "{kept}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zombies_of_any_age_stuck_deletes_and_a_full_house_hold_a_detached_del() {
        let child = |pid: i32, start: u64, del: i32, state: char, ppid: i32| {
            (Entry { pid, start, del }, Stat { state, ppid, start })
        };
        let (now, ticks) = (1000, 100);
        // Running, or a zombie its own DEL (still alive) is about to reap: no hold.
        assert_eq!(hold(&[child(5, now, 9, 'R', 9), child(6, now, 8, 'Z', 8)], now, ticks), None);
        // A zombie of anyone else, however young.
        let zombie = child(7, now, 9, 'Z', 1);
        assert_eq!(hold(&[zombie], now, ticks), Some(Hold::Zombie { pid: 7, parent: 1 }));
        // Blocked in the kernel: not yet at 190 ms, at 200 ms.
        assert_eq!(hold(&[child(8, now - 19, 9, 'D', 1)], now, ticks), None);
        assert_eq!(hold(&[child(8, now - 20, 9, 'D', 1)], now, ticks), Some(Hold::Stuck { pid: 8, ms: 200 }));
        // MAX_LIVE children alive, in any state: wait.
        let live: Vec<_> = (0..MAX_LIVE as i32).map(|p| child(p + 10, now, 9, 'S', 1)).collect();
        assert_eq!(hold(&live[1..], now, ticks), None);
        assert_eq!(hold(&live, now, ticks), Some(Hold::Busy));
        assert_eq!(Hold::Busy.explain(), None, "a burst is no fault to report");
        assert!(Hold::Stuck { pid: 8, ms: 200 }
            .explain()
            .is_some_and(|m| m.contains("blocked in the kernel")));
    }
}
