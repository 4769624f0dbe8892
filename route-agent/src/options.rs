//! The agent's settings: what `main` parses from the command line and `run` works from.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::IpNetwork;

use crate::{plan, sources, vxlan};

/// Where nodes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A JSON/YAML file, re-read on change.
    File(PathBuf),
    /// Node objects of a Kubernetes API server.
    Kubernetes(sources::kube::KubeOptions),
    /// Subnet leases in etcd (flannel's layout), for clusters without a pod CIDR allocator.
    Etcd(sources::etcd::EtcdOptions),
}

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's name: its own entry in the source gives the pod CIDR of the conflist and
    /// is never routed to.
    pub node_name: String,
    /// Where nodes come from.
    pub source: Source,
    /// The cluster's pod CIDRs (masquerade exceptions); empty: every node's pod CIDRs.
    pub cluster_cidrs: Vec<IpNetwork>,
    /// More destinations pod traffic reaches with its own source (ip-masq-agent's
    /// nonMasqueradeCIDRs), on top of the cluster's pod CIDRs.
    pub no_masquerade_cidrs: Vec<IpNetwork>,
    /// This node's addresses (one per family), overriding what the source says of it.
    pub node_ips: Vec<IpAddr>,
    /// `/readyz` fails once the source has failed for longer than this.
    pub max_snapshot_age: Option<Duration>,
    /// CNI config directory.
    pub cni_conf_dir: PathBuf,
    /// CNI config file name.
    pub cni_conf_name: String,
    /// CNI network name.
    pub network_name: String,
    /// host-local's data directory in the conflist.
    pub ipam_data_dir: String,
    /// Chain portmap in the conflist.
    pub portmap: bool,
    /// Masquerade pod traffic leaving the cluster.
    pub masquerade: bool,
    /// Masquerade with fully random source ports where the kernel supports it.
    pub masquerade_fully_random: bool,
    /// Address for /healthz, /readyz, /metrics.
    pub listen: SocketAddr,
    /// Periodic full resync.
    pub resync: Duration,
    /// The route protocol number that marks the agent's routes.
    pub route_protocol: u8,
    /// MTU for the conflist (default: the underlay link's).
    pub mtu: Option<u32>,
    /// Use nexthop objects where the kernel has them.
    pub nexthops: bool,
    /// Direct routes, VXLAN, or each where it works.
    pub backend: plan::Backend,
    /// VNI and UDP port of the VXLAN devices.
    pub vxlan: vxlan::VxlanConfig,
    /// Take the VXLAN overhead off the conflist's MTU even while no peer needs the tunnel
    /// (pods made before a peer turns off-link then fit the tunnel too).
    pub vxlan_mtu_always: bool,
    /// NetworkPolicy enforcement.
    pub policy: PolicyOptions,
}

/// Where NetworkPolicy objects come from, if policies are enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyOptions {
    /// Not enforced: the agent removes its policy table at start.
    Off,
    /// Pods, Namespaces and NetworkPolicies from manifests (a file or a directory).
    Manifests(PathBuf),
    /// Watched on the API server of the kubernetes source.
    Kubernetes(sources::kube::KubeOptions),
}
