//! From the cluster's pods, namespaces and policies to the nftables state that enforces them on
//! this node: pure, so every case is testable without a kernel.
//!
//! The state has two parts. The *skeleton* (sets declared, chains, rules, and the elements
//! that only policies decide: ipBlocks, port lists) changes only when a policy does. The
//! *elements* of the pod sets (who is selected, who is a peer, which port a name resolves to)
//! follow pods and labels; pod churn changes only those, so it goes into the kernel as element
//! updates, never as a new rule set.
//!
//! Every packet the forward hook sees (routed, and bridged between pods of this node through
//! `br_netfilter`) that is not part of an allowed connection goes through
//! `egress` (is the source a local pod isolated for egress? then one of its policies must
//! allow it) and then `ingress` (the same for the destination). The input hook applies the
//! egress half to what local pods send to the node itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::model::{Labels, Namespace, Peer, Pod, Policy, PortMatch, Protocol, Rule};

/// Everything the engine knows, by `namespace/name` (pods, policies) and name (namespaces).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    /// Pods.
    pub pods: BTreeMap<String, Pod>,
    /// Namespaces.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Policies.
    pub policies: BTreeMap<String, Policy>,
}

/// The nftables state for one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    /// nft commands that declare the table's sets, chains and rules (after `add table`).
    pub skeleton: String,
    /// The elements of each pod set, as nft writes them.
    pub elements: BTreeMap<String, BTreeSet<String>>,
    /// Local pods selected by at least one policy.
    pub selected_pods: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

impl Dir {
    fn tag(self) -> &'static str {
        match self {
            Dir::Ingress => "i",
            Dir::Egress => "e",
        }
    }
    /// The field naming the peer: who sent it (ingress) or where it goes (egress).
    fn peer_field(self) -> &'static str {
        match self {
            Dir::Ingress => "saddr",
            Dir::Egress => "daddr",
        }
    }
    /// An allowed packet: past egress it still needs the destination's ingress check.
    fn allow(self) -> &'static str {
        match self {
            Dir::Ingress => "accept",
            Dir::Egress => "goto ingress",
        }
    }
}

const FAMILIES: [(&str, &str, bool); 2] = [("ip", "ipv4_addr", true), ("ip6", "ipv6_addr", false)];

/// Neighbour discovery and MLD keep the link working whatever a policy says, as ARP does.
const ICMPV6_LINK: &str = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, \
                           nd-router-advert, mld-listener-query, mld-listener-report, mld2-listener-report } accept";

/// Indexes of the cluster the compiler asks many times.
struct View<'a> {
    node: &'a str,
    /// Each pod's addresses that it owns (a reused address belongs to the newest pod), by
    /// the pod's address in memory: asked for in every rule, so no key is built per call.
    ips: HashMap<*const Pod, Vec<IpAddr>>,
    /// Pods by namespace, only those that can be a policy's subject or peer.
    by_ns: BTreeMap<&'a str, Vec<&'a Pod>>,
    /// Labels of the namespaces pods live in (the name label alone for one not listed).
    ns_labels: HashMap<&'a str, std::borrow::Cow<'a, Labels>>,
}

impl<'a> View<'a> {
    fn new(cluster: &'a Cluster, node: &'a str) -> View<'a> {
        let mut owner: HashMap<IpAddr, &Pod> = HashMap::new();
        for pod in cluster.pods.values().filter(|p| !p.host_network) {
            for ip in &pod.ips {
                let newer =
                    owner.get(ip).is_none_or(|cur| (&pod.created, pod.key()) > (&cur.created, cur.key()));
                if newer {
                    owner.insert(*ip, pod);
                }
            }
        }
        let mut ips: HashMap<*const Pod, Vec<IpAddr>> = HashMap::new();
        let mut by_ns: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        for pod in cluster.pods.values() {
            if pod.host_network {
                continue;
            }
            let own: Vec<IpAddr> = pod
                .ips
                .iter()
                .copied()
                .filter(|ip| owner.get(ip).is_some_and(|o| std::ptr::eq(*o, pod)))
                .collect();
            ips.insert(pod as *const Pod, own);
            by_ns.entry(pod.namespace.as_str()).or_default().push(pod);
        }
        let ns_labels = by_ns
            .keys()
            .map(|ns| {
                let labels = match cluster.namespaces.get(*ns) {
                    Some(n) => std::borrow::Cow::Borrowed(&n.labels),
                    None => std::borrow::Cow::Owned(Namespace::new(ns, Labels::new()).labels),
                };
                (*ns, labels)
            })
            .collect();
        View { node, ips, by_ns, ns_labels }
    }

    fn ips_of(&self, pod: &Pod) -> &[IpAddr] {
        self.ips.get(&(pod as *const Pod)).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The local pods a policy selects.
    fn selected(&self, p: &Policy) -> Vec<&'a Pod> {
        self.by_ns
            .get(p.namespace.as_str())
            .into_iter()
            .flatten()
            .filter(|pod| pod.node == self.node && p.selector.matches(&pod.labels))
            .copied()
            .collect()
    }

    /// The pods, anywhere in the cluster, that a rule's pod peers name.
    fn peer_pods(&self, policy_ns: &str, peers: &[Peer]) -> Vec<&'a Pod> {
        let mut out: Vec<&Pod> = Vec::new();
        for peer in peers {
            let Peer::Pods { namespaces, pods } = peer else { continue };
            let spaces: Vec<&str> = match namespaces {
                None => vec![policy_ns],
                Some(sel) => self
                    .by_ns
                    .keys()
                    .copied()
                    .filter(|ns| self.ns_labels.get(ns).is_some_and(|l| sel.matches(l)))
                    .collect(),
            };
            for ns in spaces {
                for pod in self.by_ns.get(ns).into_iter().flatten() {
                    if pods.as_ref().is_none_or(|s| s.matches(&pod.labels)) {
                        out.push(pod);
                    }
                }
            }
        }
        out
    }
}

/// The state that enforces `cluster`'s policies for the pods of `node`, in table `inet {table}`.
pub fn compile(cluster: &Cluster, node: &str, table: &str) -> Desired {
    let view = View::new(cluster, node);
    let mut c =
        Compiler { table, skeleton: String::new(), elements: BTreeMap::new(), shared: HashMap::new() };
    c.base_chains();
    for pod in view.by_ns.values().flatten().filter(|p| p.node == node) {
        for ip in view.ips_of(pod) {
            let set = if ip.is_ipv4() { "self4" } else { "self6" };
            c.fill(set, std::iter::once(format!("{ip} . {ip}")));
        }
    }
    let mut selected_any: BTreeSet<String> = BTreeSet::new();
    let mut ingress_dispatch = String::new();
    let mut egress_dispatch = String::new();
    for (k, policy) in cluster.policies.values().enumerate() {
        let sel = view.selected(policy);
        for f in FAMILIES {
            let set = format!("p{k}_sel{}", fam_digit(f));
            c.set(&set, f.1, "");
            c.fill(
                &set,
                sel.iter().flat_map(|pod| view.ips_of(pod)).filter(|ip| ip.is_ipv4() == f.2).map(ip_text),
            );
        }
        selected_any.extend(sel.iter().map(|p| p.key()));
        for (dir, rules, dispatch) in [
            (Dir::Ingress, &policy.ingress, &mut ingress_dispatch),
            (Dir::Egress, &policy.egress, &mut egress_dispatch),
        ] {
            let Some(rules) = rules else { continue };
            let chain = format!("p{k}_{}", dir.tag());
            let who = match dir {
                Dir::Ingress => "daddr",
                Dir::Egress => "saddr",
            };
            for f in FAMILIES {
                let iso = format!("{}iso{}", dir.tag(), fam_digit(f));
                c.fill(
                    &iso,
                    sel.iter().flat_map(|pod| view.ips_of(pod)).filter(|ip| ip.is_ipv4() == f.2).map(ip_text),
                );
                let _ = writeln!(
                    dispatch,
                    "add rule inet {table} {}_isolated {} {who} @p{k}_sel{} jump {chain}",
                    dir_name(dir),
                    f.0,
                    fam_digit(f)
                );
            }
            let _ = writeln!(c.skeleton, "add chain inet {table} {chain}");
            for rule in rules {
                c.rule(&view, policy, dir, &chain, rule);
            }
        }
    }
    c.skeleton.push_str(&ingress_dispatch);
    c.skeleton.push_str(&egress_dispatch);
    for dir in [Dir::Ingress, Dir::Egress] {
        let name = dir_name(dir);
        let _ = writeln!(c.skeleton, "add rule inet {table} {name}_isolated counter name {name}_denied drop");
    }
    Desired { skeleton: c.skeleton, elements: c.elements, selected_pods: selected_any.len() }
}

fn dir_name(dir: Dir) -> &'static str {
    match dir {
        Dir::Ingress => "ingress",
        Dir::Egress => "egress",
    }
}

fn fam_digit(f: (&str, &str, bool)) -> char {
    if f.2 {
        '4'
    } else {
        '6'
    }
}

fn ip_text(ip: &IpAddr) -> String {
    ip.to_string()
}

struct Compiler<'t> {
    table: &'t str,
    skeleton: String,
    elements: BTreeMap<String, BTreeSet<String>>,
    /// Sets by what they hold: rules that name the same peers (every policy allowing "from
    /// namespaces labelled env=prod", say) share one set, so a big cluster's table holds each
    /// pod's address a few times, not once per policy.
    shared: HashMap<String, String>,
}

impl Compiler<'_> {
    fn base_chains(&mut self) {
        let t = self.table;
        let mut s = String::new();
        for f in FAMILIES {
            let d = fam_digit(f);
            // Who is isolated, and every pod's own pair (a pod reaching itself through a
            // Service VIP is like loopback: always allowed).
            for set in [format!("iiso{d}"), format!("eiso{d}")] {
                let _ = writeln!(s, "add set inet {t} {set} {{ type {}; }}", f.1);
                self.elements.entry(set).or_default();
            }
            let _ = writeln!(s, "add set inet {t} self{d} {{ type {0} . {0}; }}", f.1);
            self.elements.entry(format!("self{d}")).or_default();
        }
        let _ = writeln!(s, "add counter inet {t} ingress_denied");
        let _ = writeln!(s, "add counter inet {t} egress_denied");
        // Before kube-proxy's and Docker's filter chains (priority 0): a denied packet never
        // reaches them, an allowed one still does.
        let _ = writeln!(
            s,
            "add chain inet {t} forward {{ type filter hook forward priority filter - 5; policy accept; }}"
        );
        let _ = writeln!(
            s,
            "add chain inet {t} input {{ type filter hook input priority filter - 5; policy accept; }}"
        );
        for chain in ["egress", "ingress", "egress_isolated", "ingress_isolated"] {
            let _ = writeln!(s, "add chain inet {t} {chain}");
        }
        for hook in ["forward", "input"] {
            let _ = writeln!(s, "add rule inet {t} {hook} ct state established,related accept");
            let _ = writeln!(s, "add rule inet {t} {hook} {ICMPV6_LINK}");
        }
        let _ = writeln!(s, "add rule inet {t} forward ip saddr . ip daddr @self4 accept");
        let _ = writeln!(s, "add rule inet {t} forward ip6 saddr . ip6 daddr @self6 accept");
        let _ = writeln!(s, "add rule inet {t} forward jump egress");
        let _ = writeln!(s, "add rule inet {t} forward goto ingress");
        // What a local pod sends to the node itself passes only its egress policies.
        let _ = writeln!(s, "add rule inet {t} input jump egress");
        let _ = writeln!(s, "add rule inet {t} egress ip saddr @eiso4 goto egress_isolated");
        let _ = writeln!(s, "add rule inet {t} egress ip6 saddr @eiso6 goto egress_isolated");
        let _ = writeln!(s, "add rule inet {t} ingress ip daddr @iiso4 goto ingress_isolated");
        let _ = writeln!(s, "add rule inet {t} ingress ip6 daddr @iiso6 goto ingress_isolated");
        let _ = writeln!(s, "add rule inet {t} ingress accept");
        self.skeleton.push_str(&s);
    }

    /// The name of the set(s) holding what `key` describes, and whether this is its first use
    /// (the caller then declares and fills it).
    fn shared_name(&mut self, key: String) -> (String, bool) {
        if let Some(name) = self.shared.get(&key) {
            return (name.clone(), false);
        }
        let name = format!("s{}", self.shared.len());
        self.shared.insert(key, name.clone());
        (name, true)
    }

    /// Declares a set (once).
    fn set(&mut self, name: &str, ty: &str, flags: &str) {
        let _ = writeln!(self.skeleton, "add set inet {} {name} {{ type {ty};{flags} }}", self.table);
        self.elements.entry(name.to_string()).or_default();
    }

    fn fill(&mut self, set: &str, items: impl Iterator<Item = String>) {
        self.elements.entry(set.to_string()).or_default().extend(items);
    }

    /// The rules of one ingress or egress rule, in chain `chain`, sets named from `prefix`.
    fn rule(&mut self, view: &View, policy: &Policy, dir: Dir, chain: &str, rule: &Rule) {
        let t = self.table;
        let field = dir.peer_field();
        let comment = format!("comment \"{}\"", policy.key().replace('"', ""));
        // Peer expressions: (family or None for both, expression).
        let mut peers: Vec<(Option<bool>, String)> = Vec::new();
        match &rule.peers {
            None => peers.push((None, String::new())),
            Some(list) => {
                // One set per distinct pod peer: the same selector in many policies is one set.
                let mut pod_sets = Vec::new();
                for peer in list.iter().filter(|p| matches!(p, Peer::Pods { .. })) {
                    let one = std::slice::from_ref(peer);
                    let Some(key) = peers_key(&policy.namespace, one) else { continue };
                    let (name, new) = self.shared_name(format!("pods:{key}"));
                    if new {
                        let pods = view.peer_pods(&policy.namespace, one);
                        for f in FAMILIES {
                            let set = format!("{name}_pods{}", fam_digit(f));
                            self.set(&set, f.1, "");
                            self.fill(
                                &set,
                                pods.iter()
                                    .flat_map(|p| view.ips_of(p))
                                    .filter(|ip| ip.is_ipv4() == f.2)
                                    .map(ip_text),
                            );
                        }
                    }
                    if !pod_sets.contains(&name) {
                        pod_sets.push(name);
                    }
                }
                for f in FAMILIES {
                    let d = fam_digit(f);
                    for name in &pod_sets {
                        peers.push((Some(f.2), format!("{} {field} @{name}_pods{d}", f.0)));
                    }
                    let ranges = block_ranges(list, f.2);
                    if !ranges.is_empty() {
                        let elems: Vec<String> =
                            ranges.iter().map(|(a, b)| range_text(*a, *b, f.2)).collect();
                        let elems = elems.join(", ");
                        let (name, new) = self.shared_name(format!("cidr{d}:{elems}"));
                        let set = format!("{name}_cidr{d}");
                        if new {
                            let _ = writeln!(
                                self.skeleton,
                                "add set inet {t} {set} {{ type {}; flags interval; elements = {{ {elems} }}; }}",
                                f.1,
                            );
                        }
                        peers.push((Some(f.2), format!("{} {field} @{set}", f.0)));
                    }
                }
            }
        }
        // Port expressions, the same way.
        let mut ports: Vec<(Option<bool>, String)> = Vec::new();
        match &rule.ports {
            None => ports.push((None, String::new())),
            Some(list) => {
                let mut numeric: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
                let mut named: BTreeSet<(Protocol, &str)> = BTreeSet::new();
                for p in list {
                    match &p.port {
                        PortMatch::Any => numeric.entry(p.protocol).or_default().push((1, 65535)),
                        PortMatch::Range(a, b) => numeric.entry(p.protocol).or_default().push((*a, *b)),
                        PortMatch::Named(n) => {
                            named.insert((p.protocol, n));
                        }
                    }
                }
                for (proto, ranges) in numeric {
                    let list: Vec<String> =
                        merge_ranges(ranges.iter().map(|(a, b)| (*a as u128, *b as u128)).collect())
                            .into_iter()
                            .map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
                            .collect();
                    let expr = if list.as_slice() == ["1-65535"] {
                        format!("meta l4proto {}", proto.nft())
                    } else {
                        // One port or range is matched inline, never as an anonymous set: a set
                        // per rule costs the kernel more than the rule (8,000 rules with a
                        // two-port set each took 11 s to load here, 0.6 s with one port inline).
                        match list.as_slice() {
                            [one] => format!("meta l4proto {} th dport {one}", proto.nft()),
                            _ => format!("meta l4proto {} th dport {{ {} }}", proto.nft(), list.join(", ")),
                        }
                    };
                    ports.push((None, expr));
                }
                if !named.is_empty() {
                    // Named ports resolve on the destination: the selected pod for ingress,
                    // the peer for egress (every pod when the rule names no peer).
                    let whose = match (dir, &rule.peers) {
                        (Dir::Ingress, _) => format!("selected by {}", policy.key()),
                        (Dir::Egress, Some(list)) => peers_key(&policy.namespace, list).unwrap_or_default(),
                        (Dir::Egress, None) => "every pod".to_string(),
                    };
                    let (name, new) = self.shared_name(format!("named:{named:?}:{whose}"));
                    let targets: Vec<&Pod> = match (new, dir, &rule.peers) {
                        (false, _, _) => Vec::new(),
                        (true, Dir::Ingress, _) => view.selected(policy),
                        (true, Dir::Egress, Some(list)) => view.peer_pods(&policy.namespace, list),
                        (true, Dir::Egress, None) => view.by_ns.values().flatten().copied().collect(),
                    };
                    for f in FAMILIES {
                        let set = format!("{name}_named{}", fam_digit(f));
                        ports.push((Some(f.2), format!("{} daddr . meta l4proto . th dport @{set}", f.0)));
                        if !new {
                            continue;
                        }
                        self.set(&set, &format!("{} . inet_proto . inet_service", f.1), "");
                        let mut items = Vec::new();
                        for pod in &targets {
                            for np in
                                pod.ports.iter().filter(|np| named.contains(&(np.protocol, np.name.as_str())))
                            {
                                for ip in view.ips_of(pod).iter().filter(|ip| ip.is_ipv4() == f.2) {
                                    items.push(format!("{ip} . {} . {}", np.protocol.nft(), np.port));
                                }
                            }
                        }
                        self.fill(&set, items.into_iter());
                    }
                }
            }
        }
        for (pf, pe) in &peers {
            for (of, oe) in &ports {
                if let (Some(a), Some(b)) = (pf, of) {
                    if a != b {
                        continue;
                    }
                }
                let exprs: Vec<&str> =
                    [pe.as_str(), oe.as_str()].into_iter().filter(|e| !e.is_empty()).collect();
                let _ = writeln!(
                    self.skeleton,
                    "add rule inet {t} {chain} {} {} {comment}",
                    exprs.join(" "),
                    dir.allow()
                );
            }
        }
    }
}

/// What a rule's pod peers select, written so that two rules selecting the same pods (by the
/// same selectors, a missing namespace selector spelled as the policy's namespace) get the
/// same text; `None` when the rule has no pod peers.
fn peers_key(policy_ns: &str, peers: &[Peer]) -> Option<String> {
    let mut parts: Vec<String> = peers
        .iter()
        .filter_map(|p| match p {
            Peer::Pods { namespaces, pods } => Some(match namespaces {
                None => format!("ns={policy_ns:?} pods={pods:?}"),
                Some(sel) => format!("ns~{sel:?} pods={pods:?}"),
            }),
            Peer::Block { .. } => None,
        })
        .collect();
    if parts.is_empty() {
        return None;
    }
    parts.sort();
    parts.dedup();
    Some(parts.join(" | "))
}

/// The address ranges of a rule's ipBlocks in one family, less their holes, merged.
fn block_ranges(peers: &[Peer], v4: bool) -> Vec<(u128, u128)> {
    let mut ranges = Vec::new();
    for p in peers {
        let Peer::Block { cidr, except } = p else { continue };
        if cidr.is_ipv4() != v4 {
            continue;
        }
        let mut pieces = vec![net_range(cidr)];
        for hole in except {
            let (hs, he) = net_range(hole);
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    let mut out = Vec::new();
                    if he < s || hs > e {
                        out.push((s, e));
                    } else {
                        if hs > s {
                            out.push((s, hs - 1));
                        }
                        if he < e {
                            out.push((he + 1, e));
                        }
                    }
                    out
                })
                .collect();
        }
        ranges.extend(pieces);
    }
    merge_ranges(ranges)
}

fn net_range(net: &IpNetwork) -> (u128, u128) {
    let (bits, start) = match net {
        IpNetwork::V4(n) => (32u32, u32::from(n.network()) as u128),
        IpNetwork::V6(n) => (128u32, u128::from(n.network())),
    };
    let host = bits - u32::from(net.prefix());
    let size_minus_one = if host == 128 { u128::MAX } else { (1u128 << host) - 1 };
    (start, start + size_minus_one)
}

/// Sorted, overlapping and adjacent ranges joined (nft refuses overlapping interval elements).
fn merge_ranges(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn range_text(a: u128, b: u128, v4: bool) -> String {
    let show = |x: u128| -> String {
        if v4 {
            std::net::Ipv4Addr::from(x as u32).to_string()
        } else {
            std::net::Ipv6Addr::from(x).to_string()
        }
    };
    if a == b {
        show(a)
    } else {
        format!("{}-{}", show(a), show(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(text: &[&str], except: &[&str]) -> Vec<String> {
        let peers: Vec<Peer> = text
            .iter()
            .map(|c| Peer::Block {
                cidr: c.parse().unwrap(),
                except: except.iter().map(|e| e.parse().unwrap()).collect(),
            })
            .collect();
        let v4 = text[0].contains('.');
        block_ranges(&peers, v4).into_iter().map(|(a, b)| range_text(a, b, v4)).collect()
    }

    #[test]
    fn ip_blocks_less_their_holes_merge_into_ranges() {
        assert_eq!(ranges(&["10.0.0.0/24"], &["10.0.0.5/32"]), ["10.0.0.0-10.0.0.4", "10.0.0.6-10.0.0.255"]);
        assert_eq!(ranges(&["10.0.0.0/25", "10.0.0.128/25"], &[]), ["10.0.0.0-10.0.0.255"]);
        assert_eq!(ranges(&["0.0.0.0/0"], &["0.0.0.0/1"]), ["128.0.0.0-255.255.255.255"]);
        assert_eq!(ranges(&["::/0"], &[]), ["::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]);
        assert_eq!(ranges(&["fd00::/64"], &["fd00::/64"]), Vec::<String>::new());
    }
}
