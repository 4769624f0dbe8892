//! A netlink socket that overflowed (ENOBUFS, "No buffer space available", os error 105) lost
//! messages: the acks of a large batch of writes, or kernel events. The kernel may have done
//! all, part or none of what was asked, and the agent cannot tell which from what it got
//! back; a fresh dump can. So an overrun is a reason to resync at once, never to wait for the
//! next tick (30 s, during which the node is not ready and a missed route deletion is not
//! repaired). The sockets are also sized for the work, so that a sync does not overrun them
//! in the first place.

use std::os::fd::RawFd;

use crate::error::AgentError;

/// The text of ENOBUFS as errors carry it.
fn enobufs_text() -> String {
    std::io::Error::from_raw_os_error(nix::errno::Errno::ENOBUFS as i32).to_string()
}

/// Whether an error message (one of a sync's collected errors) is a socket overrun.
pub fn is_overrun_message(message: &str) -> bool {
    message.contains(&enobufs_text())
}

/// Whether a sync's error is a socket overrun.
pub fn is_overrun(e: &AgentError) -> bool {
    match e {
        AgentError::Overrun(_) => true,
        AgentError::Netlink { source, .. } => {
            netlink_wire::errno(source) == Some(nix::errno::Errno::ENOBUFS as i32)
        }
        AgentError::Io { source, .. } => source.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32),
        _ => false,
    }
}

/// Resyncs in a row after overruns before the agent falls back to the next event or tick: a
/// socket that overflows on every attempt must not turn the agent into a busy loop.
pub const MAX_IMMEDIATE: u32 = 5;

/// What the agent does after a sync that ended with `result`, having already resynced at
/// once `in_a_row` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Sync again now.
    ResyncNow,
    /// Wait for the next source change, kernel event or tick.
    Wait,
}

/// The decision (see the module's comment).
pub fn next(result: &Result<(), AgentError>, in_a_row: u32) -> Next {
    match result {
        Err(e) if is_overrun(e) && in_a_row < MAX_IMMEDIATE => Next::ResyncNow,
        _ => Next::Wait,
    }
}

/// Receive buffer of the agent's netlink sockets: room for the acks of a window of writes
/// and for the events of a whole resync of a large cluster (each message costs the kernel
/// about 1 KiB of buffer, whatever its size).
pub const RCVBUF: usize = 32 << 20;

/// Sets the socket's receive buffer to `bytes`, past `net.core.rmem_max` when the agent has
/// CAP_NET_ADMIN (SO_RCVBUFFORCE), else as far as the limit allows.
pub fn size_receive_buffer(fd: RawFd, bytes: usize) {
    let value = i32::try_from(bytes).unwrap_or(i32::MAX);
    let set = |option: i32| {
        // SAFETY: a plain integer option on a descriptor the caller owns and keeps open.
        unsafe {
            nix::libc::setsockopt(
                fd,
                nix::libc::SOL_SOCKET,
                option,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as nix::libc::socklen_t,
            )
        }
    };
    if set(nix::libc::SO_RCVBUFFORCE) != 0 {
        set(nix::libc::SO_RCVBUF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overrun_resyncs_at_once_a_bounded_number_of_times_other_errors_wait() {
        let overrun = Err(AgentError::Overrun("nexthops: No buffer space available (os error 105)".into()));
        assert_eq!(next(&overrun, 0), Next::ResyncNow);
        assert_eq!(next(&overrun, MAX_IMMEDIATE - 1), Next::ResyncNow);
        assert_eq!(next(&overrun, MAX_IMMEDIATE), Next::Wait, "no busy loop");
        let io = Err(AgentError::Io {
            context: "dump".into(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::ENOBUFS as i32),
        });
        assert_eq!(next(&io, 0), Next::ResyncNow);
        assert_eq!(next(&Err(AgentError::Route("2 route or nexthop changes failed".into())), 0), Next::Wait);
        assert_eq!(next(&Ok(()), 0), Next::Wait);
    }

    #[test]
    fn overrun_messages_are_recognised_as_the_sync_collects_them() {
        let e = std::io::Error::from_raw_os_error(nix::errno::Errno::ENOBUFS as i32).to_string();
        assert!(is_overrun_message(&e), "{e}");
        assert!(is_overrun_message(&format!("route to 10.244.3.0/24: {e}")));
        assert!(!is_overrun_message("request 7: File exists (os error 17)"));
    }
}
