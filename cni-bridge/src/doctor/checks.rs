//! Every check of the doctor, each a row of the table (or several), in the order they run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::Value;

use cni_bridge::firewall;
use cni_host_local::store::Lease;

use super::args::Opts;
use super::node::*;
use super::table::{fail, pass, skip, Check};

pub(super) fn check_conf(o: &Opts) -> (Check, Option<Value>) {
    const C: &str = "conflist";
    let Some(path) = o.conf.clone().or_else(|| find_conf(&o.conf_dir)) else {
        let fix = "cni-route-agent writes it once ready (is it running? see /readyz); or write one (README: Install on a node)";
        return (fail(C, format!("no config file in {}", o.conf_dir.display()), fix), None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            return (fail(C, format!("{}: {e}", path.display()), "check the path and permissions"), None)
        }
    };
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return (fail(C, format!("{}: not JSON: {e}", path.display()), "fix the JSON syntax"), None)
        }
    };
    // A single-plugin .conf is a list of one.
    let list = if v.get("plugins").is_some() {
        v
    } else {
        serde_json::json!({"name": v["name"], "cniVersion": v["cniVersion"], "plugins": [v]})
    };
    let mut missing = Vec::new();
    for k in ["name", "cniVersion"] {
        if !list[k].is_string() {
            missing.push(k.to_string());
        }
    }
    match list["plugins"].as_array() {
        Some(p) if !p.is_empty() => {
            for (i, p) in p.iter().enumerate() {
                if !p["type"].is_string() {
                    missing.push(format!("plugins[{i}].type"));
                }
            }
        }
        _ => missing.push("plugins (non-empty)".into()),
    }
    if !missing.is_empty() {
        let detail = format!("{}: missing {}", path.display(), missing.join(", "));
        return (fail(C, detail, "add the missing fields (CNI spec: network configuration lists)"), None);
    }
    (pass(C, format!("{} (network {})", path.display(), list["name"].as_str().unwrap_or(""))), Some(list))
}

pub(super) fn check_plugins(o: &Opts, list: &Value) -> Check {
    const C: &str = "plugins present";
    let mut types = Vec::new();
    for p in list["plugins"].as_array().into_iter().flatten() {
        types.extend(p["type"].as_str().map(str::to_string));
        types.extend(p["ipam"]["type"].as_str().map(str::to_string));
    }
    let executable = |t: &str| {
        o.bin_dirs
            .iter()
            .any(|d| std::fs::metadata(d.join(t)).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
    };
    let missing: Vec<&String> = types.iter().filter(|t| !executable(t)).collect();
    let dirs = o.bin_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":");
    if missing.is_empty() {
        pass(C, format!("{} in {dirs}", types.join(", ")))
    } else {
        let fix =
            format!("cni-route-agent install-cni --bin-dir {dirs} (our plugins); others from their package");
        fail(
            C,
            format!("not in {dirs}: {}", missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
            fix,
        )
    }
}

pub(super) fn check_bridge(node: &Node, net: &Net) -> Vec<Check> {
    let br = &net.bridge;
    let Some(link) = node.link(br) else {
        let fix = "the first pod ADD creates it; if pods exist, their ADD failed: see kubelet events";
        return vec![fail("bridge", format!("{br}: no such link"), fix)];
    };
    let mut out = Vec::new();
    let kind = link["linkinfo"]["info_kind"].as_str().unwrap_or("");
    if kind != "bridge" {
        out.push(fail(
            "bridge",
            format!("{br} is a {kind:?} link, not a bridge"),
            "rename the other link or set \"bridge\"",
        ));
        return out;
    }
    out.push(if is_up(link) {
        pass("bridge", format!("{br} exists and is up"))
    } else {
        fail("bridge", format!("{br} is down"), format!("ip link set {br} up"))
    });
    if net.is_gateway {
        let have = node.addrs_of(br);
        let missing: Vec<String> = net
            .ranges
            .iter()
            .filter(|(s, gw)| !have.iter().any(|(a, p)| a == gw && *p == s.prefix()))
            .map(|(s, gw)| format!("{gw}/{}", s.prefix()))
            .collect();
        out.push(if missing.is_empty() {
            pass(
                "gateway addresses",
                format!(
                    "{br} has {}",
                    net.ranges.iter().map(|(_, g)| g.to_string()).collect::<Vec<_>>().join(", ")
                ),
            )
        } else {
            fail(
                "gateway addresses",
                format!("{br} lacks {}", missing.join(", ")),
                format!("ip addr add {} dev {br} (a different address there: set forceAddress)", missing[0]),
            )
        });
    } else {
        out.push(skip("gateway addresses", "isGateway is off"));
    }
    // An unpinned bridge takes the lowest MAC of its ports, and changes it as pods come and go
    // (neighbours then hold a stale gateway MAC): pinned, it differs from every port's.
    let mac = link["address"].as_str().unwrap_or("");
    let ports = node.ports(br);
    out.push(match ports.iter().find(|p| p["address"] == mac) {
        None if ports.is_empty() => skip("bridge MAC pinned", "no port yet: nothing to compare"),
        None => pass("bridge MAC pinned", format!("{br} {mac}: no port's MAC")),
        Some(p) => fail(
            "bridge MAC pinned",
            format!(
                "{br} has the MAC of its port {} ({mac}): it follows its ports",
                p["ifname"].as_str().unwrap_or("")
            ),
            format!("ip link set {br} address {mac} (pins it; cni-bridge pins the bridges it creates)"),
        ),
    });
    out
}

pub(super) fn check_hairpin(node: &Node, net: &Net) -> Check {
    const C: &str = "hairpin";
    let br = &net.bridge;
    if net.promisc {
        let promisc = node.link(br).and_then(|l| l["promiscuity"].as_u64()).unwrap_or(0) > 0;
        return if promisc {
            pass(C, format!("promiscMode: {br} is promiscuous"))
        } else {
            fail(
                C,
                format!("promiscMode set but {br} is not promiscuous"),
                format!("ip link set {br} promisc on"),
            )
        };
    }
    let ports = node.ports(br);
    if ports.is_empty() {
        return skip(C, format!("{br} has no port"));
    }
    let wrong: Vec<&str> = ports
        .iter()
        .filter(|p| p["linkinfo"]["info_slave_data"]["hairpin"].as_bool().unwrap_or(false) != net.hairpin)
        .filter_map(|p| p["ifname"].as_str())
        .collect();
    let want = if net.hairpin { "on" } else { "off" };
    if wrong.is_empty() {
        pass(C, format!("{} port(s), hairpin {want} as configured", ports.len()))
    } else {
        fail(
            C,
            format!("hairpin not {want} on {}", wrong.join(", ")),
            format!("bridge link set dev {} hairpin {want} (without it a pod cannot reach itself through its Service)", wrong[0]),
        )
    }
}

pub(super) fn check_forwarding(net: &Net) -> Vec<Check> {
    let mut out = Vec::new();
    for (v4, key) in [(true, "net.ipv4.ip_forward"), (false, "net.ipv6.conf.all.forwarding")] {
        if !net.ranges.iter().any(|(s, _)| s.is_ipv4() == v4) {
            continue;
        }
        out.push(match sysctl(key).as_deref() {
            Some("1") => pass("forwarding", format!("{key} = 1")),
            v => fail(
                "forwarding",
                format!("{key} = {}", v.unwrap_or("?")),
                format!("sysctl -w {key}=1 (isGateway sets it on ADD)"),
            ),
        });
    }
    out
}

pub(super) fn check_br_netfilter(net: &Net) -> Vec<Check> {
    const C: &str = "br_netfilter";
    if !kube_proxy_present() {
        return vec![skip(C, "no kube-proxy rules here: bridged traffic need not pass iptables")];
    }
    if !Path::new("/proc/sys/net/bridge").exists() {
        return vec![fail(
            C,
            "kube-proxy rules exist but br_netfilter is not loaded",
            "modprobe br_netfilter (and list it in /etc/modules-load.d)",
        )];
    }
    let mut out = Vec::new();
    for (v4, key) in
        [(true, "net.bridge.bridge-nf-call-iptables"), (false, "net.bridge.bridge-nf-call-ip6tables")]
    {
        if !net.ranges.iter().any(|(s, _)| s.is_ipv4() == v4) {
            continue;
        }
        out.push(match sysctl(key).as_deref() {
            Some("1") => pass(C, format!("{key} = 1")),
            v => fail(
                C,
                format!(
                    "{key} = {}: a pod's reply to a pod on the same bridge skips kube-proxy's NAT",
                    v.unwrap_or("?")
                ),
                format!("sysctl -w {key}=1"),
            ),
        });
    }
    out
}

pub(super) fn check_leases(node: &Node, net: &Net) -> (Check, BTreeMap<IpAddr, Option<Lease>>) {
    const C: &str = "leases vs pods";
    let leased = leases(net);
    let pods = pod_addresses(node, &net.bridge);
    let mut live = BTreeSet::new();
    let mut problems = Vec::new();
    for (port, addrs) in &pods {
        match addrs {
            None => problems.push(format!("port {port}: its pod's namespace not found")),
            Some(a) => {
                for ip in a {
                    live.insert(*ip);
                    if !leased.contains_key(ip) {
                        problems.push(format!("pod on {port} has {ip} without a lease"));
                    }
                }
            }
        }
    }
    for (ip, lease) in &leased {
        match lease {
            None => problems.push(format!(
                "lease {ip}: its file is torn (a writer was killed); the next call reclaims it"
            )),
            Some(lease) if !live.contains(ip) => {
                problems.push(format!("lease {ip} ({}): no pod interface has it", holder(lease)))
            }
            Some(_) => {}
        }
    }
    let check = if problems.is_empty() {
        pass(C, format!("{} lease(s), {} pod port(s), all matched", leased.len(), pods.len()))
    } else {
        fail(
            C,
            problems.join("; "),
            format!(
                "leaked leases: run GC through the runtime (or DEL the pod); a leased address without a pod can be freed with rm {}/{}/<ip>",
                net.data_dir.display(),
                net.name
            ),
        )
    };
    (check, leased)
}

pub(super) fn check_masq(net: &Net, leased: &BTreeMap<IpAddr, Option<Lease>>) -> Check {
    const C: &str = "masquerade entries";
    let entries = masq_entries(&net.name);
    if !net.ip_masq {
        return if entries.is_empty() {
            skip(C, "ipMasq is off (cni-route-agent masquerades for the node instead)")
        } else {
            fail(
                C,
                format!("ipMasq is off but {} entries exist", entries.len()),
                "they are stale: cni-route-agent uninstall removes them, or GC",
            )
        };
    }
    // Owners shown as the leases show holders: without the network in front.
    let prefix = format!("{}/", net.name);
    let shown = |o: &str| o.strip_prefix(&prefix).unwrap_or(o).to_string();
    let mut problems = Vec::new();
    for (ip, lease) in leased {
        let Some(lease) = lease else { continue };
        let owner = holder(lease);
        match entries.get(ip) {
            None => problems.push(format!("{ip} ({owner}) is leased but not masqueraded")),
            Some(o) if *o != firewall::owner(&net.name, &lease.id, &lease.ifname) => {
                problems.push(format!("{ip}: entry for {}, lease for {owner}", shown(o)))
            }
            Some(_) => {}
        }
    }
    for (ip, owner) in &entries {
        if !matches!(leased.get(ip), Some(Some(_))) {
            problems.push(format!("entry {ip} ({}) has no lease", shown(owner)));
        }
    }
    if problems.is_empty() {
        pass(C, format!("{} entr(ies), one per leased address", entries.len()))
    } else {
        fail(
            C,
            problems.join("; "),
            "DEL/ADD the pod, or GC through the runtime (removes entries without a lease)",
        )
    }
}

pub(super) fn check_routes(o: &Opts) -> Check {
    const C: &str = "routes to other nodes";
    let Some(m) = metrics(&o.metrics) else {
        return skip(C, format!("no cni-route-agent /metrics at {}", o.metrics));
    };
    let get = |k: &str| m.get(&format!("cni_route_agent_{k}")).copied().unwrap_or(f64::NAN);
    let (desired, installed, ready) = (get("routes_desired"), get("routes_installed"), get("ready"));
    let kernel = output(None, "ip", &["-j", "route", "show", "proto", "168"])
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
        + output(None, "ip", &["-6", "-j", "route", "show", "proto", "168"])
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
    if ready == 1.0 && desired == installed {
        pass(C, format!("agent ready, {installed} of {desired} routes installed ({kernel} proto 168 routes in the kernel)"))
    } else {
        fail(
            C,
            format!("agent ready={ready}, routes installed {installed} of {desired}"),
            "kubectl -n kube-system logs ds/cni-route-agent; nodes off the L2 segment are counted in nodes_off_link",
        )
    }
}

/// NetworkPolicy enforcement by the route agent: its table in the kernel and its figures.
pub(super) fn check_policy(o: &Opts) -> Check {
    const C: &str = "network policy";
    const TABLE: &str = "cni_route_agent_policy";
    let table = output(None, "nft", &["list", "table", "inet", TABLE]);
    let m = metrics(&o.metrics);
    let get = |k: &str| m.as_ref().and_then(|m| m.get(&format!("cni_route_agent_{k}")).copied());
    match (table, get("policies")) {
        (None, None) => skip(C, "not enforced (no policy table, no policy figures from the agent)"),
        (Some(_), None) if m.is_none() => fail(
            C,
            format!("table inet {TABLE} exists but no cni-route-agent answers at {}", o.metrics),
            "the last agent's policies stay enforced but no longer follow changes: kubectl -n kube-system get pods -l app=cni-route-agent",
        ),
        (Some(_), None) => fail(
            C,
            format!("table inet {TABLE} exists but the agent at {} does not enforce policies", o.metrics),
            "left by an earlier run with policies on: cni-route-agent uninstall, or start the agent without --network-policy=false",
        ),
        (None, Some(_)) => fail(
            C,
            format!("the agent enforces policies but table inet {TABLE} is missing"),
            "kubectl -n kube-system logs ds/cni-route-agent (nft errors); it retries every 5 s",
        ),
        (Some(_), Some(policies)) => {
            let dropped: f64 = m
                .iter()
                .flatten()
                .filter(|(k, _)| k.starts_with("cni_route_agent_policy_dropped_packets_total"))
                .map(|(_, v)| v)
                .sum();
            let errors = get("policy_errors_total").unwrap_or(0.0);
            let malformed = get("policy_malformed_total").unwrap_or(0.0);
            let detail = format!(
                "{policies} policies, {} pods of this node selected, {dropped} packets dropped, {malformed} malformed objects skipped, last sync at {} (Unix)",
                get("policy_selected_pods").unwrap_or(f64::NAN),
                get("policy_last_sync_timestamp_seconds").unwrap_or(f64::NAN),
            );
            if errors > 0.0 && get("policy_last_sync_timestamp_seconds").unwrap_or(0.0) == 0.0 {
                fail(C, detail, "no sync succeeded yet: kubectl -n kube-system logs ds/cni-route-agent")
            } else {
                pass(C, detail)
            }
        }
    }
}

pub(super) fn check_mtu(node: &Node, net: &Net) -> Check {
    const C: &str = "MTU";
    let Some(br) = node.link(&net.bridge) else { return skip(C, "no bridge") };
    let br_mtu = br["mtu"].as_u64().unwrap_or(0);
    let mut problems = Vec::new();
    let uplink = json_of(None, "ip", &["-j", "route", "show", "default"])
        .first()
        .and_then(|r| r["dev"].as_str().map(str::to_string))
        .and_then(|d| Some((d.clone(), node.link(&d)?["mtu"].as_u64()?)));
    if let Some((dev, mtu)) = &uplink {
        if br_mtu > *mtu {
            problems.push(format!("{} MTU {br_mtu} > uplink {dev} MTU {mtu}", net.bridge));
        }
    }
    if let Some(want) = net.mtu {
        if br_mtu != want {
            problems.push(format!("{} MTU {br_mtu}, config says {want}", net.bridge));
        }
    }
    for p in node.ports(&net.bridge) {
        let m = p["mtu"].as_u64().unwrap_or(0);
        if m != br_mtu {
            problems.push(format!("port {} MTU {m} != bridge {br_mtu}", p["ifname"].as_str().unwrap_or("")));
        }
    }
    let up = uplink.map(|(d, m)| format!(", uplink {d} {m}")).unwrap_or_default();
    if problems.is_empty() {
        pass(C, format!("bridge and ports {br_mtu}{up}"))
    } else {
        fail(
            C,
            problems.join("; "),
            "set \"mtu\" in the config to the uplink's MTU minus any encapsulation, then recreate the pods",
        )
    }
}

pub(super) fn check_pod(ns: &Path, net: &Net) -> Vec<Check> {
    let mut out = Vec::new();
    let links = json_of(Some(ns), "ip", &["-j", "addr", "show"]);
    if links.is_empty() {
        return vec![fail(
            "pod interface",
            format!("cannot enter {}", ns.display()),
            "give /proc/<pause pid>/ns/net (crictl inspectp)",
        )];
    }
    let in_pod: Vec<(String, IpAddr)> = links
        .iter()
        .flat_map(|l| {
            let name = l["ifname"].as_str().unwrap_or("").to_string();
            l["addr_info"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |i| Some((name.clone(), i["local"].as_str()?.parse().ok()?)))
        })
        .filter(|(_, ip)| net.ranges.iter().any(|(s, _)| s.contains(*ip)))
        .collect();
    out.push(match in_pod.first() {
        Some((dev, ip)) => pass("pod interface", format!("{dev} has {ip}")),
        None => fail(
            "pod interface",
            "no address from the pod subnets in the pod",
            "the pod's ADD failed or was undone: kubelet events",
        ),
    });
    let routes = json_of(Some(ns), "ip", &["-j", "route", "show", "default"]);
    out.push(if !net.default_route {
        skip("pod default route", "the config asks for none")
    } else if routes.is_empty() {
        fail("pod default route", "none", "isDefaultGateway (or an ipam route 0.0.0.0/0) in the config")
    } else {
        pass("pod default route", format!("via {}", routes[0]["gateway"].as_str().unwrap_or("?")))
    });
    let resolv = process_in(ns).map(|p| p.join("root/etc/resolv.conf"));
    out.push(match resolv.as_deref().map(std::fs::read_to_string) {
        None => skip("pod resolv.conf", "no process in that namespace to read it through"),
        Some(Err(e)) => {
            fail("pod resolv.conf", format!("unreadable: {e}"), "kubelet writes it from the pod's dnsPolicy")
        }
        Some(Ok(text)) => {
            let servers = text.lines().filter(|l| l.starts_with("nameserver")).count();
            let ndots = text
                .lines()
                .filter(|l| l.starts_with("options"))
                .flat_map(|l| l.split_whitespace())
                .find_map(|w| w.strip_prefix("ndots:")?.parse::<u32>().ok())
                .unwrap_or(1);
            if servers == 0 {
                fail(
                    "pod resolv.conf",
                    "no nameserver",
                    "check the pod's dnsPolicy and kubelet --cluster-dns",
                )
            } else if ndots > 5 {
                fail(
                    "pod resolv.conf",
                    format!("ndots:{ndots}: every name goes through each search domain first"),
                    "dnsConfig options ndots:5 or less",
                )
            } else {
                pass("pod resolv.conf", format!("{servers} nameserver(s), ndots:{ndots}"))
            }
        }
    });
    out
}

pub(super) fn run_checks(o: &Opts) -> Vec<Check> {
    let (conf, list) = check_conf(o);
    let mut out = vec![conf];
    let Some(list) = list else { return out };
    out.push(check_plugins(o, &list));
    let net = match parse_net(&list) {
        Ok(n) => n,
        Err(e) => {
            out.push(fail("bridge config", e, "a cni-bridge plugin with host-local ranges"));
            return out;
        }
    };
    let node = Node::read();
    out.extend(check_bridge(&node, &net));
    out.push(check_hairpin(&node, &net));
    out.extend(check_forwarding(&net));
    out.extend(check_br_netfilter(&net));
    let (leases_check, leased) = check_leases(&node, &net);
    out.push(leases_check);
    out.push(check_masq(&net, &leased));
    out.push(check_routes(o));
    out.push(check_policy(o));
    out.push(check_mtu(&node, &net));
    if let Some(ns) = &o.netns {
        out.extend(check_pod(ns, &net));
    }
    out
}
