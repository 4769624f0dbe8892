//! Watching a file or a directory for the file sources (nodes, policy manifests): inotify on
//! the directory, so both in-place writes and atomic renames are seen.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::AgentError;

struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A watched path: a file (events naming it in its directory) or a directory (any event).
pub struct PathWatch {
    // Declared before `ino`: dropped (deregistered) before the fd it borrows is closed.
    afd: AsyncFd<Fd>,
    ino: Inotify,
    /// The file's name; `None` when the path is a directory.
    name: Option<OsString>,
    /// The path, absolute.
    pub path: PathBuf,
}

impl PathWatch {
    /// Watches `path` for `events`. The path is made absolute against the working directory
    /// at start: a bare `nodes.yaml` has the parent "", which inotify cannot watch. It is not
    /// canonicalized: the file may not exist yet, and a symlinked directory (a mounted
    /// ConfigMap's `..data`) is re-resolved on every read.
    pub fn new(path: &Path, events: AddWatchFlags) -> Result<PathWatch, AgentError> {
        let path =
            std::path::absolute(path).map_err(AgentError::io(format!("resolving {}", path.display())))?;
        let (dir, name) = if path.is_dir() {
            (path.clone(), None)
        } else {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("/"),
            };
            (dir, Some(path.file_name().map(|n| n.to_os_string()).unwrap_or_default()))
        };
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| AgentError::io("inotify")(e.into()))?;
        ino.add_watch(&dir, events)
            .map_err(|e| AgentError::io(format!("watching {}", dir.display()))(e.into()))?;
        // SAFETY: `ino` owns the fd and is kept in the same struct, declared after `afd`, so
        // the fd is closed only after `afd` has been dropped (deregistered).
        let afd = unsafe { AsyncFd::register_with_interest(Fd(ino.as_fd().as_raw_fd()), Interest::READABLE) }
            .map_err(|e| AgentError::io("inotify fd")(e.into()))?;
        Ok(PathWatch { afd, ino, name, path })
    }

    /// Waits for a change like [`PathWatch::changed`] and says which entries of the watched
    /// directory it touched; `None` when that is not known (the kernel's event queue
    /// overflowed, or the directory itself changed): then everything may have.
    pub async fn changed_names(&self) -> Result<Option<Vec<OsString>>, AgentError> {
        loop {
            let mut guard = self.afd.readable().await.map_err(AgentError::io("inotify"))?;
            let events = match self.ino.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EAGAIN) => {
                    guard.clear_ready();
                    continue;
                }
                Err(e) => return Err(AgentError::io("reading inotify")(e.into())),
            };
            if events.is_empty() {
                continue;
            }
            let mut names = Vec::new();
            for e in events {
                if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    return Ok(None);
                }
                match e.name {
                    Some(n) if self.name.as_ref().is_none_or(|ours| *ours == n) => names.push(n),
                    Some(_) => {}
                    None => return Ok(None),
                }
            }
            if !names.is_empty() {
                return Ok(Some(names));
            }
        }
    }

    /// Returns once something happened to the path.
    pub async fn changed(&self) -> Result<(), AgentError> {
        self.changed_names().await.map(|_| ())
    }
}
