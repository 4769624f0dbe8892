//! The `etcd` source: subnet leases in etcd (to be implemented).

use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use tokio::sync::watch;

use crate::error::AgentError;
use crate::model::Snapshot;
use crate::Metrics;

/// Settings of the `etcd` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix.
    pub prefix: String,
    /// The cluster CIDRs to carve node subnets from (one per family at most).
    pub cluster_cidrs: Vec<IpNetwork>,
    /// Prefix length of an IPv4 node subnet.
    pub subnet_len_v4: u8,
    /// Prefix length of an IPv6 node subnet.
    pub subnet_len_v6: u8,
    /// This node's name.
    pub node_name: String,
    /// This node's addresses (one per family at most).
    pub node_addrs: Vec<IpAddr>,
    /// Lease TTL in seconds.
    pub lease_ttl: i64,
}

/// Claims this node's subnets, keeps them alive, and publishes every node's.
pub async fn run(
    _opts: EtcdOptions,
    _tx: watch::Sender<Snapshot>,
    _metrics: Arc<Metrics>,
) -> Result<(), AgentError> {
    Err(AgentError::Source("the etcd source is not implemented yet".into()))
}
