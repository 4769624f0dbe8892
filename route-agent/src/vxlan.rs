//! The VXLAN backend for peers a direct route cannot reach: one unicast VXLAN device per
//! underlay family, with a static FDB entry (remote VTEP MAC -> remote node address) and a
//! permanent neighbour entry (tunnel gateway -> remote VTEP MAC) per tunnelled pod CIDR, as
//! flannel programs them. No multicast, no learning: the agent knows every VTEP from the node
//! source. Each node's VTEP MAC is derived from its underlay address ([`vtep_mac`]), so no
//! node has to publish it. [`VtepPlan`] is pure; `kernel::vxlan::{ensure, cleanup}` bring the
//! kernel to it before and after the routes are written.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use ipnetwork::IpNetwork;

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
