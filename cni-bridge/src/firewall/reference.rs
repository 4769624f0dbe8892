//! The reference `bridge`'s ipMasq rules, on a node taken over from it: per attachment, a
//! nat chain `CNI-<24 hex>` (ACCEPT to the subnet, MASQUERADE the rest) and a POSTROUTING
//! jump to it per address, each commented `name: "<network>" id: "<container id>"`. A DEL
//! through this plugin of a pod the reference made removes them, as the reference's DEL
//! would have; left behind, they would masquerade the next pod given that address.

use super::iptables::{nat_chains, restore_nat, save_nat};
use super::netlink::{NFPROTO_IPV4, NFPROTO_IPV6};
use crate::error::BridgeError;

/// The reference's comment for an attachment (Go's `name: %q id: %q`), as iptables-save
/// prints it inside its own quotes.
fn saved_comment(network: &str, container_id: &str) -> String {
    format!("--comment \"name: \\\"{network}\\\" id: \\\"{container_id}\\\"\"")
}

/// The reference's per-attachment chain names: `CNI-` and 24 hex digits of a SHA-512 (its
/// portmap chains, `CNI-HOSTPORT-*` and `CNI-DN-*`, are not of this shape).
fn is_reference_chain(name: &str) -> bool {
    name.strip_prefix("CNI-")
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The iptables-restore script removing `container_id`'s rules from an `iptables-save -t nat`
/// text; `None` when it has none.
pub fn removal(saved: &str, network: &str, container_id: &str) -> Option<String> {
    let comment = saved_comment(network, container_id);
    let jumps: Vec<&str> =
        saved.lines().filter(|l| l.starts_with("-A POSTROUTING ") && l.contains(&comment)).collect();
    let mut chains: Vec<&str> = jumps
        .iter()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "-j").nth(1))
        .filter(|c| is_reference_chain(c))
        .collect();
    chains.dedup();
    if jumps.is_empty() {
        return None;
    }
    let mut script = String::from("*nat\n");
    for rule in &jumps {
        script.push_str(&format!("-D {}\n", &rule["-A ".len()..]));
    }
    for chain in chains {
        // Only if no other rule jumps to it (never seen, but then it is not this pod's alone).
        let others = saved.lines().filter(|l| l.ends_with(&format!(" -j {chain}"))).count();
        let declared = saved.lines().any(|l| l.starts_with(&format!(":{chain} ")));
        if declared && others == jumps.iter().filter(|l| l.ends_with(&format!(" -j {chain}"))).count() {
            script.push_str(&format!("-F {chain}\n-X {chain}\n"));
        }
    }
    script.push_str("COMMIT\n");
    Some(script)
}

/// Removes the reference's masquerade rules of `container_id` in `network`, both families.
/// Costs nothing on a node where no such chain can exist: iptables-nft's chains are listed
/// over netlink; the legacy backend's nat table must exist for iptables-save to be run. Within
/// [`super::iptables::sharing_dumps`] (DEL) it reads the dumps the masquerade sweep made.
pub fn remove(network: &str, container_id: &str) -> Result<(), BridgeError> {
    let families = [
        ("iptables-save", "iptables-restore", "/proc/net/ip_tables_names", NFPROTO_IPV4),
        ("ip6tables-save", "ip6tables-restore", "/proc/net/ip6_tables_names", NFPROTO_IPV6),
    ];
    let mut errs = Vec::new();
    for (save, restore, legacy_tables, nfproto) in families {
        let legacy = std::fs::read_to_string(legacy_tables).unwrap_or_default().lines().any(|t| t == "nat");
        let maybe = legacy
            || match nat_chains(nfproto) {
                Ok(chains) => chains.iter().any(|c| is_reference_chain(c)),
                Err(e) if e.is_missing() => false,
                Err(e) => {
                    errs.push(format!("listing the chains of table nat: {e}"));
                    continue;
                }
            };
        if !maybe {
            continue;
        }
        let saved = match save_nat(save, nfproto) {
            Ok(s) => s,
            // No iptables on this node: no rule of the reference either.
            Err(e) if e.not_found() => continue,
            Err(e) => {
                errs.push(e.to_string());
                continue;
            }
        };
        if let Some(script) = removal(&saved, network, container_id) {
            if let Err(e) = restore_nat(restore, nfproto, &script) {
                errs.push(e.to_string());
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(BridgeError::Firewall(format!("the reference plugin's masquerade rules: {}", errs.join("; "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "*nat\n:POSTROUTING ACCEPT [0:0]\n:CNI-0057d6c92fec36c1ac111616 - [0:0]\n:CNI-aaaaaaaaaaaaaaaaaaaaaaaa - [0:0]\n:CNI-HOSTPORT-MASQ - [0:0]\n\
-A POSTROUTING -m comment --comment \"CNI portfwd requiring masquerade\" -j CNI-HOSTPORT-MASQ\n\
-A POSTROUTING -s 10.33.0.2/32 -m comment --comment \"name: \\\"cbr0\\\" id: \\\"r1\\\"\" -j CNI-0057d6c92fec36c1ac111616\n\
-A POSTROUTING -s 10.33.0.3/32 -m comment --comment \"name: \\\"cbr0\\\" id: \\\"r10\\\"\" -j CNI-aaaaaaaaaaaaaaaaaaaaaaaa\n\
-A CNI-0057d6c92fec36c1ac111616 -d 10.33.0.0/24 -m comment --comment \"name: \\\"cbr0\\\" id: \\\"r1\\\"\" -j ACCEPT\n\
COMMIT\n";

    #[test]
    fn removes_the_jump_and_chain_of_one_attachment_only() {
        let s = removal(SAVED, "cbr0", "r1").unwrap();
        assert_eq!(
            s,
            "*nat\n-D POSTROUTING -s 10.33.0.2/32 -m comment --comment \"name: \\\"cbr0\\\" id: \\\"r1\\\"\" -j CNI-0057d6c92fec36c1ac111616\n\
             -F CNI-0057d6c92fec36c1ac111616\n-X CNI-0057d6c92fec36c1ac111616\nCOMMIT\n"
        );
        assert_eq!(removal(SAVED, "cbr0", "r2"), None);
        assert_eq!(removal(SAVED, "other", "r1"), None, "another network's pod of that id");
        assert!(is_reference_chain("CNI-0057d6c92fec36c1ac111616"));
        assert!(!is_reference_chain("CNI-HOSTPORT-MASQ") && !is_reference_chain("CNIB-0057d6c92fec36c1"));
    }
}
