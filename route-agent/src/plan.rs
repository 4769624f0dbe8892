//! The desired route set (a pure function of the nodes) and its difference to the kernel's.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::model::{NodeInfo, Snapshot};

/// What the agent wants in the kernel, and what it cannot route.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Pod CIDR of another node -> that node's address.
    pub routes: BTreeMap<IpNetwork, IpAddr>,
    /// Nodes whose address is not on a directly connected subnet of this node and that no
    /// tunnel reaches (host-gw backend, or no underlay address to tunnel from): (node, address).
    pub off_link: Vec<(String, IpAddr)>,
    /// Pod CIDRs reached through the VXLAN device (their `routes` gateway is the CIDR's own
    /// network address, [`tunnel_gateway`], on-link on the device).
    pub tunnelled: BTreeMap<IpNetwork, Tunnel>,
    /// Claims ignored because they overlap an earlier one.
    pub conflicts: Vec<Conflict>,
    /// Other nodes listed with pod CIDRs but without any usable address.
    pub nodes_without_address: Vec<String>,
    /// Other nodes' pod CIDRs without a node address of their family.
    pub without_address: Vec<Unaddressed>,
}

/// Which peers the agent reaches through a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Direct routes only; off-link peers are reported, not routed.
    HostGw,
    /// Every peer through the VXLAN device.
    Vxlan,
    /// Direct routes to on-link peers, the VXLAN device for the others.
    #[default]
    Auto,
}

/// How the plan may tunnel: the backend and this node's underlay addresses (the tunnel's
/// local end; a family without one cannot carry a tunnel).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tunnelling {
    /// The backend.
    pub backend: Backend,
    /// This node's addresses.
    pub local: Vec<IpAddr>,
}

/// A pod CIDR reached through the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tunnel {
    /// The node holding it.
    pub node: String,
    /// That node's underlay address the packets are sent to: IPv4 when both ends have one
    /// (IPv6 pods ride it too), else IPv6.
    pub remote: IpAddr,
}

/// The gateway of a tunnelled route: the pod CIDR's network address, as flannel does. The
/// remote node needs no such address: the neighbour entry maps it to the remote VTEP's MAC,
/// and the remote node forwards the inner packet by its destination.
pub fn tunnel_gateway(cidr: &IpNetwork) -> IpAddr {
    cidr.network()
}

/// The underlay address to reach `node` at through the tunnel, given this node's addresses.
fn underlay(node: &NodeInfo, local: &[IpAddr]) -> Option<IpAddr> {
    let v4 = local.iter().any(IpAddr::is_ipv4).then_some(node.ipv4.map(IpAddr::V4)).flatten();
    let v6 = local.iter().any(IpAddr::is_ipv6).then_some(node.ipv6.map(IpAddr::V6)).flatten();
    v4.or(v6)
}

/// A pod CIDR claim that overlaps one kept before it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    /// The ignored claim.
    pub cidr: IpNetwork,
    /// The node making it.
    pub claimant: String,
    /// The claim it overlaps, which is kept.
    pub owner_cidr: IpNetwork,
    /// The node holding that claim.
    pub owner: String,
}

/// A pod CIDR of another node that has no address of the CIDR's family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unaddressed {
    /// The node.
    pub node: String,
    /// Its pod CIDR.
    pub cidr: IpNetwork,
    /// The route kept from before (the kernel's gateway), if there was one.
    pub kept: Option<IpAddr>,
    /// The kept route goes through the VXLAN device. It leads nowhere: the node's VTEP
    /// entries (FDB, neighbour) are made from its address and went with it.
    pub tunnel: bool,
}

/// A pod CIDR as an address interval, for the overlap check.
fn span(net: &IpNetwork) -> (bool, u128, u128) {
    let (base, bits) = match net.network() {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    let size_minus_one = u128::MAX.checked_shr(u32::from(net.prefix()) + (128 - bits)).unwrap_or(0);
    (net.is_ipv4(), base, base + size_minus_one)
}

/// Claims kept so far: disjoint intervals by start, with their claim.
#[derive(Default)]
struct Owners<'a> {
    by_start: BTreeMap<(bool, u128), (u128, IpNetwork, &'a str)>,
}

impl<'a> Owners<'a> {
    /// Keeps `cidr` for `node` unless it overlaps a kept claim; returns that claim if it does.
    fn claim(&mut self, cidr: IpNetwork, node: &'a str) -> Result<(), (IpNetwork, &'a str)> {
        let (v4, start, end) = span(&cidr);
        // The kept claims are disjoint, so only the last one starting at or before our end
        // can overlap us.
        if let Some((&(_, other_start), &(other_end, other, owner))) =
            self.by_start.range((v4, 0)..=(v4, end)).next_back()
        {
            if other_start >= start || other_end >= start {
                return Err((other, owner));
            }
        }
        self.by_start.insert((v4, start), (end, cidr, node));
        Ok(())
    }
}

/// Routes to every other node's pod CIDRs via that node's address of the same family, when
/// that address is on one of `connected` (this node's directly connected subnets).
///
/// `have` is the kernel's current routes. It decides who owns overlapping claims (this node
/// first, then claims already routed, then by node name), and it keeps the route of a node
/// still listed but without an address of the family: a half-written nodes file or a node
/// whose address was cleared must not take working routes away. Only a node that leaves the
/// source loses its routes.
pub fn desired(
    nodes: &Snapshot,
    me: &str,
    connected: &[IpNetwork],
    have: &BTreeMap<IpNetwork, IpAddr>,
) -> Desired {
    let host_gw = Tunnelling { backend: Backend::HostGw, local: Vec::new() };
    desired_with(nodes, me, connected, have, &host_gw)
}

/// [`desired`] with a tunnel for the peers direct routes cannot reach (see [`Backend`]).
pub fn desired_with(
    nodes: &Snapshot,
    me: &str,
    connected: &[IpNetwork],
    have: &BTreeMap<IpNetwork, IpAddr>,
    tunnelling: &Tunnelling,
) -> Desired {
    let mut desired = Desired::default();
    // Each claim carries its node, so that nothing is looked up by name again: at 20,000
    // nodes those lookups were a good part of a plan, and a plan is made on every change.
    let mut claims: Vec<(u8, &str, IpNetwork, &NodeInfo)> = nodes
        .values()
        .flat_map(|n| n.pod_cidrs.iter().map(move |c| (n, *c)))
        .map(|(n, cidr)| {
            let rank = if n.name == me {
                0
            } else if have
                .get(&cidr)
                .is_some_and(|gw| *gw == tunnel_gateway(&cidr) || n.addr_for(&cidr).is_none_or(|a| a == *gw))
            {
                1
            } else {
                2
            };
            (rank, n.name.as_str(), cidr, n)
        })
        .collect();
    claims.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let mut owners = Owners::default();
    let mut kept: Vec<(&str, IpNetwork, &NodeInfo)> = Vec::new();
    for (_, node, cidr, info) in claims {
        match owners.claim(cidr, node) {
            Ok(()) => kept.push((node, cidr, info)),
            Err((owner_cidr, owner)) => desired.conflicts.push(Conflict {
                cidr,
                claimant: node.to_string(),
                owner_cidr,
                owner: owner.to_string(),
            }),
        }
    }
    desired.conflicts.sort();
    kept.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for (name, cidr, n) in kept.into_iter().filter(|(name, _, _)| *name != me) {
        let Some(gw) = n.addr_for(&cidr) else {
            let kept = have.get(&cidr).copied();
            let tunnel = kept == Some(tunnel_gateway(&cidr));
            desired.without_address.push(Unaddressed { node: name.to_string(), cidr, kept, tunnel });
            if let Some(gw) = kept {
                desired.routes.insert(cidr, gw);
            }
            continue;
        };
        let on_link = connected.iter().any(|c| c.contains(gw));
        let tunnel = match tunnelling.backend {
            Backend::HostGw => None,
            Backend::Auto if on_link => None,
            Backend::Auto | Backend::Vxlan => underlay(n, &tunnelling.local),
        };
        if let Some(remote) = tunnel {
            desired.tunnelled.insert(cidr, Tunnel { node: name.to_string(), remote });
            desired.routes.insert(cidr, tunnel_gateway(&cidr));
            continue;
        }
        if !on_link {
            if !desired.off_link.iter().any(|(off, _)| off == name) {
                desired.off_link.push((name.to_string(), gw));
            }
            continue;
        }
        desired.routes.insert(cidr, gw);
    }
    desired.nodes_without_address = nodes
        .values()
        .filter(|n| n.name != me && !n.pod_cidrs.is_empty() && n.ipv4.is_none() && n.ipv6.is_none())
        .map(|n| n.name.clone())
        .collect();
    desired
}

/// What to change in the kernel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    /// Routes to add, or to replace in place (a new gateway): never delete-then-add.
    pub upsert: Vec<(IpNetwork, IpAddr)>,
    /// Our routes that are no longer wanted.
    pub delete: Vec<(IpNetwork, IpAddr)>,
}

impl Diff {
    /// Whether nothing needs to change.
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.delete.is_empty()
    }
}

/// The difference between what is wanted and what the kernel has (our protocol only).
pub fn diff(want: &BTreeMap<IpNetwork, IpAddr>, have: &BTreeMap<IpNetwork, IpAddr>) -> Diff {
    Diff {
        upsert: want.iter().filter(|(d, g)| have.get(d) != Some(g)).map(|(d, g)| (*d, *g)).collect(),
        delete: have.iter().filter(|(d, _)| !want.contains_key(d)).map(|(d, g)| (*d, *g)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeInfo;

    fn node(name: &str, cidrs: &[&str], addrs: &[&str]) -> NodeInfo {
        NodeInfo::with_addresses(
            name,
            cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            &addrs.iter().map(|a| a.parse().unwrap()).collect::<Vec<IpAddr>>(),
        )
    }

    fn snap(nodes: Vec<NodeInfo>) -> Snapshot {
        nodes.into_iter().map(|n| (n.name.clone(), n)).collect()
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const L2: [&str; 2] = ["10.200.0.0/24", "fd00:200::/64"];

    fn connected() -> Vec<IpNetwork> {
        L2.iter().map(|c| net(c)).collect()
    }

    #[test]
    fn routes_to_other_nodes_per_family_not_to_self() {
        let s = snap(vec![
            node("a", &["10.244.1.0/24", "fd00:244:1::/64"], &["10.200.0.1", "fd00:200::1"]),
            node("b", &["10.244.2.0/24", "fd00:244:2::/64"], &["10.200.0.2", "fd00:200::2"]),
            node("c", &["10.244.3.0/24"], &["10.200.0.3"]),
        ]);
        let d = desired(&s, "a", &connected(), &BTreeMap::new());
        assert_eq!(
            d.routes,
            BTreeMap::from([
                (net("10.244.2.0/24"), ip("10.200.0.2")),
                (net("10.244.3.0/24"), ip("10.200.0.3")),
                (net("fd00:244:2::/64"), ip("fd00:200::2")),
            ])
        );
        assert!(d.off_link.is_empty() && d.conflicts.is_empty());
    }

    #[test]
    fn skips_nodes_without_cidr_or_address_of_the_family() {
        let s = snap(vec![
            node("a", &["10.244.1.0/24"], &["10.200.0.1"]),
            node("b", &[], &["10.200.0.2"]),
            node("c", &["fd00:244:3::/64"], &["10.200.0.3"]),
        ]);
        assert!(desired(&s, "a", &connected(), &BTreeMap::new()).routes.is_empty());
    }

    #[test]
    fn reports_nodes_off_the_l2_segment_instead_of_misrouting() {
        let s = snap(vec![
            node("a", &["10.244.1.0/24"], &["10.200.0.1"]),
            node("far", &["10.244.9.0/24"], &["192.0.2.9"]),
        ]);
        let d = desired(&s, "a", &connected(), &BTreeMap::new());
        assert!(d.routes.is_empty());
        assert_eq!(d.off_link, vec![("far".to_string(), ip("192.0.2.9"))]);
    }

    #[test]
    fn a_cidr_claimed_twice_goes_to_the_first_node_and_never_over_our_own() {
        let s = snap(vec![
            node("a", &["10.244.1.0/24"], &["10.200.0.1"]),
            node("b", &["10.244.2.0/24"], &["10.200.0.2"]),
            node("c", &["10.244.2.0/24"], &["10.200.0.3"]),
            node("d", &["10.244.1.0/24"], &["10.200.0.4"]),
        ]);
        let d = desired(&s, "a", &connected(), &BTreeMap::new());
        assert_eq!(d.routes, BTreeMap::from([(net("10.244.2.0/24"), ip("10.200.0.2"))]));
        assert_eq!(d.conflicts.len(), 2);
    }

    #[test]
    fn a_partial_overlap_is_a_conflict_and_the_established_owner_keeps_its_cidr() {
        let s = snap(vec![
            node("node-1", &["10.245.1.0/24", "fd00:245:1::/64"], &["10.200.0.1", "fd00:200::1"]),
            node("node-2", &["10.245.2.0/24", "fd00:245:2::/64"], &["10.200.0.2", "fd00:200::2"]),
            node("node-x", &["10.245.2.128/25", "fd00:245:2:0:8000::/65"], &["10.200.0.9", "fd00:200::9"]),
        ]);
        let d = desired(&s, "node-1", &connected(), &BTreeMap::new());
        assert_eq!(
            d.routes,
            BTreeMap::from([
                (net("10.245.2.0/24"), ip("10.200.0.2")),
                (net("fd00:245:2::/64"), ip("fd00:200::2")),
            ]),
            "no route for node-x's claims"
        );
        let named: Vec<(String, String, String)> =
            d.conflicts.iter().map(|c| (c.cidr.to_string(), c.claimant.clone(), c.owner.clone())).collect();
        assert_eq!(
            named,
            [
                ("10.245.2.128/25".into(), "node-x".into(), "node-2".into()),
                ("fd00:245:2:0:8000::/65".into(), "node-x".into(), "node-2".into()),
            ]
        );
        // A wider claim arriving later does not take over a routed one, whatever its name.
        let s = snap(vec![
            node("a", &["10.244.1.0/24"], &["10.200.0.1"]),
            node("b", &["10.245.0.0/16"], &["10.200.0.2"]),
            node("c", &["10.245.7.0/24"], &["10.200.0.3"]),
        ]);
        let have = BTreeMap::from([(net("10.245.7.0/24"), ip("10.200.0.3"))]);
        let d = desired(&s, "a", &connected(), &have);
        assert_eq!(d.routes, have);
        assert_eq!(d.conflicts[0].claimant, "b");
        // Nor over this node's own, even in part.
        let s = snap(vec![
            node("a", &["10.244.1.0/24"], &["10.200.0.1"]),
            node("b", &["10.244.0.0/23"], &["10.200.0.2"]),
        ]);
        let d = desired(&s, "a", &connected(), &BTreeMap::new());
        assert!(d.routes.is_empty());
        assert_eq!((d.conflicts[0].claimant.as_str(), d.conflicts[0].owner.as_str()), ("b", "a"));
    }

    #[test]
    fn a_kept_route_through_the_tunnel_is_marked_as_such() {
        let cidr = net("10.244.3.0/24");
        let have = BTreeMap::from([(cidr, tunnel_gateway(&cidr)), (net("10.244.2.0/24"), ip("10.200.0.2"))]);
        let s = snap(vec![
            node("a", &["10.244.1.0/24"], &["10.200.0.1"]),
            node("b", &["10.244.2.0/24"], &[]),
            node("c", &["10.244.3.0/24"], &[]),
        ]);
        let d = desired(&s, "a", &connected(), &have);
        let tunnel: Vec<(&str, bool)> =
            d.without_address.iter().map(|u| (u.node.as_str(), u.tunnel)).collect();
        assert_eq!(tunnel, [("b", false), ("c", true)]);
    }

    #[test]
    fn a_listed_node_without_address_keeps_its_route_a_removed_one_loses_it() {
        let have = BTreeMap::from([
            (net("10.244.2.0/24"), ip("10.200.0.2")),
            (net("10.244.3.0/24"), ip("10.200.0.3")),
        ]);
        let s =
            snap(vec![node("a", &["10.244.1.0/24"], &["10.200.0.1"]), node("b", &["10.244.2.0/24"], &[])]);
        let d = desired(&s, "a", &connected(), &have);
        assert_eq!(d.routes, BTreeMap::from([(net("10.244.2.0/24"), ip("10.200.0.2"))]));
        assert_eq!(d.nodes_without_address, ["b"]);
        assert_eq!(d.without_address[0].kept, Some(ip("10.200.0.2")));
        // Never routed before: nothing to keep, still reported.
        let d = desired(&s, "a", &connected(), &BTreeMap::new());
        assert!(d.routes.is_empty());
        assert_eq!(d.without_address[0].kept, None);
    }

    #[test]
    fn a_dual_stack_node_with_only_an_ipv4_address_reports_its_ipv6_cidr() {
        let s = snap(vec![
            node("a", &["10.244.1.0/24", "fd00:244:1::/64"], &["10.200.0.1", "fd00:200::1"]),
            node("b", &["10.244.2.0/24", "fd00:244:2::/64"], &["10.200.0.2"]),
        ]);
        let d = desired(&s, "a", &connected(), &BTreeMap::new());
        assert_eq!(d.routes, BTreeMap::from([(net("10.244.2.0/24"), ip("10.200.0.2"))]));
        assert!(d.nodes_without_address.is_empty(), "b has an address");
        assert_eq!(
            d.without_address,
            [Unaddressed { node: "b".into(), cidr: net("fd00:244:2::/64"), kept: None, tunnel: false }]
        );
    }

    fn tunnelling(backend: Backend) -> Tunnelling {
        Tunnelling { backend, local: vec![ip("10.200.0.1"), ip("fd00:200::1")] }
    }

    #[test]
    fn auto_routes_on_link_peers_directly_and_tunnels_the_others_both_families_over_ipv4() {
        let s = snap(vec![
            node("a", &["10.244.1.0/24", "fd00:244:1::/64"], &["10.200.0.1", "fd00:200::1"]),
            node("b", &["10.244.2.0/24", "fd00:244:2::/64"], &["10.200.0.2", "fd00:200::2"]),
            node("far", &["10.244.9.0/24", "fd00:244:9::/64"], &["192.0.2.9", "2001:db8::9"]),
        ]);
        let d = desired_with(&s, "a", &connected(), &BTreeMap::new(), &tunnelling(Backend::Auto));
        assert_eq!(
            d.routes,
            BTreeMap::from([
                (net("10.244.2.0/24"), ip("10.200.0.2")),
                (net("10.244.9.0/24"), ip("10.244.9.0")),
                (net("fd00:244:2::/64"), ip("fd00:200::2")),
                (net("fd00:244:9::/64"), ip("fd00:244:9::")),
            ])
        );
        let far = Tunnel { node: "far".into(), remote: ip("192.0.2.9") };
        assert_eq!(
            d.tunnelled,
            BTreeMap::from([(net("10.244.9.0/24"), far.clone()), (net("fd00:244:9::/64"), far)])
        );
        assert!(d.off_link.is_empty(), "a tunnelled peer is not unreachable");
        // host-gw: today's behaviour.
        let d = desired_with(&s, "a", &connected(), &BTreeMap::new(), &tunnelling(Backend::HostGw));
        assert!(d.tunnelled.is_empty());
        assert_eq!(d.off_link, vec![("far".to_string(), ip("192.0.2.9"))]);
        // vxlan: everyone through the tunnel.
        let d = desired_with(&s, "a", &connected(), &BTreeMap::new(), &tunnelling(Backend::Vxlan));
        assert_eq!(d.tunnelled.len(), 4);
        assert_eq!(d.routes[&net("10.244.2.0/24")], ip("10.244.2.0"));
    }

    #[test]
    fn a_tunnelled_claim_in_the_kernel_stays_established_against_a_wider_newcomer() {
        let s = snap(vec![
            node("a", &["10.244.1.0/24"], &["10.200.0.1"]),
            node("b", &["10.245.0.0/16"], &["10.200.0.2"]),
            node("c", &["10.245.7.0/24"], &["192.0.2.3"]),
        ]);
        let have = BTreeMap::from([(net("10.245.7.0/24"), ip("10.245.7.0"))]);
        let d = desired_with(&s, "a", &connected(), &have, &tunnelling(Backend::Auto));
        assert_eq!(d.routes, have, "c keeps its tunnelled CIDR");
        assert_eq!(d.conflicts[0].claimant, "b");
    }

    #[test]
    fn an_ipv6_only_underlay_carries_the_tunnel_and_no_local_address_means_off_link() {
        let s = snap(vec![
            node("a", &["fd00:244:1::/64"], &["fd00:200::1"]),
            node("far", &["fd00:244:9::/64"], &["192.0.2.9", "2001:db8::9"]),
        ]);
        let v6_only = Tunnelling { backend: Backend::Auto, local: vec![ip("fd00:200::1")] };
        let d = desired_with(&s, "a", &connected(), &BTreeMap::new(), &v6_only);
        assert_eq!(d.tunnelled[&net("fd00:244:9::/64")].remote, ip("2001:db8::9"));
        let none = Tunnelling { backend: Backend::Auto, local: vec![] };
        let d = desired_with(&s, "a", &connected(), &BTreeMap::new(), &none);
        assert!(d.tunnelled.is_empty());
        assert_eq!(d.off_link, vec![("far".to_string(), ip("2001:db8::9"))]);
    }

    #[test]
    fn diff_replaces_in_place_and_deletes_only_the_unwanted() {
        let want = BTreeMap::from([
            (net("10.244.2.0/24"), ip("10.200.0.2")),
            (net("10.244.3.0/24"), ip("10.200.0.33")),
        ]);
        let have = BTreeMap::from([
            (net("10.244.2.0/24"), ip("10.200.0.2")),
            (net("10.244.3.0/24"), ip("10.200.0.3")),
            (net("10.244.4.0/24"), ip("10.200.0.4")),
        ]);
        let d = diff(&want, &have);
        assert_eq!(d.upsert, vec![(net("10.244.3.0/24"), ip("10.200.0.33"))]);
        assert_eq!(d.delete, vec![(net("10.244.4.0/24"), ip("10.200.0.4"))]);
        assert!(diff(&want, &want).is_empty());
    }
}
