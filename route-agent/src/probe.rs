//! ICMP echo from a chosen local address, with Don't Fragment set: what `ping -M do -I ADDR
//! -s N` does, without depending on an iputils being installed on the node (the image has
//! none). The doctor sends it from this node's pod gateway to another node's, so it follows
//! the pods' path (the agent's routes, the tunnel) and the reply needs the peer's route back.
//! A raw socket (CAP_NET_RAW, which the DaemonSet grants); every socket sees every ICMP
//! packet of its family, so replies are matched by address (`connect`), identifier and
//! sequence.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage,
};
use nix::sys::time::TimeVal;

/// IPv4 header (20) + ICMP header (8): an echo of IP packet size N carries N - 28 bytes.
pub const OVERHEAD_V4: usize = 28;
/// IPv6 header (40) + ICMPv6 header (8).
pub const OVERHEAD_V6: usize = 48;
/// A small probe's IP packet size: ping's default (56 bytes of payload over IPv4).
pub const SMALL: usize = 84;

/// What became of an echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Echo {
    /// A reply came back.
    Answered(Duration),
    /// Nothing came back before the last attempt's timeout.
    Lost,
    /// The packet does not fit the path with DF: refused at once by this node (its route or
    /// a path MTU a router reported), with the MTU the kernel knows when it says.
    TooBig(Option<u32>),
    /// An error for the packet: unreachable (an ICMP error, or no neighbour), or this node
    /// could not send at all (no such local address, no permission).
    Failed(String),
}

static NEXT_ID: AtomicU16 = AtomicU16::new(0);

/// One echo of `size` bytes (the whole IP packet) from `from` (or the address the kernel
/// picks) to `to`, DF set; up to `attempts` tries of `timeout` each.
pub fn echo(from: Option<IpAddr>, to: IpAddr, size: usize, timeout: Duration, attempts: u16) -> Echo {
    let overhead = if to.is_ipv4() { OVERHEAD_V4 } else { OVERHEAD_V6 };
    let payload = size.saturating_sub(overhead);
    let sock = match open(from, to) {
        Ok(s) => s,
        Err(e) => return Echo::Failed(e),
    };
    // Unique among the doctor's concurrent probes and distinct from another process's.
    let id =
        (std::process::id() as u16).wrapping_mul(31).wrapping_add(NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let mut last = Echo::Lost;
    for seq in 1..=attempts.max(1) {
        let packet = request(to.is_ipv4(), id, seq, payload);
        let start = Instant::now();
        match socket::send(sock.as_raw_fd(), &packet, MsgFlags::empty()) {
            Ok(_) => {}
            Err(Errno::EMSGSIZE) => return Echo::TooBig(path_mtu(&sock, to)),
            Err(e) => {
                last = Echo::Failed(format!("sending: {}", e.desc()));
                continue;
            }
        }
        match wait_reply(&sock, to.is_ipv4(), id, seq, start + timeout) {
            Ok(true) => return Echo::Answered(start.elapsed()),
            Ok(false) => {}
            Err(Errno::EMSGSIZE) => return Echo::TooBig(path_mtu(&sock, to)),
            Err(e) => last = Echo::Failed(e.desc().to_string()),
        }
    }
    last
}

fn open(from: Option<IpAddr>, to: IpAddr) -> Result<OwnedFd, String> {
    let (family, proto) = match to {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6),
    };
    let sock = socket::socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, proto)
        .map_err(|e| format!("raw ICMP socket: {} (needs CAP_NET_RAW)", e.desc()))?;
    dont_fragment(&sock, to.is_ipv4()).map_err(|e| format!("setting DF: {}", e.desc()))?;
    if let Some(from) = from {
        let addr = SockaddrStorage::from(SocketAddr::new(from, 0));
        socket::bind(sock.as_raw_fd(), &addr).map_err(|e| format!("sending from {from}: {}", e.desc()))?;
    }
    // On a raw socket, connect filters what it receives to packets from `to`.
    let addr = SockaddrStorage::from(SocketAddr::new(to, 0));
    socket::connect(sock.as_raw_fd(), &addr).map_err(|e| format!("{to}: {}", e.desc()))?;
    Ok(sock)
}

/// IP_PMTUDISC_DO / IPV6_PMTUDISC_DO: DF on every packet, never fragmented here, and a packet
/// over the known path MTU refused with EMSGSIZE (what `ping -M do` sets). nix has no setter
/// for IP_MTU_DISCOVER.
fn dont_fragment(sock: &OwnedFd, v4: bool) -> nix::Result<()> {
    let (level, name, value) = match v4 {
        true => (nix::libc::IPPROTO_IP, nix::libc::IP_MTU_DISCOVER, nix::libc::IP_PMTUDISC_DO),
        false => (nix::libc::IPPROTO_IPV6, nix::libc::IPV6_MTU_DISCOVER, nix::libc::IPV6_PMTUDISC_DO),
    };
    // SAFETY: a valid socket, and a pointer to a c_int that outlives the call, with its size.
    let rc = unsafe {
        nix::libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of_val(&value) as nix::libc::socklen_t,
        )
    };
    Errno::result(rc)?;
    if !v4 {
        socket::setsockopt(sock, sockopt::Ipv6DontFrag, &true)?;
    }
    Ok(())
}

/// The path MTU the kernel knows for the connected destination (IPv4 only: IP_MTU).
fn path_mtu(sock: &OwnedFd, to: IpAddr) -> Option<u32> {
    match to {
        IpAddr::V4(_) => {
            socket::getsockopt(&sock.as_fd(), sockopt::IpMtu).ok().and_then(|m| u32::try_from(m).ok())
        }
        IpAddr::V6(_) => None,
    }
}

/// An echo request. The kernel fills in the ICMPv6 checksum (it covers a pseudo-header);
/// the ICMP one is ours.
fn request(v4: bool, id: u16, seq: u16, payload: usize) -> Vec<u8> {
    let mut p = vec![if v4 { 8 } else { 128 }, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((0..payload).map(|i| (i % 251) as u8));
    if v4 {
        let sum = checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 =
        data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether `packet` (as a raw socket of the family reads it: with the IPv4 header, without
/// the IPv6 one) is the reply to (`id`, `seq`).
fn is_reply(v4: bool, packet: &[u8], id: u16, seq: u16) -> bool {
    let icmp = match v4 {
        true => {
            let header = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
            packet.get(header..).unwrap_or_default()
        }
        false => packet,
    };
    let reply_type = if v4 { 0 } else { 129 };
    icmp.len() >= 8
        && icmp[0] == reply_type
        && icmp[1] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// Reads until the reply or `deadline`: `Ok(false)` when none came.
fn wait_reply(sock: &OwnedFd, v4: bool, id: u16, seq: u16, deadline: Instant) -> nix::Result<bool> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let tv = TimeVal::new(left.as_secs() as _, left.subsec_micros().max(1) as _);
        socket::setsockopt(sock, sockopt::ReceiveTimeout, &tv)?;
        match socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) if is_reply(v4, &buf[..n], id, seq) => return Ok(true),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_has_a_valid_checksum_and_its_reply_is_recognised() {
        let p = request(true, 0x1234, 2, 56);
        assert_eq!(p.len(), 64);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        let mut reply = vec![0x45u8];
        reply.extend([0u8; 19]);
        reply.extend_from_slice(&p);
        reply[20] = 0;
        assert!(is_reply(true, &reply, 0x1234, 2));
        assert!(!is_reply(true, &reply, 0x1234, 3), "another attempt's reply");
        let mut v6 = request(false, 7, 1, 10);
        v6[0] = 129;
        assert!(is_reply(false, &v6, 7, 1) && !is_reply(false, &v6[..6], 7, 1));
    }
}
