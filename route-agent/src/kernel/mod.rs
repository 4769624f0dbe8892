//! The kernel side: one netlink connection, routes tagged with a private protocol number so
//! the agent only ever touches its own, dumped once per sync and changed with pipelined
//! requests. [`vxlan`] holds the tunnels' devices and entries: with this module, the only code
//! that holds the netlink handle.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::stream::{self, StreamExt, TryStreamExt};
use ipnetwork::IpNetwork;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};

use netlink_wire::dump::{self, Family};
use netlink_wire::{address_of, errno};

use crate::error::AgentError;

pub mod vxlan;

/// Requests in flight at once while applying a diff.
const PIPELINE: usize = 256;
/// The main routing table.
const MAIN_TABLE: u8 = 254;

/// The agent's netlink connection.
#[derive(Clone)]
pub struct Kernel {
    pub(crate) handle: Handle,
    proto: u8,
    /// Routes point at nexthop objects (one per node address) instead of carrying a gateway.
    pub nexthops: bool,
    /// The VXLAN devices, for [`events`].
    pub tunnel_links: std::sync::Arc<crate::vxlan::TunnelLinks>,
}

/// Counts of a sync's netlink writes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Routes added or replaced.
    pub upserted: usize,
    /// Routes deleted.
    pub deleted: usize,
    /// Requests that failed.
    pub failed: usize,
}

impl Kernel {
    /// Opens the connection (inside a tokio runtime).
    /// With `nexthops`, uses nexthop objects if the kernel has them.
    pub async fn new(proto: u8, nexthops: bool) -> Result<Kernel, AgentError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(AgentError::io("opening a netlink socket"))?;
        tokio::spawn(conn);
        let nexthops = nexthops && crate::nexthop::dump_async().await.is_ok();
        Ok(Kernel { handle, proto, nexthops, tunnel_links: Default::default() })
    }

    /// The protocol number marking our routes and nexthops.
    pub fn proto(&self) -> u8 {
        self.proto
    }

    fn ours(&self, m: &RouteMessage) -> bool {
        m.header.protocol == RouteProtocol::Other(self.proto) && m.header.table == MAIN_TABLE
    }

    /// Our routes in the main table: destination -> gateway (through `nh_gw` for routes that
    /// name a nexthop and, with net.ipv4.nexthop_compat_mode off, no gateway).
    pub async fn routes(
        &self,
        nh_gw: &BTreeMap<u32, IpAddr>,
    ) -> Result<BTreeMap<IpNetwork, IpAddr>, AgentError> {
        let mut out = BTreeMap::new();
        for family in Family::BOTH {
            let msgs =
                dump::routes(&self.handle, family).await.map_err(AgentError::netlink("dumping routes"))?;
            for m in msgs.iter().filter(|m| self.ours(m)) {
                let dst = dump::destination(m);
                let gw = dump::gateway(m).or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        RouteAttribute::NhId(id) => nh_gw.get(id).copied(),
                        _ => None,
                    })
                });
                if let (Some(d), Some(g)) = (dst, gw) {
                    if let Ok(n) = IpNetwork::new(d, m.header.destination_prefix_length) {
                        out.insert(n, g);
                    }
                }
            }
        }
        Ok(out)
    }

    fn message(
        &self,
        dst: IpNetwork,
        gw: Option<IpAddr>,
        nhid: Option<u32>,
        tunnel: Option<u32>,
    ) -> RouteMessage {
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .expect("family of dst")
            .protocol(RouteProtocol::Other(self.proto));
        match (tunnel, nhid, gw) {
            // The gateway is on no subnet of the VXLAN device: `onlink` says it is there anyway.
            (Some(oif), _, Some(gw)) => {
                builder = builder
                    .gateway(gw)
                    .expect("gateway of the family of dst (the plan's tunnel gateway)")
                    .output_interface(oif)
                    .onlink()
            }
            (_, Some(id), _) => builder = builder.nhid(id),
            (_, None, Some(gw)) => {
                builder = builder.gateway(gw).expect("gateway of the family of dst (checked by the plan)")
            }
            (_, None, None) => {}
        }
        builder.build()
    }

    /// Adds/replaces and deletes routes, many requests in flight at once.
    /// `nh_ids` maps gateways to their nexthop objects (empty without nexthops); `tunnel`
    /// maps tunnelled destinations to the VXLAN device they go out of.
    pub async fn apply(
        &self,
        diff: &crate::plan::Diff,
        nh_ids: &BTreeMap<IpAddr, u32>,
        tunnel: &BTreeMap<IpNetwork, u32>,
    ) -> (Applied, Vec<String>) {
        let mut applied = Applied::default();
        let mut errors = Vec::new();
        let ups = stream::iter(diff.upsert.iter().map(|(d, g)| {
            let msg = self.message(*d, Some(*g), nh_ids.get(g).copied(), tunnel.get(d).copied());
            let handle = self.handle.clone();
            async move { (*d, handle.route().add(msg).replace().execute().await) }
        }))
        .buffer_unordered(PIPELINE)
        .collect::<Vec<_>>()
        .await;
        for (d, r) in ups {
            match r {
                Ok(()) => applied.upserted += 1,
                Err(e) => {
                    applied.failed += 1;
                    errors.push(format!("route to {d}: {e}"));
                }
            }
        }
        let dels = stream::iter(diff.delete.iter().map(|(d, _)| {
            let msg = self.message(*d, None, None, None);
            let handle = self.handle.clone();
            async move { (*d, handle.route().del(msg).execute().await) }
        }))
        .buffer_unordered(PIPELINE)
        .collect::<Vec<_>>()
        .await;
        for (d, r) in dels {
            match r {
                // Someone removed it already: the goal is reached.
                Err(e) if errno(&e) == Some(nix::errno::Errno::ESRCH as i32) => applied.deleted += 1,
                Ok(()) => applied.deleted += 1,
                Err(e) => {
                    applied.failed += 1;
                    errors.push(format!("deleting route to {d}: {e}"));
                }
            }
        }
        (applied, errors)
    }

    /// Directly connected subnets (every address's network), their link and the address, for
    /// the same-L2 check, the nexthops' output interface and the underlay MTU: one dump.
    /// Temporary and deprecated IPv6 addresses are left out (they come and go; flannel#2293).
    pub async fn connected(&self) -> Result<Vec<(IpNetwork, u32, IpAddr)>, AgentError> {
        let msgs =
            dump::addresses(&self.handle, None).await.map_err(AgentError::netlink("dumping addresses"))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let ip = address_of(m)?;
                if ip.is_loopback() || !stable(ip, flags_of(m)) {
                    return None;
                }
                let n = IpNetwork::new(ip, m.header.prefix_len).ok()?;
                Some((IpNetwork::new(n.network(), n.prefix()).ok()?, m.header.index, ip))
            })
            .collect())
    }

    /// This node's address per family when none is configured: see [`pick_node_addresses`].
    pub async fn node_addresses(&self) -> Result<Vec<IpAddr>, AgentError> {
        let mut default_links = Vec::new();
        for family in Family::BOTH {
            let msgs =
                dump::routes(&self.handle, family).await.map_err(AgentError::netlink("dumping routes"))?;
            default_links.extend(
                msgs.iter()
                    .filter(|m| m.header.destination_prefix_length == 0 && m.header.table == MAIN_TABLE)
                    .filter_map(dump::output_interface),
            );
        }
        let msgs =
            dump::addresses(&self.handle, None).await.map_err(AgentError::netlink("dumping addresses"))?;
        let local: Vec<LocalAddress> = msgs
            .iter()
            .filter_map(|m| {
                Some(LocalAddress { ip: address_of(m)?, link: m.header.index, flags: flags_of(m) })
            })
            .collect();
        Ok(pick_node_addresses(&local, &default_links))
    }

    /// The MTU of link `index` (the underlay, found through [`Kernel::connected`]).
    pub async fn mtu_of_link(&self, index: u32) -> Result<Option<u32>, AgentError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect()
            .await
            .map_err(AgentError::netlink("getting the underlay link"))?;
        Ok(links.first().and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        }))
    }
}

fn flags_of(m: &AddressMessage) -> AddressFlags {
    m.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(m.header.flags.bits())))
}

/// Whether a local address may stand for this node: not an IPv6 privacy (temporary) address,
/// which expires, nor a deprecated one. IFA_F_TEMPORARY shares its bit with IFA_F_SECONDARY,
/// which on IPv4 marks an ordinary second address of a subnet.
pub fn stable(ip: IpAddr, flags: AddressFlags) -> bool {
    ip.is_ipv4() || !flags.intersects(AddressFlags::Secondary | AddressFlags::Deprecated)
}

/// A local address as the node-address choice sees it.
#[derive(Debug, Clone, Copy)]
pub struct LocalAddress {
    /// The address.
    pub ip: IpAddr,
    /// Its link's index.
    pub link: u32,
    /// Its IFA_F_* flags.
    pub flags: AddressFlags,
}

/// One address per family: global (no loopback, no link-local), stable (see [`stable`]), on a
/// link holding a default route if there is one, else the first such address.
pub fn pick_node_addresses(local: &[LocalAddress], default_links: &[u32]) -> Vec<IpAddr> {
    let usable = |a: &&LocalAddress| {
        let link_local = match a.ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        !a.ip.is_loopback() && !a.ip.is_multicast() && !link_local && stable(a.ip, a.flags)
    };
    [true, false]
        .into_iter()
        .filter_map(|v4| {
            let family: Vec<&LocalAddress> =
                local.iter().filter(|a| a.ip.is_ipv4() == v4).filter(usable).collect();
            family.iter().find(|a| default_links.contains(&a.link)).or(family.first()).map(|a| a.ip)
        })
        .collect()
}

/// A stream of "something changed" from the kernel: one of our routes deleted, a link
/// changed (a link going down flushes its routes), a permanent FDB or neighbour entry
/// deleted (the VXLAN tunnels' FDB entries are), or any neighbour on a VXLAN device deleted.
/// Our own additions do not wake us.
pub fn events(
    proto: u8,
    tunnel_links: std::sync::Arc<crate::vxlan::TunnelLinks>,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<()>, AgentError> {
    let (conn, _h, mut msgs) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Link,
        MulticastGroup::Neigh,
    ])
    .map_err(AgentError::io("subscribing to netlink events"))?;
    // Left at the default size on purpose: a sync of thousands of routes echoes each of its
    // writes here, and decoding them all costs more than the one resync an overrun causes.
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((m, _)) = msgs.next().await {
            let wake = match m.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(r)) => {
                    r.header.protocol == RouteProtocol::Other(proto)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(neigh)) => {
                    neigh.header.state == NeighbourState::Permanent
                        || tunnel_links.contains(neigh.header.ifindex)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(_))
                | NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(_)) => true,
                // Events were lost (the buffer overflowed): one of them may have been a
                // deletion of ours, so look again.
                NetlinkPayload::Overrun(_) => {
                    tracing::info!("kernel events lost (netlink socket overrun): resyncing");
                    true
                }
                _ => false,
            };
            if wake && tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_and_deprecated_ipv6_addresses_do_not_stand_for_the_node() {
        let v6: IpAddr = "fd00:200::11".parse().unwrap();
        let v4: IpAddr = "10.200.0.11".parse().unwrap();
        assert!(stable(v6, AddressFlags::Permanent));
        assert!(!stable(v6, AddressFlags::Secondary), "IFA_F_TEMPORARY");
        assert!(!stable(v6, AddressFlags::Deprecated | AddressFlags::Permanent));
        assert!(stable(v4, AddressFlags::Secondary), "an IPv4 secondary is an ordinary address");
    }

    #[test]
    fn node_address_default_one_per_family_on_the_default_route_link_never_temporary() {
        let a =
            |ip: &str, link: u32, flags: AddressFlags| LocalAddress { ip: ip.parse().unwrap(), link, flags };
        let local = [
            a("127.0.0.1", 1, AddressFlags::Permanent),
            a("10.244.1.1", 3, AddressFlags::Permanent),
            a("fe80::1", 2, AddressFlags::Permanent),
            a("2001:db8::aaaa", 2, AddressFlags::Secondary),
            a("2001:db8::bbbb", 2, AddressFlags::Deprecated),
            a("10.200.0.11", 2, AddressFlags::Permanent),
            a("2001:db8::11", 2, AddressFlags::empty()),
        ];
        let got: Vec<String> = pick_node_addresses(&local, &[2]).iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["10.200.0.11", "2001:db8::11"]);
        let got: Vec<String> = pick_node_addresses(&local, &[]).iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["10.244.1.1", "2001:db8::11"], "no default route: the first usable one");
    }
}
