//! What the agent knows of a node, whatever the source.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// One node: its pod CIDRs and its address per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Pod CIDRs (v4 and/or v6).
    pub pod_cidrs: Vec<IpNetwork>,
    /// IPv4 address (InternalIP, else ExternalIP).
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
}

impl NodeInfo {
    /// The node's address in the family of `net`.
    pub fn addr_for(&self, net: &IpNetwork) -> Option<IpAddr> {
        match net {
            IpNetwork::V4(_) => self.ipv4.map(IpAddr::V4),
            IpNetwork::V6(_) => self.ipv6.map(IpAddr::V6),
        }
    }

    /// The first address of each family from a list, as the sources pick them.
    pub fn with_addresses(name: &str, pod_cidrs: Vec<IpNetwork>, addrs: &[IpAddr]) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            pod_cidrs,
            ipv4: addrs.iter().find_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                _ => None,
            }),
            ipv6: addrs.iter().find_map(|a| match a {
                IpAddr::V6(v) => Some(*v),
                _ => None,
            }),
        }
    }
}

/// Every node by name: what a source publishes, whole, on every change.
pub type Snapshot = BTreeMap<String, NodeInfo>;

/// Makes `mine` equal to `published`, copying only the nodes that differ: one ordered walk of
/// both, where a clone of 20,000 nodes costs more than the rest of handling one's change.
pub fn refresh(mine: &mut Snapshot, published: &Snapshot) {
    let mut gone = Vec::new();
    let mut changed = Vec::new();
    let (mut a, mut b) = (mine.iter().peekable(), published.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    gone.push((*ka).clone());
                    a.next();
                }
                Ordering::Greater => {
                    changed.push(*kb);
                    b.next();
                }
                Ordering::Equal => {
                    if va != vb {
                        changed.push(*kb);
                    }
                    a.next();
                    b.next();
                }
            },
            (Some((ka, _)), None) => {
                gone.push((*ka).clone());
                a.next();
            }
            (None, Some((kb, _))) => {
                changed.push(*kb);
                b.next();
            }
            (None, None) => break,
        }
    }
    for name in gone {
        mine.remove(&name);
    }
    for name in changed {
        if let Some(node) = published.get(name) {
            mine.insert(name.clone(), node.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_ends_equal_whatever_changed() {
        let n = |name: &str, last: u8| {
            let cidr = format!("10.244.{last}.0/24").parse().unwrap();
            (
                name.to_string(),
                NodeInfo::with_addresses(name, vec![cidr], &[IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))]),
            )
        };
        let before: Snapshot = [n("a", 1), n("c", 3), n("e", 5), n("g", 7)].into();
        let cases: [Snapshot; 5] = [
            [n("a", 1), n("b", 2), n("c", 3), n("e", 5), n("g", 7)].into(),
            [n("a", 1), n("c", 9), n("e", 5), n("g", 7)].into(),
            [n("c", 3), n("e", 5)].into(),
            [n("0", 1), n("h", 8), n("z", 9)].into(),
            Snapshot::new(),
        ];
        for published in cases {
            let mut mine = before.clone();
            refresh(&mut mine, &published);
            assert_eq!(mine, published);
            let mut empty = Snapshot::new();
            refresh(&mut empty, &published);
            assert_eq!(empty, published);
        }
    }
}
