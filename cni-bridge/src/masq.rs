//! IP masquerade with nftables, in one atomic `nft -f` per ADD.
//!
//! Table `inet cni_bridge`: chain `postrouting` sends a pod's traffic, looked up by source
//! address in map `pods4`/`pods6`, to a chain per pod subnet that returns for the subnet and
//! multicast and masquerades the rest (the reference's per-container rules, as map entries).
//! Each map entry's comment names its attachment (`<network>/<container>/<ifname>`), so DEL
//! and GC find the entries without the pod's namespace or prevResult.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::error::BridgeError;
use crate::ipt;
use crate::nft;
use crate::nft_nl;

const TABLE: &str = "inet cni_bridge";

/// One map entry: a pod address and the attachment that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The pod address.
    pub ip: IpAddr,
    /// `<network>/<container>/<ifname>`.
    pub owner: String,
}

/// The owner comment of an attachment.
pub fn owner(network: &str, container: &str, ifname: &str) -> String {
    format!("{network}/{container}/{ifname}")
}

fn subnet_chain(net: &IpNetwork) -> String {
    match net.network() {
        IpAddr::V4(a) => format!("masq4-{:08x}-{}", u32::from(a), net.prefix()),
        IpAddr::V6(a) => format!("masq6-{:032x}-{}", u128::from(a), net.prefix()),
    }
}

/// Masquerades traffic from each of `addrs` that leaves its own subnet.
fn nft_elements(addrs: &[IpNetwork], owner: &str) -> String {
    let mut s = String::new();
    for a in addrs {
        let map = if a.is_ipv4() { "pods4" } else { "pods6" };
        s.push_str(&format!(
            "add element {TABLE} {map} {{ {} comment \"{owner}\" : jump {} }}\n",
            a.ip(),
            subnet_chain(a)
        ));
    }
    s
}

/// The whole structure: table, hook chain, maps, and the chain of each subnet in `addrs`.
/// Idempotent (rules are flushed and re-added), but the flush costs an RCU grace period.
fn nft_setup(addrs: &[IpNetwork]) -> String {
    let mut s = format!(
        "add table {TABLE}\n\
         add chain {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add map {TABLE} pods4 {{ type ipv4_addr : verdict; }}\n\
         add map {TABLE} pods6 {{ type ipv6_addr : verdict; }}\n\
         flush chain {TABLE} postrouting\n\
         add rule {TABLE} postrouting ip saddr vmap @pods4\n\
         add rule {TABLE} postrouting ip6 saddr vmap @pods6\n"
    );
    for a in addrs {
        let chain = subnet_chain(a);
        let (fam, mcast) = if a.is_ipv4() { ("ip", "224.0.0.0/4") } else { ("ip6", "ff00::/8") };
        let net = IpNetwork::new(a.network(), a.prefix()).expect("valid prefix");
        s.push_str(&format!(
            "add chain {TABLE} {chain}\n\
             flush chain {TABLE} {chain}\n\
             add rule {TABLE} {chain} {fam} daddr {net} return\n\
             add rule {TABLE} {chain} {fam} daddr {mcast} return\n\
             add rule {TABLE} {chain} masquerade\n"
        ));
    }
    s
}

fn nft_add(addrs: &[IpNetwork], owner: &str) -> Result<(), BridgeError> {
    if addrs.is_empty() {
        return Ok(());
    }
    // Steady state: the table and the subnet's chain exist, and adding map elements only is
    // one netlink batch, no process. It fails when something is missing (first pod of a
    // subnet on this node, or someone removed the table): then nft builds the structure.
    let elems: Vec<(std::net::IpAddr, String)> = addrs.iter().map(|a| (a.ip(), subnet_chain(a))).collect();
    match nft_nl::add_elements("cni_bridge", &elems, owner) {
        Ok(()) => Ok(()),
        Err(_) => nft::apply(&(nft_setup(addrs) + &nft_elements(addrs, owner))),
    }
}

/// Every map entry on this node, and whether the postrouting hook jumps into the maps.
fn nft_state() -> Result<(Vec<Entry>, bool), BridgeError> {
    let mut entries = Vec::new();
    let mut hooked = false;
    for item in nft::list_table("inet", "cni_bridge")? {
        if let Some(rule) = item.get("rule") {
            hooked |= rule["chain"] == "postrouting" && rule.to_string().contains("@pods");
            continue;
        }
        let Some(map) = item.get("map") else { continue };
        for pair in map["elem"].as_array().into_iter().flatten() {
            let elem = &pair[0]["elem"];
            let (Some(ip), Some(owner)) = (elem["val"].as_str(), elem["comment"].as_str()) else {
                continue;
            };
            if let Ok(ip) = ip.parse() {
                entries.push(Entry { ip, owner: owner.to_string() });
            }
        }
    }
    Ok((entries, hooked))
}

fn nft_list() -> Result<Vec<Entry>, BridgeError> {
    nft_state().map(|(e, _)| e)
}

/// Removes the given entries in one transaction.
fn nft_remove(entries: &[Entry]) -> Result<(), BridgeError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut s = String::new();
    for e in entries {
        let map = if e.ip.is_ipv4() { "pods4" } else { "pods6" };
        s.push_str(&format!("delete element {TABLE} {map} {{ {} }}\n", e.ip));
    }
    nft::apply(&s)
}

/// Which tool holds the masquerade rules (`ipMasqBackend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Our `inet cni_bridge` table (default where `nft` exists).
    Nftables,
    /// Per-attachment iptables chains, as the reference makes them.
    Iptables,
}

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

    /// Masquerades traffic from each of `addrs` that leaves its own subnet.
    pub fn add(self, addrs: &[IpNetwork], owner: &str) -> Result<(), BridgeError> {
        match self {
            Backend::Nftables => nft_add(addrs, owner),
            Backend::Iptables => ipt::add(addrs, owner),
        }
    }

    /// Every masquerade entry on this node.
    pub fn list(self) -> Result<Vec<Entry>, BridgeError> {
        match self {
            Backend::Nftables => nft_list(),
            Backend::Iptables => Ok(ipt::list()),
        }
    }

    /// Whether traffic actually goes through the entries (the hook rules are in place).
    pub fn hooked(self) -> Result<bool, BridgeError> {
        match self {
            Backend::Nftables => nft_state().map(|(_, h)| h),
            // Each iptables entry is itself a POSTROUTING rule.
            Backend::Iptables => Ok(true),
        }
    }

    /// Removes the entries of every owner satisfying `stale`.
    pub fn remove_where(self, stale: impl Fn(&str) -> bool) -> Result<(), BridgeError> {
        match self {
            Backend::Nftables => {
                let doomed: Vec<Entry> = nft_list()?.into_iter().filter(|e| stale(&e.owner)).collect();
                nft_remove(&doomed)
            }
            Backend::Iptables => ipt::remove_where(stale),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_per_subnet() {
        assert_eq!(subnet_chain(&"10.1.2.5/24".parse().unwrap()), "masq4-0a010200-24");
        assert_eq!(subnet_chain(&"fd00::5/64".parse().unwrap()), "masq6-fd000000000000000000000000000000-64");
        assert_eq!(owner("net", "c1", "eth0"), "net/c1/eth0");
    }
}
