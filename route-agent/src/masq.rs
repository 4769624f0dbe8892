//! One masquerade rule set for the node (not per pod): traffic from this node's pod CIDRs to
//! anything outside the cluster's pod CIDRs leaves with the node's address; pod-to-pod
//! traffic, across nodes too, keeps its source. Table `inet cni_route_agent`, replaced
//! atomically when its inputs change.

use ipnetwork::IpNetwork;

use crate::error::AgentError;

/// The nft script for `own` pod CIDRs and the `cluster` pod CIDRs.
pub fn script(own: &[IpNetwork], cluster: &[IpNetwork]) -> String {
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
        rule.push_str(&format!(" {fam} daddr != {mcast} masquerade\n"));
        script.push_str(&rule);
    }
    script
}

/// Applies the rule set.
pub fn apply(own: &[IpNetwork], cluster: &[IpNetwork]) -> Result<(), AgentError> {
    netlink_wire::process::pipe("nft", &["-f", "-"], &script(own, cluster))
        .map_err(|e| AgentError::Masq(e.to_string()))
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
        let s = script(&own, &cluster);
        assert!(s.contains("ip saddr { 10.244.1.0/24 } ip daddr != { 10.244.1.0/24, 10.244.2.0/24 } ip daddr != 224.0.0.0/4 masquerade"), "{s}");
        assert!(!s.contains("ip6 saddr"), "no v6 pods, no v6 rule");
    }
}
