//! Whether this machine reaps the children detached DELs leave behind.
//!
//! A detached DEL ([`crate::del`]) returns while its child still waits for the kernel; the
//! child is then reparented to init, or to the nearest ancestor that made itself a child
//! subreaper (containerd, a container's init), which must reap it. One that never does (a
//! `sleep` as a pid namespace's init, a subreaper that reaps only what it started) would
//! collect one zombie per DEL until the PID table is full. So each detached child is
//! recorded here, and DEL detaches only while none recorded has stayed a zombie: the first
//! unreaped child turns every later DEL back to waiting for the kernel itself.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Where the children are recorded: per boot (PIDs are), per mount namespace.
const RECORD: &str = "/run/cni-bridge/detached-children";

/// Records past this size start over: only the latest children matter.
const RECORD_MAX: u64 = 4096;

/// How long a child may stay a zombie before its new parent counts as one that never
/// reaps: the kernel's delete ends 15-40 ms after DEL, a busy reaper may take a while more.
const GRACE_SECONDS: u64 = 2;

/// A process as `/proc/<pid>/stat` shows it: state, parent, start time in clock ticks.
struct Stat {
    state: char,
    ppid: i32,
    start: u64,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces or ')': fields follow the last.
    let mut rest = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    // Field 22 (starttime) is the 20th after the command name.
    let start = rest.nth(17)?.parse().ok()?;
    Some(Stat { state, ppid, start })
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Seconds since boot, in clock ticks, as the start times in `/proc/<pid>/stat` count.
fn now_ticks() -> Option<u64> {
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    Some((seconds * ticks_per_second() as f64) as u64)
}

/// Whether children can be recorded (the record's directory exists or can be made).
pub fn can_record() -> bool {
    Path::new(RECORD).parent().is_some_and(|dir| std::fs::create_dir_all(dir).is_ok())
}

/// Records the detached child `pid`. `false` when it cannot be recorded (then it could not
/// be checked either, and the caller does not detach).
pub fn record(pid: i32) -> bool {
    record_in(Path::new(RECORD), pid)
}

fn record_in(path: &Path, pid: i32) -> bool {
    let Some(child) = stat(pid) else { return false };
    if let Some(dir) = path.parent() {
        if std::fs::create_dir_all(dir).is_err() {
            return false;
        }
    }
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path);
    let Ok(mut file) = opened else { return false };
    if file.metadata().is_ok_and(|m| m.len() > RECORD_MAX) {
        // Parallel DELs may lose a line here; the next unreaped child is found all the same.
        let _ = file.set_len(0);
    }
    // One short append per child: concurrent DELs do not interleave within a line.
    file.write_all(format!("{pid} {}\n", child.start).as_bytes()).is_ok()
}

/// A child of an earlier DEL that its new parent has not reaped within the grace period:
/// `(pid, its parent's name)`. `None` when every recorded child was reaped (or is young).
pub fn unreaped() -> Option<(i32, String)> {
    unreaped_in(Path::new(RECORD))
}

fn unreaped_in(path: &Path) -> Option<(i32, String)> {
    let record = std::fs::read_to_string(path).ok()?;
    let now = now_ticks()?;
    let grace = GRACE_SECONDS * ticks_per_second();
    record.lines().find_map(|line| {
        let (pid, start) = line.split_once(' ')?;
        let (pid, start): (i32, u64) = (pid.parse().ok()?, start.parse().ok()?);
        // The same start time: still that child, not a later process given its PID.
        let child = stat(pid).filter(|s| s.start == start && s.state == 'Z')?;
        if now.saturating_sub(start) < grace {
            return None;
        }
        let parent = std::fs::read_to_string(format!("/proc/{}/comm", child.ppid)).unwrap_or_default();
        Some((pid, format!("{} (pid {})", parent.trim(), child.ppid)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_stat_and_finds_no_zombie_in_a_record_of_live_processes() {
        let me = std::process::id() as i32;
        let mine = stat(me).expect("own stat");
        assert!("RS".contains(mine.state), "a live process: {}", mine.state);
        let dir = std::env::temp_dir().join(format!("cni-reaping-{me}"));
        let path = dir.join("record");
        assert!(record_in(&path, me));
        assert!(record_in(&path, me));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        assert_eq!(unreaped_in(&path), None, "a live process is no zombie");
        // A PID reused by another process (a different start time) is not the child.
        std::fs::write(&path, format!("{me} {}\n1 0\nnot a line\n", mine.start + 1)).unwrap();
        assert_eq!(unreaped_in(&path), None);
        assert_eq!(unreaped_in(&dir.join("missing")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
