//! Handing a node back to the reference `bridge` (uninstall): its DEL of a pod it did not
//! make fails with ipMasq on iptables-nft. It deletes its POSTROUTING jump to the pod's chain
//! `CNI-<24 hex of SHA-512(network + container id)>` first, and iptables-nft reports a jump to
//! a missing chain as "Chain ... does not exist" (exit 2), which the reference does not take
//! for "already gone", so the runtime retries that DEL forever. Uninstall therefore declares
//! an empty chain of that name for every lease whose chain is missing: the reference's DEL
//! then finds no jump (which it tolerates) and deletes the chain. An empty chain nothing
//! jumps to changes no packet's fate.

use std::net::IpAddr;
use std::path::Path;

/// The reference's chain of an attachment (`utils.FormatChainName`).
pub fn reference_chain(network: &str, container_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA512, format!("{network}{container_id}").as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("CNI-{}", &hex[..24])
}

/// The attachments holding leases under `data_dir`: (network, container id, address), read
/// from host-local's layout (a file per address whose first line is the container id).
pub fn leases(data_dir: &Path) -> Vec<(String, String, IpAddr)> {
    let mut out = Vec::new();
    let Ok(networks) = std::fs::read_dir(data_dir) else { return out };
    for net in networks.flatten() {
        let Some(network) = net.file_name().to_str().map(str::to_string) else { continue };
        let Ok(files) = std::fs::read_dir(net.path()) else { continue };
        for f in files.flatten() {
            let Some(ip) = f.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) else { continue };
            let text = std::fs::read_to_string(f.path()).unwrap_or_default();
            let id = text.lines().next().unwrap_or("").trim().to_string();
            if !id.is_empty() {
                out.push((network.clone(), id, ip));
            }
        }
    }
    out.sort();
    out
}

/// The iptables-restore script declaring the missing chains of `pods` in an
/// `iptables-save -t nat` text; `None` when none is missing. Declaring an existing chain in
/// `--noflush` mode would flush it: those are left out.
pub fn script<'a>(saved: &str, pods: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<String> {
    let mut missing: Vec<String> = pods
        .into_iter()
        .map(|(network, id)| reference_chain(network, id))
        .filter(|c| !saved.lines().any(|l| l.starts_with(&format!(":{c} "))))
        .collect();
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for c in missing {
        s.push_str(&format!(":{c} - [0:0]\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_the_references() {
        // Seen from /usr/lib/cni/bridge (containernetworking-plugins 1.1.1) for network cbr0, id r1.
        assert_eq!(reference_chain("cbr0", "r1"), "CNI-0057d6c92fec36c1ac111616");
    }

    #[test]
    fn only_missing_chains_are_declared() {
        let saved = "*nat\n:POSTROUTING ACCEPT [0:0]\n:CNI-0057d6c92fec36c1ac111616 - [0:0]\nCOMMIT\n";
        assert_eq!(script(saved, [("cbr0", "r1")]), None);
        let s = script(saved, [("cbr0", "r1"), ("cbr0", "o1"), ("cbr0", "o1")]).unwrap();
        assert_eq!(s, format!("*nat\n:{} - [0:0]\nCOMMIT\n", reference_chain("cbr0", "o1")));
    }
}
