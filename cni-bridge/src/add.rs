//! ADD: one [`Attach`] value goes through its phases (allocate, bridge, veth, pod, gateway,
//! ready, result). Each phase records what it created right where it creates it; on any
//! failure [`Attach::roll_back`] undoes those records in reverse, so a failed ADD leaves
//! nothing behind (IPAM released, veth gone, rules removed, and a bridge it created deleted).

use std::fs::File;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use cni_proto::{CniResult, Command, Interface, IpConfig, Request, Route};
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::link::InfoKind;

use crate::config::BridgeConf;
use crate::error::BridgeError;
use crate::firewall;
use crate::firewall::spoof;
use crate::ipam;
use crate::lock;
use crate::mac::fmt_mac;
use crate::netlink::{Link, Nl};
use crate::netns;
use crate::run::{mark, runtime};

/// How long the datapath may take to become ready (port forwarding, IPv6 addresses usable;
/// with `enabledad`, duplicate address detection takes 1-2 s of that).
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// A crash point of the test build, where a test build can also be made to fail
/// ([`cni_proto::checkpoint`]); nothing in a release build.
fn checkpoint(step: &str) -> Result<(), BridgeError> {
    cni_proto::checkpoint(step).map_err(BridgeError::io("test checkpoint"))
}

/// How many random host veth names are tried before giving up.
const VETH_NAME_TRIES: usize = 10;

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    if let Ok(mut urandom) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut urandom, &mut bytes);
    }
    bytes
}

fn random_veth_name() -> String {
    let [a, b, c, d] = random_bytes::<4>();
    format!("veth{a:02x}{b:02x}{c:02x}{d:02x}")
}

/// A random locally administered unicast MAC: the bridge's own, so it never follows a port's.
fn bridge_mac() -> [u8; 6] {
    let mut mac = random_bytes::<6>();
    // Clear the multicast bit, set the locally administered one.
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Turns duplicate address detection off on a link this ADD made for the gateway (the
/// bridge, or `<bridge>.<vlan>`), before it gets its link-local address. The kernel solicits
/// a forwarded packet's next hop only from a non-tentative link-local address of the outgoing
/// link, so with DAD a fresh node could not reach its first pod from another node for the
/// 1-2 s DAD takes. DAD can find nothing here: the link-local address comes from the random
/// locally administered MAC this plugin gave the link, and the gateway addresses are added
/// without DAD already. A link without IPv6 (an MTU below 1280) has no such setting.
fn no_dad(link: &str) -> Result<(), BridgeError> {
    if !std::path::Path::new(&format!("/proc/sys/net/ipv6/conf/{link}")).exists() {
        return Ok(());
    }
    netns::sysctl(&format!("net/ipv6/conf/{link}/accept_dad"), "0")
}

/// Whether the bridge filters by VLAN. A test build can be told to leave the filtering out
/// (a kernel without it still runs every other step of a `vlan` ADD, rollback included).
fn vlan_filtering(conf: &BridgeConf) -> bool {
    conf.vlan_filtering() && !cni_proto::test_switch("VLAN_WITHOUT_FILTERING")
}

/// Puts a bridge port on its VLANs: `vlan` as PVID/untagged (1 for a trunk without one),
/// the trunk tagged, and VLAN 1 removed unless preserved.
async fn port_vlans(
    host: &Nl,
    port: u32,
    conf: &BridgeConf,
    vlan: u16,
    trunk: &[u16],
) -> Result<(), BridgeError> {
    if vlan == 0 && trunk.is_empty() || !vlan_filtering(conf) {
        return Ok(());
    }
    if !conf.preserve_default_vlan {
        host.port_vlan_del(port, 1).await?;
    }
    host.port_vlans_add(port, Some(if vlan == 0 { 1 } else { vlan }), trunk).await
}

/// The gateway of an address: IPAM's, else the subnet's first address when that is another
/// address of the subnet (a /32 or /128 has none).
fn gateway_of(ip: &IpConfig) -> Option<IpAddr> {
    if ip.gateway.is_some() {
        return ip.gateway;
    }
    let first = match ip.address.network() {
        IpAddr::V4(a) => u32::from(a).checked_add(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(a) => u128::from(a).checked_add(1).map(|n| IpAddr::V6(n.into())),
    };
    first.filter(|g| ip.address.contains(*g) && *g != ip.address.ip())
}

/// Checks a delegated IPAM result like any other input, before anything is built from it:
/// everything ADD later derives from it (gateway addresses, routes) must be well-formed.
pub fn validate_ipam_result(plugin: &str, result: &CniResult, conf: &BridgeConf) -> Result<(), BridgeError> {
    let bad = |reason: String| BridgeError::BadIpamResult { plugin: plugin.to_string(), reason };
    if result.ips.is_empty() {
        return Err(bad("no IP configuration".into()));
    }
    for ip in &result.ips {
        let addr = ip.address;
        if let Some(i) = ip.interface {
            if i >= result.interfaces.len() {
                return Err(bad(format!(
                    "address {addr} names interface {i}, but the result lists {} interface(s)",
                    result.interfaces.len()
                )));
            }
        }
        if let Some(gw) = ip.gateway {
            if gw.is_ipv4() != addr.is_ipv4() {
                return Err(bad(format!("gateway {gw} is not of the family of address {addr}")));
            }
            if gw == addr.ip() {
                return Err(bad(format!("gateway {gw} is the pod's own address")));
            }
            if !addr.contains(gw) {
                return Err(bad(format!("gateway {gw} is outside the subnet of address {addr}")));
            }
        }
        if conf.is_gateway && gateway_of(ip).is_none() {
            return Err(bad(format!("no gateway for address {addr} (isGateway needs one)")));
        }
    }
    for route in &result.routes {
        if let Some(gw) = route.gw {
            if gw.is_ipv4() != route.dst.is_ipv4() {
                return Err(bad(format!("route to {} has gateway {gw} of the other family", route.dst)));
            }
        }
    }
    Ok(())
}

/// Whether IPAM must run after the pod interface exists (DHCP leases on that interface).
fn ipam_needs_interface(plugin: &str) -> bool {
    plugin == "dhcp"
}

/// Something ADD created, and how to remove it.
enum Made {
    /// An IPAM allocation (released by IPAM DEL).
    Lease(String),
    /// Masquerade entries of this attachment.
    Masquerade(String),
    /// The bridge, created by this ADD (deleted only while it has no ports), by name: it is
    /// recorded before it is looked up.
    Bridge(String),
    /// The veth pair, deleted through its host end: its random name is known from the
    /// moment the pair exists and is this ADD's alone (a later ADD for the same pod, after
    /// a runtime gave up on this one, has a pod end of the same name; the pod end goes with
    /// the host end).
    Veth(String),
    /// MAC spoof-check entries of this attachment.
    SpoofCheck(String),
}

type MasqJob = std::thread::JoinHandle<Result<(), BridgeError>>;

/// The host veth once it exists.
struct Port {
    name: String,
    index: u32,
}

/// One ADD under way: the request, its config, both netlink handles, the pod namespace, and
/// everything made so far.
struct Attach<'a> {
    req: &'a Request,
    conf: &'a BridgeConf,
    host: Nl,
    pod: Nl,
    pod_ns: File,
    /// What this ADD created, oldest first.
    made: Vec<Made>,
    /// The masquerade call runs on a thread while the links are set up.
    masq_job: Option<MasqJob>,
    /// Held from finding (or making) the bridge until the port is attached ([`lock`]).
    bridge_lock: Option<lock::BridgeLock>,
}

/// Runs ADD for a validated request.
pub fn add(req: &Request, conf: &BridgeConf) -> Result<CniResult, BridgeError> {
    let path = req.inv.netns.as_deref().ok_or_else(|| BridgeError::Netns("CNI_NETNS is empty".into()))?;
    mark("start");
    let pod_ns = netns::open_pod(path)?;
    // IPAM starts first: it allocates while we open our runtime and sockets.
    let pending = match conf.ipam_type.as_deref().filter(|t| !ipam_needs_interface(t)) {
        Some(plugin) => Some((plugin, ipam::start(plugin, Command::Add, req)?)),
        None => None,
    };
    let opened = runtime().and_then(|rt| Ok((Nl::here_in(&rt)?, Nl::in_ns_in(&rt, &pod_ns)?, rt)));
    let (host, pod, rt) = match opened {
        Ok(sockets) => sockets,
        Err(e) => {
            // Whatever IPAM allocated must not outlive this failed ADD.
            if let Some((plugin, started)) = pending {
                if started.wait_add().0 {
                    let _ = ipam::run(plugin, Command::Del, req);
                }
            }
            return Err(e);
        }
    };
    rt.block_on(async {
        mark("netlink sockets open");
        let mut attach =
            Attach { req, conf, host, pod, pod_ns, made: Vec::new(), masq_job: None, bridge_lock: None };
        let result = attach.run(pending).await;
        let masq = attach.join_masquerade();
        match result.and_then(|done| masq.map(|()| done)) {
            Ok(done) => Ok(done),
            Err(e) => {
                attach.roll_back().await;
                Err(e)
            }
        }
    })
}

/// Everything the result reports, once the port is up.
struct Attached {
    bridge: Link,
    port: Port,
    port_link: Link,
    pod: PodSide,
    vlan_gateway: Option<(String, Link)>,
}

/// Where the gateway addresses went: the bridge, or `<bridge>.<vlan>` (then reported too).
struct Gateway {
    name: String,
    index: u32,
    /// The IPv6 ones, which ADD waits for.
    v6: Vec<Ipv6Addr>,
    vlan: Option<(String, Link)>,
}

/// The IPv6 addresses ADD waits for: the gateways and the pod's own.
struct Readiness<'g> {
    gateway: &'g Gateway,
    gateways: Vec<Ipv6Addr>,
    pod_addresses: Vec<Ipv6Addr>,
}

impl<'g> Readiness<'g> {
    fn of(conf: &BridgeConf, ipam: &CniResult, gateway: &'g Gateway) -> Self {
        let pod_addresses = match conf.disable_container_interface {
            true => Vec::new(),
            false => ipam.ips.iter().filter_map(|ip| v6_of(ip.address.ip())).collect(),
        };
        Readiness { gateway, gateways: gateway.v6.clone(), pod_addresses }
    }
}

fn v6_of(ip: IpAddr) -> Option<Ipv6Addr> {
    match ip {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    }
}

/// What the pod got: its interface and the routes set in it.
struct PodSide {
    link: Link,
    routes: Vec<Route>,
}

impl<'a> Attach<'a> {
    fn owner(&self) -> String {
        firewall::owner(&self.req.conf.name, &self.req.inv.container_id, &self.req.inv.ifname)
    }

    async fn run(&mut self, pending: Option<(&'a str, ipam::Pending)>) -> Result<CniResult, BridgeError> {
        let mut ipam = self.allocate(pending).await?;
        let bridge = self.ensure_bridge().await?;
        checkpoint("bridge-add-after-bridge")?;
        mark("bridge ensured");
        let port = self.plumb_veth(&bridge).await?;
        // Attached: from now on a rollback of the ADD that made the bridge sees our port.
        self.bridge_lock = None;
        if let Some(plugin) = self.conf.ipam_type.as_deref().filter(|t| ipam_needs_interface(t)) {
            let pending = ipam::start(plugin, Command::Add, self.req)?;
            let allocated = self.collect_allocation(plugin, pending)?;
            self.start_masquerade(&allocated);
            ipam = Some(allocated);
        }
        let ipam = ipam.unwrap_or_default();
        let pod = self.configure_pod(&port, &ipam).await?;
        let gateway = self.configure_gateway(&bridge, &ipam).await?;
        let port_link = self.wait_until_ready(&port, &pod, Readiness::of(self.conf, &ipam, &gateway)).await?;
        let attached = Attached { bridge, port, port_link, pod, vlan_gateway: gateway.vlan };
        let result = self.build_result(attached, ipam).await?;
        checkpoint("bridge-add-before-result")?;
        Ok(result)
    }

    /// Finds or creates the bridge, up, promiscuous if asked. One this call creates is
    /// recorded for rollback at once, before anything else about it can fail.
    async fn ensure_bridge(&mut self) -> Result<Link, BridgeError> {
        self.bridge_lock = Some(lock::bridge(&self.conf.bridge)?);
        let (host, conf) = (&self.host, self.conf);
        let bridge = match host.link(&conf.bridge).await? {
            Some(existing) => existing,
            None => {
                // A parallel ADD may create it first: EEXIST is fine, the kind is checked below.
                if host.create_bridge(&conf.bridge, bridge_mac(), conf.mtu, vlan_filtering(conf)).await? {
                    self.made.push(Made::Bridge(conf.bridge.clone()));
                    no_dad(&conf.bridge)?;
                }
                checkpoint("bridge-add-bridge-created")?;
                let made = self.host.link(&conf.bridge).await?;
                made.ok_or_else(|| BridgeError::LinkVanished(conf.bridge.clone()))?
            }
        };
        let host = &self.host;
        if bridge.kind != Some(InfoKind::Bridge) {
            return Err(BridgeError::NotABridge(conf.bridge.clone()));
        }
        if vlan_filtering(conf) && !bridge.vlan_filtering {
            host.enable_vlan_filtering(&conf.bridge).await?;
        }
        // A bridge someone set down keeps every port disabled: the pod would get no traffic.
        if !bridge.up {
            host.set(bridge.index, "setting the bridge up", |l| l.up()).await?;
        }
        if conf.promisc && !bridge.promisc {
            host.set(bridge.index, "setting the bridge promiscuous", |l| l.promiscuous(true)).await?;
        }
        Ok(bridge)
    }

    /// Waits for IPAM and starts the masquerade rules for its addresses. Nothing is created
    /// before IPAM has answered and its answer is validated: a refusal (bad config, full
    /// range, unusable result) leaves the host untouched but for the released lease.
    async fn allocate(
        &mut self,
        pending: Option<(&'a str, ipam::Pending)>,
    ) -> Result<Option<CniResult>, BridgeError> {
        let exists = self.pod.link(&self.req.inv.ifname).await;
        let ipam = match pending {
            Some((plugin, started)) => Some(self.collect_allocation(plugin, started)?),
            None => None,
        };
        mark("IPAM ADD");
        if exists?.is_some() {
            return Err(BridgeError::IfaceExists(self.req.inv.ifname.clone()));
        }
        if let Some(allocated) = &ipam {
            self.start_masquerade(allocated);
        }
        Ok(ipam)
    }

    /// Takes IPAM's answer (recording the lease for rollback) and validates it.
    fn collect_allocation(
        &mut self,
        plugin: &'a str,
        pending: ipam::Pending,
    ) -> Result<CniResult, BridgeError> {
        // An exec'd IPAM that exited 0 holds a lease even if its output is unusable.
        let (held, answer) = pending.wait_add();
        if held {
            self.made.push(Made::Lease(plugin.to_string()));
        }
        let answer = answer?;
        checkpoint("bridge-add-after-ipam")?;
        let result = answer.unwrap_or_default();
        validate_ipam_result(plugin, &result, self.conf)?;
        Ok(result)
    }

    /// Starts the masquerade call for `ipam`'s addresses on a thread, so that it runs while
    /// the bridge, veth and pod are set up.
    fn start_masquerade(&mut self, ipam: &CniResult) {
        if !self.conf.ip_masq {
            return;
        }
        let owner = self.owner();
        self.made.push(Made::Masquerade(owner.clone()));
        let addrs: Vec<IpNetwork> = ipam.ips.iter().map(|i| i.address).collect();
        let backend = self.conf.masq_backend;
        self.masq_job = Some(std::thread::spawn(move || {
            let added = backend.add(&addrs, &owner);
            added.and_then(|()| checkpoint("bridge-add-after-masquerade"))
        }));
    }

    /// Collects the masquerade call (before ADD returns, so a rollback never races it).
    fn join_masquerade(&mut self) -> Result<(), BridgeError> {
        match self.masq_job.take() {
            None => Ok(()),
            Some(job) => {
                job.join().unwrap_or_else(|_| Err(BridgeError::Firewall("nft thread panicked".into())))
            }
        }
    }

    /// Creates the veth pair (pod end named CNI_IFNAME in the pod, host end a random name
    /// here) and makes the host end an up port of the bridge.
    async fn plumb_veth(&mut self, bridge: &Link) -> Result<Port, BridgeError> {
        let (host, conf, ifname) = (&self.host, self.conf, &self.req.inv.ifname);
        let host_ns = netns::current().map_err(BridgeError::io("opening the plugin's own namespace"))?;
        let mut name = None;
        for _ in 0..VETH_NAME_TRIES {
            let candidate = random_veth_name();
            if self.pod.create_veth(ifname, &candidate, &host_ns, conf.mtu, conf.mac).await? {
                // Recorded before anything else about it can fail.
                self.made.push(Made::Veth(candidate.clone()));
                name = Some(candidate);
                break;
            }
            // EEXIST names neither end: a parallel ADD for the same pod may have made ours.
            if self.pod.link(ifname).await?.is_some() {
                return Err(BridgeError::IfaceExists(ifname.clone()));
            }
        }
        let name = name.ok_or(BridgeError::VethNamesTaken(VETH_NAME_TRIES))?;
        checkpoint("bridge-add-veth-created")?;
        let link = host.link(&name).await?.ok_or_else(|| BridgeError::LinkVanished(name.clone()))?;
        checkpoint("bridge-add-after-veth")?;
        mark("veth created");
        host.set(link.index, "attaching the host veth to the bridge", |l| l.controller(bridge.index).up())
            .await?;
        host.set_port(link.index, conf.hairpin, conf.port_isolation).await?;
        port_vlans(host, link.index, conf, conf.vlan, &conf.trunk).await?;
        mark("port attached, hairpin set");
        Ok(Port { name, index: link.index })
    }

    /// The pod side: spoof check, sysctls, addresses, link up, routes.
    async fn configure_pod(&mut self, port: &Port, ipam: &CniResult) -> Result<PodSide, BridgeError> {
        let (conf, ifname) = (self.conf, &self.req.inv.ifname);
        let link = self.pod.link(ifname).await?.ok_or_else(|| BridgeError::LinkVanished(ifname.clone()))?;
        if conf.mac_spoof_check || conf.ip_spoof_check {
            let owner = self.owner();
            self.made.push(Made::SpoofCheck(owner.clone()));
            // Before the addresses go on the pod interface, so its first packet is checked.
            let ips: Vec<IpAddr> = ipam.ips.iter().map(|i| i.address.ip()).collect();
            let mac = conf.mac_spoof_check.then_some(&link.mac[..]);
            spoof::add(&port.name, mac, conf.ip_spoof_check.then_some(&ips[..]), &owner)?;
            checkpoint("bridge-add-after-spoof-check")?;
            mark("spoof checks");
        }
        let mut routes = ipam.routes.clone();
        if conf.disable_container_interface {
            return Ok(PodSide { link, routes });
        }
        let has_v6 = ipam.ips.iter().any(|i| !i.address.is_ipv4());
        let enable_dad = conf.enable_dad;
        let sysctls = netns::run_in(&self.pod_ns, || -> Result<(), BridgeError> {
            if has_v6 {
                netns::sysctl(
                    &format!("net/ipv6/conf/{ifname}/accept_dad"),
                    if enable_dad { "1" } else { "0" },
                )?;
                if enable_dad {
                    netns::sysctl(&format!("net/ipv6/conf/{ifname}/enhanced_dad"), "1")?;
                }
            }
            netns::sysctl(&format!("net/ipv4/conf/{ifname}/arp_notify"), "1")
        });
        sysctls.map_err(|e| BridgeError::Sysctl(format!("entering the pod namespace: {e}")))??;
        let adds = ipam.ips.iter().map(|ip| self.pod.add_address(link.index, ip.address));
        for added in futures::future::join_all(adds).await {
            added?;
        }
        checkpoint("bridge-add-after-addresses")?;
        self.pod.set(link.index, "setting the pod interface up", |l| l.up()).await?;
        let family_gateway =
            |v4: bool| ipam.ips.iter().filter(|i| i.address.is_ipv4() == v4).find_map(gateway_of);
        if conf.is_default_gateway {
            for v4 in [true, false] {
                let has_default = routes.iter().any(|r| r.dst.prefix() == 0 && r.dst.is_ipv4() == v4);
                if let (Some(gw), false) = (family_gateway(v4), has_default) {
                    let unspecified = if v4 { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) };
                    let dst =
                        IpNetwork::new(unspecified, 0).map_err(|e| BridgeError::Config(e.to_string()))?;
                    routes.push(Route::new(dst, Some(gw)));
                }
            }
        }
        for route in &routes {
            let mut via = route.clone();
            if via.gw.is_none() {
                via.gw = family_gateway(route.dst.is_ipv4());
            }
            self.pod.add_route(link.index, &via).await?;
        }
        checkpoint("bridge-add-after-routes")?;
        mark("pod addresses, routes, link up");
        Ok(PodSide { link, routes })
    }

    /// With isGateway: the gateway addresses (without DAD, so IPv6 works the moment ADD
    /// returns) on the bridge, or on `<bridge>.<vlan>` with a VLAN, and forwarding on.
    /// Returns where they went.
    async fn configure_gateway(&mut self, bridge: &Link, ipam: &CniResult) -> Result<Gateway, BridgeError> {
        let conf = self.conf;
        if !conf.is_gateway {
            return Ok(Gateway {
                name: conf.bridge.clone(),
                index: bridge.index,
                v6: Vec::new(),
                vlan: None,
            });
        }
        let (gw_name, gw_link, vlan_gateway) = match conf.vlan {
            0 => (conf.bridge.clone(), bridge.clone(), None),
            vlan => {
                let (name, link) = self.ensure_vlan_gateway(bridge, vlan).await?;
                (name.clone(), link.clone(), Some((name, link)))
            }
        };
        let mut seen = Vec::new();
        for ip in &ipam.ips {
            // Validated: every address has a gateway of its own family when isGateway is set.
            let Some(gw) = gateway_of(ip) else { continue };
            let want = IpNetwork::new(gw, ip.address.prefix()).map_err(|e| BridgeError::BadIpamResult {
                plugin: conf.ipam_type.clone().unwrap_or_default(),
                reason: format!("gateway {gw}/{}: {e}", ip.address.prefix()),
            })?;
            if !seen.contains(&want) {
                self.ensure_gateway_address(&gw_link, &gw_name, want).await?;
                seen.push(want);
            }
        }
        if seen.iter().any(IpNetwork::is_ipv4) {
            netns::sysctl("net/ipv4/ip_forward", "1")?;
        }
        if seen.iter().any(IpNetwork::is_ipv6) {
            netns::sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        checkpoint("bridge-add-after-gateway")?;
        mark("gateway and forwarding");
        let v6 = seen.iter().filter_map(|gw| v6_of(gw.ip())).collect();
        Ok(Gateway { name: gw_name, index: gw_link.index, v6, vlan: vlan_gateway })
    }

    /// Puts `want` on the gateway link, replacing a different address only with forceAddress.
    async fn ensure_gateway_address(
        &self,
        link: &Link,
        name: &str,
        want: IpNetwork,
    ) -> Result<(), BridgeError> {
        let present = self.host.addresses(link.index).await?;
        // Wherever it is in the list: beside it may be the gateway of a former pod CIDR
        // whose pods still use it (the route agent adds the new one before a range changes).
        if present.contains(&want) {
            return Ok(());
        }
        for have in present {
            let conflicts = have.is_ipv4() == want.is_ipv4()
                && (want.is_ipv4() || have.contains(want.ip()) || want.contains(have.ip()));
            if conflicts {
                if !self.conf.force_address {
                    return Err(BridgeError::AddressConflict(format!(
                        "{name:?} already has an IP address different from {want} ({have}); set forceAddress to replace it"
                    )));
                }
                self.host.del_address(link.index, have).await?;
            }
        }
        self.host.add_address_nodad(link.index, want).await
    }

    /// Finds or makes `<bridge>.<vlan>`: one end of a host veth pair whose other end is an
    /// access port of `vlan` on the bridge. Shared by every pod of that VLAN, so it is not
    /// rolled back.
    async fn ensure_vlan_gateway(&self, bridge: &Link, vlan: u16) -> Result<(String, Link), BridgeError> {
        let (host, conf) = (&self.host, self.conf);
        let name = format!("{}.{vlan}", conf.bridge);
        if cni_proto::env::invalid_ifname(&name).is_some() {
            return Err(BridgeError::Config(format!("VLAN gateway interface name {name:?} is too long")));
        }
        if let Some(existing) = host.link(&name).await? {
            return Ok((name, existing));
        }
        let peer = random_veth_name();
        if host.create_local_veth(&name, &peer, conf.mtu).await? {
            // Before its peer is up: no carrier yet, so no link-local address yet either.
            no_dad(&name)?;
            let port = host.link(&peer).await?.ok_or_else(|| BridgeError::LinkVanished(peer.clone()))?;
            host.set(port.index, "attaching the VLAN gateway port", |l| l.controller(bridge.index).up())
                .await?;
            port_vlans(host, port.index, conf, vlan, &[]).await?;
        }
        let gateway = host.link(&name).await?.ok_or_else(|| BridgeError::LinkVanished(name.clone()))?;
        host.set(gateway.index, "setting the VLAN gateway up", |l| l.up()).await?;
        Ok((name, gateway))
    }

    /// Waits until the pod's first packet will be answered, and reports success only then:
    /// the host veth up and its bridge port out of the disabled state; every IPv6 gateway
    /// address on the node, and every IPv6 address of the pod, member of its solicited-node
    /// group (the kernel joins it on a work queue, so a neighbour solicitation sent the moment
    /// ADD returns could otherwise go unanswered and cost the pod a 1 s retransmit); with
    /// `enabledad`, the pod's addresses through duplicate address detection (the reference's
    /// settle step), a duplicate failing ADD; with an IPv6 gateway, a non-tentative link-local
    /// address on the gateway link, so that traffic from other nodes is forwarded to the pod.
    async fn wait_until_ready(
        &self,
        port: &Port,
        pod: &PodSide,
        ready: Readiness<'_>,
    ) -> Result<Link, BridgeError> {
        let Readiness { gateway, mut gateways, mut pod_addresses } = ready;
        let gateway_index = gateway.index;
        let vanished = || BridgeError::LinkVanished(port.name.clone());
        let ifname = &self.req.inv.ifname;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut link_local_ready = gateway.v6.is_empty();
        loop {
            let link = self.host.link_by_index(port.index).await?.ok_or_else(vanished)?;
            let port_ready = self.conf.disable_container_interface || (link.oper_up && !link.port_disabled);
            if !gateways.is_empty() {
                // One someone else added with DAD may still be tentative, or found a duplicate.
                let mut unsettled = self.host.unsettled_ipv6(gateway_index).await?;
                unsettled.retain(|(address, _)| gateways.iter().any(|gw| IpAddr::V6(*gw) == *address));
                if let Some((address, _)) = unsettled.iter().find(|(_, failed)| *failed) {
                    return Err(BridgeError::DadFailed { address: *address, ifname: gateway.name.clone() });
                }
                let groups = netns::ipv6_groups().map_err(BridgeError::io("reading IPv6 groups"))?;
                gateways.retain(|gw| {
                    unsettled.iter().any(|(u, _)| *u == IpAddr::V6(*gw))
                        || !groups.contains(&(gateway_index, netns::solicited_node(*gw)))
                });
            }
            // Also on a bridge someone else made (with DAD): ADD's promise is a pod reachable
            // in both directions, and another node's packet to it is forwarded only once
            // the node can solicit the pod's address from here.
            if !link_local_ready && !gateway.v6.is_empty() {
                link_local_ready = self.host.link_local_usable(gateway_index, &gateway.name).await?;
            }
            if !pod_addresses.is_empty() {
                let unsettled = if self.conf.enable_dad {
                    self.pod.unsettled_ipv6(pod.link.index).await?
                } else {
                    vec![]
                };
                if let Some((address, _)) = unsettled.iter().find(|(_, failed)| *failed) {
                    return Err(BridgeError::DadFailed { address: *address, ifname: ifname.clone() });
                }
                let groups = netns::run_in(&self.pod_ns, netns::ipv6_groups)
                    .map_err(|e| BridgeError::Netns(format!("entering the pod namespace: {e}")))?
                    .map_err(BridgeError::io("reading IPv6 groups in the pod"))?;
                pod_addresses.retain(|a| {
                    unsettled.iter().any(|(u, _)| *u == IpAddr::V6(*a))
                        || !groups.contains(&(pod.link.index, netns::solicited_node(*a)))
                });
            }
            if port_ready && gateways.is_empty() && pod_addresses.is_empty() && link_local_ready {
                mark("datapath ready");
                return Ok(link);
            }
            if start.elapsed() > READY_TIMEOUT {
                let what = if !port_ready {
                    format!("bridge port {} did not start forwarding", port.name)
                } else if let Some(gw) = gateways.first() {
                    format!("gateway {gw} on {} did not join its solicited-node group", gateway.name)
                } else if !link_local_ready {
                    format!("{} has no usable IPv6 link-local address to solicit the pod from", gateway.name)
                } else {
                    format!("pod address {} on {ifname} did not become usable", pod_addresses[0])
                };
                return Err(BridgeError::NotReady { what, seconds: READY_TIMEOUT.as_secs() });
            }
            // Usually ready within a pass or two; DAD (`enabledad`) takes 1-2 s.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// The result: interfaces `[bridge, host veth, pod veth (, VLAN gateway)]`, IPAM's
    /// addresses on interface 2, the routes set in the pod, DNS.
    async fn build_result(&self, attached: Attached, ipam: CniResult) -> Result<CniResult, BridgeError> {
        let (conf, req) = (self.conf, self.req);
        let Attached { bridge, port, port_link, pod, vlan_gateway } = attached;
        let bridge = &bridge;
        let bridge_now = self.host.link_by_index(bridge.index).await?.unwrap_or_else(|| bridge.clone());
        let iface = |name: &str, link: &Link, sandbox: Option<String>| Interface {
            name: name.to_string(),
            mac: Some(fmt_mac(&link.mac)),
            mtu: Some(link.mtu),
            sandbox,
            ..Default::default()
        };
        let sandbox = req.inv.netns.as_ref().map(|p| p.display().to_string());
        let mut interfaces = vec![
            iface(&conf.bridge, &bridge_now, None),
            iface(&port.name, &port_link, None),
            // Read after creation; setting it up and adding addresses change neither MAC nor MTU.
            iface(&req.inv.ifname, &pod.link, sandbox),
        ];
        if let Some((name, link)) = vlan_gateway {
            interfaces.push(iface(&name, &link, None));
        }
        Ok(CniResult {
            interfaces,
            ips: ipam.ips.into_iter().map(|i| IpConfig { interface: Some(2), ..i }).collect(),
            routes: pod.routes,
            dns: conf.dns.clone().unwrap_or(ipam.dns),
        })
    }

    /// Undoes what this ADD made, newest first; failures are logged, the first error stands.
    async fn roll_back(&mut self) {
        let _ = self.join_masquerade();
        while let Some(made) = self.made.pop() {
            let undone = match &made {
                Made::Lease(plugin) => {
                    ipam::run(plugin, Command::Del, self.req).map(|_| ()).map_err(Into::into)
                }
                Made::Masquerade(owner) => self.conf.masq_backend.remove_where(|o| o == owner),
                Made::SpoofCheck(owner) => spoof::remove_where(|o| o == owner),
                Made::Veth(host_end) => self.host.del_link_named(host_end).await,
                // A parallel ADD may have attached its pod meanwhile: keep the bridge then.
                // Under the bridge lock (still held when this ADD failed before its port was
                // attached), so that no ADD attaches between the check and the delete.
                Made::Bridge(name) => match self.bridge_lock.take().map_or_else(|| lock::bridge(name), Ok) {
                    Err(e) => Err(e),
                    Ok(held) => {
                        let undone = self.remove_bridge_if_unused(name).await;
                        drop(held);
                        undone
                    }
                },
            };
            if let Err(e) = undone {
                eprintln!("cni-bridge: rollback: {e}");
            }
        }
    }

    /// Deletes the bridge `name` if it is still a bridge and has no ports, but for the
    /// `<bridge>.<vlan>` gateway pair of this ADD's VLAN: shared by the pods of that VLAN, it
    /// serves none when the bridge has no other port, and it alone would keep the bridge this
    /// ADD made. The caller holds the bridge lock.
    async fn remove_bridge_if_unused(&self, name: &str) -> Result<(), BridgeError> {
        let bridge = match self.host.link(name).await? {
            Some(bridge) if bridge.kind == Some(InfoKind::Bridge) => bridge,
            _ => return Ok(()),
        };
        let vlan_gateway = match self.conf.vlan {
            0 => None,
            vlan => self.host.link(&format!("{name}.{vlan}")).await?,
        };
        // Its peer is the bridge port (same namespace: IFLA_LINK is the peer's index here).
        let gateway_port = vlan_gateway.as_ref().and_then(|g| g.peer_index);
        let ports = self.host.ports(bridge.index).await?;
        if ports.iter().any(|p| Some(*p) != gateway_port) {
            return Ok(());
        }
        cni_proto::pause_point("bridge-rollback-before-delete");
        if let (Some(gateway), false) = (&vlan_gateway, ports.is_empty()) {
            self.host.del_link(gateway.index).await?;
        }
        self.host.del_link(bridge.index).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(address: &str, gateway: Option<&str>) -> IpConfig {
        IpConfig {
            address: address.parse().expect("test address"),
            gateway: gateway.map(|g| g.parse().expect("test gateway")),
            interface: None,
        }
    }

    #[test]
    fn gateway_is_the_given_one_or_a_first_address_inside_the_subnet() {
        assert_eq!(gateway_of(&ip("10.1.0.5/24", Some("10.1.0.9"))), "10.1.0.9".parse().ok());
        assert_eq!(gateway_of(&ip("10.1.0.5/24", None)), "10.1.0.1".parse().ok());
        assert_eq!(gateway_of(&ip("fd00::5/64", None)), "fd00::1".parse().ok());
        assert_eq!(gateway_of(&ip("10.1.0.5/32", None)), None);
        assert_eq!(gateway_of(&ip("10.1.0.1/31", None)), None, "the first address is the pod's");
        assert_eq!(gateway_of(&ip("255.255.255.255/32", None)), None);
        assert_eq!(gateway_of(&ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", None)), None);
    }
}
