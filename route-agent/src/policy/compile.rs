//! From the cluster's pods, namespaces and policies to the nftables state that enforces them on
//! this node: pure, so every case is testable without a kernel.
//!
//! Only this node's pods are enforced here, so only the policies that select one of them are
//! compiled. Local pods selected by the same policies share a *group*: one chain per direction
//! holding the union of those policies' rules, merged (the port lists of rules naming the same
//! peers become one match), and ending in a counted drop. A verdict map per family sends each
//! isolated pod's address to its group's chain, so a new connection costs one map lookup and
//! one short chain however many policies select the pod, and a pod joining, leaving or moving
//! between existing groups is an element update, never a new rule set.
//!
//! Every name is derived from what it holds (a hash of the group's policies, of a set's
//! selector or contents), so two compiles of nearly the same cluster differ only where the
//! cluster does, and the engine applies just that difference.
//!
//! Every packet the forward hook sees (routed, and bridged between pods of this node through
//! `br_netfilter`) that is not part of an allowed connection goes through `egress` (is the
//! source a local pod isolated for egress? then its group must allow it) and then `ingress`
//! (the same for the destination). The input hook applies the egress half to what local pods
//! send to the node itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fnv::FnvHashMap;
use std::fmt::Write as _;
use std::hash::Hasher as _;
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;

use super::model::{Labels, Namespace, Peer, Pod, Policy, PortMatch, Protocol, Rule};
use super::rules::{Field, PeerMatch, PortsMatch, RuleSpec, SetSpec, Verdict};

/// Everything the engine knows, by `namespace/name` (pods, policies) and name (namespaces).
/// Objects are shared, not copied, between the source's state and each view it publishes:
/// a view of a big cluster is then cheap to build and to compare with the last one (equal
/// objects are the same allocation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    /// Pods.
    pub pods: BTreeMap<String, Arc<Pod>>,
    /// Namespaces.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    /// Policies.
    pub policies: BTreeMap<String, Arc<Policy>>,
}

/// A chain the policies make: its rules, and which policies they come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chain {
    /// The policies whose rules these are (shown as the chain's comment).
    pub comment: String,
    /// Its rules.
    pub rules: Vec<RuleSpec>,
}

/// The nftables state for one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    /// The sets the policies make, by name (the table's own sets and maps are always there).
    pub sets: BTreeMap<String, SetSpec>,
    /// The chains the policies make (the base chains are the same for every cluster).
    pub chains: BTreeMap<String, Chain>,
    /// The elements that follow pods: who is selected (map `a : jump chain`), who is a
    /// peer, which port a name resolves to; as nft writes them.
    /// (Shared, so that a patched state copies only the sets it changes.)
    pub elements: BTreeMap<String, Arc<BTreeSet<String>>>,
    /// Local pods selected by at least one policy.
    pub selected_pods: usize,
}

impl Desired {
    /// The nft commands that make this state in an empty table `inet {table}`, elements left out.
    pub fn declarations(&self, table: &str) -> String {
        let mut s = String::new();
        for (name, decl) in base_sets() {
            let _ = writeln!(s, "add {} inet {table} {name} {decl}", set_kind(&decl));
        }
        for (name, spec) in &self.sets {
            let _ = writeln!(s, "add set inet {table} {name} {}", spec.decl());
        }
        s.push_str(&base_chains(table));
        for (name, chain) in &self.chains {
            let _ = writeln!(s, "{}", add_chain(table, name, chain));
        }
        for (name, chain) in &self.chains {
            for rule in &chain.rules {
                let _ = writeln!(s, "add rule inet {table} {name} {rule}");
            }
        }
        s.push_str(&base_rules(table));
        s
    }
}

/// `set` or `map`, from a declaration.
fn set_kind(decl: &str) -> &'static str {
    if decl.contains(" : ") {
        "map"
    } else {
        "set"
    }
}

/// `add chain` for a policy chain, with its comment.
pub fn add_chain(table: &str, name: &str, chain: &Chain) -> String {
    format!("add chain inet {table} {name} {{ comment \"{}\"; }}", chain.comment)
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
    fn peer_field(self) -> Field {
        match self {
            Dir::Ingress => Field::Source,
            Dir::Egress => Field::Destination,
        }
    }
    /// An allowed packet: past egress (back in `forward`) it still needs the destination's
    /// ingress check.
    fn allow(self) -> Verdict {
        match self {
            Dir::Ingress => Verdict::Accept,
            Dir::Egress => Verdict::Return,
        }
    }
    fn counter(self) -> &'static str {
        match self {
            Dir::Ingress => "ingress_denied",
            Dir::Egress => "egress_denied",
        }
    }
}

/// (nft family keyword, address type, is IPv4).
type Family = (&'static str, &'static str, bool);
const FAMILIES: [Family; 2] = [("ip", "ipv4_addr", true), ("ip6", "ipv6_addr", false)];

fn fam_digit(v4: bool) -> char {
    if v4 {
        '4'
    } else {
        '6'
    }
}

/// Neighbour discovery and MLD keep the link working whatever a policy says, as ARP does.
const ICMPV6_LINK: &str = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, \
                           nd-router-advert, mld-listener-query, mld-listener-report, mld2-listener-report } accept";

/// The sets and maps every table has (their elements follow pods).
fn base_sets() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in FAMILIES {
        let d = fam_digit(f.2);
        // Each isolated pod's address to its group's chain, per direction.
        out.push((format!("idisp{d}"), format!("{{ type {} : verdict; }}", f.1)));
        out.push((format!("edisp{d}"), format!("{{ type {} : verdict; }}", f.1)));
        // Every pod's own pair (a pod reaching itself through a Service VIP is like loopback:
        // always allowed).
        out.push((format!("self{d}"), format!("{{ type {0} . {0}; }}", f.1)));
    }
    out
}

/// The counters and chains every table has, declared.
fn base_chains(t: &str) -> String {
    let mut s = String::new();
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
    for chain in ["egress", "ingress"] {
        let _ = writeln!(s, "add chain inet {t} {chain}");
    }
    s
}

/// The rules of the base chains (after the policy chains they jump to exist).
fn base_rules(t: &str) -> String {
    let mut s = String::new();
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
    // A pod in no map falls through: not isolated in that direction.
    let _ = writeln!(s, "add rule inet {t} egress ip saddr vmap @edisp4");
    let _ = writeln!(s, "add rule inet {t} egress ip6 saddr vmap @edisp6");
    let _ = writeln!(s, "add rule inet {t} ingress ip daddr vmap @idisp4");
    let _ = writeln!(s, "add rule inet {t} ingress ip6 daddr vmap @idisp6");
    s
}

/// A short stable name from what a chain or set holds.
fn digest(key: &str) -> String {
    let mut h = fnv::FnvHasher::default();
    h.write(key.as_bytes());
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Indexes of the cluster the compiler asks many times.
struct View<'a> {
    node: &'a str,
    /// Which pod owns each address: a reused address belongs to the newest pod.
    owner: FnvHashMap<IpAddr, &'a Pod>,
    /// Every address has one claimant: `owner` is empty and not asked.
    unique: bool,
    /// Pods by namespace, only those that can be a policy's subject or peer.
    by_ns: BTreeMap<&'a str, Vec<&'a Pod>>,
    /// Labels of the namespaces pods live in (the name label alone for one not listed).
    ns_labels: FnvHashMap<&'a str, std::borrow::Cow<'a, Labels>>,
}

impl<'a> View<'a> {
    /// `unique`: no two pods claim one address (known from a patch), so each owns all of
    /// its own and no owner index is needed.
    fn new(cluster: &'a Cluster, node: &'a str, unique: bool) -> View<'a> {
        let mut owner: FnvHashMap<IpAddr, &Pod> = FnvHashMap::default();
        if !unique {
            owner.reserve(cluster.pods.len() * 2);
        }
        let mut by_ns: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        for pod in cluster.pods.values().map(|p| &**p).filter(|p| !p.host_network) {
            for ip in pod.ips.iter().filter(|_| !unique) {
                match owner.entry(*ip) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(pod);
                    }
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        let cur = *o.get();
                        if (&pod.created, pod.key()) > (&cur.created, cur.key()) {
                            o.insert(pod);
                        }
                    }
                }
            }
            match by_ns.get_mut(pod.namespace.as_str()) {
                Some(v) => v.push(pod),
                None => {
                    by_ns.insert(pod.namespace.as_str(), vec![pod]);
                }
            }
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
        View { node, unique, owner, by_ns, ns_labels }
    }

    /// The addresses `pod` owns.
    fn ips_of<'p>(&'p self, pod: &'p Pod) -> impl Iterator<Item = &'p IpAddr> + 'p {
        pod.ips
            .iter()
            .filter(move |ip| self.unique || self.owner.get(ip).is_some_and(|o| std::ptr::eq(*o, pod)))
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

    fn addresses<'p>(&'p self, pods: &'p [&'a Pod], v4: bool) -> impl Iterator<Item = String> + 'p {
        pods.iter().flat_map(|p| self.ips_of(p)).filter(move |ip| ip.is_ipv4() == v4).map(|ip| ip.to_string())
    }
}

/// The state that enforces `cluster`'s policies for the pods of `node`.
pub fn compile(cluster: &Cluster, node: &str) -> Desired {
    compile_full(cluster, node, None).0
}

/// Where the elements of a set that can hold other nodes' pods come from: the pods that
/// `peers` of a policy in `ns` name (every pod when `None`), their addresses, or with `named`
/// their named ports of those names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    ns: String,
    peers: Option<Vec<Peer>>,
    named: Option<BTreeSet<(Protocol, String)>>,
}

impl Source {
    /// What `pod` puts into the set (of IPv4 addresses when `v4`), given its namespace's labels.
    fn elements(&self, pod: &Pod, ns_labels: &Labels, v4: bool, out: &mut Vec<String>) {
        if pod.host_network {
            return;
        }
        let named = match &self.peers {
            None => true,
            Some(list) => list.iter().any(|peer| peer_names(peer, &self.ns, pod, ns_labels)),
        };
        if !named {
            return;
        }
        match &self.named {
            None => out.extend(pod.ips.iter().filter(|ip| ip.is_ipv4() == v4).map(|ip| ip.to_string())),
            Some(names) => {
                named_elements(pod, pod.ips.iter(), |p, n| names.contains(&(p, n.to_string())), v4, out)
            }
        }
    }
}

/// Whether pod peer `peer` of a policy in `policy_ns` names `pod` (in a namespace labelled
/// `ns_labels`).
fn peer_names(peer: &Peer, policy_ns: &str, pod: &Pod, ns_labels: &Labels) -> bool {
    let Peer::Pods { namespaces, pods } = peer else { return false };
    let space = match namespaces {
        None => pod.namespace == policy_ns,
        Some(sel) => sel.matches(ns_labels),
    };
    space && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
}

/// `address . protocol . port` of `pod`'s named ports that `wanted` names, for its addresses
/// `ips` of one family.
fn named_elements<'i>(
    pod: &Pod,
    ips: impl Iterator<Item = &'i IpAddr>,
    wanted: impl Fn(Protocol, &str) -> bool,
    v4: bool,
    out: &mut Vec<String>,
) {
    let ips: Vec<&IpAddr> = ips.filter(|ip| ip.is_ipv4() == v4).collect();
    for np in pod.ports.iter().filter(|np| wanted(np.protocol, &np.name)) {
        for ip in &ips {
            out.push(format!("{ip} . {} . {}", np.protocol.nft(), np.port));
        }
    }
}

/// A compiler that keeps what it compiled last. Pods changing on other nodes (most of a big
/// cluster's churn) then update just the sets that name them, without compiling the node's
/// whole state again; anything else (a local pod, a namespace, a policy, an address two pods
/// claim) compiles anew. Both ways give the same state (a test compares them).
#[derive(Debug)]
pub struct Recompiler {
    node: String,
    last: Option<Last>,
    /// Compiles that only patched sets (tests, logs).
    pub patched: u64,
}

#[derive(Debug)]
struct Last {
    cluster: Arc<Cluster>,
    desired: Desired,
    sources: Vec<(String, bool, Source)>,
    /// How many pods claim each address (hostNetwork pods left out), made when first needed.
    claims: Option<FnvHashMap<IpAddr, u32>>,
}

/// At most this many changed pods are patched in; more compile anew.
const MOST_PATCHED: usize = 64;

impl Recompiler {
    /// A compiler for `node`'s pods.
    pub fn new(node: &str) -> Recompiler {
        Recompiler { node: node.into(), last: None, patched: 0 }
    }

    /// The state for `cluster`.
    pub fn compile(&mut self, cluster: &Arc<Cluster>) -> Desired {
        if let Some(last) = &mut self.last {
            if let Some(desired) = patch(last, cluster, &self.node) {
                self.patched += 1;
                return desired;
            }
        }
        let (desired, sources) = compile_full(cluster, &self.node, None);
        self.last =
            Some(Last { cluster: Arc::clone(cluster), desired: desired.clone(), sources, claims: None });
        desired
    }
}

/// The pods that differ between two views, old and new version; `None` when more than `most`.
type PodChange<'c> = (Option<&'c Pod>, Option<&'c Pod>);

fn changed_pods<'c>(
    old: &'c BTreeMap<String, Arc<Pod>>,
    new: &'c BTreeMap<String, Arc<Pod>>,
    most: usize,
) -> Option<Vec<PodChange<'c>>> {
    let mut out = Vec::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        let change = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, va)), Some((kb, vb))) if ka == kb => {
                let change = (!Arc::ptr_eq(va, vb) && va != vb).then_some((Some(&***va), Some(&***vb)));
                a.next();
                b.next();
                change
            }
            (Some((ka, va)), Some((kb, _))) if ka < kb => {
                let change = Some((Some(&***va), None));
                a.next();
                change
            }
            (Some((_, va)), None) => {
                let change = Some((Some(&***va), None));
                a.next();
                change
            }
            (_, Some((_, vb))) => {
                let change = Some((None, Some(&***vb)));
                b.next();
                change
            }
        };
        if let Some(c) = change {
            out.push(c);
            if out.len() > most {
                return None;
            }
        }
    }
    Some(out)
}

/// Patches `last` to `cluster` when only other nodes' pods changed, none of them touching an
/// address another pod claims; `None` when the node's state must be compiled anew.
fn patch(last: &mut Last, cluster: &Arc<Cluster>, node: &str) -> Option<Desired> {
    if last.cluster.policies != cluster.policies || last.cluster.namespaces != cluster.namespaces {
        return None;
    }
    let changes = changed_pods(&last.cluster.pods, &cluster.pods, MOST_PATCHED)?;
    let local = changes.iter().flat_map(|(o, n)| o.iter().chain(n.iter())).any(|p| p.node == node);
    let claims = last.claims.get_or_insert_with(|| {
        let mut m: FnvHashMap<IpAddr, u32> = FnvHashMap::default();
        for pod in last.cluster.pods.values().filter(|p| !p.host_network) {
            for ip in &pod.ips {
                *m.entry(*ip).or_default() += 1;
            }
        }
        m
    });
    // Every address a change touches has at most one claimant before and after: then each
    // pod owns its addresses, and elements move with their pods.
    let mut delta: FnvHashMap<IpAddr, i64> = FnvHashMap::default();
    for (old, new) in &changes {
        for (pod, d) in [(old, -1), (new, 1)] {
            for ip in pod.iter().filter(|p| !p.host_network).flat_map(|p| p.ips.iter()) {
                *delta.entry(*ip).or_default() += d;
            }
        }
    }
    for (ip, d) in &delta {
        let before = i64::from(claims.get(ip).copied().unwrap_or(0));
        if before > 1 || before + d > 1 {
            return None;
        }
    }
    let ns_labels = |ns: &str| match cluster.namespaces.get(ns) {
        Some(n) => std::borrow::Cow::Borrowed(&n.labels),
        None => std::borrow::Cow::Owned(Namespace::new(ns, Labels::new()).labels),
    };
    let mut desired = last.desired.clone();
    for (set, v4, source) in &last.sources {
        // All removals before any addition: an address one pod left may be another's now.
        let (mut gone, mut added) = (Vec::new(), Vec::new());
        for (old, new) in &changes {
            if let Some(p) = old {
                source.elements(p, &ns_labels(&p.namespace), *v4, &mut gone);
            }
            if let Some(p) = new {
                source.elements(p, &ns_labels(&p.namespace), *v4, &mut added);
            }
        }
        if gone.is_empty() && added.is_empty() {
            continue;
        }
        let elements = Arc::make_mut(desired.elements.get_mut(set)?);
        for e in &gone {
            elements.remove(e);
        }
        elements.extend(added);
    }
    for (ip, d) in delta {
        let c = claims.entry(ip).or_default();
        *c = (i64::from(*c) + d).max(0) as u32;
    }
    if local {
        // This node's groups, chains and maps may change: compile them, taking the sets of
        // remote-capable peers just patched rather than computing them again.
        let unique = claims.values().all(|c| *c <= 1);
        let reuse = Reuse { elements: &desired.elements, unique };
        let (whole, sources) = compile_full(cluster, node, Some(&reuse));
        desired = whole;
        last.sources = sources;
    }
    last.cluster = Arc::clone(cluster);
    last.desired = desired.clone();
    Some(desired)
}

/// The state and where its remote-pod sets come from.
/// `reuse`: elements of sets that can hold remote pods known to be right for `cluster`
/// already (a patch brought them up to date), taken as they are instead of computed again.
fn compile_full(
    cluster: &Cluster,
    node: &str,
    reuse: Option<&Reuse>,
) -> (Desired, Vec<(String, bool, Source)>) {
    // Reused sets come from a patch, which also knows whether any address is contested.
    let view = View::new(cluster, node, reuse.is_some_and(|r| r.unique));
    let mut c = Compiler {
        reuse,
        sources: Vec::new(),
        sets: BTreeMap::new(),
        elements: BTreeMap::new(),
        chains: BTreeMap::new(),
        made: HashMap::new(),
    };
    for (name, _) in base_sets() {
        c.elements.insert(name, Arc::default());
    }
    let local: Vec<&Pod> = view.by_ns.values().flatten().filter(|p| p.node == node).copied().collect();
    for pod in &local {
        for ip in view.ips_of(pod) {
            let set = format!("self{}", fam_digit(ip.is_ipv4()));
            c.fill(&set, std::iter::once(format!("{ip} . {ip}")));
        }
    }
    // Each local pod's policies, per direction, in the cluster's (key) order.
    let policies: Vec<&Policy> = cluster.policies.values().map(|p| &**p).collect();
    let mut groups: [BTreeMap<*const Pod, Vec<usize>>; 2] = [BTreeMap::new(), BTreeMap::new()];
    for (k, policy) in policies.iter().enumerate() {
        let Some(pods) = view.by_ns.get(policy.namespace.as_str()) else { continue };
        for pod in pods.iter().filter(|p| p.node == node && policy.selector.matches(&p.labels)) {
            for (g, rules) in groups.iter_mut().zip([&policy.ingress, &policy.egress]) {
                if rules.is_some() {
                    g.entry(*pod as *const Pod).or_default().push(k);
                }
            }
        }
    }
    let mut selected_any: BTreeSet<*const Pod> = BTreeSet::new();
    for (dir, members) in [Dir::Ingress, Dir::Egress].into_iter().zip(&groups) {
        // Pods by group, so each group's chain is compiled once.
        let mut by_group: BTreeMap<&[usize], Vec<&Pod>> = BTreeMap::new();
        for pod in &local {
            if let Some(ks) = members.get(&(*pod as *const Pod)) {
                by_group.entry(ks.as_slice()).or_default().push(pod);
                selected_any.insert(*pod as *const Pod);
            }
        }
        for (ks, pods) in by_group {
            let keys: Vec<String> = ks.iter().map(|k| policies[*k].key()).collect();
            let chain = format!("{}{}", dir.tag(), digest(&keys.join("\n")));
            let mut allows = Vec::new();
            for k in ks {
                let policy = policies[*k];
                let rules = match dir {
                    Dir::Ingress => &policy.ingress,
                    Dir::Egress => &policy.egress,
                };
                for rule in rules.iter().flatten() {
                    c.rule(&view, policy, dir, rule, &mut allows);
                }
            }
            let mut rules = c.merge(allows, dir);
            rules.push(RuleSpec {
                peer: None,
                ports: PortsMatch::Any,
                verdict: Verdict::Deny(dir.counter()),
            });
            let comment = match keys.as_slice() {
                [] => String::new(),
                [one] => one.clone(),
                [first, rest @ ..] => format!("{first} and {} more", rest.len()),
            };
            c.chains.insert(chain.clone(), Chain { comment: comment.replace('"', ""), rules });
            for f in FAMILIES {
                let map = format!("{}disp{}", dir.tag(), fam_digit(f.2));
                let items: Vec<String> =
                    view.addresses(&pods, f.2).map(|a| format!("{a} : jump {chain}")).collect();
                c.fill(&map, items.into_iter());
            }
        }
    }
    let desired =
        Desired { sets: c.sets, chains: c.chains, elements: c.elements, selected_pods: selected_any.len() };
    (desired, c.sources)
}

/// What one rule allows, before merging: a family (or both), a peer match, a port match.
struct Allow {
    family: Option<bool>,
    peer: Option<PeerMatch>,
    ports: Ports,
}

enum Ports {
    Any,
    Numeric(Protocol, Vec<(u16, u16)>),
    /// Named ports of one family: address, protocol and port in one set.
    Named(bool, String),
}

/// What a patch hands a compile of this node's part: the sets it brought up to date, and
/// whether every address has a single claimant.
struct Reuse<'d> {
    elements: &'d BTreeMap<String, Arc<BTreeSet<String>>>,
    unique: bool,
}

struct Compiler<'r> {
    reuse: Option<&'r Reuse<'r>>,
    /// Where the elements of sets that can hold remote pods come from: (set, IPv4, source).
    sources: Vec<(String, bool, Source)>,
    sets: BTreeMap<String, SetSpec>,
    elements: BTreeMap<String, Arc<BTreeSet<String>>>,
    chains: BTreeMap<String, Chain>,
    /// The sets already made, by what they hold: rules that name the same peers (every policy
    /// allowing "from namespaces labelled env=prod", say) share one set, so a big cluster's
    /// table holds each pod's address a few times, not once per policy.
    made: HashMap<String, String>,
}

impl Compiler<'_> {
    /// The name of the set(s) holding what `key` describes, and whether this is its first use
    /// (the caller then declares and fills it).
    fn shared_name(&mut self, prefix: char, key: String) -> (String, bool) {
        if let Some(name) = self.made.get(&key) {
            return (name.clone(), false);
        }
        let name = format!("{prefix}{}", digest(&key));
        self.made.insert(key, name.clone());
        (name, true)
    }

    /// Declares a set whose elements follow pods.
    fn set(&mut self, name: &str, spec: SetSpec) {
        self.sets.insert(name.to_string(), spec);
        self.elements.entry(name.to_string()).or_default();
    }

    /// Whether the sets `{name}{suffix}4` and `6` come up to date from `reuse`.
    fn reused(&self, name: &str, suffix: &str) -> bool {
        self.reuse.is_some_and(|r| {
            r.elements.contains_key(&format!("{name}{suffix}4"))
                && r.elements.contains_key(&format!("{name}{suffix}6"))
        })
    }

    /// Fills a set from `reuse` when it holds it, else from `items`.
    fn fill_or_reuse(&mut self, set: &str, items: impl Iterator<Item = String>) {
        match self.reuse.and_then(|r| r.elements.get(set)) {
            Some(known) => {
                self.elements.insert(set.to_string(), Arc::clone(known));
            }
            None => self.fill(set, items),
        }
    }

    fn fill(&mut self, set: &str, items: impl Iterator<Item = String>) {
        Arc::make_mut(self.elements.entry(set.to_string()).or_default()).extend(items);
    }

    /// What one ingress or egress rule of `policy` allows, added to `out`.
    fn rule(&mut self, view: &View, policy: &Policy, dir: Dir, rule: &Rule, out: &mut Vec<Allow>) {
        let field = dir.peer_field();
        // Peer matches: (family or None for both, expression).
        let mut peers: Vec<(Option<bool>, Option<PeerMatch>)> = Vec::new();
        match &rule.peers {
            None => peers.push((None, None)),
            Some(list) => {
                // One set per distinct pod peer: the same selector in many policies is one set.
                let mut pod_sets = Vec::new();
                for peer in list.iter().filter(|p| matches!(p, Peer::Pods { .. })) {
                    let one = std::slice::from_ref(peer);
                    let Some(key) = peers_key(&policy.namespace, one) else { continue };
                    let (name, new) = self.shared_name('s', format!("pods:{key}"));
                    if new {
                        let pods = match self.reused(&name, "_pods") {
                            true => Vec::new(),
                            false => view.peer_pods(&policy.namespace, one),
                        };
                        for f in FAMILIES {
                            let set = format!("{name}_pods{}", fam_digit(f.2));
                            self.set(&set, SetSpec::Pods(f.2));
                            self.fill_or_reuse(&set, view.addresses(&pods, f.2));
                            let source = Source {
                                ns: policy.namespace.clone(),
                                peers: Some(one.to_vec()),
                                named: None,
                            };
                            self.sources.push((set, f.2, source));
                        }
                    }
                    if !pod_sets.contains(&name) {
                        pod_sets.push(name);
                    }
                }
                for f in FAMILIES {
                    let d = fam_digit(f.2);
                    for name in &pod_sets {
                        let set = format!("{name}_pods{d}");
                        peers.push((Some(f.2), Some(PeerMatch { v4: f.2, field, set })));
                    }
                    let ranges = block_ranges(list, f.2);
                    if !ranges.is_empty() {
                        let (name, new) = self.shared_name('c', format!("cidr{d}:{ranges:?}"));
                        let set = format!("{name}_cidr{d}");
                        if new {
                            self.sets.insert(set.clone(), SetSpec::Cidr(f.2, ranges));
                        }
                        peers.push((Some(f.2), Some(PeerMatch { v4: f.2, field, set })));
                    }
                }
            }
        }
        // Port matches, the same way.
        let mut ports: Vec<(Option<bool>, Ports)> = Vec::new();
        match &rule.ports {
            None => ports.push((None, Ports::Any)),
            Some(list) => {
                let mut named: BTreeSet<(Protocol, &str)> = BTreeSet::new();
                for p in list {
                    match &p.port {
                        PortMatch::Any => ports.push((None, Ports::Numeric(p.protocol, vec![(1, 65535)]))),
                        PortMatch::Range(a, b) => {
                            ports.push((None, Ports::Numeric(p.protocol, vec![(*a, *b)])))
                        }
                        PortMatch::Named(n) => {
                            named.insert((p.protocol, n));
                        }
                    }
                }
                if !named.is_empty() {
                    // Named ports resolve on the destination: the selected pod for ingress,
                    // the peer for egress (every pod when the rule names no peer).
                    let whose = match (dir, &rule.peers) {
                        (Dir::Ingress, _) => format!("selected by {}", policy.key()),
                        (Dir::Egress, Some(list)) => peers_key(&policy.namespace, list).unwrap_or_default(),
                        (Dir::Egress, None) => "every pod".to_string(),
                    };
                    let (name, new) = self.shared_name('n', format!("named:{named:?}:{whose}"));
                    let reused = dir == Dir::Egress && self.reused(&name, "_named");
                    let targets: Vec<&Pod> = match (new && !reused, dir, &rule.peers) {
                        (false, _, _) => Vec::new(),
                        (true, Dir::Ingress, _) => view.selected(policy),
                        (true, Dir::Egress, Some(list)) => view.peer_pods(&policy.namespace, list),
                        (true, Dir::Egress, None) => view.by_ns.values().flatten().copied().collect(),
                    };
                    for f in FAMILIES {
                        let set = format!("{name}_named{}", fam_digit(f.2));
                        ports.push((Some(f.2), Ports::Named(f.2, set.clone())));
                        if !new {
                            continue;
                        }
                        self.set(&set, SetSpec::Named(f.2));
                        let mut items = Vec::new();
                        for pod in &targets {
                            let wanted = |p: Protocol, n: &str| named.contains(&(p, n));
                            named_elements(pod, view.ips_of(pod), wanted, f.2, &mut items);
                        }
                        if reused {
                            self.fill_or_reuse(&set, items.into_iter());
                        } else {
                            self.fill(&set, items.into_iter());
                        }
                        if dir == Dir::Egress {
                            // (Ingress ones hold local pods only: any change to those compiles anew.)
                            let named = named.iter().map(|(p, n)| (*p, n.to_string())).collect();
                            let source = Source {
                                ns: policy.namespace.clone(),
                                peers: rule.peers.clone(),
                                named: Some(named),
                            };
                            self.sources.push((set, f.2, source));
                        }
                    }
                }
            }
        }
        for (pf, pe) in &peers {
            for (of, oe) in &ports {
                let family = match (pf, of) {
                    (Some(a), Some(b)) if a != b => continue,
                    (Some(a), _) | (None, Some(a)) => Some(*a),
                    (None, None) => None,
                };
                let ports = match oe {
                    Ports::Any => Ports::Any,
                    Ports::Numeric(p, r) => Ports::Numeric(*p, r.clone()),
                    Ports::Named(v4, set) => Ports::Named(*v4, set.clone()),
                };
                out.push(Allow { family, peer: pe.clone(), ports });
            }
        }
    }

    /// A group's allows as few rules: per peer match, every port of every rule naming it in
    /// one match (a single port or range inline; more in a shared named set: an anonymous set
    /// per rule costs the kernel more than the rule does).
    fn merge(&mut self, allows: Vec<Allow>, dir: Dir) -> Vec<RuleSpec> {
        #[derive(Default)]
        struct PeerPorts {
            any: bool,
            numeric: BTreeMap<Protocol, Vec<(u128, u128)>>,
            named: BTreeSet<(bool, String)>,
        }
        // The family is in the key only to keep the two families' rules apart; the matches
        // themselves name it.
        let mut by_peer: BTreeMap<(Option<bool>, Option<PeerMatch>), PeerPorts> = BTreeMap::new();
        for a in allows {
            let e = by_peer.entry((a.family, a.peer)).or_default();
            match a.ports {
                Ports::Any => e.any = true,
                Ports::Numeric(p, r) => {
                    e.numeric.entry(p).or_default().extend(r.iter().map(|(a, b)| (*a as u128, *b as u128)))
                }
                Ports::Named(v4, set) => {
                    e.named.insert((v4, set));
                }
            }
        }
        let mut out = Vec::new();
        let verdict = dir.allow();
        for ((_, peer), pp) in by_peer {
            let rule = |ports| RuleSpec { peer: peer.clone(), ports, verdict };
            if pp.any {
                out.push(rule(PortsMatch::Any));
                continue;
            }
            for (proto, ranges) in pp.numeric {
                let ranges = merge_ranges(ranges);
                let m = match ranges.as_slice() {
                    [(1, 65535)] => PortsMatch::Proto(proto),
                    [(a, b)] => PortsMatch::Range(proto, *a as u16, *b as u16),
                    _ => {
                        let (name, new) = self.shared_name('p', format!("ports:{ranges:?}"));
                        if new {
                            self.sets.insert(name.clone(), SetSpec::Ports(ranges));
                        }
                        PortsMatch::Set(proto, name)
                    }
                };
                out.push(rule(m));
            }
            for (v4, set) in pp.named {
                out.push(rule(PortsMatch::Named(v4, set)));
            }
        }
        out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Requirement;
    use crate::policy::model::Selector;

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

    /// A small deterministic generator (the same runs every time).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn random_pod(r: &mut Rng, n: u64) -> Pod {
        use crate::policy::model::NamedPort;
        let mut labels = Labels::new();
        labels.insert("app".into(), format!("a{}", r.below(3)));
        if r.below(2) == 0 {
            labels.insert("tier".into(), format!("t{}", r.below(2)));
        }
        // Few addresses, so that pods sometimes claim the same one.
        let ip = r.below(12);
        Pod {
            namespace: format!("ns{}", r.below(3)),
            name: format!("p{n}"),
            node: format!("n{}", r.below(3)),
            host_network: r.below(10) == 0,
            labels,
            ips: vec![format!("10.0.0.{ip}").parse().unwrap(), format!("fd00::{ip}").parse().unwrap()],
            ports: vec![NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8000 + r.below(3) as u16,
            }],
            created: format!("2026-01-01T00:00:{:02}Z", r.below(60)),
        }
    }

    fn cluster(r: &mut Rng) -> Cluster {
        let mut c = Cluster::default();
        for n in 0..3 {
            let mut labels = Labels::new();
            labels.insert("env".into(), if n == 0 { "prod".into() } else { "dev".into() });
            c.namespaces.insert(format!("ns{n}"), Arc::new(Namespace::new(&format!("ns{n}"), labels)));
        }
        for n in 0..15 {
            let pod = random_pod(r, n);
            c.pods.insert(pod.key(), Arc::new(pod));
        }
        let sel = |k: &str, v: &str| Selector(vec![Requirement::In(k.into(), vec![v.into()])]);
        let peers = [
            Peer::Pods { namespaces: None, pods: Some(sel("app", "a1")) },
            Peer::Pods { namespaces: Some(sel("env", "prod")), pods: Some(sel("tier", "t0")) },
            Peer::Pods { namespaces: Some(Selector(vec![])), pods: None },
        ];
        for (k, ns) in ["ns0", "ns1", "ns2"].into_iter().enumerate() {
            let named = vec![crate::policy::model::PortSpec {
                protocol: Protocol::Tcp,
                port: PortMatch::Named("http".into()),
            }];
            let rules = vec![
                Rule { peers: Some(vec![peers[k].clone()]), ports: Some(named.clone()) },
                Rule { peers: Some(vec![peers[(k + 1) % 3].clone()]), ports: None },
                Rule { peers: None, ports: Some(named) },
            ];
            let policy = Policy {
                namespace: ns.into(),
                name: "p".into(),
                selector: sel("app", &format!("a{k}")),
                ingress: Some(rules.clone()),
                egress: Some(rules),
            };
            c.policies.insert(policy.key(), Arc::new(policy));
        }
        c
    }

    #[test]
    fn patched_state_equals_a_compile_from_scratch() {
        let mut patched = 0;
        for seed in 0..40 {
            let mut r = Rng(seed);
            let mut c = cluster(&mut r);
            let mut rc = Recompiler::new("n0");
            assert_eq!(rc.compile(&Arc::new(c.clone())), compile(&c, "n0"));
            for step in 0..40 {
                let n = r.below(18);
                let key = format!("ns{}/p{n}", r.below(3));
                match r.below(6) {
                    0 => {
                        c.pods.remove(&key);
                    }
                    1 if step % 7 == 0 => {
                        // Now and then a namespace relabelled: compiled anew.
                        let ns = Arc::make_mut(c.namespaces.get_mut("ns1").unwrap());
                        ns.labels.insert("env".into(), "prod".into());
                    }
                    _ => {
                        let mut pod = random_pod(&mut r, n);
                        if r.below(4) != 0 {
                            pod.node = "n1".into();
                        }
                        c.pods.insert(pod.key(), Arc::new(pod));
                    }
                }
                assert_eq!(rc.compile(&Arc::new(c.clone())), compile(&c, "n0"), "seed {seed} step {step}");
            }
            patched += rc.patched;
        }
        assert!(patched > 200, "the patch path ran only {patched} times");
    }
}
