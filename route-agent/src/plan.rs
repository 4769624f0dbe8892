//! The desired route set (a pure function of the nodes) and its difference to the kernel's.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::model::Snapshot;

/// What the agent wants in the kernel, and what it cannot route.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Pod CIDR of another node -> that node's address.
    pub routes: BTreeMap<IpNetwork, IpAddr>,
    /// Nodes whose address is not on a directly connected subnet of this node (host-gw
    /// cannot reach their pods): (node, address).
    pub off_link: Vec<(String, IpAddr)>,
    /// Pod CIDRs claimed by more than one node: (cidr, node kept, node ignored).
    pub conflicts: Vec<(IpNetwork, String, String)>,
}

/// Routes to every other node's pod CIDRs via that node's address of the same family, when
/// that address is on one of `connected` (this node's directly connected subnets).
pub fn desired(nodes: &Snapshot, me: &str, connected: &[IpNetwork]) -> Desired {
    let mut d = Desired::default();
    let own: Vec<IpNetwork> = nodes.get(me).map(|n| n.pod_cidrs.clone()).unwrap_or_default();
    let mut owner: BTreeMap<IpNetwork, String> = BTreeMap::new();
    for n in nodes.values().filter(|n| n.name != me) {
        for cidr in &n.pod_cidrs {
            let Some(gw) = n.addr_for(cidr) else { continue };
            if own.iter().any(|o| o.contains(cidr.network()) || cidr.contains(o.network())) {
                d.conflicts.push((*cidr, me.to_string(), n.name.clone()));
                continue;
            }
            if !connected.iter().any(|c| c.contains(gw)) {
                if !d.off_link.iter().any(|(name, _)| name == &n.name) {
                    d.off_link.push((n.name.clone(), gw));
                }
                continue;
            }
            // Names are visited in order, so the first node (by name) keeps a shared CIDR.
            if let Some(first) = owner.get(cidr) {
                d.conflicts.push((*cidr, first.clone(), n.name.clone()));
                continue;
            }
            owner.insert(*cidr, n.name.clone());
            d.routes.insert(*cidr, gw);
        }
    }
    d
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
        let d = desired(&s, "a", &connected());
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
        assert!(desired(&s, "a", &connected()).routes.is_empty());
    }

    #[test]
    fn reports_nodes_off_the_l2_segment_instead_of_misrouting() {
        let s = snap(vec![
            node("a", &["10.244.1.0/24"], &["10.200.0.1"]),
            node("far", &["10.244.9.0/24"], &["192.0.2.9"]),
        ]);
        let d = desired(&s, "a", &connected());
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
        let d = desired(&s, "a", &connected());
        assert_eq!(d.routes, BTreeMap::from([(net("10.244.2.0/24"), ip("10.200.0.2"))]));
        assert_eq!(d.conflicts.len(), 2);
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
