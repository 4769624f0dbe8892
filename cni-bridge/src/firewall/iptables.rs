//! `ipMasqBackend: "iptables"`: the reference's per-attachment chain (`-d <subnet> ACCEPT`,
//! `! -d <multicast> MASQUERADE`, a commented POSTROUTING jump per address), applied in one
//! `iptables-restore --noflush` per family instead of one `iptables` process per rule.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_wire::process;

use super::masquerade::{Entry, Masquerade};
use super::netlink::{self as nl, NFPROTO_IPV4, NFPROTO_IPV6};
use crate::error::BridgeError;

const COMMENT: &str = "cni-bridge";
const CHAIN_PREFIX: &str = "CNIB-";

/// The iptables backend.
pub struct Iptables;

/// FNV-1a 64: a stable short name for an attachment's chain (the bytes alone: `Hash for str`
/// would add a terminator and rename every chain).
fn fnv1a(s: &str) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, s.as_bytes());
    std::hash::Hasher::finish(&h)
}

/// The chain of an attachment. A 64-bit hash: ids chosen on purpose can collide, which is
/// why a chain is only ever changed for the owner its jumps and rules name. A test build can
/// be told to collide every name (CNI_TEST_CHAIN_HASH_COLLIDE=1).
pub fn chain(owner: &str) -> String {
    let hash = if cni_proto::test_switch("CHAIN_HASH_COLLIDE") { 0 } else { fnv1a(owner) };
    format!("{CHAIN_PREFIX}{hash:016x}")
}

struct Family {
    save: &'static str,
    restore: &'static str,
    /// The table list of the legacy (x_tables) backend in this namespace.
    legacy_tables: &'static str,
    nfproto: u8,
}

const FAMILIES: [Family; 2] = [
    Family {
        save: "iptables-save",
        restore: "iptables-restore",
        legacy_tables: "/proc/net/ip_tables_names",
        nfproto: NFPROTO_IPV4,
    },
    Family {
        save: "ip6tables-save",
        restore: "ip6tables-restore",
        legacy_tables: "/proc/net/ip6_tables_names",
        nfproto: NFPROTO_IPV6,
    },
];

/// The owner in a rule's `cni-bridge <owner>` comment.
fn comment_owner(rule: &str) -> Option<String> {
    let prefix = format!("--comment \"{COMMENT} ");
    let rest = &rule[rule.find(&prefix)? + prefix.len()..];
    Some(rest[..rest.find('"')?].to_string())
}

/// Every (address, owner) jump in POSTROUTING of a saved `nat` table, with its rule text.
fn jumps(saved: &str) -> Vec<(Entry, String)> {
    saved
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING "))
        .filter_map(|l| {
            let owner = comment_owner(l)?;
            let src = l.split_whitespace().skip_while(|w| *w != "-s").nth(1)?;
            let ip: IpAddr = src.split('/').next()?.parse().ok()?;
            Some((Entry { ip, owner }, l["-A ".len()..].to_string()))
        })
        .collect()
}

/// The target of a saved rule (`-j X`).
fn target(rule: &str) -> Option<&str> {
    rule.split_whitespace().skip_while(|w| *w != "-j").nth(1)
}

/// Everyone the saved table names as an owner of chain `ch`: the owners of the jumps to it
/// and of its own rules (each carries the full owner: the chain's name is only a hash).
fn chain_owners(saved: &str, ch: &str) -> Vec<String> {
    let in_chain = format!("-A {ch} ");
    let mut owners: Vec<String> = saved
        .lines()
        .filter(|l| l.starts_with(&in_chain) || (l.starts_with("-A POSTROUTING ") && target(l) == Some(ch)))
        .filter_map(comment_owner)
        .collect();
    owners.sort();
    owners.dedup();
    owners
}

impl Family {
    fn v4(&self) -> bool {
        self.nfproto == NFPROTO_IPV4
    }

    fn restore(&self, script: &str) -> Result<(), BridgeError> {
        process::pipe(self.restore, &["--noflush", "-w"], script)
            .map_err(|e| BridgeError::Firewall(e.to_string()))
    }

    /// The `nat` table as `iptables-save` prints it.
    fn dump(&self) -> Result<String, BridgeError> {
        process::run(self.save, &["-t", "nat"], None).map_err(|e| BridgeError::Firewall(e.to_string()))
    }

    /// Every (address, owner) jump in POSTROUTING, with its saved rule text.
    fn saved(&self) -> Result<Vec<(Entry, String)>, BridgeError> {
        Ok(jumps(&self.dump()?))
    }

    /// Whether this family's `nat` table may hold the chain of `owner` (any of ours: `None`):
    /// iptables-nft keeps them in nftables table `nat` (listed over netlink, no process), the
    /// legacy backend in an x_tables `nat` table, which exists only once something used it in
    /// this namespace (and cannot be looked into without iptables-save).
    fn may_hold_chains(&self, owner: Option<&str>) -> Result<bool, BridgeError> {
        let legacy = std::fs::read_to_string(self.legacy_tables).unwrap_or_default();
        if legacy.lines().any(|t| t == "nat") {
            return Ok(true);
        }
        match nl::chains(self.nfproto, "nat") {
            Ok(chains) => Ok(chains.iter().any(|c| match owner {
                Some(owner) => *c == chain(owner),
                None => c.starts_with(CHAIN_PREFIX),
            })),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(BridgeError::Firewall(format!("listing the chains of table nat: {e}"))),
        }
    }
}

impl Masquerade for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn add(&self, addrs: &[IpNetwork], owner: &str) -> Result<(), BridgeError> {
        let ch = chain(owner);
        for fam in &FAMILIES {
            let mine: Vec<&IpNetwork> = addrs.iter().filter(|a| a.is_ipv4() == fam.v4()).collect();
            if mine.is_empty() {
                continue;
            }
            // Declaring the chain below flushes it: never one another attachment owns (its
            // name is the same hash). Looked into only where it may exist (iptables-nft: a
            // netlink listing, no process).
            if fam.may_hold_chains(Some(owner))? {
                let others: Vec<String> =
                    chain_owners(&fam.dump()?, &ch).into_iter().filter(|o| o != owner).collect();
                if !others.is_empty() {
                    return Err(BridgeError::Firewall(format!(
                        "chain {ch} (the hash of {owner}) belongs to {}: refusing to touch it",
                        others.join(", ")
                    )));
                }
            }
            let (mcast, host) = if fam.v4() { ("224.0.0.0/4", 32) } else { ("ff00::/8", 128) };
            let comment = format!("-m comment --comment \"{COMMENT} {owner}\"");
            let mut s = format!("*nat\n:{ch} - [0:0]\n");
            for a in &mine {
                s.push_str(&format!("-A {ch} -d {}/{} {comment} -j ACCEPT\n", a.network(), a.prefix()));
            }
            s.push_str(&format!("-A {ch} ! -d {mcast} {comment} -j MASQUERADE\n"));
            for a in &mine {
                s.push_str(&format!(
                    "-A POSTROUTING -s {}/{host} -m comment --comment \"{COMMENT} {owner}\" -j {ch}\n",
                    a.ip()
                ));
            }
            s.push_str("COMMIT\n");
            fam.restore(&s)?;
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<Entry>, BridgeError> {
        let mut out = Vec::new();
        for fam in &FAMILIES {
            out.extend(fam.saved()?.into_iter().map(|(e, _)| e));
        }
        Ok(out)
    }

    fn remove_where(&self, stale: &dyn Fn(&str) -> bool) -> Result<(), BridgeError> {
        let mut errs = Vec::new();
        for fam in &FAMILIES {
            // A family with no chain of ours (an IPv4-only node's ip6tables) costs no
            // `*-save` process; a failed look falls through to the dump, which says why.
            if let Ok(false) = fam.may_hold_chains(None) {
                continue;
            }
            let saved = match fam.dump() {
                Ok(saved) => saved,
                Err(e) => {
                    errs.push(e.to_string());
                    continue;
                }
            };
            let doomed: Vec<(Entry, String)> =
                jumps(&saved).into_iter().filter(|(e, _)| stale(&e.owner)).collect();
            if doomed.is_empty() {
                continue;
            }
            let mut s = String::from("*nat\n");
            let mut chains: Vec<String> = Vec::new();
            for (e, rule) in &doomed {
                s.push_str(&format!("-D {rule}\n"));
                let ch = chain(&e.owner);
                // Only a chain nobody else owns: a colliding attachment keeps its chain.
                if !chains.contains(&ch) && chain_owners(&saved, &ch).iter().all(|o| stale(o)) {
                    chains.push(ch);
                }
            }
            for ch in &chains {
                s.push_str(&format!("-F {ch}\n-X {ch}\n"));
            }
            s.push_str("COMMIT\n");
            if let Err(e) = fam.restore(&s) {
                errs.push(e.to_string());
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(BridgeError::Firewall(errs.join("; ")))
        }
    }

    fn hooked(&self) -> Result<bool, BridgeError> {
        // Each entry is itself a POSTROUTING rule.
        Ok(true)
    }

    fn may_hold_entries(&self, owner: Option<&str>) -> Result<bool, BridgeError> {
        for fam in &FAMILIES {
            if fam.may_hold_chains(owner)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_fit_iptables_limits_and_differ() {
        let a = chain("net/c1/eth0");
        assert!(a.len() <= 28 && a.starts_with("CNIB-"));
        assert_ne!(a, chain("net/c2/eth0"));
        assert_eq!(a, chain("net/c1/eth0"));
        // Pinned: DEL finds chains made by older builds only while the name stays the same.
        assert_eq!(chain("a"), "CNIB-af63dc4c8601ec8c");
    }
}
