//! Spoof checks on the frames entering the bridge from a pod's port, in table
//! `bridge cni_bridge`, each element commented with its attachment for DEL and GC:
//!
//! - MAC (`macspoofchk`): the frame's source MAC must be the pod's. Chain `prerouting`, one
//!   rule for all pods; sets `guarded` (ports) and `allowed` (port . MAC).
//! - IP (`ipspoofchk`, ours): the pod sends only from its own addresses and claims only them
//!   in ARP and neighbour advertisements, so that no pod passes a NetworkPolicy rule, or takes
//!   another pod's traffic, with another pod's address. Chain `ipspoof`, its own base chain so
//!   that the MAC check's flush (also by older versions) never drops its rules; sets
//!   `ipguarded` (ports), `allowed4`, `allowed6` (port . address) and `ndtarget6` (the same
//!   IPv6 pairs, typed as the raw payload a neighbour advertisement's target is matched
//!   with: nft 1.0.6 has no `icmpv6 taddr`).
//!
//! The table, chains, rules and sets are made by `nft -f` (the first pod on a node, or after
//! the ruleset was flushed or the rules changed); each pod's elements are added over netlink,
//! without a process, once one netlink dump has shown the rules in place. Every rule carries a
//! comment naming its place and a digest of its chain's rules, so that dump tells our rules,
//! as this version writes them, from missing, flushed, foreign or older ones.

use std::net::IpAddr;

use super::netlink::{self as nl, NlError, Op, SetRef, NFPROTO_BRIDGE};
use super::nftables::apply;
use crate::error::BridgeError;
use crate::mac::fmt_mac;

const TABLE: &str = "bridge cni_bridge";
const TABLE_NAME: &str = "cni_bridge";
/// The kernel's ifname keys: the name NUL-padded to IFNAMSIZ.
const IFNAMSIZ: usize = 16;
const fn set(name: &'static str) -> SetRef<'static> {
    SetRef { family: NFPROTO_BRIDGE, table: "cni_bridge", set: name }
}
/// Every set holding per-attachment elements: teardown looks in all of them, whatever the
/// config says now.
const SETS: [SetRef; 6] =
    [set("guarded"), set("allowed"), set("ipguarded"), set("allowed4"), set("allowed6"), set("ndtarget6")];

/// The IP check's chain. Frames from ports not in `ipguarded` leave it at once. In order:
/// - a frame still VLAN-tagged once the kernel has taken its outer tag off drops: a receiver
///   strips priority tags (VLAN 0) again, so the packet inside would reach it unchecked;
/// - ARP whose sender address is not the port's drops (0.0.0.0, an ARP probe, passes);
/// - IPv4 from 0.0.0.0 passes only as a DHCP client's request (a pod renewing a lost lease);
/// - any other IPv4 whose source is not the port's drops;
/// - router advertisements and redirects drop: a pod is no router of its neighbours;
/// - neighbour advertisements for an address not the port's, link-local excepted, drop
///   (the target is at byte 8 of the ICMPv6 header: `@th,64,128`; fe80::/10 is its first 10 bits);
/// - IPv6 whose source is not the port's drops, but for link-local and :: (DAD, ND, MLD).
///
/// The family is matched with `meta protocol` (the packet's, after the outer tag is taken
/// off), not `ether type`, which nft reads with the tag put back: a priority-tagged frame
/// would not match `ether type ip` and pass.
const IP_RULES: [&str; 8] = [
    "iifname != @ipguarded accept",
    "meta protocol { 8021q, 8021ad } drop",
    "meta protocol arp iifname . arp saddr ip != @allowed4 arp saddr ip != 0.0.0.0 drop",
    "meta protocol ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
    "meta protocol ip iifname . ip saddr != @allowed4 drop",
    "meta protocol ip6 icmpv6 type { nd-router-advert, nd-redirect } drop",
    "meta protocol ip6 icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @ndtarget6 @th,64,10 != 0x3fa drop",
    "meta protocol ip6 iifname . ip6 saddr != @allowed6 ip6 saddr != { ::, fe80::/10 } drop",
];

/// The MAC check's one rule, in chain `prerouting`.
const MAC_RULES: [&str; 1] = ["iifname @guarded iifname . ether saddr != @allowed drop"];

/// The comment of rule `i` of a chain holding `rules`: a digest of them all and the place, so
/// that a changed rule set (another version's), a rule removed, added or reordered shows.
fn rule_tag(rules: &[&str], i: usize) -> String {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, rules.join("\n").as_bytes());
    format!("cni-bridge {:016x} {i}", std::hash::Hasher::finish(&h))
}

/// `add rule` lines for `rules` in `chain`, each with its tag.
fn rule_lines(chain: &str, rules: &[&str]) -> String {
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| format!("add rule {TABLE} {chain} {rule} comment \"{}\"\n", rule_tag(rules, i)))
        .collect()
}

/// The script that guards `port`: lets it send only frames from `mac` (when given) and only
/// from, and for, `ips` (when given). One transaction.
fn script(port: &str, mac: Option<&[u8]>, ips: Option<&[IpAddr]>, owner: &str) -> String {
    let mut s = format!("add table {TABLE}\n");
    if let Some(mac) = mac {
        let mac = fmt_mac(mac);
        s.push_str(&format!(
            "add set {TABLE} guarded {{ type ifname; }}\n\
             add set {TABLE} allowed {{ type ifname . ether_addr; }}\n\
             add chain {TABLE} prerouting {{ type filter hook prerouting priority -300; policy accept; }}\n\
             flush chain {TABLE} prerouting\n\
             {}\
             add element {TABLE} guarded {{ \"{port}\" comment \"{owner}\" }}\n\
             add element {TABLE} allowed {{ \"{port}\" . {mac} comment \"{owner}\" }}\n",
            rule_lines("prerouting", &MAC_RULES)
        ));
    }
    if let Some(ips) = ips {
        s.push_str(&format!(
            "add set {TABLE} ipguarded {{ type ifname; }}\n\
             add set {TABLE} allowed4 {{ type ifname . ipv4_addr; }}\n\
             add set {TABLE} allowed6 {{ type ifname . ipv6_addr; }}\n\
             add set {TABLE} ndtarget6 {{ typeof iifname . @th,64,128; }}\n\
             add chain {TABLE} ipspoof {{ type filter hook prerouting priority -300; policy accept; }}\n\
             flush chain {TABLE} ipspoof\n"
        ));
        s.push_str(&rule_lines("ipspoof", &IP_RULES));
        let mut ips = ips.to_vec();
        ips.sort();
        ips.dedup();
        for ip in ips {
            let element = |set: &str, key: String| {
                format!("add element {TABLE} {set} {{ \"{port}\" . {key} comment \"{owner}\" }}\n")
            };
            match ip {
                IpAddr::V4(v4) => s.push_str(&element("allowed4", v4.to_string())),
                IpAddr::V6(v6) => {
                    s.push_str(&element("allowed6", v6.to_string()));
                    s.push_str(&element("ndtarget6", format!("0x{:032x}", u128::from(v6))));
                }
            }
        }
        // In the same transaction as its addresses: a port is never guarded without them.
        s.push_str(&format!("add element {TABLE} ipguarded {{ \"{port}\" comment \"{owner}\" }}\n"));
    }
    s
}

/// Whether the chains the checks asked for hold exactly the rules this version writes (one
/// netlink dump). Anything else (no table, a flushed chain, an older version's rules, a rule
/// someone added) is "no": `nft` then makes them again.
fn rules_in_place(mac: bool, ip: bool) -> bool {
    let Ok(found) = nl::rule_comments(NFPROTO_BRIDGE, TABLE_NAME) else { return false };
    let holds = |chain: &str, rules: &[&str]| {
        let tags: Vec<&str> = found.iter().filter(|(c, _)| c == chain).map(|(_, t)| t.as_str()).collect();
        tags.len() == rules.len() && tags.iter().enumerate().all(|(i, t)| *t == rule_tag(rules, i))
    };
    (!mac || holds("prerouting", &MAC_RULES)) && (!ip || holds("ipspoof", &IP_RULES))
}

/// `port`'s key in the sets, None for a name the kernel would not hold.
fn ifname_key(port: &str) -> Option<Vec<u8>> {
    if port.is_empty() || port.len() >= IFNAMSIZ || port.contains('\0') {
        return None;
    }
    let mut key = port.as_bytes().to_vec();
    key.resize(IFNAMSIZ, 0);
    Some(key)
}

/// A concatenation's key: each part padded to 4 bytes, as the kernel lays out registers.
fn concat(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::new();
    for part in parts {
        key.extend_from_slice(part);
        key.resize(key.len().next_multiple_of(4), 0);
    }
    key
}

/// The elements [`script`] adds, as netlink operations: the same sets, keys and comments, the
/// port's `ipguarded` element last (one transaction either way).
fn element_ops<'a>(port: &[u8], mac: Option<&[u8]>, ips: Option<&[IpAddr]>, owner: &'a str) -> Vec<Op<'a>> {
    let add = |name: &'static str, key: Vec<u8>| Op::Add { set: set(name), key, chain: None, comment: owner };
    let mut ops = Vec::new();
    if let Some(mac) = mac {
        ops.push(add("guarded", port.to_vec()));
        ops.push(add("allowed", concat(&[port, mac])));
    }
    if let Some(ips) = ips {
        let mut ips = ips.to_vec();
        ips.sort();
        ips.dedup();
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => ops.push(add("allowed4", concat(&[port, &v4.octets()]))),
                IpAddr::V6(v6) => {
                    ops.push(add("allowed6", concat(&[port, &v6.octets()])));
                    // The raw payload's value is the address's bytes, in network order.
                    ops.push(add("ndtarget6", concat(&[port, &v6.octets()])));
                }
            }
        }
        ops.push(add("ipguarded", port.to_vec()));
    }
    ops
}

/// Adds the elements in one netlink transaction. An element left for this port's key by
/// anyone else (a port name reused before the old attachment's DEL) is replaced in the same
/// transaction: kept, its owner's DEL would remove this pod's guard with it.
fn add_elements(ops: Vec<Op>) -> Result<(), NlError> {
    match nl::apply(&ops, true) {
        Err(e) if e.is_exists() => {
            let mut all: Vec<Op> = Vec::new();
            let mut listed: Vec<(&str, Vec<nl::Element>)> = Vec::new();
            for op in &ops {
                let Op::Add { set, key, .. } = op else { continue };
                if !listed.iter().any(|(name, _)| *name == set.set) {
                    listed.push((set.set, nl::list(*set)?));
                }
                let present =
                    listed.iter().any(|(name, v)| *name == set.set && v.iter().any(|e| e.key == *key));
                if present {
                    all.push(Op::Del { set: *set, keys: vec![key.clone()] });
                }
            }
            all.extend(ops);
            nl::apply(&all, true)
        }
        r => r,
    }
}

/// Guards `port`: only frames from `mac` (`macspoofchk`, when given), only packets from and
/// ARP/ND claims for `ips` (`ipspoofchk`, when given), in one transaction. Over netlink when
/// the rules are in place (every pod but a node's first); otherwise `nft` makes the table,
/// chains, rules and sets and adds the elements.
pub fn add(port: &str, mac: Option<&[u8]>, ips: Option<&[IpAddr]>, owner: &str) -> Result<(), BridgeError> {
    if let Some(key) = ifname_key(port) {
        // A failed batch (a set missing) changed nothing: nft below makes what is missing.
        if rules_in_place(mac.is_some(), ips.is_some())
            && add_elements(element_ops(&key, mac, ips, owner)).is_ok()
        {
            return Ok(());
        }
    }
    apply(&script(port, mac, ips, owner))
}

/// The elements of the table: the set each is in and its owner. None when the table does
/// not exist; an error when listing fails.
pub fn list() -> Result<Vec<(&'static str, String)>, BridgeError> {
    let mut out = Vec::new();
    for set in SETS {
        match nl::list(set) {
            Ok(v) => out.extend(v.into_iter().map(|e| (set.set, e.comment))),
            Err(e) if e.is_missing() => {}
            Err(e) => return Err(BridgeError::Firewall(format!("listing {TABLE} {}: {e}", set.set))),
        }
    }
    Ok(out)
}

/// Removes the elements whose owner satisfies `stale`, over netlink (no `nft` process).
pub fn remove_where(stale: impl Fn(&str) -> bool) -> Result<(), BridgeError> {
    // Most nodes run without the checks: one request instead of a listing per set.
    match nl::table_exists(NFPROTO_BRIDGE, TABLE_NAME) {
        Ok(false) => return Ok(()),
        Ok(true) => {}
        Err(e) => return Err(BridgeError::Firewall(format!("looking for {TABLE}: {e}"))),
    }
    let mut last = None;
    // As for the masquerade maps: a concurrent removal fails the batch with ENOENT; list again.
    for _ in 0..3 {
        let mut doomed = Vec::new();
        for set in SETS {
            match nl::list(set) {
                Ok(v) => {
                    doomed.push((set, v.into_iter().filter(|e| stale(&e.comment)).map(|e| e.key).collect()))
                }
                Err(e) if e.is_missing() => {}
                Err(e) => return Err(BridgeError::Firewall(format!("listing {TABLE} {}: {e}", set.set))),
            }
        }
        // One transaction for every set when it fits (a pod's guard and its allowances go
        // together, in one round trip); a node's whole GC in several.
        let total: usize = doomed.iter().map(|(_, keys): &(SetRef, Vec<Vec<u8>>)| keys.len()).sum();
        let removed = if total <= 256 * 8 {
            let ops: Vec<Op> = doomed
                .iter()
                .flat_map(|(set, keys)| keys.chunks(256).map(|k| Op::Del { set: *set, keys: k.to_vec() }))
                .collect();
            nl::apply(&ops, false)
        } else {
            doomed.into_iter().try_for_each(|(set, keys)| nl::remove(set, keys))
        };
        match removed {
            Err(e) if e.is_missing() => last = Some(e),
            r => return r.map_err(|e| BridgeError::Firewall(format!("removing from {TABLE}: {e}"))),
        }
    }
    Err(BridgeError::Firewall(format!(
        "removing from {TABLE}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_check_allows_each_address_once_and_guards_the_port() {
        let ips: Vec<IpAddr> =
            ["10.1.0.5", "fd00::5", "10.1.0.5"].iter().map(|a| a.parse().expect("test address")).collect();
        let s = script("veth1", None, Some(&ips), "n/c/eth0");
        assert!(
            !s.contains("chain bridge cni_bridge prerouting") && !s.contains(" guarded {"),
            "no MAC check unless asked: {s}"
        );
        assert_eq!(s.matches("allowed4 { \"veth1\" . 10.1.0.5 comment \"n/c/eth0\" }").count(), 1, "{s}");
        assert!(s.contains("allowed6 { \"veth1\" . fd00::5 comment"), "{s}");
        assert!(s.contains("ndtarget6 { \"veth1\" . 0xfd000000000000000000000000000005 comment"), "{s}");
        assert!(s.contains("ipguarded { \"veth1\" comment \"n/c/eth0\" }"), "{s}");
        let both = script("veth1", Some(&[2, 0, 0, 0, 0, 1]), Some(&[]), "n/c/eth0");
        assert!(
            both.contains("allowed { \"veth1\" . 02:00:00:00:00:01") && both.contains("ipguarded"),
            "{both}"
        );
        assert!(!script("veth1", Some(&[2, 0, 0, 0, 0, 1]), None, "o").contains("ipspoof"));
    }

    #[test]
    fn netlink_elements_are_the_scripts_keys_ipguarded_last() {
        let port = ifname_key("veth1").expect("a valid name");
        assert_eq!(port.len(), 16);
        assert!(
            ifname_key("veth0123456789ab").is_none() && ifname_key("").is_none(),
            "16 bytes need the NUL"
        );
        let ips: Vec<IpAddr> =
            ["fd00::5", "10.1.0.5", "10.1.0.5"].iter().map(|a| a.parse().expect("address")).collect();
        let ops = element_ops(&port, Some(&[2, 0, 0, 0, 0, 1]), Some(&ips), "n/c/eth0");
        let keys: Vec<(&str, usize)> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Add { set, key, .. } => Some((set.set, key.len())),
                Op::Del { .. } | Op::Message { .. } => None,
            })
            .collect();
        // ether_addr is padded to 8 bytes in a concatenation; each address once.
        assert_eq!(
            keys,
            [
                ("guarded", 16),
                ("allowed", 24),
                ("allowed4", 20),
                ("allowed6", 32),
                ("ndtarget6", 32),
                ("ipguarded", 16)
            ]
        );
        let tags: Vec<String> = (0..IP_RULES.len()).map(|i| rule_tag(&IP_RULES, i)).collect();
        assert!(tags.iter().all(|t| t.len() < 128 && !t.contains('"')), "{tags:?}");
        assert_ne!(rule_tag(&IP_RULES, 0), rule_tag(&IP_RULES[1..], 0), "another rule set, another tag");
    }
}
