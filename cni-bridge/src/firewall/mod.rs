//! The firewall state of an attachment: masquerade entries (in one of two backends) and the
//! MAC spoof check. Each entry is commented with its attachment ([`owner`]), so DEL and GC
//! find what to remove without the pod's namespace or prevResult.
//!
//! Ownership rules that keep one attachment from removing another's state:
//! - DEL, GC and a failed ADD remove an attachment's entries *before* its lease is released,
//!   so an address is never handed out again while an entry names it for its old owner;
//! - ADD replaces an element left for its address by anyone else (only the lease holder may
//!   own the address's element);
//! - teardown sweeps every backend that may hold entries, not only the one configured now, and
//!   a failure to list is an error, never "nothing there".

pub mod iptables;
pub mod masquerade;
pub mod netlink;
pub mod nftables;
pub mod reference;
pub mod spoof;

use ipnetwork::IpNetwork;

pub use masquerade::{Entry, Masquerade};

use crate::error::BridgeError;

/// The longest network name kept readable in an owner; longer ones are digested.
const NETWORK_MAX: usize = 64;

/// FNV-1a over 128 bits (the `fnv` crate has only 64): a stable digest. Not a defence against
/// crafted collisions, which would need control of two runtimes' container ids.
fn fnv1a_128(s: &str) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    s.bytes().fold(OFFSET, |h, b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

/// How a network appears in its digested owners: the name, or `#<digest>` when it is long.
fn network_tag(network: &str) -> String {
    if network.len() <= NETWORK_MAX {
        network.to_string()
    } else {
        format!("#{:032x}", fnv1a_128(network))
    }
}

/// The owner comment of an attachment: `<network>/<container>/<ifname>` whenever it fits the
/// 128 characters `nft` allows in a comment (the format ADD always wrote, so DEL and GC find
/// older entries), else `<network tag>/#<digest of container and ifname>`: at most 99
/// characters for every valid name and id.
pub fn owner(network: &str, container: &str, ifname: &str) -> String {
    let plain = format!("{network}/{container}/{ifname}");
    if plain.len() <= netlink::COMMENT_MAX && !plain.contains('"') {
        return plain;
    }
    format!("{}/#{:032x}", network_tag(network), fnv1a_128(&format!("{container}/{ifname}")))
}

/// Whether `owner` is an attachment of `network`, in either owner form.
pub fn of_network(network: &str, owner: &str) -> bool {
    let under = |prefix: &str| owner.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'));
    under(network) || under(&network_tag(network))
}

/// Which backend holds the masquerade rules (`ipMasqBackend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Our `inet cni_bridge` table (default where `nft` exists).
    Nftables,
    /// Per-attachment iptables chains, as the reference makes them.
    Iptables,
}

/// Every backend, for teardown.
pub const BACKENDS: [Backend; 2] = [Backend::Nftables, Backend::Iptables];

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

impl Backend {
    /// The backend for `ipMasqBackend`: as asked, else nftables unless only iptables is installed.
    pub fn choose(asked: Option<&str>) -> Option<Backend> {
        match asked {
            Some("nftables") => Some(Backend::Nftables),
            Some("iptables") => Some(Backend::Iptables),
            None | Some("") if !on_path("nft") && on_path("iptables-restore") => Some(Backend::Iptables),
            None | Some("") => Some(Backend::Nftables),
            Some(_) => None,
        }
    }

    /// The backend's masquerade implementation.
    pub fn masquerade(self) -> &'static dyn Masquerade {
        match self {
            Backend::Nftables => &nftables::Nftables,
            Backend::Iptables => &iptables::Iptables,
        }
    }

    /// See [`Masquerade::add`].
    pub fn add(self, addrs: &[IpNetwork], owner: &str) -> Result<(), BridgeError> {
        self.masquerade().add(addrs, owner)
    }

    /// See [`Masquerade::list`].
    pub fn list(self) -> Result<Vec<Entry>, BridgeError> {
        self.masquerade().list()
    }

    /// See [`Masquerade::hooked`].
    pub fn hooked(self) -> Result<bool, BridgeError> {
        self.masquerade().hooked()
    }

    /// See [`Masquerade::remove_where`]: this backend only (ADD's rollback).
    pub fn remove_where(self, stale: impl Fn(&str) -> bool) -> Result<(), BridgeError> {
        self.masquerade().remove_where(&stale)
    }
}

/// Removes the masquerade entries of every owner satisfying `stale` (only `owner`, when
/// given) from every backend that may hold some (`chosen` always), whatever `ipMasqBackend`
/// says now: the rules may have been made with another backend, or before a tool appeared on
/// or vanished from PATH.
fn sweep_masquerade(
    chosen: Backend,
    owner: Option<&str>,
    stale: &dyn Fn(&str) -> bool,
) -> Result<(), BridgeError> {
    let mut errs = Vec::new();
    for b in BACKENDS {
        let r = match b.masquerade().may_hold_entries(owner) {
            Ok(false) if b != chosen => Ok(()),
            Ok(_) => b.masquerade().remove_where(stale),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            errs.push(format!("{} masquerade: {e}", b.masquerade().name()));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(BridgeError::Firewall(errs.join("; ")))
    }
}

/// Removes every firewall entry (masquerade in every backend, MAC spoof check) of one
/// attachment, whatever the config says now. DEL calls it *before* the lease is released, and
/// must not release it when this fails.
pub fn remove_attachment(chosen: Backend, owner: &str) -> Result<(), BridgeError> {
    teardown(chosen, Some(owner), &|o| o == owner)
}

/// [`remove_attachment`] for every owner satisfying `stale` (GC, before IPAM GC).
pub fn remove_stale(chosen: Backend, stale: &dyn Fn(&str) -> bool) -> Result<(), BridgeError> {
    teardown(chosen, None, stale)
}

fn teardown(chosen: Backend, owner: Option<&str>, stale: &dyn Fn(&str) -> bool) -> Result<(), BridgeError> {
    let masq = sweep_masquerade(chosen, owner, stale);
    let spoof = spoof::remove_where(stale);
    match (masq, spoof) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(BridgeError::Firewall(format!("{a}; spoof checks: {b}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_plain_when_they_fit_and_bounded_digests_otherwise() {
        assert_eq!(owner("net", "c1", "eth0"), "net/c1/eth0");
        let id = "a".repeat(64);
        let net59 = "n".repeat(59);
        let long = owner(&net59, &id, "eth0");
        assert!(long.len() <= netlink::COMMENT_MAX && long.starts_with(&format!("{net59}/#")), "{long}");
        assert_ne!(long, owner(&net59, &id, "eth1"));
        assert_eq!(long, owner(&net59, &id, "eth0"), "stable");
        let huge = owner(&"n".repeat(300), &"c".repeat(300), "eth0");
        assert!(huge.len() <= 99 && huge.starts_with('#'), "{huge}");
        assert!(of_network(&"n".repeat(300), &huge));
        assert!(of_network(&net59, &long) && of_network("net", "net/c1/eth0"));
        assert!(!of_network("net", "net2/c1/eth0") && !of_network("ne", "net/c1/eth0"));
        assert!(!owner("net", "c\"1", "eth0").contains('"'), "no quote reaches an nft script");
    }
}
