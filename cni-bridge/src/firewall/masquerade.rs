//! What the masquerade backends (iptables.rs, nftables.rs) implement and list. Apart from the
//! firewall's mod.rs, which picks a backend, so that the backends need not import their picker.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::error::BridgeError;

/// One masquerade entry: a pod address and the attachment that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The pod address.
    pub ip: IpAddr,
    /// [`owner`](super::owner) of the attachment.
    pub owner: String,
}

/// What a masquerade backend does: entries added per attachment, listed with their owners,
/// removed by owner, and whether traffic passes through them.
pub trait Masquerade {
    /// The name in `ipMasqBackend` and in errors.
    fn name(&self) -> &'static str;
    /// Masquerades traffic from each of `addrs` that leaves its own subnet.
    fn add(&self, addrs: &[IpNetwork], owner: &str) -> Result<(), BridgeError>;
    /// Every entry on this node.
    fn list(&self) -> Result<Vec<Entry>, BridgeError>;
    /// Removes the entries of every owner satisfying `stale`.
    fn remove_where(&self, stale: &dyn Fn(&str) -> bool) -> Result<(), BridgeError>;
    /// Whether traffic actually goes through the entries (the hook rules are in place).
    fn hooked(&self) -> Result<bool, BridgeError>;
    /// Whether this backend may hold entries of `owner` (of anyone: `None`) on this node:
    /// teardown skips it when not. Cheap, without listing.
    fn may_hold_entries(&self, owner: Option<&str>) -> Result<bool, BridgeError>;
}
