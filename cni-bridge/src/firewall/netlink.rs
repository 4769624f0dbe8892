//! nftables over netlink: the shared implementation in `netlink_wire::nftables`, which the
//! route agent's policy engine uses too.

pub use netlink_wire::nftables::*;
