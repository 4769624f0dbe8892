//! The bridge's gateway addresses across a change of this node's pod CIDRs.
//!
//! The reference `bridge` (and flannel's users) fail every ADD after such a change with
//! "cni0 already has an IP address different from ...": the bridge still carries the old
//! range's gateway. Here the agent puts the new range's gateway on the bridge before the
//! conflist names the range, so the first ADD of the new range finds it there; the old
//! gateway stays while a lease of its range exists (its pods keep their default route), and
//! goes with the last one. Only gateway-shaped addresses (the first address of their subnet,
//! which is what host-local gives without a `gateway` field, the agent's conflist) outside
//! the node's pod CIDRs are ever removed: an address someone else put on the bridge stays.

use std::net::IpAddr;
use std::path::Path;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::LinkMessage;

use netlink_wire::{address_of, dump, errno};

use crate::error::AgentError;
use crate::kernel::Kernel;

/// The bridge the agent's conflist names.
pub const BRIDGE: &str = "cni0";

/// The gateway host-local hands out for `net` when none is configured: its first address.
pub fn gateway_of(net: &IpNetwork) -> Option<IpNetwork> {
    let first = match net.network() {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).checked_add(1)?.into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).checked_add(1)?.into()),
    };
    IpNetwork::new(first, net.prefix()).ok()
}

/// What to do with the bridge's addresses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GatewayPlan {
    /// Gateways of the current pod CIDRs the bridge lacks.
    pub add: Vec<IpNetwork>,
    /// Gateways of former ranges no lease uses any more.
    pub remove: Vec<IpNetwork>,
    /// Former ranges still leased: their gateways stay, and their pods are masqueraded.
    pub retained: Vec<IpNetwork>,
}

/// The plan for a bridge carrying `have` (global addresses), the node's `pod_cidrs`, and the
/// addresses leased in the network's data directory.
pub fn plan(have: &[IpNetwork], pod_cidrs: &[IpNetwork], leased: &[IpAddr]) -> GatewayPlan {
    let wanted: Vec<IpNetwork> = pod_cidrs.iter().filter_map(gateway_of).collect();
    let mut out = GatewayPlan {
        add: wanted.iter().filter(|w| !have.contains(w)).copied().collect(),
        ..GatewayPlan::default()
    };
    for h in have.iter().filter(|h| !wanted.contains(h)) {
        let net = match IpNetwork::new(h.network(), h.prefix()) {
            Ok(n) => n,
            Err(_) => continue,
        };
        let gateway_shaped = gateway_of(&net) == Some(*h);
        let overlaps = pod_cidrs.iter().any(|c| c.contains(net.network()) || net.contains(c.network()));
        if !gateway_shaped || overlaps {
            continue;
        }
        if leased.iter().any(|ip| net.contains(*ip)) {
            out.retained.push(net);
        } else {
            out.remove.push(*h);
        }
    }
    out
}

/// The addresses leased in host-local's layout: one file per address, named by it.
pub fn leased(data_dir: &Path, network: &str) -> Vec<IpAddr> {
    std::fs::read_dir(data_dir.join(network))
        .map(|entries| entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<IpAddr>().ok()).collect())
        .unwrap_or_default()
}

/// Brings the bridge's gateways to the plan for `pod_cidrs`; returns the former ranges still
/// in use. Without a bridge there is nothing to do: the first ADD makes it with the gateway
/// of the conflist's range (the bridge appearing is a link event, which syncs again).
pub async fn reconcile(
    kernel: &Kernel,
    pod_cidrs: &[IpNetwork],
    data_dir: &Path,
    network: &str,
) -> Result<Vec<IpNetwork>, AgentError> {
    let Some(bridge) = observe(kernel).await? else { return Ok(Vec::new()) };
    let have: Vec<IpNetwork> = bridge.addresses.iter().map(|(n, _)| *n).collect();
    let p = plan(&have, pod_cidrs, &leased(data_dir, network));
    apply(kernel, &bridge, &p).await?;
    Ok(p.retained)
}

/// The bridge as the kernel has it: its index and its global addresses.
pub struct Bridge {
    index: u32,
    addresses: Vec<(IpNetwork, rtnetlink::packet_route::address::AddressMessage)>,
}

/// The plan for the bridge now, without changing anything (`None`: no bridge).
pub async fn dry_run(
    kernel: &Kernel,
    pod_cidrs: &[IpNetwork],
    data_dir: &Path,
    network: &str,
) -> Result<Option<GatewayPlan>, AgentError> {
    let Some(bridge) = observe(kernel).await? else { return Ok(None) };
    let have: Vec<IpNetwork> = bridge.addresses.iter().map(|(n, _)| *n).collect();
    Ok(Some(plan(&have, pod_cidrs, &leased(data_dir, network))))
}

async fn observe(kernel: &Kernel) -> Result<Option<Bridge>, AgentError> {
    let links: Vec<LinkMessage> =
        match kernel.handle.link().get().match_name(BRIDGE.to_string()).execute().try_collect().await {
            Ok(l) => l,
            Err(e) if errno(&e) == Some(nix::errno::Errno::ENODEV as i32) => return Ok(None),
            Err(e) => return Err(AgentError::netlink(format!("looking up {BRIDGE}"))(e)),
        };
    let Some(index) = links.first().map(|l| l.header.index) else { return Ok(None) };
    let msgs = dump::addresses(&kernel.handle, Some(index))
        .await
        .map_err(AgentError::netlink(format!("listing the addresses of {BRIDGE}")))?;
    let addresses = msgs
        .into_iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            let ip = address_of(&m)?;
            let link_local = match ip {
                IpAddr::V4(a) => a.is_link_local(),
                IpAddr::V6(a) => a.is_unicast_link_local(),
            };
            (!link_local).then_some((IpNetwork::new(ip, m.header.prefix_len).ok()?, m))
        })
        .collect();
    Ok(Some(Bridge { index, addresses }))
}

async fn apply(kernel: &Kernel, bridge: &Bridge, p: &GatewayPlan) -> Result<(), AgentError> {
    let index = bridge.index;
    for gw in &p.add {
        let mut req = kernel.handle.address().add(index, gw.ip(), gw.prefix());
        if gw.is_ipv6() {
            // Usable at once: a tentative gateway drops the first pods' IPv6 packets.
            req.message_mut().header.flags = AddressHeaderFlags::Nodad;
        }
        match req.execute().await {
            // A concurrent ADD may have put it there first.
            Err(e) if errno(&e) == Some(nix::errno::Errno::EEXIST as i32) => {}
            Err(e) => return Err(AgentError::netlink(format!("adding gateway {gw} to {BRIDGE}"))(e)),
            Ok(()) => tracing::info!(gateway = %gw, bridge = BRIDGE, "added the pod CIDR's gateway"),
        }
    }
    for gw in &p.remove {
        let Some((_, msg)) = bridge.addresses.iter().find(|(n, _)| n == gw) else { continue };
        match kernel.handle.address().del(msg.clone()).execute().await {
            Err(e) if errno(&e) == Some(nix::errno::Errno::EADDRNOTAVAIL as i32) => {}
            Err(e) => return Err(AgentError::netlink(format!("removing gateway {gw} from {BRIDGE}"))(e)),
            Ok(()) => {
                tracing::info!(gateway = %gw, bridge = BRIDGE, "no pod left in a former pod CIDR: removed its gateway")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn a_new_range_gets_its_gateway_and_the_old_one_stays_while_leased() {
        let have = [n("10.244.1.1/24"), n("fd00:1::1/64")];
        let now = [n("10.244.9.0/24"), n("fd00:9::/64")];
        let p = plan(&have, &now, &["10.244.1.7".parse().unwrap(), "10.244.9.2".parse().unwrap()]);
        assert_eq!(p.add, [n("10.244.9.1/24"), n("fd00:9::1/64")]);
        assert_eq!(p.retained, [n("10.244.1.0/24")]);
        assert_eq!(p.remove, [n("fd00:1::1/64")], "no IPv6 lease left in the old range");
    }

    #[test]
    fn addresses_not_shaped_like_a_gateway_or_inside_the_pod_cidrs_are_left_alone() {
        let have = [n("10.244.9.1/24"), n("192.168.5.7/24"), n("10.244.9.200/24"), n("10.9.0.1/16")];
        let now = [n("10.244.9.0/24")];
        let p = plan(&have, &now, &[]);
        assert!(p.add.is_empty());
        assert_eq!(p.remove, [n("10.9.0.1/16")], "only the former gateway");
        assert!(p.retained.is_empty());
    }

    #[test]
    fn gateway_is_the_first_address() {
        assert_eq!(gateway_of(&n("10.244.3.0/24")), Some(n("10.244.3.1/24")));
        assert_eq!(gateway_of(&n("fd00:10:244:3::/64")), Some(n("fd00:10:244:3::1/64")));
    }
}
