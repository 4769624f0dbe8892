//! The VXLAN backend for peers a direct route cannot reach: one unicast VXLAN device per
//! underlay family, with a static FDB entry (remote VTEP MAC -> remote node address) and a
//! permanent neighbour entry (tunnel gateway -> remote VTEP MAC) per tunnelled pod CIDR, as
//! flannel programs them. No multicast, no learning: the agent knows every VTEP from the node
//! source. Each node's VTEP MAC is derived from its underlay address ([`vtep_mac`]), so no
//! node has to publish it. [`VtepPlan`] is pure; [`ensure`] and [`cleanup`] bring the kernel to
//! it before and after the routes are written.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan};

use crate::error::AgentError;
use crate::kernel::Kernel;
use crate::plan::{tunnel_gateway, Tunnel};

/// The device carrying tunnels over the IPv4 underlay (inner IPv4 and IPv6).
pub const DEVICE_V4: &str = "cra-vxlan4";
/// The device carrying tunnels over the IPv6 underlay.
pub const DEVICE_V6: &str = "cra-vxlan6";
/// Encapsulation overhead: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const OVERHEAD_V4: u32 = 50;
/// The same with an outer IPv6 header (40).
pub const OVERHEAD_V6: u32 = 70;

/// The VXLAN settings every node of a cluster must share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
}

/// The device for tunnels to `remote`.
pub fn device_for(remote: &IpAddr) -> &'static str {
    if remote.is_ipv4() {
        DEVICE_V4
    } else {
        DEVICE_V6
    }
}

/// The encapsulation overhead of an underlay family.
pub fn overhead(underlay: &IpAddr) -> u32 {
    if underlay.is_ipv4() {
        OVERHEAD_V4
    } else {
        OVERHEAD_V6
    }
}

/// The VTEP MAC of the node with underlay address `ip`: locally administered, unicast, the
/// IPv4 address in its last four bytes (an FNV-1a hash of an IPv6 address), so every node
/// computes every other node's MAC from the address the source lists.
pub fn vtep_mac(ip: &IpAddr) -> [u8; 6] {
    let tail = match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => {
            let hash =
                v6.octets().iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
            hash.to_be_bytes()
        }
    };
    let family = if ip.is_ipv4() { 0x04 } else { 0x06 };
    [0x0e, family, tail[0], tail[1], tail[2], tail[3]]
}

/// The VXLAN devices' indices (0: none), shared with the kernel event listener: deleting one
/// of their neighbour entries wakes the agent (the kernel reports such a deletion with the
/// entry already failed, not as the permanent entry it was).
#[derive(Debug, Default)]
pub struct TunnelLinks([AtomicU32; 2]);

impl TunnelLinks {
    /// Records the devices [`ensure`] found or made.
    pub fn set(&self, index: &BTreeMap<&'static str, u32>) {
        for (slot, name) in self.0.iter().zip([DEVICE_V4, DEVICE_V6]) {
            slot.store(index.get(name).copied().unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// Whether link `index` is one of the VXLAN devices.
    pub fn contains(&self, index: u32) -> bool {
        index != 0 && self.0.iter().any(|slot| slot.load(Ordering::Relaxed) == index)
    }
}

/// One VXLAN device as wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its name ([`DEVICE_V4`] or [`DEVICE_V6`]).
    pub name: &'static str,
    /// This node's underlay address, the tunnel's local end.
    pub local: IpAddr,
    /// Its MAC ([`vtep_mac`] of `local`).
    pub mac: [u8; 6],
    /// Its MTU: the underlay link's minus the overhead (unknown: the kernel's default).
    pub mtu: Option<u32>,
}

/// What the tunnels need in the kernel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VtepPlan {
    /// The devices wanted (none: every device of ours goes).
    pub devices: Vec<Device>,
    /// FDB entries: (device, remote VTEP MAC, remote underlay address).
    pub fdb: BTreeSet<(&'static str, [u8; 6], IpAddr)>,
    /// Neighbour entries: (device, tunnel gateway, remote VTEP MAC).
    pub neighbours: BTreeSet<(&'static str, IpAddr, [u8; 6])>,
    /// Tunnelled pod CIDR -> the device its route goes through.
    pub routes: BTreeMap<IpNetwork, &'static str>,
}

impl VtepPlan {
    /// The plan for `tunnelled`, from this node's addresses `local`; `underlay_mtu` gives the
    /// MTU of the link holding a local address.
    pub fn new(
        tunnelled: &BTreeMap<IpNetwork, Tunnel>,
        local: &[IpAddr],
        underlay_mtu: impl Fn(&IpAddr) -> Option<u32>,
    ) -> VtepPlan {
        let mut plan = VtepPlan::default();
        for (cidr, tunnel) in tunnelled {
            let name = device_for(&tunnel.remote);
            let Some(me) = local.iter().find(|l| l.is_ipv4() == tunnel.remote.is_ipv4()) else { continue };
            if !plan.devices.iter().any(|d| d.name == name) {
                let mtu = underlay_mtu(me).map(|m| m.saturating_sub(overhead(me)));
                plan.devices.push(Device { name, local: *me, mac: vtep_mac(me), mtu });
            }
            let mac = vtep_mac(&tunnel.remote);
            plan.fdb.insert((name, mac, tunnel.remote));
            plan.neighbours.insert((name, tunnel_gateway(cidr), mac));
            plan.routes.insert(*cidr, name);
        }
        plan.devices.sort_by_key(|d| d.name);
        plan
    }
}

/// A device of ours as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Present {
    index: u32,
    vni: Option<u32>,
    port: Option<u16>,
    local: Option<IpAddr>,
    learning: Option<bool>,
    mac: Option<Vec<u8>>,
    mtu: Option<u32>,
    up: bool,
}

fn present(link: &LinkMessage) -> Option<(String, Present)> {
    let name = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(ifname) => Some(ifname.clone()),
        _ => None,
    })?;
    if name != DEVICE_V4 && name != DEVICE_V6 {
        return None;
    }
    let mut found = Present {
        index: link.header.index,
        vni: None,
        port: None,
        local: None,
        learning: None,
        mac: None,
        mtu: None,
        up: link.header.flags.contains(LinkFlags::Up),
    };
    for attr in &link.attributes {
        match attr {
            LinkAttribute::Address(mac) => found.mac = Some(mac.clone()),
            LinkAttribute::Mtu(mtu) => found.mtu = Some(*mtu),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Vxlan(vx)) = info {
                        for setting in vx {
                            match setting {
                                InfoVxlan::Id(id) => found.vni = Some(*id),
                                InfoVxlan::Port(port) => found.port = Some(*port),
                                InfoVxlan::Local(local) => found.local = Some(IpAddr::V4(*local)),
                                InfoVxlan::Local6(local) => found.local = Some(IpAddr::V6(*local)),
                                InfoVxlan::Learning(on) => found.learning = Some(*on),
                                _ => {}
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some((name, found))
}

/// Our devices in the kernel by name.
async fn devices(kernel: &Kernel) -> Result<BTreeMap<String, Present>, AgentError> {
    let links: Vec<LinkMessage> = kernel
        .handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(AgentError::netlink("dumping links"))?;
    Ok(links.iter().filter_map(present).collect())
}

/// Our FDB and neighbour entries on device `index`: (mac, underlay) and (gateway, mac).
type Entries = (BTreeSet<([u8; 6], IpAddr)>, BTreeSet<(IpAddr, [u8; 6])>);

async fn entries(kernel: &Kernel, index: u32) -> Result<Entries, AgentError> {
    let mut fdb = BTreeSet::new();
    let mut neigh = BTreeSet::new();
    for family in [AddressFamily::Bridge, AddressFamily::Inet, AddressFamily::Inet6] {
        let msgs: Vec<NeighbourMessage> = kernel
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(AgentError::netlink("dumping neighbours"))?;
        for msg in msgs.iter().filter(|m| m.header.ifindex == index && m.header.family == family) {
            let mac = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(lladdr) => <[u8; 6]>::try_from(lladdr.as_slice()).ok(),
                _ => None,
            });
            let dst = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                _ => None,
            });
            let (Some(mac), Some(dst)) = (mac, dst) else { continue };
            if family == AddressFamily::Bridge {
                fdb.insert((mac, dst));
            } else if msg.header.state == NeighbourState::Permanent {
                neigh.insert((dst, mac));
            }
        }
    }
    Ok((fdb, neigh))
}

/// What [`ensure`] found and did.
#[derive(Debug, Default)]
pub struct Ensured {
    /// Device name -> its index.
    pub index: BTreeMap<&'static str, u32>,
    /// Netlink writes.
    pub writes: usize,
    /// Failed writes.
    pub errors: Vec<String>,
}

/// Creates or adjusts the wanted devices and adds their missing FDB and neighbour entries
/// (never removing anything: that is [`cleanup`], after the routes). A device whose VNI,
/// port, local address or MAC differ from the plan is recreated; one that matches is left
/// alone, so a restarted agent changes nothing.
pub async fn ensure(kernel: &Kernel, plan: &VtepPlan, cfg: VxlanConfig) -> Result<Ensured, AgentError> {
    let mut out = Ensured::default();
    if plan.devices.is_empty() {
        return Ok(out);
    }
    let have = devices(kernel).await?;
    let links = kernel.handle.link();
    for dev in &plan.devices {
        let current = have.get(dev.name);
        let matches = current.is_some_and(|have| {
            have.vni == Some(cfg.vni)
                && have.port == Some(cfg.port)
                && have.local == Some(dev.local)
                && have.learning != Some(true)
                && have.mac.as_deref() == Some(&dev.mac[..])
        });
        if let (Some(stale), false) = (current, matches) {
            tracing::info!(device = dev.name, "VXLAN device differs from the settings: recreating it");
            links.del(stale.index).execute().await.map_err(AgentError::netlink("deleting a VXLAN device"))?;
            out.writes += 1;
        }
        if matches {
            let kept = current.expect("matches implies present");
            if !kept.up || (dev.mtu.is_some() && kept.mtu != dev.mtu) {
                let mut msg = LinkUnspec::new_with_index(kept.index).up();
                if let Some(mtu) = dev.mtu {
                    msg = msg.mtu(mtu);
                }
                links
                    .set(msg.build())
                    .execute()
                    .await
                    .map_err(AgentError::netlink("setting up a VXLAN device"))?;
                out.writes += 1;
            }
            out.index.insert(dev.name, kept.index);
        } else {
            let mut msg = LinkVxlan::new(dev.name, cfg.vni).port(cfg.port).learning(false);
            msg = match dev.local {
                IpAddr::V4(v4) => msg.local(v4),
                IpAddr::V6(v6) => msg.local6(v6),
            };
            msg = msg.address(dev.mac.to_vec()).up();
            if let Some(mtu) = dev.mtu {
                msg = msg.mtu(mtu);
            }
            links.add(msg.build()).execute().await.map_err(AgentError::netlink("creating a VXLAN device"))?;
            out.writes += 1;
            tracing::info!(device = dev.name, local = %dev.local, vni = cfg.vni, port = cfg.port, "created the VXLAN device");
            let index = devices(kernel)
                .await?
                .get(dev.name)
                .map(|made| made.index)
                .ok_or_else(|| AgentError::Route(format!("{} vanished after creation", dev.name)))?;
            out.index.insert(dev.name, index);
        }
    }
    for (name, index) in &out.index {
        let (fdb, neigh) = entries(kernel, *index).await?;
        for (_, mac, remote) in plan.fdb.iter().filter(|(dev, _, _)| dev == name) {
            if fdb.contains(&(*mac, *remote)) {
                continue;
            }
            let written = kernel
                .handle
                .neighbours()
                .add_bridge(*index, mac)
                .destination(*remote)
                .flags(NeighbourFlags::Own)
                .replace()
                .execute()
                .await;
            out.writes += 1;
            if let Err(e) = written {
                out.errors.push(format!("FDB entry for {remote} on {name}: {e}"));
            }
        }
        for (_, gw, mac) in plan.neighbours.iter().filter(|(dev, _, _)| dev == name) {
            if neigh.contains(&(*gw, *mac)) {
                continue;
            }
            let written =
                kernel.handle.neighbours().add(*index, *gw).link_layer_address(mac).replace().execute().await;
            out.writes += 1;
            if let Err(e) = written {
                out.errors.push(format!("neighbour {gw} on {name}: {e}"));
            }
        }
    }
    Ok(out)
}

fn entry(family: AddressFamily, index: u32, dst: IpAddr, mac: Option<&[u8; 6]>) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    if family == AddressFamily::Bridge {
        msg.header.flags = NeighbourFlags::Own;
    }
    if let Some(mac) = mac {
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    msg.attributes.push(NeighbourAttribute::Destination(match dst {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }));
    msg
}

/// Removes what the plan no longer wants: FDB and neighbour entries of gone peers, and our
/// devices without any tunnel (their routes go with them). Returns (writes, errors).
pub async fn cleanup(kernel: &Kernel, plan: &VtepPlan) -> Result<(usize, Vec<String>), AgentError> {
    let mut writes = 0;
    let mut errors = Vec::new();
    for (name, have) in devices(kernel).await? {
        let Some(dev) = plan.devices.iter().find(|d| d.name == name) else {
            kernel
                .handle
                .link()
                .del(have.index)
                .execute()
                .await
                .map_err(AgentError::netlink("deleting a VXLAN device"))?;
            tracing::info!(device = %name, "no peer needs the tunnel: deleted the VXLAN device");
            writes += 1;
            continue;
        };
        let (fdb, neigh) = entries(kernel, have.index).await?;
        for (mac, remote) in fdb.iter().filter(|(m, r)| !plan.fdb.contains(&(dev.name, *m, *r))) {
            let msg = entry(AddressFamily::Bridge, have.index, *remote, Some(mac));
            writes += 1;
            if let Err(e) = kernel.handle.neighbours().del(msg).execute().await {
                errors.push(format!("deleting FDB entry for {remote} on {name}: {e}"));
            }
        }
        for (gw, mac) in neigh.iter().filter(|(g, m)| !plan.neighbours.contains(&(dev.name, *g, *m))) {
            let family = if gw.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
            let msg = entry(family, have.index, *gw, Some(mac));
            writes += 1;
            if let Err(e) = kernel.handle.neighbours().del(msg).execute().await {
                errors.push(format!("deleting neighbour {gw} on {name}: {e}"));
            }
        }
    }
    Ok((writes, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_device_per_underlay_family_an_fdb_entry_per_node_a_neighbour_per_cidr() {
        let far = Tunnel { node: "far".into(), remote: ip("192.0.2.9") };
        let far6 = Tunnel { node: "far6".into(), remote: ip("2001:db8::7") };
        let tunnelled = BTreeMap::from([
            ("10.244.9.0/24".parse().unwrap(), far.clone()),
            ("fd00:244:9::/64".parse().unwrap(), far),
            ("fd00:244:7::/64".parse().unwrap(), far6),
        ]);
        let local = [ip("10.200.0.1"), ip("fd00:200::1")];
        let plan = VtepPlan::new(&tunnelled, &local, |l| Some(if l.is_ipv4() { 1500 } else { 9000 }));
        assert_eq!(
            plan.devices,
            [
                Device { name: DEVICE_V4, local: local[0], mac: [0x0e, 4, 10, 200, 0, 1], mtu: Some(1450) },
                Device { name: DEVICE_V6, local: local[1], mac: vtep_mac(&local[1]), mtu: Some(8930) },
            ]
        );
        let far_mac = [0x0e, 4, 192, 0, 2, 9];
        assert_eq!(
            plan.fdb,
            BTreeSet::from([
                (DEVICE_V4, far_mac, ip("192.0.2.9")),
                (DEVICE_V6, vtep_mac(&ip("2001:db8::7")), ip("2001:db8::7"))
            ])
        );
        assert!(plan.neighbours.contains(&(DEVICE_V4, ip("10.244.9.0"), far_mac)));
        assert!(plan.neighbours.contains(&(DEVICE_V4, ip("fd00:244:9::"), far_mac)));
        assert_eq!(plan.routes.len(), 3);
        assert_ne!(vtep_mac(&ip("2001:db8::7")), vtep_mac(&ip("2001:db8::8")));
        assert!(VtepPlan::new(&BTreeMap::new(), &local, |_| None).devices.is_empty());
    }
}
