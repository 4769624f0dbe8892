//! ADD: bridge, veth into the pod, IPAM, addresses and routes, gateway, masquerade; and on
//! any failure after the veth exists, undo all of it.

use std::fs::File;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use cni_proto::{CniResult, Command, Interface, IpConfig, Request, Route};
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::link::InfoKind;

use crate::config::{fmt_mac, BridgeConf};
use crate::error::BridgeError;
use crate::firewall;
use crate::firewall::spoof;
use crate::ipam;
use crate::netlink::{Link, Nl};
use crate::netns;

/// How long the host veth may take to come up.
const PORT_UP_TIMEOUT: Duration = Duration::from_secs(5);

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b
}

/// A random locally administered unicast MAC: the bridge's own, so it never follows a port's.
fn bridge_mac() -> [u8; 6] {
    let mut m = random_bytes::<6>();
    m[0] = (m[0] & 0xfe) | 0x02;
    m
}

/// Finds or creates the bridge, up, promiscuous if asked.
pub async fn ensure_bridge(host: &Nl, conf: &BridgeConf) -> Result<Link, BridgeError> {
    let existing = host.link(&conf.bridge).await?;
    let br = match existing {
        Some(l) => l,
        None => {
            // A parallel ADD may create it first: EEXIST is fine, the kind is checked below.
            host.create_bridge(&conf.bridge, bridge_mac(), conf.mtu, conf.vlan_filtering()).await?;
            host.link(&conf.bridge).await?.ok_or_else(|| BridgeError::NotABridge(conf.bridge.clone()))?
        }
    };
    if br.kind != Some(InfoKind::Bridge) {
        return Err(BridgeError::NotABridge(conf.bridge.clone()));
    }
    if conf.vlan_filtering() && !br.vlan_filtering {
        host.enable_vlan_filtering(&conf.bridge).await?;
    }
    if conf.promisc && !br.promisc {
        host.set(br.index, "setting the bridge promiscuous", |l| l.promiscuous(true)).await?;
    }
    Ok(br)
}

/// Puts a bridge port on its VLANs: `vlan` as PVID/untagged (1 for a trunk without one),
/// the trunk tagged, and VLAN 1 removed unless preserved.
async fn port_vlans(
    host: &Nl,
    port: u32,
    vlan: u16,
    trunk: &[u16],
    preserve: bool,
) -> Result<(), BridgeError> {
    if vlan == 0 && trunk.is_empty() {
        return Ok(());
    }
    if !preserve {
        host.port_vlan_del(port, 1).await?;
    }
    host.port_vlans_add(port, Some(if vlan == 0 { 1 } else { vlan }), trunk).await
}

/// Finds or makes `<bridge>.<vlan>`: one end of a host veth pair whose other end is an
/// access port of `vlan` on the bridge.
async fn ensure_vlan_gateway(
    host: &Nl,
    conf: &BridgeConf,
    br: &Link,
    vlan: u16,
) -> Result<(String, Link), BridgeError> {
    let name = format!("{}.{vlan}", conf.bridge);
    if cni_proto::env::invalid_ifname(&name).is_some() {
        return Err(BridgeError::Config(format!("VLAN gateway interface name {name:?} is too long")));
    }
    if let Some(l) = host.link(&name).await? {
        return Ok((name, l));
    }
    let r = random_bytes::<4>();
    let peer = format!("veth{:02x}{:02x}{:02x}{:02x}", r[0], r[1], r[2], r[3]);
    if host.create_local_veth(&name, &peer, conf.mtu).await? {
        let p = host.link(&peer).await?.ok_or_else(|| BridgeError::PortDown(format!("{peer} vanished")))?;
        host.set(p.index, "attaching the VLAN gateway port", |l| l.controller(br.index).up()).await?;
        port_vlans(host, p.index, vlan, &[], conf.preserve_default_vlan).await?;
    }
    let l = host.link(&name).await?.ok_or_else(|| BridgeError::PortDown(format!("{name} vanished")))?;
    host.set(l.index, "setting the VLAN gateway up", |x| x.up()).await?;
    Ok((name, l))
}

/// The gateway of each address: IPAM's, else the subnet's first address.
fn gateway_of(ip: &IpConfig) -> IpAddr {
    ip.gateway.unwrap_or_else(|| {
        let n = ip.address.network();
        match n {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
        }
    })
}

/// Puts `gw/prefix` on the bridge, replacing a different address only with forceAddress.
async fn ensure_gateway_address(
    host: &Nl,
    br: &Link,
    name: &str,
    want: IpNetwork,
    force: bool,
) -> Result<(), BridgeError> {
    for have in host.addresses(br.index).await? {
        if have == want {
            return Ok(());
        }
        let conflicts = have.is_ipv4() == want.is_ipv4()
            && (want.is_ipv4() || have.contains(want.ip()) || want.contains(have.ip()));
        if conflicts {
            if !force {
                return Err(BridgeError::AddressConflict(format!(
                    "{name:?} already has an IP address different from {want} ({have}); set forceAddress to replace it"
                )));
            }
            host.del_address(br.index, have).await?;
        }
    }
    host.add_address(br.index, want).await
}

/// What this ADD has made so far, undone in reverse on failure.
struct Undo<'a> {
    req: &'a Request,
    host: &'a Nl,
    host_veth: Option<u32>,
    ipam: Option<&'a str>,
    masq: Option<String>,
    spoof: Option<String>,
    backend: firewall::Backend,
}

impl Undo<'_> {
    async fn run(self) {
        if let Some(owner) = &self.masq {
            if let Err(e) = self.backend.remove_where(|o| o == owner) {
                eprintln!("cni-bridge: rollback: {e}");
            }
        }
        if let Some(owner) = &self.spoof {
            if let Err(e) = spoof::remove_where(|o| o == owner) {
                eprintln!("cni-bridge: rollback: {e}");
            }
        }
        if let Some(t) = self.ipam {
            if let Err(e) = ipam::run(t, Command::Del, self.req) {
                eprintln!("cni-bridge: rollback: IPAM DEL: {e}");
            }
        }
        if let Some(i) = self.host_veth {
            if let Err(e) = self.host.del_link(i).await {
                eprintln!("cni-bridge: rollback: {e}");
            }
        }
    }
}

/// Runs ADD for a validated request.
pub fn add(req: &Request, conf: &BridgeConf) -> Result<CniResult, BridgeError> {
    let path = req.inv.netns.as_deref().ok_or_else(|| BridgeError::Netns("CNI_NETNS is empty".into()))?;
    crate::mark("start");
    let pod_ns = netns::open_pod(path)?;
    // IPAM starts first: it allocates while we open our runtime and sockets.
    let pending = match conf.ipam_type.as_deref().filter(|t| !ipam_needs_interface(t)) {
        Some(t) => Some((t, ipam::start(t, Command::Add, req)?)),
        None => None,
    };
    let sockets = crate::runtime().and_then(|rt| Ok((Nl::here_in(&rt)?, Nl::in_ns_in(&rt, &pod_ns)?, rt)));
    let (host, pod, rt) = match sockets {
        Ok(x) => x,
        Err(e) => {
            // Whatever IPAM allocated must not outlive this failed ADD.
            if let Some((t, p)) = pending {
                if p.wait().is_ok() {
                    let _ = ipam::run(t, Command::Del, req);
                }
            }
            return Err(e);
        }
    };
    rt.block_on(async {
        crate::mark("netlink sockets open");
        let mut undo = Undo {
            req,
            host: &host,
            host_veth: None,
            ipam: None,
            masq: None,
            spoof: None,
            backend: conf.masq_backend,
        };
        match build(req, conf, &host, &pod, &pod_ns, pending, &mut undo).await {
            Ok(r) => Ok(r),
            Err(e) => {
                undo.run().await;
                Err(e)
            }
        }
    })
}

/// Whether IPAM must run after the pod interface exists (DHCP leases on that interface).
fn ipam_needs_interface(t: &str) -> bool {
    t == "dhcp"
}

type MasqJob = std::thread::JoinHandle<Result<(), BridgeError>>;

/// Starts the masquerade nft call on a thread as soon as the addresses are known, so it runs
/// while the bridge, veth and pod are set up; [`join_masq`] collects it before ADD returns,
/// so a rollback never races it.
fn spawn_masq<'a>(
    req: &'a Request,
    conf: &'a BridgeConf,
    ipam: &CniResult,
    undo: &mut Undo<'a>,
) -> Option<MasqJob> {
    conf.ip_masq.then(|| {
        let owner = firewall::owner(&req.conf.name, &req.inv.container_id, &req.inv.ifname);
        undo.masq = Some(owner.clone());
        let addrs: Vec<IpNetwork> = ipam.ips.iter().map(|i| i.address).collect();
        let backend = conf.masq_backend;
        std::thread::spawn(move || backend.add(&addrs, &owner))
    })
}

fn join_masq(job: Option<MasqJob>) -> Result<(), BridgeError> {
    job.map_or(Ok(()), |j| j.join().unwrap_or_else(|_| Err(BridgeError::Masq("nft thread panicked".into()))))
}

fn ipam_result<'a>(t: &'a str, p: ipam::Pending, undo: &mut Undo<'a>) -> Result<CniResult, BridgeError> {
    let r = p.wait()?.unwrap_or_default();
    undo.ipam = Some(t);
    if r.ips.is_empty() {
        return Err(BridgeError::Config(format!("IPAM plugin {t} returned no IP configuration")));
    }
    Ok(r)
}

async fn build<'a>(
    req: &'a Request,
    conf: &'a BridgeConf,
    host: &Nl,
    pod: &Nl,
    pod_ns: &File,
    pending: Option<(&'a str, ipam::Pending)>,
    undo: &mut Undo<'a>,
) -> Result<CniResult, BridgeError> {
    // Nothing is created before IPAM has answered: a refusal (bad config, full range) then
    // leaves the host untouched. Meanwhile only reads.
    let exists = pod.link(&req.inv.ifname).await;
    let mut ipam = None;
    if let Some((t, p)) = pending {
        ipam = Some(ipam_result(t, p, undo)?);
        crate::mark("IPAM ADD");
    }
    if exists?.is_some() {
        return Err(BridgeError::IfaceExists(req.inv.ifname.clone()));
    }
    let mut masq_job = ipam.as_ref().and_then(|r| spawn_masq(req, conf, r, undo));
    let r = build_rest(req, conf, host, pod, pod_ns, ipam, &mut masq_job, undo).await;
    let m = join_masq(masq_job);
    let result = r?;
    m?;
    Ok(result)
}

#[allow(clippy::too_many_arguments)]
async fn build_rest<'a>(
    req: &'a Request,
    conf: &'a BridgeConf,
    host: &Nl,
    pod: &Nl,
    pod_ns: &File,
    mut ipam: Option<CniResult>,
    masq_job: &mut Option<MasqJob>,
    undo: &mut Undo<'a>,
) -> Result<CniResult, BridgeError> {
    let br = ensure_bridge(host, conf).await?;
    crate::mark("bridge ensured");
    let host_ns = netns::current().map_err(|e| BridgeError::Netns(e.to_string()))?;
    let mut host_name = String::new();
    for _ in 0..10 {
        let r = random_bytes::<4>();
        host_name = format!("veth{:02x}{:02x}{:02x}{:02x}", r[0], r[1], r[2], r[3]);
        if pod.create_veth(&req.inv.ifname, &host_name, &host_ns, conf.mtu, conf.mac).await? {
            break;
        }
        host_name.clear();
    }
    if host_name.is_empty() {
        return Err(BridgeError::IfaceExists(format!("{} (or 10 random host veth names)", req.inv.ifname)));
    }
    let hv =
        host.link(&host_name).await?.ok_or_else(|| BridgeError::PortDown(format!("{host_name} vanished")))?;
    undo.host_veth = Some(hv.index);
    if let Some(t) = conf.ipam_type.as_deref().filter(|t| ipam_needs_interface(t)) {
        let r = ipam_result(t, ipam::start(t, Command::Add, req)?, undo)?;
        *masq_job = spawn_masq(req, conf, &r, undo);
        ipam = Some(r);
    }
    crate::mark("veth created");
    setup(req, conf, host, pod, pod_ns, &br, &host_name, hv.index, ipam.unwrap_or_default(), undo).await
}

#[allow(clippy::too_many_arguments)]
async fn setup<'a>(
    req: &'a Request,
    conf: &'a BridgeConf,
    host: &Nl,
    pod: &Nl,
    pod_ns: &File,
    br: &Link,
    host_name: &str,
    hv_index: u32,
    ipam: CniResult,
    undo: &mut Undo<'a>,
) -> Result<CniResult, BridgeError> {
    host.set(hv_index, "attaching the host veth to the bridge", |l| l.controller(br.index).up()).await?;
    host.set_port(hv_index, conf.hairpin, conf.port_isolation).await?;
    port_vlans(host, hv_index, conf.vlan, &conf.trunk, conf.preserve_default_vlan).await?;

    let gws: Vec<(IpAddr, IpNetwork)> = ipam.ips.iter().map(|ip| (gateway_of(ip), ip.address)).collect();
    let family_gw = |v4: bool| gws.iter().find(|(g, _)| g.is_ipv4() == v4).map(|(g, _)| *g);

    crate::mark("port attached, hairpin set");
    let pod_link = pod
        .link(&req.inv.ifname)
        .await?
        .ok_or_else(|| BridgeError::IfaceExists("pod interface vanished".into()))?;
    if conf.mac_spoof_check {
        let owner = firewall::owner(&req.conf.name, &req.inv.container_id, &req.inv.ifname);
        undo.spoof = Some(owner.clone());
        spoof::add(host_name, &pod_link.mac, &owner)?;
    }
    let mut routes = ipam.routes.clone();
    if !conf.disable_container_interface {
        let has_v6 = ipam.ips.iter().any(|i| !i.address.is_ipv4());
        let ifname = &req.inv.ifname;
        let enable_dad = conf.enable_dad;
        let sysctls = netns::run_in(pod_ns, || -> Result<(), BridgeError> {
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
        sysctls.map_err(|e| BridgeError::Sysctl(e.to_string()))??;
        let adds = ipam.ips.iter().map(|ip| pod.add_address(pod_link.index, ip.address));
        for r in futures::future::join_all(adds).await {
            r?;
        }
        pod.set(pod_link.index, "setting the pod interface up", |l| l.up()).await?;
        if conf.is_default_gateway {
            for v4 in [true, false] {
                let has_default = routes.iter().any(|r| r.dst.prefix() == 0 && r.dst.is_ipv4() == v4);
                if let (Some(gw), false) = (family_gw(v4), has_default) {
                    let dst: IpNetwork = if v4 { "0.0.0.0/0" } else { "::/0" }.parse().expect("literal");
                    routes.push(Route::new(dst, Some(gw)));
                }
            }
        }
        for r in &routes {
            let mut r2 = r.clone();
            if r2.gw.is_none() {
                r2.gw = family_gw(r.dst.is_ipv4());
            }
            pod.add_route(pod_link.index, &r2).await?;
        }
    }

    let mut vlan_gw = None;
    crate::mark("pod addresses, routes, link up");
    if conf.is_gateway {
        // With a VLAN, the gateway lives on <bridge>.<vlan>, an access port of that VLAN.
        let gw_link = match conf.vlan {
            0 => (conf.bridge.clone(), br.clone()),
            v => {
                let l = ensure_vlan_gateway(host, conf, br, v).await?;
                vlan_gw = Some(l.clone());
                l
            }
        };
        let mut seen = Vec::new();
        for (gw, addr) in &gws {
            let want = IpNetwork::new(*gw, addr.prefix()).expect("prefix of an address");
            if !seen.contains(&want) {
                ensure_gateway_address(host, &gw_link.1, &gw_link.0, want, conf.force_address).await?;
                seen.push(want);
            }
        }
        if gws.iter().any(|(g, _)| g.is_ipv4()) {
            netns::sysctl("net/ipv4/ip_forward", "1")?;
        }
        if gws.iter().any(|(g, _)| !g.is_ipv4()) {
            netns::sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
    }

    crate::mark("gateway and forwarding");
    // The port forwards only once the veth's carrier is up; report success only then.
    let mut hv = host.link_by_index(hv_index).await?.unwrap_or_default();
    if !conf.disable_container_interface {
        let start = Instant::now();
        while !hv.oper_up {
            if start.elapsed() > PORT_UP_TIMEOUT {
                return Err(BridgeError::PortDown(format!("bridge port {host_name} did not come up")));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            hv = host.link_by_index(hv_index).await?.unwrap_or_default();
        }
    }
    crate::mark("port up");
    let br_now = host.link_by_index(br.index).await?.unwrap_or_else(|| br.clone());
    let iface = |name: &str, l: &Link, sandbox: Option<String>| Interface {
        name: name.to_string(),
        mac: Some(fmt_mac(&l.mac)),
        mtu: Some(l.mtu),
        sandbox,
        ..Default::default()
    };
    let sandbox = req.inv.netns.as_ref().map(|p| p.display().to_string());
    let mut interfaces = vec![
        iface(&conf.bridge, &br_now, None),
        iface(host_name, &hv, None),
        // Read after creation; setting it up and adding addresses change neither MAC nor MTU.
        iface(&req.inv.ifname, &pod_link, sandbox),
    ];
    if let Some((name, l)) = vlan_gw {
        interfaces.push(iface(&name, &l, None));
    }
    Ok(CniResult {
        interfaces,
        ips: ipam.ips.into_iter().map(|i| IpConfig { interface: Some(2), ..i }).collect(),
        routes,
        dns: conf.dns.clone().unwrap_or(ipam.dns),
    })
}
