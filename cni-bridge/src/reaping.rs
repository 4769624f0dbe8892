//! Whether this machine reaps the children detached DELs leave behind.
//!
//! A detached DEL ([`crate::del`]) returns while its child still waits for the kernel; the
//! child is then reparented to init, or to the nearest ancestor that made itself a child
//! subreaper (containerd, a container's init), which must reap it. One that never does (a
//! `sleep` as a pid namespace's init, a subreaper that reaps only what it started) would
//! collect one zombie per DEL until the PID table is full. So each detached child is
//! recorded here, and DEL detaches only while none recorded has stayed a zombie of another
//! process for 2 s (from its start): while one is, DEL waits for the kernel itself. A reaper
//! that is only slow costs a few DELs their speed; one that never reaps keeps them all waiting. Where children cannot be recorded and checked, DEL does not detach.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Where the children are recorded: per boot, one file per pid namespace (PIDs are), named
/// `detached-children-<pid namespace inode>`.
const RECORD_DIR: &str = "/run/cni-bridge";

/// Past this size the record keeps only the lines of processes that still exist.
const RECORD_MAX: u64 = 4096;

/// How long a child may stay a zombie before its new parent counts as one that never
/// reaps: the kernel's delete ends 15-40 ms after DEL, a busy reaper may take a while more.
const GRACE_SECONDS: u64 = 2;

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

    /// A child of an earlier DEL that has stayed a zombie for the grace period while the DEL
    /// that forked it is gone: `(pid, its parent's name and pid)`. Ages are counted from this
    /// DEL's start, from the same /proc clock as the children's.
    pub fn unreaped(&mut self) -> Option<(i32, String)> {
        let grace = GRACE_SECONDS * ticks_per_second();
        let now = self.me.start;
        // A /proc read per line old enough to tell (the record is trimmed to a few KB; the
        // read of a process that is gone fails at once).
        let old_enough = self.entries().into_iter().filter(|e| now.saturating_sub(e.start) >= grace);
        old_enough.rev().find_map(|entry| {
            let child = entry.alive().filter(|s| s.state == 'Z' && s.ppid != entry.del)?;
            let parent = std::fs::read_to_string(format!("/proc/{}/comm", child.ppid)).unwrap_or_default();
            Some((entry.pid, format!("{} (pid {})", parent.trim(), child.ppid)))
        })
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
        assert_eq!(r.unreaped(), None, "a live process is no zombie");
        assert!(!r.record(i32::MAX), "no such process");
        // A PID reused by another process (a different start time) is not the child.
        let start = stat(me).unwrap().start;
        std::fs::write(&path, format!("{me} {} 1\n1 0 1\nnot a line\n", start + 1)).unwrap();
        assert_eq!(r.unreaped(), None);
        // Past the cap, the lines of processes that are gone go.
        let gone: String = (0..400).map(|i| format!("{} 1 1\n", 4_000_000 + i)).collect();
        std::fs::write(&path, format!("{gone}{me} {start} 1\n")).unwrap();
        assert!(r.record(me));
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept.lines().count(), 2, "{kept}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
