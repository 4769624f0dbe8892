//! MAC spoof check (`macspoofchk`): frames entering the bridge from a pod's port must carry
//! the pod's MAC. One rule for all pods in table `bridge cni_bridge`; sets `guarded` (ports)
//! and `allowed` (port . MAC), each element commented with its attachment for DEL and GC.

use crate::config::fmt_mac;
use crate::error::BridgeError;
use crate::nft;

const TABLE: &str = "bridge cni_bridge";

/// Lets `port` send only frames from `mac`.
pub fn add(port: &str, mac: &[u8], owner: &str) -> Result<(), BridgeError> {
    let mac = fmt_mac(mac);
    nft::apply(&format!(
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

/// The elements (`set`, key as nft prints it, owner) of the table.
pub fn list() -> Result<Vec<(String, String, String)>, BridgeError> {
    let mut out = Vec::new();
    for item in nft::list_table("bridge", "cni_bridge")? {
        let Some(set) = item.get("set") else { continue };
        let name = set["name"].as_str().unwrap_or("").to_string();
        for e in set["elem"].as_array().into_iter().flatten() {
            let owner = e["elem"]["comment"].as_str().unwrap_or("").to_string();
            let key = match &e["elem"]["val"] {
                serde_json::Value::String(s) => format!("\"{s}\""),
                v => {
                    let parts: Vec<String> = v["concat"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .enumerate()
                        .map(|(i, p)| {
                            let s = p.as_str().unwrap_or("");
                            if i == 0 {
                                format!("\"{s}\"")
                            } else {
                                s.to_string()
                            }
                        })
                        .collect();
                    parts.join(" . ")
                }
            };
            out.push((name.clone(), key, owner));
        }
    }
    Ok(out)
}

/// Removes the elements whose owner satisfies `stale`.
pub fn remove_where(stale: impl Fn(&str) -> bool) -> Result<(), BridgeError> {
    let mut s = String::new();
    for (set, key, owner) in list()? {
        if stale(&owner) {
            s.push_str(&format!("delete element {TABLE} {set} {{ {key} }}\n"));
        }
    }
    if s.is_empty() {
        return Ok(());
    }
    nft::apply(&s)
}
