//! `cni-route-agent doctor`: is this node's part of the path between nodes sound? The source
//! (read, timed, and the running agent's own view of it), conflicting claims in it, the
//! kernel against the plan (what `plan` would still change is what is wrong: a route missing
//! or stale, a nexthop, a tunnel device), each tunnelled peer's FDB and neighbour entries, the
//! conflist against the node's pod CIDRs, the masquerade table, the installed plugins against
//! the install record; then a probe of every peer's pod gateway, small and at the pod MTU with
//! DF (an unreachable peer, a tunnel losing packets, an MTU black hole), and the installed
//! `cni-bridge doctor`'s own checks of the bridge, the plugins and the agent's endpoint, run
//! rather than copied. Read-only, like `plan`, but for the probes' echo requests.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use serde::Serialize;
use serde_json::Value;

use crate::gateways::gateway_of;
use crate::kernel::Kernel;
use crate::model::{NodeInfo, Snapshot};
use crate::probe::{self, Echo};
use crate::{dryrun, install, vxlan, Options, Source};

/// One check's outcome.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub check: String,
    /// `pass`, `fail` or `skip`.
    pub status: String,
    /// What was found.
    pub detail: String,
    /// How to fix a failure.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

fn check(name: &str, status: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { check: name.into(), status: status.into(), detail: detail.into(), fix: fix.into() }
}

const AGENT_FIX: &str =
    "the agent is not running or its syncs fail: `kubectl -n kube-system logs ds/cni-route-agent` \
on this node, and its /readyz; it repairs this on its next sync";

const SOURCE_FIX: &str = "the agent's log names the source's error, and \
cni_route_agent_source_errors_total{kind} counts them: the nodes file, the API server or etcd \
must answer the agent, with the agent's own credentials";

/// Each try of a probe waits this long for its reply; a lost reply is tried once more.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const PROBE_ATTEMPTS: u16 = 2;
/// Peers probed at once: 100 peers, each lost, take 100 / 16 * 4 s at most, not 400 s.
const PROBE_WIDTH: usize = 16;
/// The pod MTU when the conflist sets none: the bridge plugin then leaves the kernel's.
const DEFAULT_MTU: usize = 1500;

/// Every check; `bin_dir` holds the installed plugins (`cni-bridge doctor` among them).
pub async fn run(opts: &Options, bin_dir: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let started = Instant::now();
    let snap = match dryrun::snapshot(opts).await {
        Ok(s) => s,
        Err(e) => {
            let fix = match opts.source {
                Source::Etcd(_) => "run the doctor with the daemon's flags but --source file or kubernetes",
                _ => SOURCE_FIX,
            };
            out.push(check("source", "fail", format!("{}: {e}", source_name(opts)), fix));
            out.push(agent_view(opts));
            return out;
        }
    };
    let took = started.elapsed().as_millis();
    out.push(check(
        "source",
        "pass",
        format!("{}: {} nodes, read by this doctor just now in {took} ms", source_name(opts), snap.len()),
        "",
    ));
    out.push(agent_view(opts));
    let plan = match dryrun::compute_from(opts, &snap).await {
        Ok(p) => p,
        Err(e) => {
            out.push(check(
                "source and kernel",
                "fail",
                e.to_string(),
                "check the source flags (--source, --nodes-file, --kubeconfig) and that it answers",
            ));
            return out;
        }
    };
    out.push(claims(&snap, &plan));
    let mine: Vec<String> = strings(&plan["pod_cidrs"]);
    if mine.is_empty() {
        out.push(check(
            "this node in the source",
            "fail",
            format!("{} is not listed, or has no pod CIDRs", opts.node_name),
            "give the node its pod CIDRs (kube-controller-manager --allocate-node-cidrs, or the nodes file)",
        ));
    } else {
        out.push(check("this node in the source", "pass", mine.join(", "), ""));
    }
    let pending = |kind: &str, v: &Value, show: &dyn Fn(&Value) -> String| -> Check {
        let items: Vec<String> = v.as_array().into_iter().flatten().map(show).collect();
        match items.is_empty() {
            true => check(kind, "pass", "as planned", ""),
            false => check(kind, "fail", items.join("; "), AGENT_FIX),
        }
    };
    let route = |r: &Value| format!("{} via {}", text(&r["dst"]), text(&r["via"]));
    out.push(pending("routes missing or wrong", &plan["routes"]["add_or_replace"], &route));
    out.push(pending("routes stale", &plan["routes"]["delete"], &route));
    out.push(pending("nexthops missing", &plan["nexthops"]["create"], &|n| {
        format!("via {}", text(&n["via"]))
    }));
    out.push(pending("nexthops stale", &plan["nexthops"]["delete"], &|n| format!("id {n}")));
    for dev in plan["tunnel"]["devices"].as_array().into_iter().flatten() {
        let name = text(&dev["name"]);
        let present = netlink_wire::process::run("ip", &["link", "show", "dev", &name], None).is_ok();
        out.push(match present {
            true => check("tunnel device", "pass", name, ""),
            false => check("tunnel device", "fail", format!("{name} missing"), AGENT_FIX),
        });
    }
    out.extend(tunnel_entries(opts, &snap, &plan).await);
    out.push(conflist(opts, &mine));
    if opts.masquerade {
        let present =
            netlink_wire::process::run("nft", &["list", "table", "inet", "cni_route_agent"], None).is_ok();
        out.push(match present {
            true => check("masquerade table", "pass", "inet cni_route_agent", ""),
            false => check("masquerade table", "fail", "table inet cni_route_agent missing", AGENT_FIX),
        });
    }
    out.push(installed(bin_dir));
    out.extend(peers(opts, &snap, &plan));
    out.extend(bridge_doctor(opts, bin_dir));
    out
}

fn source_name(opts: &Options) -> String {
    match &opts.source {
        Source::File(path) => format!("nodes file {}", path.display()),
        Source::Kubernetes(_) => "the Kubernetes API's Nodes".into(),
        Source::Etcd(_) => "etcd".into(),
    }
}

/// The running agent's view of the source (its `/metrics`): this doctor's own read is always
/// fresh, so what can be old is what the agent routes from.
fn agent_view(opts: &Options) -> Check {
    const NAME: &str = "source snapshot age";
    let metrics =
        match get_metrics(opts.listen) {
            Ok(m) => m,
            Err(e) => return check(
                NAME,
                "fail",
                format!(
                    "no agent answers at {}/metrics ({e}): nothing keeps this node's routes current",
                    opts.listen
                ),
                "start the agent on this node (its DaemonSet pod: `kubectl -n kube-system get pods -o wide \
| grep cni-route-agent`); its log says why it stopped",
            ),
        };
    let age = metrics.lines().find_map(|l| {
        l.strip_prefix("cni_route_agent_source_snapshot_age_seconds ")?.trim().parse::<f64>().ok()
    });
    let limit = match opts.max_snapshot_age {
        Some(max) => format!("; its /readyz fails after {} s", max.as_secs()),
        None => String::new(),
    };
    match age {
        None => check(
            NAME,
            "fail",
            "the agent has no complete view of the source yet, so it has not synced",
            SOURCE_FIX,
        ),
        Some(age) if age <= 0.0 => {
            check(NAME, "pass", "the agent's view is current (source_snapshot_age_seconds 0)", "")
        }
        Some(age) => check(
            NAME,
            "fail",
            format!(
                "the agent's source has failed for {age:.0} s: it routes from a view {age:.0} s old{limit}"
            ),
            SOURCE_FIX,
        ),
    }
}

/// `GET /metrics` from the agent's endpoint, bounded (a hung agent must not hang the doctor).
fn get_metrics(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    match body.starts_with("HTTP/1.1 200") || body.starts_with("HTTP/1.0 200") {
        true => Ok(body),
        false => Err(body.lines().next().unwrap_or("no answer").to_string()),
    }
}

/// Two nodes claiming overlapping pod CIDRs (the plan routes only the first claim), or the
/// same address (traffic for one goes to the other).
fn claims(snap: &Snapshot, plan: &Value) -> Check {
    const NAME: &str = "conflicting claims";
    let mut found: Vec<String> = plan["not_routed"]["conflicts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} claims {}, overlapping {}'s {} (not routed)",
                text(&c["node"]),
                text(&c["cidr"]),
                text(&c["owner"]),
                text(&c["owner_cidr"])
            )
        })
        .collect();
    let mut by_address: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
    for n in snap.values() {
        for a in [n.ipv4.map(IpAddr::V4), n.ipv6.map(IpAddr::V6)].into_iter().flatten() {
            by_address.entry(a).or_default().push(&n.name);
        }
    }
    for (addr, names) in by_address.iter().filter(|(_, names)| names.len() > 1) {
        found.push(format!("{} all list address {addr}", names.join(", ")));
    }
    let cidrs: usize = snap.values().map(|n| n.pod_cidrs.len()).sum();
    match found.is_empty() {
        true => {
            check(NAME, "pass", format!("none: {} nodes, {cidrs} pod CIDRs, each its own", snap.len()), "")
        }
        false => check(
            NAME,
            "fail",
            found.join("; "),
            "every node needs pod CIDRs and an address of its own: let kube-controller-manager \
--allocate-node-cidrs assign the CIDRs (or correct the nodes file / etcd subnets), and check each \
node's InternalIP (kubelet --node-ip)",
        ),
    }
}

/// The FDB entry (peer VTEP MAC -> its underlay address) and the neighbour entries (tunnel
/// gateway -> that MAC) each tunnelled peer needs, as the plan wants them, against the kernel.
async fn tunnel_entries(opts: &Options, snap: &Snapshot, plan: &Value) -> Vec<Check> {
    let list = |key: &str| plan["tunnel"][key].as_array().cloned().unwrap_or_default();
    let (fdb, neighbours) = (list("fdb"), list("neighbours"));
    if fdb.is_empty() && neighbours.is_empty() {
        return Vec::new();
    }
    let present = match Kernel::new(opts.route_protocol, opts.nexthops).await {
        Ok(k) => crate::kernel::vxlan::present_entries(&k).await,
        Err(e) => Err(e),
    };
    let present = match present {
        Ok(p) => p,
        Err(e) => return vec![check("tunnel entries", "fail", format!("reading them: {e}"), "")],
    };
    let mac = |m: &[u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let mut have_fdb = BTreeSet::new();
    let mut have_neigh = BTreeSet::new();
    for (dev, (f, n)) in &present {
        have_fdb.extend(f.iter().map(|(m, dst)| (dev.clone(), mac(m), dst.to_string())));
        have_neigh.extend(n.iter().map(|(ip, m)| (dev.clone(), ip.to_string(), mac(m))));
    }
    let mut out = Vec::new();
    for peer in snap.values().filter(|n| n.name != opts.node_name) {
        let addrs: Vec<String> = [peer.ipv4.map(IpAddr::V4), peer.ipv6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .map(|a| a.to_string())
            .collect();
        let gateways: Vec<String> = peer.pod_cidrs.iter().map(|c| c.network().to_string()).collect();
        let mut ok = Vec::new();
        let mut missing = Vec::new();
        for f in fdb.iter().filter(|f| addrs.contains(&text(&f["dst"]))) {
            let key = (text(&f["dev"]), text(&f["mac"]), text(&f["dst"]));
            let line = format!("fdb {} dst {} on {}", key.1, key.2, key.0);
            if have_fdb.contains(&key) {
                ok.push(line)
            } else {
                missing.push(line)
            }
        }
        for n in neighbours.iter().filter(|n| gateways.contains(&text(&n["ip"]))) {
            let key = (text(&n["dev"]), text(&n["ip"]), text(&n["mac"]));
            let line = format!("neighbour {} lladdr {} on {}", key.1, key.2, key.0);
            if have_neigh.contains(&key) {
                ok.push(line)
            } else {
                missing.push(line)
            }
        }
        let name = format!("peer {} tunnel entries", peer.name);
        match (ok.is_empty() && missing.is_empty(), missing.is_empty()) {
            (true, _) => {}
            (false, true) => out.push(check(&name, "pass", ok.join("; "), "")),
            (false, false) => out.push(check(
                &name,
                "fail",
                format!("missing: {}", missing.join("; ")),
                format!(
                    "{AGENT_FIX} (a running agent puts a deleted entry back at once: if they stay gone, \
it is not running, or something flushes them: `ip monitor neigh`)"
                ),
            )),
        }
    }
    out
}

/// The plugins in `bin_dir` against install-cni's record of what it wrote there.
fn installed(bin_dir: &Path) -> Check {
    const NAME: &str = "installed plugins";
    let Some(files) = install::verify(bin_dir) else {
        return check(
            NAME,
            "skip",
            format!(
                "no {} in {}: the plugins were not installed by install-cni",
                install::RECORD,
                bin_dir.display()
            ),
            "",
        );
    };
    let bad: Vec<String> =
        files.iter().filter_map(|(n, s)| s.as_ref().err().map(|e| format!("{n}: {e}"))).collect();
    match bad.is_empty() {
        true => check(
            NAME,
            "pass",
            format!("{} as install-cni wrote them", files.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")),
            "",
        ),
        false => check(
            NAME,
            "fail",
            format!("{} in {}", bad.join("; "), bin_dir.display()),
            format!(
                "reinstall: `cni-route-agent install-cni --bin-dir {}` (the DaemonSet's init container does \
it when the pod restarts)",
                bin_dir.display()
            ),
        ),
    }
}

/// One pod gateway to probe: a peer's pod CIDR of a family this node has too.
struct Target {
    peer: String,
    family: &'static str,
    /// This node's pod gateway of the family, the source: the pods' own path.
    from: IpAddr,
    local_cidr: IpNetwork,
    /// The peer's pod gateway (the first address of its pod CIDR, on its bridge).
    gw: IpAddr,
    /// The peer's node address, probed when its gateway does not answer.
    node: Option<IpAddr>,
    path: Way,
}

/// How this node reaches a peer's pod CIDR, as the plan has it.
enum Way {
    Direct(IpAddr),
    Tunnel {
        dev: String,
        dst: String,
    },
    /// Why not, and the fix.
    NotRouted(&'static str, &'static str),
}

impl std::fmt::Display for Way {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Way::Direct(via) => write!(f, "direct via {via}"),
            Way::Tunnel { dev, dst } => write!(f, "through the tunnel {dev} to {dst}"),
            Way::NotRouted(why, _) => write!(f, "not routed by this node: {why}"),
        }
    }
}

/// How the plan reaches `cidr` of `peer`.
fn path_to(plan: &Value, peer: &NodeInfo, cidr: &IpNetwork) -> Way {
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let tunnel_gw = cidr.network().to_string();
    if let Some(n) = list(&plan["tunnel"]["neighbours"]).iter().find(|n| text(&n["ip"]) == tunnel_gw) {
        let dst = list(&plan["tunnel"]["fdb"])
            .iter()
            .find(|f| f["mac"] == n["mac"])
            .map(|f| text(&f["dst"]))
            .unwrap_or_default();
        return Way::Tunnel { dev: text(&n["dev"]), dst };
    }
    let nr = &plan["not_routed"];
    if list(&nr["conflicts"])
        .iter()
        .any(|c| text(&c["node"]) == peer.name && text(&c["cidr"]) == cidr.to_string())
    {
        return Way::NotRouted("its claim overlaps another node's", "see `conflicting claims`");
    }
    if list(&nr["off_link"]).iter().any(|o| text(&o["node"]) == peer.name) {
        return Way::NotRouted(
            "its address is on no connected subnet and no tunnel reaches it",
            "--backend auto tunnels to nodes on other subnets (VXLAN), or put the nodes on one subnet",
        );
    }
    match peer.addr_for(cidr) {
        Some(via) => Way::Direct(via),
        None => Way::NotRouted(
            "it lists no address of this family",
            "the node must publish an address of each family it has pod CIDRs of (its InternalIP)",
        ),
    }
}

/// Every peer's pod gateway, probed from this node's, in parallel.
fn peers(opts: &Options, snap: &Snapshot, plan: &Value) -> Vec<Check> {
    let Some(me) = snap.get(&opts.node_name) else { return Vec::new() };
    let lacking: Vec<String> = strings(&plan["bridge_gateways"]["add"]);
    let (mtu, mtu_from) = pod_mtu(opts);
    let mut out = Vec::new();
    let mut targets = Vec::new();
    for peer in snap.values().filter(|n| n.name != me.name) {
        for cidr in &peer.pod_cidrs {
            let family = if cidr.is_ipv4() { "IPv4" } else { "IPv6" };
            let name = format!("peer {} {family}", peer.name);
            let Some(gw) = gateway_of(cidr).map(|g| g.ip()) else { continue };
            let local = me.pod_cidrs.iter().find(|c| c.is_ipv4() == cidr.is_ipv4());
            let Some((local_cidr, from)) = local.and_then(|c| Some((*c, gateway_of(c)?))) else {
                out.push(check(
                    &name,
                    "skip",
                    format!("this node has no {family} pod CIDR to probe {gw} from"),
                    "",
                ));
                continue;
            };
            // No bridge, or no gateway on it: no pod here yet (the first ADD makes both).
            if plan["bridge_gateways"].is_null() || lacking.contains(&from.to_string()) {
                out.push(check(
                    &name,
                    "skip",
                    format!("this node's bridge has no {} to probe {gw} from: no pod here yet", from.ip()),
                    "",
                ));
                continue;
            }
            let path = path_to(plan, peer, cidr);
            // Not probed: its gateway may even be an address of this node (a claim of this
            // node's own CIDR), which would answer.
            if let Way::NotRouted(why, fix) = path {
                let detail =
                    format!("{cidr} is not routed by this node: {why}; no pod here reaches its pods");
                out.push(check(&name, "fail", detail, fix));
                continue;
            }
            let node = match &path {
                Way::Direct(via) => Some(*via),
                Way::Tunnel { dst, .. } => dst.parse().ok(),
                Way::NotRouted(..) => None,
            };
            targets.push(Target {
                peer: peer.name.clone(),
                family,
                from: from.ip(),
                local_cidr,
                gw,
                node,
                path,
            });
        }
    }
    let peer_count = targets.iter().map(|t| &t.peer).collect::<BTreeSet<_>>().len();
    let started = Instant::now();
    let results = parallel(&targets, PROBE_WIDTH, |t| verdict(opts, t, mtu));
    let failed = out.iter().chain(&results).filter(|c| c.status == "fail").count();
    out.push(check(
        "peers probed",
        if failed == 0 { "pass" } else { "fail" },
        format!(
            "{peer_count} peers, {} pod gateways, {PROBE_WIDTH} at a time, in {:.1} s: {failed} failed; \
probes of {SMALL} bytes and of the pod MTU {mtu} ({mtu_from}) with DF",
            targets.len(),
            started.elapsed().as_secs_f64(),
            SMALL = probe::SMALL,
        ),
        if failed == 0 { "" } else { "the failed `peer` checks say what to fix" },
    ));
    out.extend(results);
    out
}

/// The MTU the conflist gives pods, and where it came from.
fn pod_mtu(opts: &Options) -> (usize, String) {
    let path = opts.cni_conf_dir.join(&opts.cni_conf_name);
    let list: Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    match list["plugins"][0]["mtu"].as_u64().and_then(|m| usize::try_from(m).ok()) {
        Some(m) => (m, "the conflist's".into()),
        None => (DEFAULT_MTU, "the kernel's default: the conflist sets none".into()),
    }
}

/// Runs `f` over `items`, `width` at a time, results in the items' order.
fn parallel<T: Sync, R: Send>(items: &[T], width: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..width.min(items.len()))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break mine };
                        mine.push((i, f(item)));
                    }
                })
            })
            .collect();
        workers.into_iter().filter_map(|w| w.join().ok()).flatten().collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Probes one pod gateway: small first (is it reachable at all?), then at the pod MTU with DF
/// (does a full-size packet get through?); when the small one fails, the peer's node address
/// (is the node up, and the loss in the pod path or tunnel?).
fn verdict(opts: &Options, t: &Target, mtu: usize) -> Check {
    let name = format!("peer {} {}", t.peer, t.family);
    let small = probe::echo(Some(t.from), t.gw, probe::SMALL, PROBE_TIMEOUT, PROBE_ATTEMPTS);
    if matches!(small, Echo::Answered(_)) {
        let overhead = match &t.path {
            Way::Tunnel { dst, .. } if dst.contains(':') => {
                format!(" + {} for VXLAN over IPv6", vxlan::OVERHEAD_V6)
            }
            Way::Tunnel { .. } => format!(" + {} for VXLAN over IPv4", vxlan::OVERHEAD_V4),
            _ => String::new(),
        };
        let fix = format!(
            "a link between the nodes carries less than the pod MTU {mtu}{overhead}: raise the MTU on every \
hop of the underlay, or give pods less with --mtu (a pod keeps its MTU until it is recreated)"
        );
        return match probe::echo(Some(t.from), t.gw, mtu, PROBE_TIMEOUT, PROBE_ATTEMPTS) {
            Echo::Answered(rtt) => check(
                &name,
                "pass",
                format!(
                    "{} answers {}: {}-byte and {mtu}-byte packets with DF, in {} ms ({})",
                    t.gw,
                    t.from,
                    probe::SMALL,
                    rtt.as_millis(),
                    t.path
                ),
                "",
            ),
            Echo::Lost => check(
                &name,
                "fail",
                format!(
                    "MTU black hole: packets of {mtu} bytes are lost on the path to {} ({}; {} answers small ones)",
                    t.peer, t.path, t.gw
                ),
                fix,
            ),
            Echo::TooBig(pmtu) => check(
                &name,
                "fail",
                format!(
                    "packets of {mtu} bytes do not fit the path to {} ({}): refused with DF{}",
                    t.peer,
                    t.path,
                    pmtu.map(|m| format!(", the path MTU is {m}")).unwrap_or_default()
                ),
                fix,
            ),
            Echo::Failed(e) => check(
                &name,
                "fail",
                format!("packets of {mtu} bytes to {} fail: {e} ({}; small ones pass)", t.gw, t.path),
                fix,
            ),
        };
    }
    let why = match &small {
        Echo::Failed(e) => format!(" ({e})"),
        _ => String::new(),
    };
    let node_answers = t.node.is_some_and(|n| {
        matches!(probe::echo(None, n, probe::SMALL, PROBE_TIMEOUT, PROBE_ATTEMPTS), Echo::Answered(_))
    });
    let node = t.node.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    let (detail, fix) = match (&t.path, node_answers) {
        (_, false) => (
            format!("peer unreachable: neither its pod gateway {} ({}) nor its address {node} answers{why}", t.gw, t.path),
            format!(
                "{} is down or cut off from this node: `kubectl get node {}`; a node gone for good: delete its \
Node (or its entry in the nodes file), and its routes go",
                t.peer, t.peer
            ),
        ),
        (Way::Tunnel { dev, dst }, true) => (
            format!(
                "no answer from {} through the tunnel {dev} to {dst}{why}, though {node} itself answers: \
the tunnel loses packets",
                t.gw
            ),
            format!(
                "let UDP port {} pass between this node and {dst} (firewalls, security groups, routers \
between them); if it does, the VXLAN checksum offload bug: `ethtool -K {dev} tx-checksum-ip-generic off` \
on both nodes; and {}'s agent must run (its {dev} and its route back to {})",
                opts.vxlan.port, t.peer, t.local_cidr
            ),
        ),
        (Way::Direct(via), true) => (
            format!("no answer from {} (direct via {via}){why}, though {node} itself answers", t.gw),
            format!(
                "on {}: cni0 needs {} (a node without pods has no bridge yet: its first pod makes it), \
forwarding on, and a route back to {}: run `cni-route-agent doctor` there",
                t.peer, t.gw, t.local_cidr
            ),
        ),
        (Way::NotRouted(reason, fix), true) => {
            (format!("no answer from {}{why}: this node does not route to it ({reason})", t.gw), fix.to_string())
        }
    };
    check(&name, "fail", detail, fix)
}

/// The conflist the agent writes: present, and over exactly the node's pod CIDRs.
fn conflist(opts: &Options, mine: &[String]) -> Check {
    let path = opts.cni_conf_dir.join(&opts.cni_conf_name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return check("conflist", "fail", format!("{}: {e}", path.display()), AGENT_FIX),
    };
    let list: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let ranges: BTreeSet<String> = list["plugins"][0]["ipam"]["ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|set| set[0]["subnet"].as_str()?.parse::<IpNetwork>().ok())
        .map(|n| n.to_string())
        .collect();
    let want: BTreeSet<String> = mine.iter().cloned().collect();
    if ranges == want {
        check("conflist", "pass", format!("{} over {}", path.display(), mine.join(", ")), "")
    } else {
        check(
            "conflist",
            "fail",
            format!("{} has ranges {:?}, the node's pod CIDRs are {:?}", path.display(), ranges, want),
            AGENT_FIX,
        )
    }
}

/// `cni-bridge doctor --json` of the installed plugin, against the agent's conflist.
fn bridge_doctor(opts: &Options, bin_dir: &Path) -> Vec<Check> {
    let plugin = bin_dir.join("cni-bridge");
    if !plugin.exists() {
        return vec![check(
            "cni-bridge doctor",
            "fail",
            format!("{} missing", plugin.display()),
            "install the plugins: cni-route-agent install-cni --bin-dir <dir>",
        )];
    }
    let conf = opts.cni_conf_dir.join(&opts.cni_conf_name).display().to_string();
    let (bins, listen) = (bin_dir.display().to_string(), opts.listen.to_string());
    let args = ["doctor", "--json", "--conf", &conf, "--bin-dir", &bins, "--metrics", &listen];
    // Exit status 1 only says some check failed: the checks are on stdout either way.
    let stdout = match std::process::Command::new(&plugin).args(args).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => return vec![check("cni-bridge doctor", "fail", e.to_string(), "")],
    };
    match serde_json::from_str::<Vec<Value>>(&stdout) {
        Ok(checks) => checks
            .iter()
            .map(|c| Check {
                check: format!("bridge: {}", text(&c["check"])),
                status: text(&c["status"]).to_lowercase(),
                detail: text(&c["detail"]),
                fix: c["fix"].as_str().unwrap_or("").to_string(),
            })
            .collect(),
        Err(e) => vec![check("cni-bridge doctor", "fail", format!("unreadable output: {e}"), "")],
    }
}

fn text(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(text).collect()
}

/// The checks for people, with the fix under each failure.
pub fn table(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<width$}  {:<6}  DETAIL\n", "CHECK", "RESULT");
    for c in checks {
        let status = if c.status == "fail" { "FAIL" } else { c.status.as_str() };
        s.push_str(&format!("{:<width$}  {status:<6}  {}\n", c.check, c.detail));
        if !c.fix.is_empty() {
            s.push_str(&format!("{:<width$}  {:<6}  fix: {}\n", "", "", c.fix));
        }
    }
    let failed = checks.iter().filter(|c| c.status == "fail").count();
    s.push_str(&format!("{} checks, {failed} failed\n", checks.len()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_the_fix_under_a_failure_and_counts() {
        let t = table(&[
            check("routes missing or wrong", "fail", "10.244.2.0/24 via 10.200.0.12", "restart it"),
            check("conflist", "pass", "ok", ""),
        ]);
        assert!(t.contains("routes missing or wrong  FAIL    10.244.2.0/24 via 10.200.0.12"), "{t}");
        assert!(t.contains("fix: restart it") && t.ends_with("2 checks, 1 failed\n"), "{t}");
    }

    #[test]
    fn overlapping_pod_cidrs_and_a_shared_address_are_conflicting_claims() {
        let node = |name: &str, cidr: &str, ip: &str| {
            let info = NodeInfo::with_addresses(name, vec![cidr.parse().unwrap()], &[ip.parse().unwrap()]);
            (name.to_string(), info)
        };
        let snap: Snapshot = [
            node("a", "10.244.1.0/24", "10.200.0.11"),
            node("b", "10.244.2.0/24", "10.200.0.12"),
            node("c", "10.244.3.0/24", "10.200.0.13"),
        ]
        .into_iter()
        .collect();
        let plan = serde_json::json!({"not_routed": {"conflicts": []}});
        let c = claims(&snap, &plan);
        assert_eq!(
            (c.status.as_str(), c.detail.as_str()),
            ("pass", "none: 3 nodes, 3 pod CIDRs, each its own")
        );
        let mut shared = snap.clone();
        shared.extend([node("c", "10.244.3.0/24", "10.200.0.12")]);
        let plan = serde_json::json!({"not_routed": {"conflicts": [
            {"node": "c", "cidr": "10.244.2.0/23", "owner": "b", "owner_cidr": "10.244.2.0/24"}
        ]}});
        let c = claims(&shared, &plan);
        assert_eq!(c.status, "fail");
        assert!(
            c.detail.contains("c claims 10.244.2.0/23, overlapping b's 10.244.2.0/24 (not routed)"),
            "{c:?}"
        );
        assert!(c.detail.contains("b, c all list address 10.200.0.12") && !c.fix.is_empty(), "{c:?}");
    }

    #[test]
    fn parallel_keeps_the_order_and_runs_every_item_once() {
        let items: Vec<usize> = (0..100).collect();
        assert_eq!(parallel(&items, 7, |i| i * 2), items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert!(parallel(&Vec::<usize>::new(), 7, |i| *i).is_empty());
    }
}
