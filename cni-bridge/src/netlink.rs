//! The netlink requests the plugin makes, over one connection per namespace.

use std::fs::File;
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::{AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::BridgeVlanInfoFlags;
use rtnetlink::packet_route::link::{
    BridgePortState, InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage, State,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteMetric, RouteScope};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkBridgeVlan, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use netlink_wire::dump::{self, Family};
use netlink_wire::{address_of, errno};

use crate::error::BridgeError;
use crate::netns;

const EEXIST: i32 = nix::errno::Errno::EEXIST as i32;
const ENODEV: i32 = nix::errno::Errno::ENODEV as i32;
const EADDRNOTAVAIL: i32 = nix::errno::Errno::EADDRNOTAVAIL as i32;
const EOPNOTSUPP: i32 = nix::errno::Errno::EOPNOTSUPP as i32;
const ENOENT: i32 = nix::errno::Errno::ENOENT as i32;
const EINVAL: i32 = nix::errno::Errno::EINVAL as i32;

fn no_vlan_filtering() -> BridgeError {
    BridgeError::Unsupported {
        field: "vlan",
        value: "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)".into(),
    }
}

/// What the plugin needs to know of a link.
#[derive(Debug, Clone, Default)]
pub struct Link {
    /// The interface index, stable for the link's life (names can change).
    pub index: u32,
    /// The hardware address, reported in the result and compared by CHECK.
    pub mac: Vec<u8>,
    /// Reported in 1.1.0 results and compared with the config's `mtu` by CHECK.
    pub mtu: u32,
    /// `bridge`, `veth`...: an existing link named like the bridge must be a bridge.
    pub kind: Option<InfoKind>,
    /// The index of the bridge this link is a port of, if any.
    pub controller: Option<u32>,
    /// Administratively up (IFF_UP): a bridge that is down keeps every port disabled.
    pub up: bool,
    /// Operational state up: for a bridge port, it forwards only then.
    pub oper_up: bool,
    /// For a bridge port, whether it is still disabled: the kernel enables it when it
    /// handles the carrier change, a moment after the veth reports operational state up.
    pub port_disabled: bool,
    /// IFF_PROMISC (`promiscMode`).
    pub promisc: bool,
    /// The bridge port's hairpin mode, `None` when the link is no bridge port.
    pub hairpin: Option<bool>,
    /// The bridge port's isolation, `None` when the link is no bridge port.
    pub isolated: Option<bool>,
    /// For a veth, its peer's ifindex (IFLA_LINK), in the peer's namespace.
    pub peer_index: Option<u32>,
    /// For a bridge, whether it filters by VLAN.
    pub vlan_filtering: bool,
}

fn summarize(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        promisc: msg.header.flags.contains(LinkFlags::Promisc),
        up: msg.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Address(mac) => link.mac = mac.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Controller(bridge) => link.controller = Some(*bridge),
            LinkAttribute::OperState(state) => link.oper_up = *state == State::Up,
            LinkAttribute::Link(peer) => link.peer_index = Some(*peer),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => link.kind = Some(kind.clone()),
                        LinkInfo::Data(InfoData::Bridge(bridge)) => {
                            link.vlan_filtering =
                                bridge.iter().any(|x| matches!(x, InfoBridge::VlanFiltering(true)));
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                            for port_attr in port {
                                match port_attr {
                                    InfoBridgePort::HairpinMode(on) => link.hairpin = Some(*on),
                                    InfoBridgePort::Isolated(on) => link.isolated = Some(*on),
                                    InfoBridgePort::State(state) => {
                                        link.port_disabled = *state == BridgePortState::Disabled
                                    }
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// A netlink connection bound to one namespace.
#[derive(Clone)]
pub struct Nl {
    handle: Handle,
}

impl Nl {
    /// A connection in the current namespace.
    pub fn here() -> Result<Nl, BridgeError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(BridgeError::io("opening a netlink socket"))?;
        tokio::spawn(conn);
        Ok(Nl { handle })
    }

    /// [`Nl::here`] from outside the runtime `rt`.
    pub fn here_in(rt: &tokio::runtime::Runtime) -> Result<Nl, BridgeError> {
        let _g = rt.enter();
        Nl::here()
    }

    /// [`Nl::in_ns`] from outside the runtime `rt`.
    pub fn in_ns_in(rt: &tokio::runtime::Runtime, ns: &File) -> Result<Nl, BridgeError> {
        let _g = rt.enter();
        Nl::in_ns(ns)
    }

    /// A connection whose socket lives in `ns` (the socket binds at creation).
    pub fn in_ns(ns: &File) -> Result<Nl, BridgeError> {
        let made = netns::run_in(ns, rtnetlink::new_connection)
            .map_err(|e| BridgeError::Netns(format!("entering the pod namespace: {e}")))?;
        let (conn, handle, _) =
            made.map_err(BridgeError::io("opening a netlink socket in the pod namespace"))?;
        tokio::spawn(conn);
        Ok(Nl { handle })
    }

    /// A link by name; `None` if there is none.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, BridgeError> {
        match self.handle.link().get().match_name(name.to_string()).execute().try_next().await {
            Ok(m) => Ok(m.as_ref().map(summarize)),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(BridgeError::netlink(format!("getting link {name}"))(e)),
        }
    }

    /// A link by index; `None` if there is none.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, BridgeError> {
        match self.handle.link().get().match_index(index).execute().try_next().await {
            Ok(m) => Ok(m.as_ref().map(summarize)),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(BridgeError::netlink(format!("getting link {index}"))(e)),
        }
    }

    /// Creates the bridge (up, with its MAC pinned and its MTU set); `false` if it existed.
    pub async fn create_bridge(
        &self,
        name: &str,
        mac: [u8; 6],
        mtu: Option<u32>,
        vlan_filtering: bool,
    ) -> Result<bool, BridgeError> {
        // Down: the caller turns duplicate address detection off before the bridge can get
        // its link-local address, which happens once it is up with a port.
        let mut builder = LinkMessageBuilder::<LinkBridge>::new(name).address(mac.to_vec());
        if vlan_filtering {
            builder = builder.vlan_filtering(true);
        }
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        match self.handle.link().add(builder.build()).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(false),
            Err(e) if vlan_filtering && errno(&e) == Some(EOPNOTSUPP) => Err(no_vlan_filtering()),
            Err(e) => Err(BridgeError::netlink(format!("creating bridge {name}"))(e)),
        }
    }

    /// Turns VLAN filtering on for an existing bridge.
    pub async fn enable_vlan_filtering(&self, name: &str) -> Result<(), BridgeError> {
        let msg = LinkBridge::new(name).vlan_filtering(true).build();
        match self.handle.link().change(msg).execute().await {
            Err(e) if errno(&e) == Some(EOPNOTSUPP) => Err(no_vlan_filtering()),
            r => r.map_err(BridgeError::netlink(format!("enabling VLAN filtering on {name}"))),
        }
    }

    /// Adds VLANs to a bridge port: `pvid` as PVID and untagged, `tagged` as tagged.
    pub async fn port_vlans_add(
        &self,
        port: u32,
        pvid: Option<u16>,
        tagged: &[u16],
    ) -> Result<(), BridgeError> {
        let mut builder = LinkBridgeVlan::new(port);
        // Runs of consecutive ids go as ranges: a trunk of 1-4094 is two entries, not 4094.
        let mut run_start = 0;
        while run_start < tagged.len() {
            let mut run_end = run_start;
            while run_end + 1 < tagged.len() && tagged[run_end + 1] == tagged[run_end] + 1 {
                run_end += 1;
            }
            if run_end == run_start {
                builder = builder.vlan(tagged[run_start], BridgeVlanInfoFlags::empty());
            } else {
                builder = builder
                    .vlan_range_start(tagged[run_start], BridgeVlanInfoFlags::empty())
                    .vlan_range_end(tagged[run_end], BridgeVlanInfoFlags::empty());
            }
            run_start = run_end + 1;
        }
        if let Some(pvid) = pvid {
            builder = builder.vlan(pvid, BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged);
        }
        self.handle
            .link()
            .set(builder.build())
            .execute()
            .await
            .map_err(BridgeError::netlink("adding VLANs to the bridge port"))
    }

    /// Removes a VLAN from a bridge port; absent is fine.
    pub async fn port_vlan_del(&self, port: u32, vid: u16) -> Result<(), BridgeError> {
        let msg = LinkBridgeVlan::new(port).vlan(vid, BridgeVlanInfoFlags::empty()).build();
        match self.handle.link().del_with_message(msg).execute().await {
            Err(e) if !matches!(errno(&e), Some(ENOENT) | Some(EINVAL)) => {
                Err(BridgeError::netlink(format!("removing VLAN {vid} from the bridge port"))(e))
            }
            _ => Ok(()),
        }
    }

    /// RTM_SETLINK with what `add_to` adds to a message for `index`.
    pub async fn set(
        &self,
        index: u32,
        what: &str,
        add_to: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
    ) -> Result<(), BridgeError> {
        let msg = add_to(LinkUnspec::new_with_index(index)).build();
        self.handle.link().set(msg).execute().await.map_err(BridgeError::netlink(what.to_string()))
    }

    /// Sets hairpin and isolation on a bridge port.
    pub async fn set_port(&self, index: u32, hairpin: bool, isolated: bool) -> Result<(), BridgeError> {
        let msg = LinkBridgePort::new(index).hairpin(hairpin).isolated(isolated).build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(BridgeError::netlink("setting bridge port mode"))
    }

    /// Creates a veth through this (pod) connection: `name` here, `peer` in `host_ns`.
    /// Returns `Ok(false)` when a name is taken.
    pub async fn create_veth(
        &self,
        name: &str,
        peer: &str,
        host_ns: &File,
        mtu: Option<u32>,
        mac: Option<[u8; 6]>,
    ) -> Result<bool, BridgeError> {
        use std::os::fd::AsRawFd;
        let mut peer_builder = LinkUnspec::new_with_name(peer).setns_by_fd(host_ns.as_raw_fd());
        let mut veth = LinkVeth::new(name, peer);
        if let Some(mtu) = mtu {
            peer_builder = peer_builder.mtu(mtu);
            veth = veth.mtu(mtu);
        }
        if let Some(mac) = mac {
            veth = veth.address(mac.to_vec());
        }
        let msg = veth.set_info_data(InfoData::Veth(InfoVeth::Peer(peer_builder.build()))).build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(false),
            Err(e) => Err(BridgeError::netlink(format!("creating veth {name}/{peer}"))(e)),
        }
    }

    /// Creates a veth pair with both ends here; `Ok(false)` when a name is taken.
    pub async fn create_local_veth(
        &self,
        name: &str,
        peer: &str,
        mtu: Option<u32>,
    ) -> Result<bool, BridgeError> {
        let mut veth = LinkVeth::new(name, peer);
        if let Some(mtu) = mtu {
            veth = veth.mtu(mtu);
        }
        match self.handle.link().add(veth.build()).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(false),
            Err(e) => Err(BridgeError::netlink(format!("creating veth {name}/{peer}"))(e)),
        }
    }

    /// Deletes a link by name in one request; gone already is fine.
    pub async fn del_link_named(&self, name: &str) -> Result<(), BridgeError> {
        let msg = LinkUnspec::new_with_name(name).build();
        match self.handle.link().del_with_message(msg).execute().await {
            Err(e) if errno(&e) != Some(ENODEV) => Err(BridgeError::netlink(format!("deleting {name}"))(e)),
            _ => Ok(()),
        }
    }

    /// The indexes of the ports of bridge `index`.
    pub async fn ports(&self, index: u32) -> Result<Vec<u32>, BridgeError> {
        let mut ports = Vec::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(BridgeError::netlink("listing links"))? {
            if summarize(&link).controller == Some(index) {
                ports.push(link.header.index);
            }
        }
        Ok(ports)
    }

    /// Deletes a link; gone already is fine.
    pub async fn del_link(&self, index: u32) -> Result<(), BridgeError> {
        match self.handle.link().del(index).execute().await {
            Err(e) if errno(&e) != Some(ENODEV) => Err(BridgeError::netlink("deleting link")(e)),
            _ => Ok(()),
        }
    }

    async fn address_messages(&self, index: u32) -> Result<Vec<AddressMessage>, BridgeError> {
        dump::addresses(&self.handle, Some(index)).await.map_err(BridgeError::netlink("listing addresses"))
    }

    /// Addresses of a link (link-local IPv6 left out).
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>, BridgeError> {
        Ok(self
            .address_messages(index)
            .await?
            .iter()
            .filter_map(|m| {
                let ip = address_of(m)?;
                if let IpAddr::V6(v6) = ip {
                    if v6.segments()[0] & 0xffc0 == 0xfe80 {
                        return None;
                    }
                }
                IpNetwork::new(ip, m.header.prefix_len).ok()
            })
            .collect())
    }

    /// The IPv6 addresses on a link that duplicate address detection has not cleared yet:
    /// `(address, failed)`, `failed` when another host answered for it.
    pub async fn unsettled_ipv6(&self, index: u32) -> Result<Vec<(IpAddr, bool)>, BridgeError> {
        Ok(self
            .address_messages(index)
            .await?
            .iter()
            .filter_map(|m| {
                let ip = address_of(m).filter(IpAddr::is_ipv6)?;
                let failed = m.header.flags.contains(AddressHeaderFlags::Dadfailed);
                (failed || m.header.flags.contains(AddressHeaderFlags::Tentative)).then_some((ip, failed))
            })
            .collect())
    }

    /// Whether the link can send neighbour solicitations for packets it forwards: the kernel
    /// sends them only from a link-local address that is not tentative, so until then a
    /// packet forwarded to a pod that has not spoken yet waits (1-2 s of DAD) or is lost.
    /// `Err` names a link-local address found duplicate. A link that never gets one
    /// (`addr_gen_mode` none, set by its owner) counts as usable: there is nothing to wait for.
    pub async fn link_local_usable(&self, index: u32, name: &str) -> Result<bool, BridgeError> {
        let mut usable = false;
        for m in self.address_messages(index).await? {
            let Some(IpAddr::V6(v6)) = address_of(&m) else { continue };
            if v6.segments()[0] & 0xffc0 != 0xfe80 {
                continue;
            }
            if m.header.flags.contains(AddressHeaderFlags::Dadfailed) {
                return Err(BridgeError::DadFailed { address: IpAddr::V6(v6), ifname: name.to_string() });
            }
            usable |= !m.header.flags.contains(AddressHeaderFlags::Tentative);
        }
        let no_link_local = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/addr_gen_mode"))
            .is_ok_and(|mode| mode.trim() == "1");
        Ok(usable || no_link_local)
    }

    /// Adds an address; present already is fine.
    pub async fn add_address(&self, index: u32, address: IpNetwork) -> Result<(), BridgeError> {
        self.add_address_with(index, address, false).await
    }

    /// Adds an address that skips duplicate address detection (IPv6): usable at once, where
    /// a DAD'd one stays tentative for 1-2 s (no bind, no neighbour answers meanwhile).
    pub async fn add_address_nodad(&self, index: u32, address: IpNetwork) -> Result<(), BridgeError> {
        self.add_address_with(index, address, true).await
    }

    async fn add_address_with(&self, index: u32, address: IpNetwork, nodad: bool) -> Result<(), BridgeError> {
        let mut req = self.handle.address().add(index, address.ip(), address.prefix());
        if nodad && address.is_ipv6() {
            req.message_mut().header.flags = AddressHeaderFlags::Nodad;
        }
        match req.execute().await {
            Err(e) if errno(&e) != Some(EEXIST) => {
                Err(BridgeError::netlink(format!("adding address {address}"))(e))
            }
            _ => Ok(()),
        }
    }

    /// Removes an address; absent is fine.
    pub async fn del_address(&self, index: u32, address: IpNetwork) -> Result<(), BridgeError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(address.ip())
            .execute()
            .try_collect()
            .await
            .map_err(BridgeError::netlink("listing addresses"))?;
        for message in msgs {
            match self.handle.address().del(message).execute().await {
                Err(e) if errno(&e) != Some(EADDRNOTAVAIL) => {
                    return Err(BridgeError::netlink(format!("removing address {address}"))(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Adds a route out of `oif`; present already is fine.
    pub async fn add_route(&self, oif: u32, route: &cni_proto::Route) -> Result<(), BridgeError> {
        let mut msg = route_message(oif, route)?;
        if route.mtu.is_some() || route.advmss.is_some() {
            let mut metrics = Vec::new();
            if let Some(mtu) = route.mtu {
                metrics.push(RouteMetric::Mtu(mtu));
            }
            if let Some(advmss) = route.advmss {
                metrics.push(RouteMetric::Advmss(advmss));
            }
            msg.attributes.push(RouteAttribute::Metrics(metrics));
        }
        match self.handle.route().add(msg).execute().await {
            Err(e) if errno(&e) != Some(EEXIST) => {
                Err(BridgeError::netlink(format!("adding route to {} via {:?}", route.dst, route.gw))(e))
            }
            _ => Ok(()),
        }
    }

    /// Routes of one family out of `oif`, as (dst, gw).
    pub async fn routes(&self, oif: u32, v4: bool) -> Result<Vec<(IpNetwork, Option<IpAddr>)>, BridgeError> {
        let family = if v4 { Family::V4 } else { Family::V6 };
        let msgs =
            dump::routes(&self.handle, family).await.map_err(BridgeError::netlink("listing routes"))?;
        Ok(msgs
            .iter()
            .filter(|m| dump::output_interface(m) == Some(oif))
            .filter_map(|m| {
                let dst = dump::destination(m).unwrap_or(family.unspecified());
                let net = IpNetwork::new(dst, m.header.destination_prefix_length).ok()?;
                Some((net, dump::gateway(m)))
            })
            .collect())
    }
}

fn route_message(oif: u32, route: &cni_proto::Route) -> Result<RouteMessage, BridgeError> {
    // Both are checked when a result is parsed; refused here too rather than trusted.
    let mismatch =
        || BridgeError::Config(format!("route to {} via {:?}: families differ", route.dst, route.gw));
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.dst.network(), route.dst.prefix())
        .map_err(|_| mismatch())?
        .output_interface(oif);
    if let Some(gw) = route.gw {
        builder = builder.gateway(gw).map_err(|_| mismatch())?;
    }
    if let Some(priority) = route.priority {
        builder = builder.priority(priority);
    }
    if let Some(table) = route.table {
        builder = builder.table_id(table);
    }
    match route.scope {
        Some(scope) => builder = builder.scope(RouteScope::from(scope)),
        None if route.gw.is_none() => builder = builder.scope(RouteScope::Link),
        None => {}
    }
    Ok(builder.build())
}
