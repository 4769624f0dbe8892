//! NetworkPolicy (networking.k8s.io/v1) enforcement with nftables: [`model`] (the fields the
//! engine needs), [`compile`] (pure: cluster to nft state), [`objects`] (reading manifests),
//! and [`Engine`], which puts the state into the kernel, each change as one transaction.

pub mod compile;
pub mod model;
pub mod objects;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;

pub use compile::{compile, Cluster, Desired};

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
    node: String,
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
            node: node.into(),
            applied: None,
            netlink_updates: 0,
            dropped_before: [0; 2],
        }
    }

    /// The nft script that takes the kernel from what we applied last to `want`, and what
    /// kind of change it is.
    pub fn script(&self, want: &Desired) -> (String, Applied) {
        let t = &self.table;
        let Some(have) = self.applied.as_ref().filter(|have| {
            // Names come from contents, so a name declared differently is a hash collision:
            // start over rather than guess.
            want.sets.iter().all(|(name, decl)| have.sets.get(name).is_none_or(|d| d == decl))
        }) else {
            // Created, emptied and refilled in one transaction: no packet sees a half table,
            // and whatever an earlier agent left is replaced, not merged.
            let mut s = format!("add table inet {t}\ndelete table inet {t}\nadd table inet {t}\n");
            s.push_str(&want.declarations(t));
            for (set, items) in &want.elements {
                if !items.is_empty() {
                    let all: Vec<&String> = items.iter().collect();
                    let _ = writeln!(s, "add element inet {t} {set} {{ {} }}", join(&all));
                }
            }
            return (s, Applied::Table);
        };
        // Only the difference, in an order the kernel takes in one transaction: what is new
        // is declared before anything refers to it, and what goes is deleted after the last
        // reference to it (a map element, a rule) is gone.
        let mut s = String::new();
        for (name, decl) in want.sets.iter().filter(|(n, _)| !have.sets.contains_key(*n)) {
            let _ = writeln!(s, "add {} inet {t} {name} {decl}", compile::set_kind(decl));
        }
        for (name, chain) in want.chains.iter().filter(|(n, _)| !have.chains.contains_key(*n)) {
            let _ = writeln!(s, "{}", compile::add_chain(t, name, chain));
        }
        for (name, chain) in &want.chains {
            match have.chains.get(name) {
                Some(old) if old.rules == chain.rules => continue,
                Some(_) => {
                    let _ = writeln!(s, "flush chain inet {t} {name}");
                }
                None => {}
            }
            for rule in &chain.rules {
                let _ = writeln!(s, "add rule inet {t} {name} {rule}");
            }
        }
        let rules_changed = !s.is_empty();
        let before_elements = s.len();
        let empty = BTreeSet::new();
        for (set, items) in &want.elements {
            let old = have.elements.get(set).unwrap_or(&empty);
            // A map element is deleted by its key alone.
            let gone: Vec<&str> = old.difference(items).map(|e| e.split(" : ").next().unwrap_or(e)).collect();
            if !gone.is_empty() {
                let _ = writeln!(s, "delete element inet {t} {set} {{ {} }}", gone.join(", "));
            }
        }
        for (set, items) in &want.elements {
            let old = have.elements.get(set).unwrap_or(&empty);
            let new: Vec<&String> = items.difference(old).collect();
            if !new.is_empty() {
                let _ = writeln!(s, "add element inet {t} {set} {{ {} }}", join(&new));
            }
        }
        let elements_changed = s.len() > before_elements;
        let mut removed = false;
        for name in have.chains.keys().filter(|n| !want.chains.contains_key(*n)) {
            let _ = writeln!(s, "delete chain inet {t} {name}");
            removed = true;
        }
        for (name, decl) in have.sets.iter().filter(|(n, _)| !want.sets.contains_key(*n)) {
            let _ = writeln!(s, "delete {} inet {t} {name}", compile::set_kind(decl));
            removed = true;
        }
        let kind = if rules_changed || removed {
            Applied::Rules
        } else if elements_changed {
            Applied::Elements
        } else {
            Applied::Nothing
        };
        (s, kind)
    }

    /// Records that `want` is in the kernel (tests that apply a script themselves).
    pub fn mark_applied(&mut self, want: Desired) {
        self.applied = Some(want);
    }

    /// Brings the kernel to what `cluster` says; returns what kind of change it was and how
    /// many of this node's pods a policy selects.
    pub fn sync(&mut self, cluster: &Cluster) -> Result<(Applied, usize), AgentError> {
        let want = compile(cluster, &self.node);
        let (script, kind) = self.script(&want);
        if kind == Applied::Table && self.applied.is_some() {
            // Only the replaced table's own counts: what earlier tables counted is in
            // `dropped_before` already.
            let replaced = read_counters(&self.table).unwrap_or_default();
            self.dropped_before[0] = self.dropped_before[0].saturating_add(replaced[0]);
            self.dropped_before[1] = self.dropped_before[1].saturating_add(replaced[1]);
        }
        if kind == Applied::Elements {
            if let Some(have) = &self.applied {
                // Pod churn on a big cluster: the `nft` tool would first read the whole table
                // (thousands of rules) to update a few elements; netlink takes them as they are.
                match self.apply_elements(have, &want) {
                    Ok(()) => {
                        self.netlink_updates += 1;
                        let selected = want.selected_pods;
                        self.applied = Some(want);
                        return Ok((kind, selected));
                    }
                    Err(e) => tracing::debug!(%e, "policy elements through nft instead of netlink"),
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

    /// The element changes from `have` to `want` as one netlink transaction; `Err` (nothing
    /// changed) when there are too many for one batch or one does not convert or apply.
    fn apply_elements(&self, have: &Desired, want: &Desired) -> Result<(), String> {
        use netlink_wire::nftables::{apply, Op, SetRef, NFPROTO_INET};
        const MOST: usize = 512;
        let mut ops = Vec::new();
        let mut count = 0;
        let empty = BTreeSet::new();
        for (set, items) in &want.elements {
            let old = have.elements.get(set).unwrap_or(&empty);
            let gone: Vec<Vec<u8>> = old
                .difference(items)
                .map(|e| element_key(map_entry(e).0).ok_or(e.clone()))
                .collect::<Result<_, _>>()?;
            count += gone.len();
            let set = SetRef { family: NFPROTO_INET, table: &self.table, set };
            for keys in gone.chunks(256) {
                ops.push(Op::Del { set, keys: keys.to_vec() });
            }
            for e in items.difference(old) {
                let (key, chain) = map_entry(e);
                ops.push(Op::Add { set, key: element_key(key).ok_or(e.clone())?, chain, comment: "" });
                count += 1;
            }
            if count > MOST {
                return Err(format!("{count} element changes"));
            }
        }
        apply(&ops, false).map_err(|e| e.to_string())
    }

    /// Packets dropped by policy since the agent started: (ingress, egress).
    pub fn dropped(&self) -> [u64; 2] {
        let now = read_counters(&self.table).unwrap_or_default();
        [self.dropped_before[0].saturating_add(now[0]), self.dropped_before[1].saturating_add(now[1])]
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

fn join(items: &[&String]) -> String {
    items.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
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
        match engine.sync(&cluster) {
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
