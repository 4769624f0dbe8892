//! CHECK: what the reference verifies, plus hairpin, port isolation, MTU and masquerade.

use cni_proto::{CniResult, Command, Request};
use rtnetlink::packet_route::link::InfoKind;

use crate::config::BridgeConf;
use crate::error::BridgeError;
use crate::firewall;
use crate::firewall::spoof;
use crate::mac::fmt_mac;
use crate::netlink::{Link, Nl};
use crate::netns;
use crate::run::runtime;

fn fail(why: String) -> BridgeError {
    BridgeError::Check(why)
}

/// Verifies the attachment against prevResult and the config: each interface by its own
/// validator (bridge, pod interface, host veth, then the pod's addresses and routes), then
/// the firewall entries. The order is the order of the errors a broken attachment reports.
pub fn check(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    let prev = req
        .conf
        .prev_result()?
        .ok_or_else(|| BridgeError::Config("CHECK: required prevResult missing".into()))?;
    if let Some(ipam_type) = conf.ipam_type.as_deref() {
        crate::ipam::run(ipam_type, Command::Check, req)?;
    }
    let path = req.inv.netns.as_deref().ok_or_else(|| BridgeError::Netns("CNI_NETNS is empty".into()))?;
    let pod_ns = netns::open_pod(path)?;
    let ifname = &req.inv.ifname;
    runtime()?.block_on(async {
        let host = Nl::here()?;
        let pod = Nl::in_ns(&pod_ns)?;
        let bridge = validate_bridge(&host, conf, &prev).await?;
        let pod_link = validate_pod_interface(&pod, conf, &prev, ifname).await?;
        validate_host_veth(&host, conf, &prev, &bridge, &pod_link, ifname).await?;
        validate_pod_addresses(&pod, conf, &prev, &pod_link, ifname).await
    })?;
    validate_firewall(conf, &prev, &firewall::owner(&req.conf.name, &req.inv.container_id, ifname))
}

/// The bridge: a bridge, promiscuous as configured, with prevResult's MAC.
async fn validate_bridge(host: &Nl, conf: &BridgeConf, prev: &CniResult) -> Result<Link, BridgeError> {
    let bridge =
        host.link(&conf.bridge).await?.ok_or_else(|| fail(format!("bridge {} not found", conf.bridge)))?;
    if bridge.kind != Some(InfoKind::Bridge) {
        return Err(fail(format!("{} is not a bridge", conf.bridge)));
    }
    if bridge.promisc != conf.promisc {
        return Err(fail(format!(
            "bridge {} promiscuous mode is {}, config says {}",
            conf.bridge, bridge.promisc, conf.promisc
        )));
    }
    if let Some(mac) = prev.interfaces.iter().find(|i| i.name == conf.bridge).and_then(|i| i.mac.clone()) {
        if mac != fmt_mac(&bridge.mac) {
            return Err(fail(format!(
                "bridge {} MAC is {}, prevResult says {mac}",
                conf.bridge,
                fmt_mac(&bridge.mac)
            )));
        }
    }
    Ok(bridge)
}

/// The pod's interface: a veth with prevResult's MAC and the configured MTU.
async fn validate_pod_interface(
    pod: &Nl,
    conf: &BridgeConf,
    prev: &CniResult,
    ifname: &str,
) -> Result<Link, BridgeError> {
    let pod_link =
        pod.link(ifname).await?.ok_or_else(|| fail(format!("interface {ifname} not found in the pod")))?;
    if pod_link.kind != Some(InfoKind::Veth) {
        return Err(fail(format!("pod interface {ifname} is not a veth")));
    }
    if let Some(mac) =
        prev.interfaces.iter().find(|i| i.name == ifname && i.sandbox.is_some()).and_then(|i| i.mac.clone())
    {
        if mac != fmt_mac(&pod_link.mac) {
            return Err(fail(format!(
                "pod interface MAC is {}, prevResult says {mac}",
                fmt_mac(&pod_link.mac)
            )));
        }
    }
    if let Some(mtu) = conf.mtu {
        if pod_link.mtu != mtu {
            return Err(fail(format!("pod interface MTU is {}, config says {mtu}", pod_link.mtu)));
        }
    }
    Ok(pod_link)
}

/// The host's end of the veth (prevResult's interface outside the pod): a port of the bridge,
/// the pod interface's peer, with the configured hairpin mode and port isolation.
async fn validate_host_veth(
    host: &Nl,
    conf: &BridgeConf,
    prev: &CniResult,
    bridge: &Link,
    pod_link: &Link,
    ifname: &str,
) -> Result<(), BridgeError> {
    let host_veth_name = prev
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_none() && i.name != conf.bridge)
        .map(|i| i.name.clone())
        .ok_or_else(|| fail("prevResult lists no host veth".into()))?;
    let host_veth = host
        .link(&host_veth_name)
        .await?
        .ok_or_else(|| fail(format!("host veth {host_veth_name} not found")))?;
    if host_veth.controller != Some(bridge.index) {
        return Err(fail(format!("host veth {host_veth_name} is not a port of {}", conf.bridge)));
    }
    if pod_link.peer_index != Some(host_veth.index) {
        return Err(fail(format!("host veth {host_veth_name} is not the peer of {ifname}")));
    }
    if host_veth.hairpin != Some(conf.hairpin) {
        return Err(fail(format!(
            "hairpin mode of {host_veth_name} is {:?}, config says {}",
            host_veth.hairpin, conf.hairpin
        )));
    }
    if host_veth.isolated.unwrap_or(false) != conf.port_isolation {
        return Err(fail(format!("port isolation of {host_veth_name} differs from the config")));
    }
    Ok(())
}

/// prevResult's addresses on the pod interface and its routes in the pod (none are expected
/// with `disableContainerInterface`).
async fn validate_pod_addresses(
    pod: &Nl,
    conf: &BridgeConf,
    prev: &CniResult,
    pod_link: &Link,
    ifname: &str,
) -> Result<(), BridgeError> {
    let have = pod.addresses(pod_link.index).await?;
    for ip in &prev.ips {
        if !have.contains(&ip.address) {
            return Err(fail(format!("address {} is not on {ifname}", ip.address)));
        }
    }
    for v4 in [true, false] {
        let want: Vec<_> = prev.routes.iter().filter(|route| route.dst.is_ipv4() == v4).collect();
        if want.is_empty() || conf.disable_container_interface {
            continue;
        }
        let routes = pod.routes(pod_link.index, v4).await?;
        for route in want {
            let found =
                routes.iter().any(|(dst, gw)| *dst == route.dst && (route.gw.is_none() || *gw == route.gw));
            if !found {
                return Err(fail(format!("route to {} via {:?} is missing in the pod", route.dst, route.gw)));
            }
        }
    }
    Ok(())
}

/// The attachment's firewall entries: the spoof checks' and the masquerade's, as configured.
fn validate_firewall(conf: &BridgeConf, prev: &CniResult, owner: &str) -> Result<(), BridgeError> {
    if conf.mac_spoof_check && !spoof::list()?.iter().any(|(set, o)| *set == "allowed" && *o == owner) {
        return Err(fail(format!("MAC spoof check entry for {owner} is missing")));
    }
    if conf.ip_spoof_check {
        // The port and each of the pod's addresses: a missing address cuts the pod off it.
        let listed = spoof::list()?;
        let count = |name: &str| listed.iter().filter(|(set, o)| *set == name && *o == owner).count();
        let mut ips: Vec<std::net::IpAddr> = prev.ips.iter().map(|i| i.address.ip()).collect();
        ips.sort();
        ips.dedup();
        let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
        let v6 = ips.len() - v4;
        if count("ipguarded") == 0
            || count("allowed4") < v4
            || count("allowed6") < v6
            || count("ndtarget6") < v6
        {
            return Err(fail(format!("IP spoof check entries for {owner} are missing")));
        }
    }
    if conf.ip_masq && !prev.ips.is_empty() {
        let entries = conf.masq_backend.list()?;
        for ip in &prev.ips {
            if !entries.iter().any(|e| e.ip == ip.address.ip() && e.owner == owner) {
                return Err(fail(format!("masquerade entry for {} is missing", ip.address.ip())));
            }
        }
        if !conf.masq_backend.hooked()? {
            return Err(fail("the masquerade rules are not hooked into postrouting".into()));
        }
    }
    Ok(())
}
