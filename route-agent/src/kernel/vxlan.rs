//! The VXLAN devices, FDB and neighbour entries in the kernel: brought to a [`VtepPlan`]
//! before ([`ensure`]) and after ([`cleanup`]) the routes are written. The plan itself is pure
//! (`crate::vxlan`); this is the only VXLAN code that talks to the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan};

use super::Kernel;
use crate::error::AgentError;
use crate::vxlan::{VtepPlan, VxlanConfig, DEVICE_V4, DEVICE_V6};

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
pub type Entries = (BTreeSet<([u8; 6], IpAddr)>, BTreeSet<(IpAddr, [u8; 6])>);

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
                // An FDB entry (family AF_BRIDGE) carries its underlay address as bytes the
                // parser cannot type by the message's family: 4 or 16 of them.
                NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => ip_of(bytes),
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

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
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

/// The FDB and neighbour entries on our devices as the kernel has them, by device name:
/// (remote VTEP MAC, underlay address) and (tunnel gateway, MAC). Read-only: for the doctor.
pub async fn present_entries(kernel: &Kernel) -> Result<BTreeMap<String, Entries>, AgentError> {
    let mut out = BTreeMap::new();
    for (name, have) in devices(kernel).await? {
        out.insert(name, entries(kernel, have.index).await?);
    }
    Ok(out)
}
