//! `ipMasqBackend: "iptables"`: the reference's per-attachment chain (`-d <subnet> ACCEPT`,
//! `! -d <multicast> MASQUERADE`, a commented POSTROUTING jump per address), applied in one
//! `iptables-restore --noflush` per family instead of one `iptables` process per rule.

use std::cell::RefCell;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_wire::process::{self, RunError};

use super::masquerade::{Entry, Masquerade};
use super::netlink::{self as nl, NlError, NFPROTO_IPV4, NFPROTO_IPV6};
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

/// What one teardown learnt of each family's `nat` table (IPv4, IPv6), while it lasts: our
/// masquerade sweep and the reference's rules' removal look at the same table, and each look
/// is a process (`iptables-save`) or a netlink dump. Only what this thread read is kept, and a
/// family's entry goes when this thread changes its table.
#[derive(Default)]
struct Seen {
    saved: [Option<String>; 2],
    chains: [Option<Vec<String>>; 2],
}

thread_local! {
    static SEEN: RefCell<Option<Seen>> = const { RefCell::new(None) };
}

/// Ends the sharing however `sharing_dumps`' closure ends.
struct Sharing;

impl Drop for Sharing {
    fn drop(&mut self) {
        SEEN.with(|s| *s.borrow_mut() = None);
    }
}

/// Runs `f` with each family's `nat` table dumped (and its chains listed) at most once until
/// this thread changes it: DEL's two sweeps of that table. Outside, every look is fresh.
pub fn sharing_dumps<T>(f: impl FnOnce() -> T) -> T {
    SEEN.with(|s| *s.borrow_mut() = Some(Seen::default()));
    let _sharing = Sharing;
    f()
}

fn slot(nfproto: u8) -> usize {
    usize::from(nfproto != NFPROTO_IPV4)
}

/// The family's `save` tool's `nat` table, shared within [`sharing_dumps`].
pub(super) fn save_nat(save: &str, nfproto: u8) -> Result<String, RunError> {
    if let Some(text) = SEEN.with(|s| s.borrow().as_ref().and_then(|s| s.saved[slot(nfproto)].clone())) {
        return Ok(text);
    }
    let text = process::run(save, &["-t", "nat"], None)?;
    SEEN.with(|s| {
        if let Some(seen) = s.borrow_mut().as_mut() {
            seen.saved[slot(nfproto)] = Some(text.clone());
        }
    });
    Ok(text)
}

/// The chains of the family's nftables table `nat` (iptables-nft's), shared likewise.
pub(super) fn nat_chains(nfproto: u8) -> Result<Vec<String>, NlError> {
    if let Some(chains) = SEEN.with(|s| s.borrow().as_ref().and_then(|s| s.chains[slot(nfproto)].clone())) {
        return Ok(chains);
    }
    let chains = nl::chains(nfproto, "nat")?;
    SEEN.with(|s| {
        if let Some(seen) = s.borrow_mut().as_mut() {
            seen.chains[slot(nfproto)] = Some(chains.clone());
        }
    });
    Ok(chains)
}

/// Applies `script` to the family's `nat` table with its `restore` tool, forgetting what was
/// seen of it (also when the tool fails: it may have changed something).
pub(super) fn restore_nat(restore: &str, nfproto: u8, script: &str) -> Result<(), RunError> {
    restore_nat_to(restore, nfproto, script, None)
}

/// [`restore_nat`] of a script that deletes `removal`'s rules (as saved, without `-A `) and
/// chains only: once it has succeeded (iptables-restore commits all or nothing), the table is
/// the one seen before without them, which is kept as seen.
fn restore_nat_to(
    restore: &str,
    nfproto: u8,
    script: &str,
    removal: Option<(&[String], &[String])>,
) -> Result<(), RunError> {
    let i = slot(nfproto);
    // Taken before the run: a failed run may have changed something.
    let before =
        SEEN.with(|s| s.borrow_mut().as_mut().map(|seen| (seen.saved[i].take(), seen.chains[i].take())));
    process::pipe(restore, &["--noflush", "-w"], script)?;
    if let (Some((rules, chains)), Some((Some(saved), listed))) = (removal, before) {
        let kept = without(&saved, rules, chains);
        let listed = listed.map(|mut v| {
            v.retain(|c| !chains.contains(c));
            v
        });
        // The reference's rules (reference.rs) are read from this, not from a second dump:
        // this removal never touches them.
        SEEN.with(|s| {
            if let Some(seen) = s.borrow_mut().as_mut() {
                seen.saved[i] = Some(kept);
                seen.chains[i] = listed;
            }
        });
    }
    Ok(())
}

/// A saved table without `rules` (as saved, without `-A `) and `chains` (their declarations
/// and rules): what the table is once a script deleting them has committed.
fn without(saved: &str, rules: &[String], chains: &[String]) -> String {
    let declares = |l: &str, ch: &str| {
        l.strip_prefix(':').and_then(|r| r.strip_prefix(ch)).is_some_and(|r| r.starts_with(' '))
    };
    let in_chain = |l: &str, ch: &str| {
        l.strip_prefix("-A ").and_then(|r| r.strip_prefix(ch)).is_some_and(|r| r.starts_with(' '))
    };
    saved
        .lines()
        .filter(|l| !l.strip_prefix("-A ").is_some_and(|r| rules.iter().any(|d| d == r)))
        .filter(|l| !chains.iter().any(|ch| declares(l, ch) || in_chain(l, ch)))
        .map(|l| format!("{l}\n"))
        .collect()
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
        restore_nat(self.restore, self.nfproto, script).map_err(|e| BridgeError::Firewall(e.to_string()))
    }

    /// The `nat` table as `iptables-save` prints it.
    fn dump(&self) -> Result<String, BridgeError> {
        save_nat(self.save, self.nfproto).map_err(|e| BridgeError::Firewall(e.to_string()))
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
        match nat_chains(self.nfproto) {
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
            let rules: Vec<String> = doomed.into_iter().map(|(_, rule)| rule).collect();
            if let Err(e) = restore_nat_to(fam.restore, fam.nfproto, &s, Some((&rules, &chains))) {
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

    #[test]
    fn a_removal_leaves_the_saved_table_without_its_rules_and_chains_only() {
        let saved = "*nat\n:POSTROUTING ACCEPT [0:0]\n:CNIB-1 - [0:0]\n:CNIB-12 - [0:0]\n\
                     -A POSTROUTING -s 10.1.0.2/32 -j CNIB-1\n-A POSTROUTING -s 10.1.0.3/32 -j CNIB-12\n\
                     -A CNIB-1 -j MASQUERADE\n-A CNIB-12 -j MASQUERADE\nCOMMIT\n";
        let left = without(saved, &["POSTROUTING -s 10.1.0.2/32 -j CNIB-1".into()], &["CNIB-1".into()]);
        assert_eq!(
            left,
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:CNIB-12 - [0:0]\n-A POSTROUTING -s 10.1.0.3/32 -j CNIB-12\n\
             -A CNIB-12 -j MASQUERADE\nCOMMIT\n"
        );
    }
}
