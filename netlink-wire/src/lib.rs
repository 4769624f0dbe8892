//! Netlink pieces shared by cni-bridge and cni-route-agent: reading rtnetlink's errors and
//! attributes, and encoding/decoding raw messages for the families rtnetlink does not speak
//! (nftables batches, nexthop objects); the rtnetlink dumps both make ([`dump`]); and the one
//! runner for the command-line tools they drive ([`process`]).
//!
//! The runner is no netlink code: it is here because this is the one crate the plugins, the
//! route agent and the benches all depend on (the agent does not depend on cni-proto).

pub mod dump;
pub mod nft_objects;
pub mod nftables;
pub mod process;
pub mod raw;
pub mod rtnl;

pub use raw::*;
pub use rtnl::{address_of, errno, route_addr};
