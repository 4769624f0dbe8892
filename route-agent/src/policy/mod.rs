//! NetworkPolicy (networking.k8s.io/v1) enforcement with nftables: [`model`] (the fields the
//! engine needs), [`compile`] (pure: cluster to nft state), [`objects`] (reading manifests),
//! and [`Engine`], which puts the state into the kernel, each change as one transaction.

pub mod compile;
pub mod model;
pub mod objects;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;

pub use compile::{compile, Cluster, Desired, Recompiler};

use crate::error::AgentError;
use crate::Metrics;

/// The table the agent owns for policy (the masquerade table is separate: it is replaced on
/// its own schedule and must not take policy state with it).
pub const TABLE: &str = "cni_route_agent_policy";

/// What a sync put into the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Nothing changed.
    Nothing,
    /// Only pod set elements changed.
    Elements,
    /// Policy chains or sets were added, changed or removed (the rest of the table stayed).
    Rules,
    /// The rule set was replaced (a policy changed, or the first sync after start).
    Table,
}

/// Keeps the policy table in the kernel equal to what the cluster's policies say.
#[derive(Debug)]
pub struct Engine {
    table: String,
    /// Compiles this node's state, patching in other nodes' pod churn.
    compiler: Recompiler,
    /// What the kernel holds since our last successful sync; `None` after start, so the
    /// first sync replaces whatever a previous agent left, atomically.
    applied: Option<Desired>,
    /// Element updates that went in over netlink (the rest through `nft`).
    pub netlink_updates: u64,
    /// Drop counters of tables this engine replaced (a replaced table's counters restart).
    dropped_before: [u64; 2],
}

impl Engine {
    /// An engine for `node`'s pods.
    pub fn new(node: &str) -> Engine {
        Engine::with_table(node, TABLE)
    }

    /// The same with another table name (tests).
    pub fn with_table(node: &str, table: &str) -> Engine {
        Engine {
            table: table.into(),
            compiler: Recompiler::new(node),
            applied: None,
            netlink_updates: 0,
            dropped_before: [0; 2],
        }
    }

    /// The nft script that takes the kernel from what we applied last to `want`, and what
    /// kind of change it is.
    pub fn script(&self, want: &Desired) -> (String, Applied) {
        let t = &self.table;
        let Some(change) = self.change(want) else {
            // Created, emptied and refilled in one transaction: no packet sees a half table,
            // and whatever an earlier agent left is replaced, not merged.
            let mut s = format!("add table inet {t}\ndelete table inet {t}\nadd table inet {t}\n");
            s.push_str(&want.declarations(t));
            for (set, items) in &want.elements {
                if !items.is_empty() {
                    let all: Vec<&str> = items.iter().map(String::as_str).collect();
                    let _ = writeln!(s, "add element inet {t} {set} {{ {} }}", all.join(", "));
                }
            }
            return (s, Applied::Table);
        };
        let mut s = String::new();
        for (name, spec) in &change.new_sets {
            let _ = writeln!(s, "add set inet {t} {name} {}", spec.decl());
        }
        for (name, chain) in &change.new_chains {
            let _ = writeln!(s, "{}", compile::add_chain(t, name, chain));
        }
        for (name, chain, flush) in &change.filled {
            if *flush {
                let _ = writeln!(s, "flush chain inet {t} {name}");
            }
            for rule in &chain.rules {
                let _ = writeln!(s, "add rule inet {t} {name} {rule}");
            }
        }
        for (set, gone) in &change.gone {
            // A map element is deleted by its key alone.
            let keys: Vec<&str> = gone.iter().map(|e| map_entry(e).0).collect();
            let _ = writeln!(s, "delete element inet {t} {set} {{ {} }}", keys.join(", "));
        }
        for (set, new) in &change.added {
            let _ = writeln!(s, "add element inet {t} {set} {{ {} }}", new.join(", "));
        }
        for name in &change.dead_chains {
            let _ = writeln!(s, "delete chain inet {t} {name}");
        }
        for name in &change.dead_sets {
            let _ = writeln!(s, "delete set inet {t} {name}");
        }
        (s, change.kind())
    }

    /// What changes from what we applied last to `want`; `None` when the table must be
    /// replaced whole (nothing applied yet, or a name declared differently: names come from
    /// contents, so that is a hash collision, and we start over rather than guess).
    fn change<'w>(&self, want: &'w Desired) -> Option<Change<'w>> {
        let have = self.applied.as_ref()?;
        if want.sets.iter().any(|(name, spec)| have.sets.get(name).is_some_and(|h| h != spec)) {
            return None;
        }
        let mut c = Change {
            new_sets: want.sets.iter().filter(|(n, _)| !have.sets.contains_key(*n)).collect(),
            new_chains: want.chains.iter().filter(|(n, _)| !have.chains.contains_key(*n)).collect(),
            ..Change::default()
        };
        for (name, chain) in &want.chains {
            match have.chains.get(name) {
                Some(old) if old.rules == chain.rules => {}
                old => c.filled.push((name, chain, old.is_some())),
            }
        }
        let empty = BTreeSet::new();
        for (set, items) in &want.elements {
            let old = match have.elements.get(set) {
                // A set a patch left alone is the same allocation: nothing to compare.
                Some(old) if Arc::ptr_eq(old, items) => continue,
                Some(old) => &**old,
                None => &empty,
            };
            let gone: Vec<String> = old.difference(items).cloned().collect();
            if !gone.is_empty() {
                c.gone.push((set, gone));
            }
            let new: Vec<&str> = items.iter().filter(|e| !old.contains(*e)).map(String::as_str).collect();
            if !new.is_empty() {
                c.added.push((set, new));
            }
        }
        c.dead_chains = have.chains.keys().filter(|n| !want.chains.contains_key(*n)).cloned().collect();
        c.dead_sets = have.sets.keys().filter(|n| !want.sets.contains_key(*n)).cloned().collect();
        Some(c)
    }

    /// Records that `want` is in the kernel (tests that apply a script themselves).
    pub fn mark_applied(&mut self, want: Desired) {
        self.applied = Some(want);
    }

    /// Brings the kernel to what `cluster` says; returns what kind of change it was and how
    /// many of this node's pods a policy selects.
    pub fn sync(&mut self, cluster: &Cluster) -> Result<(Applied, usize), AgentError> {
        self.sync_shared(&Arc::new(cluster.clone()))
    }

    /// The same with the source's own copy (kept for the next sync to compare with).
    pub fn sync_shared(&mut self, cluster: &Arc<Cluster>) -> Result<(Applied, usize), AgentError> {
        let t0 = std::time::Instant::now();
        let patched = self.compiler.patched;
        let want = self.compiler.compile(cluster);
        let t1 = std::time::Instant::now();
        let (script, kind) = self.script(&want);
        tracing::debug!(
            compile_us = (t1 - t0).as_micros() as u64,
            diff_us = t1.elapsed().as_micros() as u64,
            patched = self.compiler.patched > patched,
            ?kind,
            "network policy compiled"
        );
        if kind == Applied::Table && self.applied.is_some() {
            // Only the replaced table's own counts: what earlier tables counted is in
            // `dropped_before` already.
            let replaced = read_counters(&self.table).unwrap_or_default();
            self.dropped_before[0] = self.dropped_before[0].saturating_add(replaced[0]);
            self.dropped_before[1] = self.dropped_before[1].saturating_add(replaced[1]);
        }
        if matches!(kind, Applied::Elements | Applied::Rules) {
            if let Some(change) = self.change(&want) {
                // Churn on a big cluster: the `nft` tool would first read the whole table
                // (thousands of rules) to change a few elements or a chain; netlink takes the
                // change as it is.
                match self.apply_change(&change) {
                    Ok(()) => {
                        self.netlink_updates += 1;
                        let selected = want.selected_pods;
                        self.applied = Some(want);
                        return Ok((kind, selected));
                    }
                    Err(e) => tracing::debug!(%e, "policy change through nft instead of netlink"),
                }
            }
        }
        if kind != Applied::Nothing {
            if let Err(e) = apply(&script) {
                // Unknown kernel state: the next sync replaces the table whole.
                self.applied = None;
                return Err(e);
            }
        }
        let selected = want.selected_pods;
        // Kept whole (the next sync diffs against it), never copied: on a big cluster it is
        // megabytes of rule text.
        self.applied = Some(want);
        Ok((kind, selected))
    }

    /// Whether the kernel still holds what we applied: the table with its dispatch rules. A
    /// table another tool deleted (`nft flush ruleset`) or emptied (`nft flush table`) is
    /// not; then the next sync replaces it whole. (Elements changed behind our back are not
    /// seen: that would mean listing every set.)
    pub fn intact(&mut self) -> bool {
        if self.applied.is_none() {
            return true;
        }
        let out = netlink_wire::process::run("nft", &["list", "chain", "inet", &self.table, "forward"], None);
        let ok = out.is_ok_and(|text| text.contains("goto ingress"));
        if !ok {
            self.applied = None;
        }
        ok
    }

    /// A change as one netlink transaction, in the order the kernel needs (what is new is
    /// declared before anything refers to it; what goes is deleted after the last reference to
    /// it); `Err` (nothing changed) when it is too big for one batch, or one part does not
    /// convert or apply.
    fn apply_change(&self, change: &Change) -> Result<(), String> {
        use netlink_wire::nft_objects::Table;
        use netlink_wire::nftables::{apply, Op, SetRef, NFPROTO_INET};
        // One send: a batch beyond the socket's buffer would be cut short.
        const MOST: usize = 512;
        let table = Table { family: NFPROTO_INET, name: &self.table };
        let mut ops: Vec<Op> = Vec::new();
        for (name, spec) in &change.new_sets {
            ops.extend(spec.create(table, name));
        }
        for (name, chain) in &change.new_chains {
            ops.push(table.new_chain(name, &chain.comment));
        }
        for (name, chain, flush) in &change.filled {
            if *flush {
                ops.push(table.flush_chain(name));
            }
            for rule in &chain.rules {
                ops.push(table.add_rule(name, &rule.expressions()));
            }
        }
        let mut elements = 0;
        for (set, gone) in &change.gone {
            let keys: Vec<Vec<u8>> = gone
                .iter()
                .map(|e| element_key(map_entry(e).0).ok_or(e.clone()))
                .collect::<Result<_, _>>()?;
            elements += keys.len();
            let set = SetRef { family: NFPROTO_INET, table: &self.table, set };
            for keys in keys.chunks(256) {
                ops.push(Op::Del { set, keys: keys.to_vec() });
            }
        }
        for (set, new) in &change.added {
            let set = SetRef { family: NFPROTO_INET, table: &self.table, set };
            for e in new {
                let (key, chain) = map_entry(e);
                ops.push(Op::Add { set, key: element_key(key).ok_or(e.to_string())?, chain, comment: "" });
                elements += 1;
            }
        }
        for name in &change.dead_chains {
            ops.push(table.del_chain(name));
        }
        for name in &change.dead_sets {
            ops.push(table.del_set(name));
        }
        if ops.len() > MOST || elements > MOST {
            return Err(format!("{} messages, {elements} elements", ops.len()));
        }
        apply(&ops, false).map_err(|e| e.to_string())
    }

    /// Packets dropped by policy since the agent started: (ingress, egress).
    pub fn dropped(&self) -> [u64; 2] {
        let now = read_counters(&self.table).unwrap_or_default();
        [self.dropped_before[0].saturating_add(now[0]), self.dropped_before[1].saturating_add(now[1])]
    }
}

/// What changes between two states of the table, in the order it is applied.
#[derive(Default)]
struct Change<'w> {
    new_sets: Vec<(&'w String, &'w rules::SetSpec)>,
    new_chains: Vec<(&'w String, &'w compile::Chain)>,
    /// Chains whose rules are (re)written: new ones, and changed ones flushed first.
    filled: Vec<(&'w String, &'w compile::Chain, bool)>,
    gone: Vec<(&'w String, Vec<String>)>,
    added: Vec<(&'w String, Vec<&'w str>)>,
    dead_chains: Vec<String>,
    dead_sets: Vec<String>,
}

impl Change<'_> {
    fn kind(&self) -> Applied {
        if !(self.new_sets.is_empty()
            && self.filled.is_empty()
            && self.dead_chains.is_empty()
            && self.dead_sets.is_empty())
        {
            Applied::Rules
        } else if !(self.gone.is_empty() && self.added.is_empty()) {
            Applied::Elements
        } else {
            Applied::Nothing
        }
    }
}

/// A dispatch map's `key : jump chain` as its key and chain; a set element as itself.
fn map_entry(text: &str) -> (&str, Option<&str>) {
    match text.split_once(" : jump ") {
        Some((key, chain)) => (key, Some(chain)),
        None => (text, None),
    }
}

/// The key bytes the kernel holds for an element as the compiler writes it: an address, or a
/// concatenation (` . `) of addresses, protocol names and ports, each part padded to 4 bytes.
fn element_key(text: &str) -> Option<Vec<u8>> {
    let mut key = Vec::new();
    for part in text.split(" . ") {
        if let Ok(ip) = part.parse::<std::net::IpAddr>() {
            key.extend(netlink_wire::nftables::ip_key(ip));
        } else if let Some(proto) = match part {
            "tcp" => Some(6u8),
            "udp" => Some(17),
            "sctp" => Some(132),
            _ => None,
        } {
            key.extend([proto, 0, 0, 0]);
        } else {
            let [a, b] = part.parse::<u16>().ok()?.to_be_bytes();
            key.extend([a, b, 0, 0]);
        }
    }
    Some(key)
}

fn apply(script: &str) -> Result<(), AgentError> {
    netlink_wire::process::pipe("nft", &["-f", "-"], script).map_err(|e| AgentError::Policy(e.to_string()))
}

/// The `ingress_denied` and `egress_denied` packet counters of `table`.
fn read_counters(table: &str) -> Option<[u64; 2]> {
    let out = netlink_wire::process::run("nft", &["list", "counters", "table", "inet", table], None).ok()?;
    let mut result = [0u64; 2];
    let mut current = None;
    for line in out.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("counter ") {
            current = match name.trim_end_matches(" {").trim() {
                "ingress_denied" => Some(0),
                "egress_denied" => Some(1),
                _ => None,
            };
        } else if let (Some(i), Some(rest)) = (current, line.strip_prefix("packets ")) {
            result[i] = rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    Some(result)
}

/// Removes the policy table (`--network-policy=false`, uninstall). Absent is fine.
pub fn remove(table: &str) -> Result<(), AgentError> {
    apply(&format!("add table inet {table}\ndelete table inet {table}\n"))
}

/// Same-node pod traffic crosses the bridge at layer 2; only `br_netfilter` with these
/// switches on (per network namespace) shows it to the inet forward hook.
pub fn enable_bridge_netfilter() -> Result<(), AgentError> {
    for key in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let path = format!("/proc/sys/net/bridge/{key}");
        if !std::path::Path::new(&path).exists() {
            // Best effort: a privileged DaemonSet can load it; a test namespace already has it.
            let _ = netlink_wire::process::run("modprobe", &["br_netfilter"], None);
        }
        // Read first: in a container /proc/sys is read-only, and a node set up for kube-proxy
        // (kubeadm checks it) has the switches on already.
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(&path, "1").map_err(AgentError::io(format!(
            "enabling {path} (br_netfilter: without it pods on one node reach each other unfiltered)"
        )))?;
    }
    Ok(())
}

/// Runs the engine: applies every cluster view the source publishes until the channel
/// closes, and every `resync` checks that its table is still in the kernel (restoring it
/// whole if another tool removed or emptied it). Nothing is touched before the first
/// complete view, so a restarted agent keeps enforcing the previous agent's table until it
/// can replace it whole.
pub async fn run(
    node: String,
    mut rx: watch::Receiver<Option<Arc<Cluster>>>,
    metrics: Arc<Metrics>,
    resync: std::time::Duration,
) {
    let mut engine = Engine::new(&node);
    let mut retry = tokio::time::interval(std::time::Duration::from_secs(5));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(resync);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = false;
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = retry.tick(), if failed => {},
            _ = check.tick(), if !failed => {
                // Read here, not after every sync: `nft` reads the whole table to list its
                // counters, which on a big cluster costs more than the sync itself.
                let d = engine.dropped();
                metrics.policy.dropped[0].store(d[0], Ordering::Relaxed);
                metrics.policy.dropped[1].store(d[1], Ordering::Relaxed);
                if engine.intact() {
                    continue;
                }
                tracing::warn!("network policy table removed or emptied by someone else; restoring it");
                metrics.policy.errors.fetch_add(1, Ordering::Relaxed);
            },
        }
        let Some(cluster) = rx.borrow_and_update().clone() else { continue };
        if let Err(e) = enable_bridge_netfilter() {
            tracing::error!(%e, "network policy: same-node traffic is not filtered");
            metrics.policy.errors.fetch_add(1, Ordering::Relaxed);
        }
        let started = std::time::Instant::now();
        match engine.sync_shared(&cluster) {
            Ok((kind, selected)) => {
                failed = false;
                let p = &metrics.policy;
                p.policies.store(cluster.policies.len() as u64, Ordering::Relaxed);
                p.selected_pods.store(selected as u64, Ordering::Relaxed);
                p.synced(started.elapsed());
                if kind != Applied::Nothing {
                    tracing::debug!(
                        ?kind,
                        micros = started.elapsed().as_micros() as u64,
                        "network policy synced"
                    );
                }
            }
            Err(e) => {
                failed = true;
                metrics.policy.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%e, "network policy sync failed; retrying");
            }
        }
    }
}

/// Counts and logs the malformed parts of objects, once per distinct defect.
pub fn report(defects: &[model::Defect], seen: &mut BTreeMap<String, String>, metrics: &Metrics) {
    let mut now = BTreeMap::new();
    for d in defects {
        let key = format!("{}: {}", d.object, d.message);
        if !seen.contains_key(&key) {
            tracing::warn!(object = %d.object, problem = %d.message, "malformed object; enforcing the rest");
            metrics.policy.malformed.fetch_add(1, Ordering::Relaxed);
        }
        now.insert(key, String::new());
    }
    *seen = now;
}

#[cfg(test)]
mod tests {
    use super::element_key;

    #[test]
    fn element_keys_are_the_kernels_padded_registers() {
        assert_eq!(element_key("10.0.0.1"), Some(vec![10, 0, 0, 1]));
        assert_eq!(element_key("10.0.0.1 . 10.0.0.2"), Some(vec![10, 0, 0, 1, 10, 0, 0, 2]));
        assert_eq!(element_key("10.0.0.1 . tcp . 80"), Some(vec![10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]));
        assert_eq!(element_key("fd00::1 . udp . 8080").map(|k| k.len()), Some(24));
        assert_eq!(element_key("10.0.0.0-10.0.0.9"), None, "ranges are never pod elements");
    }
}
