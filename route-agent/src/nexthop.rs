//! Nexthop objects (Linux 5.3+), one per node address, so that thousands of routes each via a
//! different gateway insert in linear time (plain IPv4 routes with distinct gateways insert in
//! quadratic time: 20k take ~10 s here, with nexthops ~0.5 s). rtnetlink has no nexthop
//! messages, so they are built here: RTM_NEWNEXTHOP / RTM_DELNEXTHOP / RTM_GETNEXTHOP with an
//! `nhmsg` header and NHA_ID / NHA_OIF / NHA_GATEWAY, many requests per send.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use netlink_wire::{attr, error_code, message, walk, NLMSG_DONE, NLMSG_ERROR};
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const RT_SCOPE_UNIVERSE: u8 = 0;

/// A nexthop in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nexthop {
    /// Its id.
    pub id: u32,
    /// Its gateway (none for blackholes and groups).
    pub gw: Option<IpAddr>,
    /// Its protocol: ours are marked with the agent's.
    pub proto: u8,
}

/// A nexthop message: nhmsg (family, scope, protocol, flags) and attributes.
fn nhmsg(kind: u16, flags: u16, seq: u32, family: u8, proto: u8, attrs: &[u8]) -> Vec<u8> {
    message(kind, flags, seq, &[family, RT_SCOPE_UNIVERSE, proto, 0, 0, 0, 0, 0], attrs)
}

fn socket() -> std::io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    // A window of acks comes back at once (see `batch`); past net.core.rmem_max if allowed.
    crate::overrun::size_receive_buffer(std::os::fd::AsRawFd::as_raw_fd(&sock), crate::overrun::RCVBUF);
    Ok(sock)
}

/// Every nexthop in this namespace; an error if the kernel has no nexthop objects.
pub fn dump() -> Result<Vec<Nexthop>, String> {
    let sock = socket().map_err(|e| e.to_string())?;
    sock.send(&nhmsg(RTM_GETNEXTHOP, NLM_F_REQUEST | NLM_F_DUMP, 1, 0, 0, &[]), 0)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    loop {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        let received = sock.recv(&mut buf, 0).map_err(|e| e.to_string())?;
        let mut done = false;
        let mut err = None;
        walk(&buf[..received], |kind, _, payload| match kind {
            NLMSG_DONE => done = true,
            NLMSG_ERROR => {
                err = Some(error_code(payload));
                done = true;
            }
            RTM_NEWNEXTHOP if payload.len() >= 8 => {
                let (family, proto) = (payload[0], payload[2]);
                let mut nh = Nexthop { id: 0, gw: None, proto };
                let mut off = 8;
                while off + 4 <= payload.len() {
                    let len = u16::from_ne_bytes(payload[off..off + 2].try_into().expect("2")) as usize;
                    let kind = u16::from_ne_bytes(payload[off + 2..off + 4].try_into().expect("2")) & 0x3fff;
                    if len < 4 || off + len > payload.len() {
                        break;
                    }
                    let value = &payload[off + 4..off + len];
                    match (kind, family, value.len()) {
                        (NHA_ID, _, 4) => nh.id = u32::from_ne_bytes(value.try_into().expect("4")),
                        (NHA_GATEWAY, AF_INET, 4) => {
                            nh.gw = Some(IpAddr::from(<[u8; 4]>::try_from(value).expect("4")))
                        }
                        (NHA_GATEWAY, AF_INET6, 16) => {
                            nh.gw = Some(IpAddr::from(<[u8; 16]>::try_from(value).expect("16")))
                        }
                        _ => {}
                    }
                    off += (len + 3) & !3;
                }
                out.push(nh);
            }
            _ => {}
        })?;
        if let Some(e) = err.filter(|e| *e != 0) {
            return Err(std::io::Error::from_raw_os_error(-e).to_string());
        }
        if done {
            return Ok(out);
        }
    }
}

/// Requests sent before their acks are read: the kernel answers each request while the send
/// is still running, one buffer slot (about 1 KiB) per ack, so sending 20,000 at once
/// overflowed the receive buffer (ENOBUFS) and lost acks. 256 fit even the default limit
/// (net.core.rmem_max 208 KiB, doubled by the kernel) when the buffer cannot be forced.
const WINDOW: usize = 256;

/// Sends the requests a window at a time, collecting each window's acks before the next:
/// errors by sequence number.
fn batch(reqs: Vec<Vec<u8>>) -> (usize, Vec<String>) {
    let total = reqs.len();
    if total == 0 {
        return (0, vec![]);
    }
    let sock = match socket() {
        Ok(sock) => sock,
        Err(e) => return (0, vec![e.to_string()]),
    };
    let mut errors = Vec::new();
    let mut done = 0;
    for window in reqs.chunks(WINDOW) {
        let mut chunk = Vec::new();
        for r in window {
            if chunk.len() + r.len() > 60_000 {
                if let Err(e) = sock.send(&chunk, 0) {
                    errors.push(e.to_string());
                    return (done, errors);
                }
                chunk.clear();
            }
            chunk.extend_from_slice(r);
        }
        if let Err(e) = sock.send(&chunk, 0) {
            errors.push(e.to_string());
            return (done, errors);
        }
        let before = errors.len();
        let lost = collect_acks(&sock, window.len(), &mut errors);
        done += window.len() - (errors.len() - before).min(window.len());
        if lost {
            return (done, errors);
        }
    }
    (done, errors)
}

/// Reads `expected` acks into `errors`; true when the socket failed (the rest are lost).
fn collect_acks(sock: &Socket, expected: usize, errors: &mut Vec<String>) -> bool {
    let mut acked = 0;
    while acked < expected {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        let received = match sock.recv(&mut buf, 0) {
            Ok(received) => received,
            Err(e) => {
                errors.push(e.to_string());
                return true;
            }
        };
        let walked = walk(&buf[..received], |kind, seq, payload| {
            if kind == NLMSG_ERROR {
                acked += 1;
                let code = error_code(payload);
                if code != 0 {
                    errors.push(format!("request {seq}: {}", std::io::Error::from_raw_os_error(-code)));
                }
            }
        });
        if let Err(e) = walked {
            errors.push(e);
            return true;
        }
    }
    false
}

/// Creates (or replaces) nexthops `(id, gateway, output interface)` with protocol `proto`.
pub fn add(nhs: &[(u32, IpAddr, u32)], proto: u8) -> (usize, Vec<String>) {
    let reqs = nhs
        .iter()
        .enumerate()
        .map(|(i, (id, gw, oif))| {
            let mut a = Vec::new();
            attr(&mut a, NHA_ID, &id.to_ne_bytes());
            attr(&mut a, NHA_OIF, &oif.to_ne_bytes());
            let family = match gw {
                IpAddr::V4(g) => {
                    attr(&mut a, NHA_GATEWAY, &g.octets());
                    AF_INET
                }
                IpAddr::V6(g) => {
                    attr(&mut a, NHA_GATEWAY, &g.octets());
                    AF_INET6
                }
            };
            let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
            nhmsg(RTM_NEWNEXTHOP, flags, i as u32 + 1, family, proto, &a)
        })
        .collect();
    batch(reqs)
}

/// Deletes nexthops by id (the kernel removes the routes that use them).
pub fn del(ids: &[u32]) -> (usize, Vec<String>) {
    let reqs = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut a = Vec::new();
            attr(&mut a, NHA_ID, &id.to_ne_bytes());
            nhmsg(RTM_DELNEXTHOP, NLM_F_REQUEST | NLM_F_ACK, i as u32 + 1, 0, 0, &a)
        })
        .collect();
    batch(reqs)
}

/// The nexthops already in the kernel, as the plan needs them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Existing {
    /// Ours (marked with the agent's protocol): gateway -> id.
    pub ours: BTreeMap<IpAddr, u32>,
    /// Every id in use, ours or not.
    pub used: BTreeSet<u32>,
}

impl Existing {
    /// Sorts a dump into ours and the ids in use.
    pub fn new(all: &[Nexthop], proto: u8) -> Existing {
        Existing {
            ours: all.iter().filter(|n| n.proto == proto).filter_map(|n| Some((n.gw?, n.id))).collect(),
            used: all.iter().map(|n| n.id).collect(),
        }
    }

    /// Id -> gateway of ours, to read routes that name a nexthop instead of a gateway.
    pub fn gateways(&self) -> BTreeMap<u32, IpAddr> {
        self.ours.iter().map(|(gw, id)| (*id, *gw)).collect()
    }
}

/// What nexthops the desired routes need: created before the routes, the stale ones deleted
/// after them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NexthopPlan {
    /// Gateway -> the nexthop id its routes name.
    pub ids: BTreeMap<IpAddr, u32>,
    /// Nexthops to create: (id, gateway, output interface).
    pub create: Vec<(u32, IpAddr, u32)>,
    /// Our nexthops no route wants any more.
    pub stale: Vec<u32>,
}

impl NexthopPlan {
    /// One nexthop per gateway in `gateways`, on the link of the connected subnet holding it
    /// (`connected`: subnet, link index, local address).
    pub fn new(
        existing: &Existing,
        gateways: &BTreeSet<IpAddr>,
        connected: &[(IpNetwork, u32, IpAddr)],
    ) -> NexthopPlan {
        let want: Vec<IpAddr> = gateways.iter().copied().collect();
        let ids = assign(&want, &existing.ours, &existing.used);
        let create = ids
            .iter()
            .filter(|(gw, _)| !existing.ours.contains_key(gw))
            .filter_map(|(gw, id)| {
                connected.iter().find(|(net, _, _)| net.contains(*gw)).map(|(_, oif, _)| (*id, *gw, *oif))
            })
            .collect();
        let stale = existing.ours.iter().filter(|(gw, _)| !ids.contains_key(gw)).map(|(_, id)| *id).collect();
        NexthopPlan { ids, create, stale }
    }
}

/// Runs a blocking netlink exchange off the async threads: thousands of acks can take a
/// while, and /healthz must keep answering meanwhile.
async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("nexthop task: {e}"))
}

/// [`dump`], without blocking the runtime.
pub async fn dump_async() -> Result<Vec<Nexthop>, String> {
    off_thread(dump).await?
}

/// [`add`], without blocking the runtime.
pub async fn add_async(nhs: Vec<(u32, IpAddr, u32)>, proto: u8) -> (usize, Vec<String>) {
    off_thread(move || add(&nhs, proto)).await.unwrap_or_else(|e| (0, vec![e]))
}

/// [`del`], without blocking the runtime.
pub async fn del_async(ids: Vec<u32>) -> (usize, Vec<String>) {
    off_thread(move || del(&ids)).await.unwrap_or_else(|e| (0, vec![e]))
}

/// Ids for new gateways: keeps ours, avoids every id in use, starts at a high base.
pub fn assign(want: &[IpAddr], ours: &BTreeMap<IpAddr, u32>, used: &BTreeSet<u32>) -> BTreeMap<IpAddr, u32> {
    let mut next = 0x0a80_0000u32;
    // New ids only grow, so one walk through the ids in use, in order, finds every free one
    // (with 20,000 nexthops, a lookup per candidate id was a plan's slowest part).
    let mut in_use = used.range(next..).copied().peekable();
    let mut out = BTreeMap::new();
    for gw in want {
        if let Some(id) = ours.get(gw) {
            out.insert(*gw, *id);
            continue;
        }
        while let Some(id) = in_use.next_if(|id| *id <= next) {
            if id == next {
                next += 1;
            }
        }
        out.insert(*gw, next);
        next += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_kept_and_never_collide() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let ours = BTreeMap::from([(a, 7)]);
        let used = BTreeSet::from([7, 0x0a80_0000]);
        let ids = assign(&[a, b], &ours, &used);
        assert_eq!(ids[&a], 7);
        assert_eq!(ids[&b], 0x0a80_0001);
    }

    #[test]
    fn plan_keeps_ours_creates_on_the_gateways_link_and_drops_the_unused() {
        let (a, b, gone): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let existing = Existing::new(
            &[
                Nexthop { id: 7, gw: Some(a), proto: 168 },
                Nexthop { id: 8, gw: Some(gone), proto: 168 },
                Nexthop { id: 0x0a80_0000, gw: Some(b), proto: 4 },
            ],
            168,
        );
        let connected = [("10.0.0.0/24".parse().unwrap(), 3, "10.0.0.9".parse().unwrap())];
        let plan = NexthopPlan::new(&existing, &BTreeSet::from([a, b]), &connected);
        assert_eq!(plan.ids, BTreeMap::from([(a, 7), (b, 0x0a80_0001)]));
        assert_eq!(plan.create, [(0x0a80_0001, b, 3)]);
        assert_eq!(plan.stale, [8]);
        assert_eq!(existing.gateways(), BTreeMap::from([(7, a), (8, gone)]));
    }

    #[test]
    fn messages_are_aligned() {
        let m = nhmsg(RTM_NEWNEXTHOP, NLM_F_REQUEST, 1, AF_INET, 168, &[]);
        assert_eq!(m.len(), 24);
        let mut a = Vec::new();
        attr(&mut a, NHA_GATEWAY, &[10, 0, 0, 1]);
        attr(&mut a, NHA_ID, &5u32.to_ne_bytes());
        assert_eq!(a.len(), 16);
    }
}
