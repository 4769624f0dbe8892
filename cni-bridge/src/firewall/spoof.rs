//! MAC spoof check (`macspoofchk`): frames entering the bridge from a pod's port must carry
//! the pod's MAC. One rule for all pods in table `bridge cni_bridge`; sets `guarded` (ports)
//! and `allowed` (port . MAC), each element commented with its attachment for DEL and GC.

use super::netlink::{self as nl, SetRef, NFPROTO_BRIDGE};
use super::nftables::apply;
use crate::config::fmt_mac;
use crate::error::BridgeError;

const TABLE: &str = "bridge cni_bridge";
const SETS: [SetRef; 2] = [
    SetRef { family: NFPROTO_BRIDGE, table: "cni_bridge", set: "guarded" },
    SetRef { family: NFPROTO_BRIDGE, table: "cni_bridge", set: "allowed" },
];

/// Lets `port` send only frames from `mac`.
pub fn add(port: &str, mac: &[u8], owner: &str) -> Result<(), BridgeError> {
    let mac = fmt_mac(mac);
    apply(&format!(
        "add table {TABLE}\n\
         add set {TABLE} guarded {{ type ifname; }}\n\
         add set {TABLE} allowed {{ type ifname . ether_addr; }}\n\
         add chain {TABLE} prerouting {{ type filter hook prerouting priority -300; policy accept; }}\n\
         flush chain {TABLE} prerouting\n\
         add rule {TABLE} prerouting iifname @guarded iifname . ether saddr != @allowed drop\n\
         add element {TABLE} guarded {{ \"{port}\" comment \"{owner}\" }}\n\
         add element {TABLE} allowed {{ \"{port}\" . {mac} comment \"{owner}\" }}\n"
    ))
}

/// The elements of the table: the set each is in and its owner. None when the table does
/// not exist; an error when listing fails.
pub fn list() -> Result<Vec<(&'static str, String)>, BridgeError> {
    let mut out = Vec::new();
    for set in SETS {
        match nl::list(set) {
            Ok(v) => out.extend(v.into_iter().map(|e| (set.set, e.comment))),
            Err(e) if e.is_missing() => {}
            Err(e) => return Err(BridgeError::Masq(format!("listing {TABLE} {}: {e}", set.set))),
        }
    }
    Ok(out)
}

/// Removes the elements whose owner satisfies `stale`, over netlink (no `nft` process).
pub fn remove_where(stale: impl Fn(&str) -> bool) -> Result<(), BridgeError> {
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
                Err(e) => return Err(BridgeError::Masq(format!("listing {TABLE} {}: {e}", set.set))),
            }
        }
        match doomed.into_iter().try_for_each(|(set, keys)| nl::remove(set, keys)) {
            Err(e) if e.is_missing() => last = Some(e),
            r => return r.map_err(|e| BridgeError::Masq(format!("removing from {TABLE}: {e}"))),
        }
    }
    Err(BridgeError::Masq(format!(
        "removing from {TABLE}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}
