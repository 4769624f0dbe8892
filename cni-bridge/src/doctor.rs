//! `cni-bridge doctor`: the troubleshooting a person does by hand on a node, as one table of
//! checks with the fix for each failure. Read-only: it runs `ip`, `bridge`, `nft` and
//! `iptables-save`, reads /proc/sys and the lease directory, and changes nothing.
//!
//! Run it where the plugin runs (the node's network namespace): everything it inspects is
//! that namespace's, except a pod's, which it enters by its namespace file.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Serialize;
use serde_json::Value;

const USAGE: &str = "usage: cni-bridge doctor [--conf FILE] [--conf-dir DIR] [--bin-dir DIR[:DIR...]] \
[--netns PATH] [--metrics HOST:PORT] [--json]

Checks the node's pod network as configured by a cni-bridge conflist and prints a table of
checks (pass / fail / skip) with the fix for each failure. Exit status 1 when any check fails.
  --conf FILE        the conflist (default: the first in --conf-dir, as runtimes pick it)
  --conf-dir DIR     default /etc/cni/net.d
  --bin-dir DIRS     the plugin directories, ':'-separated (default /opt/cni/bin)
  --netns PATH       a pod's network namespace (/proc/PID/ns/net or /run/netns/NAME): also
                     check its interface, routes and resolv.conf
  --metrics ADDR     cni-route-agent's /metrics (default 127.0.0.1:9645)
  --json             JSON instead of the table";

/// Where to look.
#[derive(Debug)]
struct Opts {
    conf: Option<PathBuf>,
    conf_dir: PathBuf,
    bin_dirs: Vec<PathBuf>,
    netns: Option<PathBuf>,
    metrics: String,
    json: bool,
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        conf: None,
        conf_dir: "/etc/cni/net.d".into(),
        bin_dirs: vec!["/opt/cni/bin".into()],
        netns: None,
        metrics: "127.0.0.1:9645".into(),
        json: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--conf" => o.conf = Some(value()?.into()),
            "--conf-dir" => o.conf_dir = value()?.into(),
            "--bin-dir" => o.bin_dirs = value()?.split(':').map(PathBuf::from).collect(),
            "--netns" => o.netns = Some(value()?.into()),
            "--metrics" => o.metrics = value()?,
            "--json" => o.json = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Pass,
    Fail,
    Skip,
}

/// One row of the table.
#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    fix: String,
}

fn pass(check: &'static str, detail: impl Into<String>) -> Check {
    Check { check, status: Status::Pass, detail: detail.into(), fix: String::new() }
}
fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { check, status: Status::Fail, detail: detail.into(), fix: fix.into() }
}
fn skip(check: &'static str, detail: impl Into<String>) -> Check {
    Check { check, status: Status::Skip, detail: detail.into(), fix: String::new() }
}

/// The parts of the bridge plugin's config the checks need.
#[derive(Debug, Default)]
struct Net {
    name: String,
    bridge: String,
    is_gateway: bool,
    hairpin: bool,
    promisc: bool,
    ip_masq: bool,
    /// isDefaultGateway or an IPAM default route: the pod must have a default route.
    default_route: bool,
    mtu: Option<u64>,
    /// (subnet, gateway)
    ranges: Vec<(IpNetwork, IpAddr)>,
    data_dir: PathBuf,
}

/// The first config file in lexical order, as libcni picks it.
fn find_conf(dir: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist" || x == "conf" || x == "json"))
        .collect();
    files.sort();
    files.into_iter().next()
}

fn first_host(net: &IpNetwork) -> Option<IpAddr> {
    match net {
        IpNetwork::V4(n) => Some(IpAddr::V4((u32::from(n.network()) + 1).into())),
        IpNetwork::V6(n) => Some(IpAddr::V6((u128::from(n.network()) + 1).into())),
    }
}

fn parse_net(list: &Value) -> Result<Net, String> {
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
fn output(netns: Option<&Path>, program: &str, args: &[&str]) -> Option<String> {
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

fn json_of(netns: Option<&Path>, program: &str, args: &[&str]) -> Vec<Value> {
    output(netns, program, args)
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/"))).ok().map(|s| s.trim().to_string())
}

/// What the node namespace looks like.
struct Node {
    links: Vec<Value>,
    addrs: Vec<Value>,
}

impl Node {
    fn read() -> Node {
        Node {
            links: json_of(None, "ip", &["-j", "-d", "link", "show"]),
            addrs: json_of(None, "ip", &["-j", "addr", "show"]),
        }
    }
    fn link(&self, name: &str) -> Option<&Value> {
        self.links.iter().find(|l| l["ifname"] == name)
    }
    fn ports(&self, bridge: &str) -> Vec<&Value> {
        self.links.iter().filter(|l| l["master"] == bridge).collect()
    }
    fn addrs_of(&self, name: &str) -> Vec<(IpAddr, u8)> {
        self.addrs
            .iter()
            .filter(|a| a["ifname"] == name)
            .flat_map(|a| a["addr_info"].as_array().cloned().unwrap_or_default())
            .filter_map(|i| Some((i["local"].as_str()?.parse().ok()?, i["prefixlen"].as_u64()? as u8)))
            .collect()
    }
}

fn is_up(link: &Value) -> bool {
    link["flags"].as_array().into_iter().flatten().any(|f| f == "UP")
}

fn check_conf(o: &Opts) -> (Check, Option<Value>) {
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

fn check_plugins(o: &Opts, list: &Value) -> Check {
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

fn check_bridge(node: &Node, net: &Net) -> Vec<Check> {
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

fn check_hairpin(node: &Node, net: &Net) -> Check {
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

fn check_forwarding(net: &Net) -> Vec<Check> {
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

/// kube-proxy's rules in iptables (KUBE-SERVICES) or its own nft table.
fn kube_proxy_present() -> bool {
    let ipt = output(None, "iptables-save", &["-t", "nat"]).is_some_and(|s| s.contains(":KUBE-SERVICES"));
    ipt || output(None, "nft", &["list", "tables"]).is_some_and(|s| s.contains("kube-proxy"))
}

fn check_br_netfilter(net: &Net) -> Vec<Check> {
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

/// The addresses leased in `<dataDir>/<network>`: ip -> "container/ifname".
fn leases(net: &Net) -> BTreeMap<IpAddr, String> {
    let dir = net.data_dir.join(&net.name);
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Some(ip) = e.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) else { continue };
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let owner = text.trim().replace("\r\n", "/");
        out.insert(ip, owner);
    }
    out
}

/// RTM_GETNSID: the id this namespace gives the namespace open as `fd` (-1: none).
fn nsid_of(fd: i32) -> Option<i32> {
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
fn namespaces_by_nsid(wanted: &BTreeSet<i64>) -> BTreeMap<i64, PathBuf> {
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
fn pod_addresses(node: &Node, bridge: &str) -> Vec<(String, Option<Vec<IpAddr>>)> {
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

fn check_leases(node: &Node, net: &Net) -> (Check, BTreeMap<IpAddr, String>) {
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
    for (ip, owner) in &leased {
        if !live.contains(ip) {
            problems.push(format!("lease {ip} ({owner}): no pod interface has it"));
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

/// Masquerade entries: nft map elements of `inet cni_bridge`, else iptables comments.
fn masq_entries(network: &str) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    let prefix = format!("{network}/");
    let v: Value = output(None, "nft", &["-j", "list", "table", "inet", "cni_bridge"])
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    for item in v["nftables"].as_array().into_iter().flatten() {
        for pair in item["map"]["elem"].as_array().into_iter().flatten() {
            let key = &pair[0]["elem"];
            let (Some(ip), Some(owner)) = (key["val"].as_str(), key["comment"].as_str()) else { continue };
            if let (Ok(ip), Some(rest)) = (ip.parse(), owner.strip_prefix(&prefix)) {
                out.insert(ip, rest.to_string());
            }
        }
    }
    let marker = format!("--comment \"cni-bridge {prefix}");
    for save in ["iptables-save", "ip6tables-save"] {
        for l in output(None, save, &["-t", "nat"]).unwrap_or_default().lines() {
            let Some(at) = l.find(&marker) else { continue };
            let rest = &l[at + marker.len()..];
            let owner = rest.split('"').next().unwrap_or("");
            let src = l.split_whitespace().skip_while(|w| *w != "-s").nth(1).unwrap_or("");
            if let Ok(ip) = src.split('/').next().unwrap_or("").parse() {
                out.insert(ip, owner.to_string());
            }
        }
    }
    out
}

fn check_masq(net: &Net, leased: &BTreeMap<IpAddr, String>) -> Check {
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
    let mut problems = Vec::new();
    for (ip, owner) in leased {
        match entries.get(ip) {
            None => problems.push(format!("{ip} ({owner}) is leased but not masqueraded")),
            Some(o) if o != owner => problems.push(format!("{ip}: entry for {o}, lease for {owner}")),
            Some(_) => {}
        }
    }
    for (ip, owner) in &entries {
        if !leased.contains_key(ip) {
            problems.push(format!("entry {ip} ({owner}) has no lease"));
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

/// GET /metrics of the route agent; None when nothing answers.
fn metrics(addr: &str) -> Option<BTreeMap<String, f64>> {
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

fn check_routes(o: &Opts) -> Check {
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
fn check_policy(o: &Opts) -> Check {
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

fn check_mtu(node: &Node, net: &Net) -> Check {
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

/// A process living in `ns` (for its mount namespace's /etc/resolv.conf).
fn process_in(ns: &Path) -> Option<PathBuf> {
    let m = std::fs::metadata(ns).ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            && std::fs::metadata(p.join("ns/net")).is_ok_and(|x| x.dev() == m.dev() && x.ino() == m.ino())
    })
}

fn check_pod(ns: &Path, net: &Net) -> Vec<Check> {
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

fn run_checks(o: &Opts) -> Vec<Check> {
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

fn table(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<width$}  {:<6}  DETAIL\n", "CHECK", "RESULT");
    for c in checks {
        let r = match c.status {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        s.push_str(&format!("{:<width$}  {r:<6}  {}\n", c.check, c.detail));
        if !c.fix.is_empty() {
            s.push_str(&format!("{:<width$}  {:<6}  fix: {}\n", "", "", c.fix));
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    s.push_str(&format!("{} checks, {failed} failed\n", checks.len()));
    s
}

/// `cni-bridge doctor ARGS`: prints the checks; the process exit code.
pub fn main(args: &[String]) -> i32 {
    let o = match parse_args(args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return 0;
        }
        Err(e) => {
            eprintln!("cni-bridge doctor: {e}\n{USAGE}");
            return 2;
        }
    };
    let checks = run_checks(&o);
    if o.json {
        println!("{}", serde_json::to_string_pretty(&checks).unwrap_or_default());
    } else {
        print!("{}", table(&checks));
    }
    i32::from(checks.iter().any(|c| c.status == Status::Fail))
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

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse_args(&["--conf".into()]).is_err());
        assert!(parse_args(&["--bogus".into()]).is_err());
        let o = parse_args(&["--bin-dir".into(), "/a:/b".into(), "--json".into()]).unwrap();
        assert_eq!(o.bin_dirs, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(o.json);
    }
}
