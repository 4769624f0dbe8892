//! `ipMasqBackend: "iptables"`: the reference's per-attachment chain (`-d <subnet> ACCEPT`,
//! `! -d <multicast> MASQUERADE`, a commented POSTROUTING jump per address), applied in one
//! `iptables-restore --noflush` per family instead of one `iptables` process per rule.

use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnetwork::IpNetwork;

use crate::error::BridgeError;
use crate::masq::Entry;

const COMMENT: &str = "cni-bridge";

/// FNV-1a: a stable short name for an attachment's chain (no hashing crate needed for this).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The chain of an attachment.
pub fn chain(owner: &str) -> String {
    format!("CNIB-{:016x}", fnv1a(owner))
}

fn tools(v4: bool) -> (&'static str, &'static str) {
    if v4 {
        ("iptables-save", "iptables-restore")
    } else {
        ("ip6tables-save", "ip6tables-restore")
    }
}

fn restore(v4: bool, script: &str) -> Result<(), BridgeError> {
    crate::nft::pipe(tools(v4).1, &["--noflush", "-w"], script)
}

/// Masquerades traffic from each of `addrs` that leaves its own subnet.
pub fn add(addrs: &[IpNetwork], owner: &str) -> Result<(), BridgeError> {
    let ch = chain(owner);
    for v4 in [true, false] {
        let mine: Vec<&IpNetwork> = addrs.iter().filter(|a| a.is_ipv4() == v4).collect();
        if mine.is_empty() {
            continue;
        }
        let (mcast, host) = if v4 { ("224.0.0.0/4", 32) } else { ("ff00::/8", 128) };
        let mut s = format!("*nat\n:{ch} - [0:0]\n");
        for a in &mine {
            s.push_str(&format!("-A {ch} -d {}/{} -j ACCEPT\n", a.network(), a.prefix()));
        }
        s.push_str(&format!("-A {ch} ! -d {mcast} -j MASQUERADE\n"));
        for a in &mine {
            s.push_str(&format!(
                "-A POSTROUTING -s {}/{host} -m comment --comment \"{COMMENT} {owner}\" -j {ch}\n",
                a.ip()
            ));
        }
        s.push_str("COMMIT\n");
        restore(v4, &s)?;
    }
    Ok(())
}

/// Every (address, owner) jump in POSTROUTING, with its saved rule text, per family.
fn saved(v4: bool) -> Vec<(Entry, String)> {
    let (bin, _) = tools(v4);
    let Ok(out) = Command::new(bin).args(["-t", "nat"]).stdin(Stdio::null()).stderr(Stdio::null()).output()
    else {
        return vec![];
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("--comment \"{COMMENT} ");
    text.lines()
        .filter(|l| l.starts_with("-A POSTROUTING "))
        .filter_map(|l| {
            let rest = &l[l.find(&prefix)? + prefix.len()..];
            let owner = rest[..rest.find('"')?].to_string();
            let src = l.split_whitespace().skip_while(|w| *w != "-s").nth(1)?;
            let ip: IpAddr = src.split('/').next()?.parse().ok()?;
            Some((Entry { ip, owner }, l["-A ".len()..].to_string()))
        })
        .collect()
}

/// Every masquerade entry this backend holds.
pub fn list() -> Vec<Entry> {
    [true, false].into_iter().flat_map(saved).map(|(e, _)| e).collect()
}

/// Removes the jumps and chains of every owner satisfying `stale`.
pub fn remove_where(stale: impl Fn(&str) -> bool) -> Result<(), BridgeError> {
    let mut errs = Vec::new();
    for v4 in [true, false] {
        let doomed: Vec<(Entry, String)> = saved(v4).into_iter().filter(|(e, _)| stale(&e.owner)).collect();
        if doomed.is_empty() {
            continue;
        }
        let mut s = String::from("*nat\n");
        let mut chains: Vec<String> = Vec::new();
        for (e, rule) in &doomed {
            s.push_str(&format!("-D {rule}\n"));
            let ch = chain(&e.owner);
            if !chains.contains(&ch) {
                chains.push(ch);
            }
        }
        for ch in &chains {
            s.push_str(&format!("-F {ch}\n-X {ch}\n"));
        }
        s.push_str("COMMIT\n");
        if let Err(e) = restore(v4, &s) {
            errs.push(e.to_string());
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(BridgeError::Masq(errs.join("; ")))
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
    }
}
