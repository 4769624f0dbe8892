//! One masquerade rule set for the node (not per pod): traffic from this node's pod CIDRs to
//! anything outside the cluster's pod CIDRs leaves with the node's address; pod-to-pod
//! traffic, across nodes too, keeps its source. Table `inet cni_route_agent`, replaced
//! atomically when its inputs change.
//!
//! Source ports are picked fully at random (`masquerade fully-random`,
//! NF_NAT_RANGE_PROTO_RANDOM_FULLY) where the kernel and nft support it: with the default
//! sequential choice two pods' simultaneous UDP flows (a resolver's A and AAAA queries) race to
//! the same mapping and one packet is dropped (conntrack `insert_failed`), the cause of the
//! well-known 5 s DNS timeouts. The first apply is the probe: if the rule set with it is
//! refused and the one without is taken, the kernel lacks it, and it is not tried again.

use std::sync::atomic::{AtomicU8, Ordering};

use ipnetwork::IpNetwork;

use crate::error::AgentError;

/// The probe's outcome, once per process.
static FULLY_RANDOM: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const SUPPORTED: u8 = 1;
const UNSUPPORTED: u8 = 2;

/// The nft script for `own` pod CIDRs and the `cluster` pod CIDRs.
pub fn script(own: &[IpNetwork], cluster: &[IpNetwork], fully_random: bool) -> String {
    let mut script = String::from(
        "add table inet cni_route_agent\nflush table inet cni_route_agent\n\
         add chain inet cni_route_agent postrouting { type nat hook postrouting priority srcnat; policy accept; }\n",
    );
    for (fam, v4) in [("ip", true), ("ip6", false)] {
        let set = |nets: &[IpNetwork]| -> Vec<String> {
            nets.iter()
                .filter(|n| n.is_ipv4() == v4)
                .map(|n| format!("{}/{}", n.network(), n.prefix()))
                .collect()
        };
        let (src, dst) = (set(own), set(cluster));
        if src.is_empty() {
            continue;
        }
        let mcast = if v4 { "224.0.0.0/4" } else { "ff00::/8" };
        let mut rule =
            format!("add rule inet cni_route_agent postrouting {fam} saddr {{ {} }}", src.join(", "));
        if !dst.is_empty() {
            rule.push_str(&format!(" {fam} daddr != {{ {} }}", dst.join(", ")));
        }
        let random = if fully_random { " fully-random" } else { "" };
        rule.push_str(&format!(" {fam} daddr != {mcast} masquerade{random}\n"));
        script.push_str(&rule);
    }
    script
}

/// Applies the rule set, with fully random ports if `fully_random` and the kernel has them;
/// returns whether the rule set in place has them.
pub fn apply(own: &[IpNetwork], cluster: &[IpNetwork], fully_random: bool) -> Result<bool, AgentError> {
    let nft = |random: bool| netlink_wire::process::pipe("nft", &["-f", "-"], &script(own, cluster, random));
    let probe = FULLY_RANDOM.load(Ordering::Relaxed);
    if !fully_random || probe == UNSUPPORTED {
        nft(false).map_err(|e| AgentError::Masq(e.to_string()))?;
        return Ok(false);
    }
    match nft(true) {
        Ok(()) => {
            FULLY_RANDOM.store(SUPPORTED, Ordering::Relaxed);
            Ok(true)
        }
        Err(e) if probe == UNKNOWN => {
            // Refused with it, taken without it: the kernel (or nft) lacks fully-random.
            nft(false).map_err(|plain| AgentError::Masq(plain.to_string()))?;
            FULLY_RANDOM.store(UNSUPPORTED, Ordering::Relaxed);
            tracing::warn!(error = %e, "masquerade without fully random ports: not supported here");
            Ok(false)
        }
        Err(e) => Err(AgentError::Masq(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerades_own_pods_leaving_the_cluster_only() {
        let own = ["10.244.1.0/24".parse().unwrap()];
        let cluster = [
            "10.244.1.0/24".parse().unwrap(),
            "10.244.2.0/24".parse().unwrap(),
            "fd00::/48".parse().unwrap(),
        ];
        let s = script(&own, &cluster, false);
        assert!(s.contains("ip saddr { 10.244.1.0/24 } ip daddr != { 10.244.1.0/24, 10.244.2.0/24 } ip daddr != 224.0.0.0/4 masquerade\n"), "{s}");
        assert!(!s.contains("ip6 saddr"), "no v6 pods, no v6 rule");
        let s = script(&own, &cluster, true);
        assert!(s.contains("ip daddr != 224.0.0.0/4 masquerade fully-random\n"), "{s}");
    }
}
