//! What the checks read: the conflist's bridge network, the node's links and addresses, the
//! pods' namespaces, leases, masquerade entries and the route agent's figures. Read-only.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cni_bridge::firewall;
use cni_host_local::store::{self, Lease};
use ipnetwork::IpNetwork;
use serde_json::Value;

/// The parts of the bridge plugin's config the checks need.
#[derive(Debug, Default)]
pub(super) struct Net {
    pub(super) name: String,
    pub(super) bridge: String,
    pub(super) is_gateway: bool,
    pub(super) hairpin: bool,
    pub(super) promisc: bool,
    pub(super) ip_masq: bool,
    /// isDefaultGateway or an IPAM default route: the pod must have a default route.
    pub(super) default_route: bool,
    pub(super) mtu: Option<u64>,
    /// (subnet, gateway)
    pub(super) ranges: Vec<(IpNetwork, IpAddr)>,
    pub(super) data_dir: PathBuf,
}

/// The first config file in lexical order, as libcni picks it.
pub(super) fn find_conf(dir: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist" || x == "conf" || x == "json"))
        .collect();
    files.sort();
    files.into_iter().next()
}

pub(super) fn first_host(net: &IpNetwork) -> Option<IpAddr> {
    match net {
        IpNetwork::V4(n) => Some(IpAddr::V4((u32::from(n.network()) + 1).into())),
        IpNetwork::V6(n) => Some(IpAddr::V6((u128::from(n.network()) + 1).into())),
    }
}

pub(super) fn parse_net(list: &Value) -> Result<Net, String> {
    let plugins = list["plugins"].as_array().ok_or("no plugins array")?;
    let br = plugins
        .iter()
        .find(|p| matches!(p["type"].as_str(), Some("cni-bridge" | "bridge")))
        .ok_or("no cni-bridge (or bridge) plugin in the list")?;
    let ipam = &br["ipam"];
    let mut ranges = Vec::new();
    let mut add_range = |r: &Value| -> Result<(), String> {
        let Some(s) = r["subnet"].as_str() else { return Ok(()) };
        let subnet: IpNetwork = s.parse().map_err(|e| format!("subnet {s}: {e}"))?;
        let gw = match r["gateway"].as_str() {
            Some(g) => g.parse().map_err(|e| format!("gateway {g}: {e}"))?,
            None => first_host(&subnet).ok_or("empty subnet")?,
        };
        ranges.push((subnet, gw));
        Ok(())
    };
    add_range(ipam)?;
    for set in ipam["ranges"].as_array().into_iter().flatten() {
        for r in set.as_array().into_iter().flatten() {
            add_range(r)?;
        }
    }
    Ok(Net {
        name: list["name"].as_str().unwrap_or("").to_string(),
        bridge: br["bridge"].as_str().unwrap_or("cni0").to_string(),
        is_gateway: br["isGateway"].as_bool().unwrap_or(false),
        hairpin: br["hairpinMode"].as_bool().unwrap_or(false),
        promisc: br["promiscMode"].as_bool().unwrap_or(false),
        ip_masq: br["ipMasq"].as_bool().unwrap_or(false),
        default_route: br["isDefaultGateway"].as_bool().unwrap_or(false)
            || ipam["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| matches!(r["dst"].as_str(), Some("0.0.0.0/0" | "::/0"))),
        mtu: br["mtu"].as_u64(),
        ranges,
        data_dir: ipam["dataDir"].as_str().unwrap_or("/var/lib/cni/networks").into(),
    })
}

/// Runs a program (in the pod namespace `netns` when given) and returns its stdout.
pub(super) fn output(netns: Option<&Path>, program: &str, args: &[&str]) -> Option<String> {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null()).stderr(Stdio::null());
    if let Some(ns) = netns {
        let f = std::fs::File::open(ns).ok()?;
        // SAFETY: setns is async-signal-safe; the child only execs afterwards.
        unsafe {
            c.pre_exec(move || {
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
    }
    let o = c.output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

pub(super) fn json_of(netns: Option<&Path>, program: &str, args: &[&str]) -> Vec<Value> {
    output(netns, program, args)
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

pub(super) fn sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/"))).ok().map(|s| s.trim().to_string())
}

/// What the node namespace looks like.
pub(super) struct Node {
    pub(super) links: Vec<Value>,
    pub(super) addrs: Vec<Value>,
}

impl Node {
    pub(super) fn read() -> Node {
        Node {
            links: json_of(None, "ip", &["-j", "-d", "link", "show"]),
            addrs: json_of(None, "ip", &["-j", "addr", "show"]),
        }
    }
    pub(super) fn link(&self, name: &str) -> Option<&Value> {
        self.links.iter().find(|l| l["ifname"] == name)
    }
    pub(super) fn ports(&self, bridge: &str) -> Vec<&Value> {
        self.links.iter().filter(|l| l["master"] == bridge).collect()
    }
    pub(super) fn addrs_of(&self, name: &str) -> Vec<(IpAddr, u8)> {
        self.addrs
            .iter()
            .filter(|a| a["ifname"] == name)
            .flat_map(|a| a["addr_info"].as_array().cloned().unwrap_or_default())
            .filter_map(|i| Some((i["local"].as_str()?.parse().ok()?, i["prefixlen"].as_u64()? as u8)))
            .collect()
    }
}

pub(super) fn is_up(link: &Value) -> bool {
    link["flags"].as_array().into_iter().flatten().any(|f| f == "UP")
}

/// kube-proxy's rules in iptables (KUBE-SERVICES) or its own nft table.
pub(super) fn kube_proxy_present() -> bool {
    let ipt = output(None, "iptables-save", &["-t", "nat"]).is_some_and(|s| s.contains(":KUBE-SERVICES"));
    ipt || output(None, "nft", &["list", "tables"]).is_some_and(|s| s.contains("kube-proxy"))
}

/// The leases of `<dataDir>/<network>`, read by the store's own code (so a torn lease file,
/// which the next call reclaims, is `None`, not an owner).
pub(super) fn leases(net: &Net) -> BTreeMap<IpAddr, Option<Lease>> {
    store::read_leases(&net.data_dir, &net.name).unwrap_or_default()
}

/// How a lease names its holder in the table: `container/ifname` (`container` for leases
/// older than interface names).
pub(super) fn holder(lease: &Lease) -> String {
    if lease.ifname.is_empty() {
        lease.id.clone()
    } else {
        format!("{}/{}", lease.id, lease.ifname)
    }
}

/// RTM_GETNSID: the id this namespace gives the namespace open as `fd` (-1: none).
pub(super) fn nsid_of(fd: i32) -> Option<i32> {
    use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    const RTM_NEWNSID: u16 = 88;
    const RTM_GETNSID: u16 = 90;
    const NETNSA_NSID: u16 = 1;
    const NETNSA_FD: u16 = 3;
    let mut s = Socket::new(NETLINK_ROUTE).ok()?;
    s.bind_auto().ok()?;
    s.connect(&SocketAddr::new(0, 0)).ok()?;
    let mut attrs = Vec::new();
    netlink_wire::attr(&mut attrs, NETNSA_FD, &(fd as u32).to_ne_bytes());
    // struct rtgenmsg, padded to 4 bytes.
    s.send(&netlink_wire::message(RTM_GETNSID, 1, 1, &[0; 4], &attrs), 0).ok()?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let n = s.recv(&mut buf, 0).ok()?;
    let mut id = None;
    netlink_wire::walk(&buf[..n], |kind, _, p| {
        if kind != RTM_NEWNSID || p.len() < 4 {
            return;
        }
        let mut off = 4;
        while off + 8 <= p.len() {
            let len = u16::from_ne_bytes([p[off], p[off + 1]]) as usize;
            let k = u16::from_ne_bytes([p[off + 2], p[off + 3]]) & 0x3fff;
            if len < 4 || off + len > p.len() {
                break;
            }
            if k == NETNSA_NSID && len >= 8 {
                id = Some(i32::from_ne_bytes([p[off + 4], p[off + 5], p[off + 6], p[off + 7]]));
            }
            off += (len + 3) & !3;
        }
    })
    .ok()?;
    id
}

/// Namespace files of every process and of /run/netns, one per namespace: nsid -> path.
pub(super) fn namespaces_by_nsid(wanted: &BTreeSet<i64>) -> BTreeMap<i64, PathBuf> {
    let mut seen = BTreeSet::new();
    let mut out = BTreeMap::new();
    let own = std::fs::metadata("/proc/thread-self/ns/net").map(|m| (m.dev(), m.ino())).ok();
    let mut candidates: Vec<PathBuf> =
        std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.path()).collect();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            candidates.push(e.path().join("ns/net"));
        }
    }
    for p in candidates {
        if out.len() == wanted.len() {
            break;
        }
        let Ok(m) = std::fs::metadata(&p) else { continue };
        let key = (m.dev(), m.ino());
        if Some(key) == own || !seen.insert(key) {
            continue;
        }
        let Ok(f) = std::fs::File::open(&p) else { continue };
        if let Some(id) = nsid_of(f.as_raw_fd()).map(i64::from).filter(|id| wanted.contains(id)) {
            out.insert(id, p);
        }
    }
    out
}

/// For each port of the bridge: its name and the addresses of its peer in the pod (None when
/// the pod's namespace was not found).
pub(super) fn pod_addresses(node: &Node, bridge: &str) -> Vec<(String, Option<Vec<IpAddr>>)> {
    let ports = node.ports(bridge);
    let wanted: BTreeSet<i64> = ports.iter().filter_map(|p| p["link_netnsid"].as_i64()).collect();
    let nss = namespaces_by_nsid(&wanted);
    ports
        .iter()
        .map(|p| {
            let name = p["ifname"].as_str().unwrap_or("").to_string();
            let addrs = (|| {
                let ns = nss.get(&p["link_netnsid"].as_i64()?)?;
                let peer = p["link_index"].as_u64()?;
                let all = json_of(Some(ns), "ip", &["-j", "addr", "show"]);
                let l = all.iter().find(|l| l["ifindex"].as_u64() == Some(peer))?;
                Some(
                    l["addr_info"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|i| i["scope"] == "global")
                        .filter_map(|i| i["local"].as_str()?.parse().ok())
                        .collect(),
                )
            })();
            (name, addrs)
        })
        .collect()
}

/// This network's masquerade entries in every backend, listed by the plugin's firewall code:
/// ip -> owner (as [`firewall::owner`] writes it). A backend that cannot be listed shows none.
pub(super) fn masq_entries(network: &str) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for backend in firewall::BACKENDS {
        for entry in backend.list().unwrap_or_default() {
            if firewall::of_network(network, &entry.owner) {
                out.insert(entry.ip, entry.owner);
            }
        }
    }
    out
}

/// GET /metrics of the route agent; None when nothing answers.
pub(super) fn metrics(addr: &str) -> Option<BTreeMap<String, f64>> {
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let body = body.split_once("\r\n\r\n")?.1;
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.trim().to_string(), v.trim().parse().ok()?))
            })
            .collect(),
    )
}

/// A process living in `ns` (for its mount namespace's /etc/resolv.conf).
pub(super) fn process_in(ns: &Path) -> Option<PathBuf> {
    let m = std::fs::metadata(ns).ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            && std::fs::metadata(p.join("ns/net")).is_ok_and(|x| x.dev() == m.dev() && x.ino() == m.ino())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_default_gateways_come_from_both_ipam_forms() {
        let list = serde_json::json!({"name": "n", "plugins": [{"type": "cni-bridge", "isGateway": true,
            "ipam": {"type": "cni-host-local", "subnet": "10.1.0.0/24",
                     "ranges": [[{"subnet": "fd00::/64", "gateway": "fd00::fe"}]]}}]});
        let n = parse_net(&list).unwrap();
        assert_eq!(n.bridge, "cni0");
        assert_eq!(
            n.ranges,
            vec![
                ("10.1.0.0/24".parse().unwrap(), "10.1.0.1".parse().unwrap()),
                ("fd00::/64".parse().unwrap(), "fd00::fe".parse().unwrap())
            ]
        );
        assert!(parse_net(&serde_json::json!({"plugins": [{"type": "ptp"}]})).is_err());
    }
}
