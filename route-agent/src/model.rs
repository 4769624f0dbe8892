//! What the agent knows of a node, whatever the source.

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
