//! IP masquerade with nftables.
//!
//! Table `inet cni_bridge`: chain `postrouting` sends a pod's traffic, looked up by source
//! address in map `pods4`/`pods6`, to a chain per pod subnet that returns for the subnet and
//! multicast and masquerades the rest (the reference's per-container rules, as map entries).
//! The structure is made once by `nft -f`; the per-pod map entries are added, listed and
//! removed over netlink, without a process.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use netlink_wire::process;

use super::masquerade::{Entry, Masquerade};
use super::netlink::{self as nl, ip_key, NlError, Op, SetRef, NFPROTO_INET};
use crate::error::BridgeError;

const TABLE: &str = "inet cni_bridge";
const POD4: SetRef = SetRef { family: NFPROTO_INET, table: "cni_bridge", set: "pods4" };
const POD6: SetRef = SetRef { family: NFPROTO_INET, table: "cni_bridge", set: "pods6" };

/// The nftables backend.
pub struct Nftables;

fn map_of(ip: IpAddr) -> SetRef<'static> {
    if ip.is_ipv4() {
        POD4
    } else {
        POD6
    }
}

fn subnet_chain(net: &IpNetwork) -> String {
    match net.network() {
        IpAddr::V4(a) => format!("masq4-{:08x}-{}", u32::from(a), net.prefix()),
        IpAddr::V6(a) => format!("masq6-{:032x}-{}", u128::from(a), net.prefix()),
    }
}

/// Runs an nft script as one transaction.
pub fn apply(script: &str) -> Result<(), BridgeError> {
    process::pipe("nft", &["-f", "-"], script).map_err(|e| BridgeError::Firewall(e.to_string()))
}

/// The whole structure: table, hook chain, maps, and the chain of each subnet in `addrs`.
/// Idempotent (rules are flushed and re-added), but the flush costs an RCU grace period.
fn setup_script(addrs: &[IpNetwork]) -> String {
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
        s.push_str(&format!(
            "add chain {TABLE} {chain}\n\
             flush chain {TABLE} {chain}\n\
             add rule {TABLE} {chain} {fam} daddr {}/{} return\n\
             add rule {TABLE} {chain} {fam} daddr {mcast} return\n\
             add rule {TABLE} {chain} masquerade\n",
            a.network(),
            a.prefix()
        ));
    }
    s
}

/// The map elements for `addrs`: each jumps to its subnet's chain.
fn add_ops<'a>(addrs: &[IpNetwork], chains: &'a [String], owner: &'a str) -> Vec<Op<'a>> {
    addrs
        .iter()
        .zip(chains)
        .map(|(a, chain)| Op::Add {
            set: map_of(a.ip()),
            key: ip_key(a.ip()),
            chain: Some(chain),
            comment: owner,
        })
        .collect()
}

/// Adds the elements; one left for one of the addresses by anyone else is replaced, in the
/// same transaction: this ADD holds the address's lease, so such an element is stale.
fn add_elements(addrs: &[IpNetwork], owner: &str) -> Result<(), NlError> {
    let chains: Vec<String> = addrs.iter().map(subnet_chain).collect();
    match nl::apply(&add_ops(addrs, &chains, owner), true) {
        Err(e) if e.is_exists() => {
            // Replacing takes over a key a removal may have listed: under the maps' lock.
            let _held = crate::lock::masquerade().map_err(|e| NlError::Local(e.to_string()))?;
            let mut ops: Vec<Op> = Vec::new();
            for (a, mine) in addrs.iter().zip(add_ops(addrs, &chains, owner)) {
                if nl::list(map_of(a.ip()))?.iter().any(|e| e.key == ip_key(a.ip())) {
                    ops.push(Op::Del { set: map_of(a.ip()), keys: vec![ip_key(a.ip())] });
                }
                ops.push(mine);
            }
            nl::apply(&ops, true)
        }
        r => r,
    }
}

fn entry(element: nl::Element) -> Option<Entry> {
    let ip = match element.key.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&element.key[..]).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&element.key[..]).ok()?)),
        _ => return None,
    };
    Some(Entry { ip, owner: element.comment })
}

/// The elements of one map; none when the table or map does not exist (nothing was ever
/// added here), an error for any other failure.
fn list_map(map: SetRef) -> Result<Vec<Entry>, BridgeError> {
    match nl::list(map) {
        Ok(v) => Ok(v.into_iter().filter_map(entry).collect()),
        Err(e) if e.is_missing() => Ok(vec![]),
        Err(e) => Err(BridgeError::Firewall(format!("listing {TABLE} {}: {e}", map.set))),
    }
}

impl Masquerade for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn add(&self, addrs: &[IpNetwork], owner: &str) -> Result<(), BridgeError> {
        if addrs.is_empty() {
            return Ok(());
        }
        // Steady state: the table and the subnet's chain exist, and adding map elements only is
        // one netlink batch. It fails when something is missing (first pod of a subnet on this
        // node, or someone removed the table): then nft builds the structure first.
        if add_elements(addrs, owner).is_ok() {
            return Ok(());
        }
        apply(&setup_script(addrs))?;
        add_elements(addrs, owner).map_err(|e| BridgeError::Firewall(format!("adding to {TABLE}: {e}")))
    }

    fn list(&self) -> Result<Vec<Entry>, BridgeError> {
        let mut v = list_map(POD4)?;
        v.extend(list_map(POD6)?);
        Ok(v)
    }

    fn remove_where(&self, stale: &dyn Fn(&str) -> bool) -> Result<(), BridgeError> {
        // An element can vanish between the listing and the removal (a concurrent DEL of the
        // same attachment, or GC): the batch then fails as a whole with ENOENT, and a fresh
        // listing tells what is left.
        // Listing then deleting by key: under the maps' lock, so that no ADD of another
        // network takes over a listed key in between (crate::lock::masquerade).
        let _held = crate::lock::masquerade()?;
        let mut last = None;
        for _ in 0..3 {
            let doomed: Vec<Entry> = self.list()?.into_iter().filter(|e| stale(&e.owner)).collect();
            cni_proto::pause_point("masq-remove-after-list");
            let r = [POD4, POD6].into_iter().try_for_each(|map| {
                let keys: Vec<Vec<u8>> =
                    doomed.iter().filter(|e| map_of(e.ip).set == map.set).map(|e| ip_key(e.ip)).collect();
                nl::remove(map, keys)
            });
            match r {
                Err(e) if e.is_missing() => last = Some(e),
                r => return r.map_err(|e| BridgeError::Firewall(format!("removing from {TABLE}: {e}"))),
            }
        }
        Err(BridgeError::Firewall(format!(
            "removing from {TABLE}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    fn hooked(&self) -> Result<bool, BridgeError> {
        // The hook chain's rules look the source up in the maps (`lookup` expressions naming
        // them), as setup_script writes them.
        let refers = |rule: &[u8], name: &[u8]| rule.windows(name.len()).any(|w| w == name);
        match nl::rules(NFPROTO_INET, "cni_bridge", "postrouting") {
            Ok(rules) => Ok(rules.iter().any(|r| refers(r, b"lookup\0") && refers(r, b"pods4\0"))
                && rules.iter().any(|r| refers(r, b"lookup\0") && refers(r, b"pods6\0"))),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(BridgeError::Firewall(format!("listing {TABLE} postrouting: {e}"))),
        }
    }

    fn may_hold_entries(&self, _owner: Option<&str>) -> Result<bool, BridgeError> {
        // Listing over netlink is cheaper than any test.
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_per_subnet() {
        assert_eq!(subnet_chain(&"10.1.2.5/24".parse().unwrap()), "masq4-0a010200-24");
        assert_eq!(subnet_chain(&"fd00::5/64".parse().unwrap()), "masq6-fd000000000000000000000000000000-64");
        let s = setup_script(&["10.1.2.5/24".parse().unwrap()]);
        assert!(s.contains("ip daddr 10.1.2.0/24 return"), "{s}");
    }

    #[test]
    fn keys_of_other_lengths_are_not_entries() {
        let e = entry(nl::Element { key: vec![10, 0, 0, 1], comment: "n/c/eth0".into() }).unwrap();
        assert_eq!(e, Entry { ip: "10.0.0.1".parse().unwrap(), owner: "n/c/eth0".into() });
        assert!(entry(nl::Element { key: vec![1, 2, 3], comment: String::new() }).is_none());
    }
}
