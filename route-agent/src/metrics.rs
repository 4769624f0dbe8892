//! What the agent exposes on /metrics and /readyz. Metrics only observe: the reconciler and
//! the sources record into them, nothing reads them to decide what to do.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The agent's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Ready: conflist written and a route sync succeeded.
    pub ready: AtomicBool,
    /// Routes the last sync wanted (one per other node's pod CIDR).
    pub routes_desired: AtomicU64,
    /// Routes in the kernel after the last sync.
    pub routes_installed: AtomicU64,
    /// Duration of the last sync in microseconds.
    pub sync_micros: AtomicU64,
    /// Syncs run since start: a stuck agent stops counting.
    pub syncs: AtomicU64,
    /// Syncs that failed in part or whole.
    pub sync_errors: AtomicU64,
    /// Netlink route writes (adds, replaces, deletes).
    pub netlink_writes: AtomicU64,
    /// Events from the source.
    pub source_events: AtomicU64,
    /// Nodes not on this node's L2 segment that no tunnel reaches.
    pub nodes_off_link: AtomicU64,
    /// Pod CIDRs routed through the VXLAN device.
    pub cidrs_tunnelled: AtomicU64,
    /// Other nodes listed with pod CIDRs but without any usable address.
    pub nodes_without_address: AtomicU64,
    /// Other nodes' pod CIDRs without a node address of their family.
    pub pod_cidrs_without_address: AtomicU64,
    /// Of those, the ones no route reaches: none kept, or one kept through the VXLAN device.
    pub pod_cidrs_unreachable: AtomicU64,
    /// What `/readyz` adds to its answer without failing: trouble with other nodes, which
    /// must not take this node out of service.
    pub warnings: Mutex<Vec<String>>,
    /// Pod CIDR claims ignored because they overlap an earlier claim.
    pub pod_cidr_conflicts: AtomicU64,
    /// The masquerade rule picks ports fully at random.
    pub masquerade_fully_random: AtomicBool,
    /// The source's health: errors by kind, and when it last had a good view.
    pub source: SourceHealth,
    /// The etcd source's connection: errors by kind and reachability (rendered only when it runs).
    pub etcd: crate::sources::etcd_tls::EtcdStatus,
    /// NetworkPolicy enforcement (rendered only when it runs).
    pub policy: PolicyStatus,
}

/// What the NetworkPolicy engine reports.
#[derive(Debug, Default)]
pub struct PolicyStatus {
    /// The engine runs.
    pub enabled: AtomicBool,
    /// Policies known.
    pub policies: AtomicU64,
    /// Local pods selected by at least one policy.
    pub selected_pods: AtomicU64,
    /// Packets dropped by policy: ingress, egress.
    pub dropped: [AtomicU64; 2],
    /// Malformed objects (or parts) skipped.
    pub malformed: AtomicU64,
    /// Failed syncs and other enforcement errors.
    pub errors: AtomicU64,
    /// Syncs into the kernel.
    pub syncs: AtomicU64,
    /// Duration of the last sync, in microseconds.
    pub sync_micros: AtomicU64,
    /// When the last sync succeeded, seconds since the epoch.
    pub last_sync_unix: AtomicU64,
}

impl PolicyStatus {
    /// A sync succeeded after `took`.
    pub fn synced(&self, took: Duration) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_micros.store(took.as_micros() as u64, Ordering::Relaxed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_sync_unix.store(now.as_secs(), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        row(out, "policies", "gauge", "NetworkPolicies enforced.", load(&self.policies));
        row(
            out,
            "policy_selected_pods",
            "gauge",
            "This node's pods selected by a NetworkPolicy.",
            load(&self.selected_pods),
        );
        out.push_str(
            "# HELP cni_route_agent_policy_dropped_packets_total Packets dropped by NetworkPolicy.\n\
             # TYPE cni_route_agent_policy_dropped_packets_total counter\n",
        );
        for (dir, v) in ["ingress", "egress"].iter().zip(&self.dropped) {
            let _ = writeln!(
                out,
                "cni_route_agent_policy_dropped_packets_total{{direction=\"{dir}\"}} {}",
                load(v)
            );
        }
        row(
            out,
            "policy_malformed_total",
            "counter",
            "Malformed policy objects or parts skipped.",
            load(&self.malformed),
        );
        row(out, "policy_errors_total", "counter", "NetworkPolicy syncs that failed.", load(&self.errors));
        row(out, "policy_syncs_total", "counter", "NetworkPolicy syncs into the kernel.", load(&self.syncs));
        row(
            out,
            "policy_sync_duration_seconds",
            "gauge",
            "Duration of the last NetworkPolicy sync.",
            format!("{:.6}", load(&self.sync_micros) as f64 / 1e6),
        );
        row(
            out,
            "policy_last_sync_timestamp_seconds",
            "gauge",
            "When the last NetworkPolicy sync succeeded (Unix time).",
            load(&self.last_sync_unix),
        );
    }
}

/// How the node source is doing.
#[derive(Debug, Default)]
pub struct SourceHealth {
    state: Mutex<SourceState>,
}

#[derive(Debug, Default)]
struct SourceState {
    /// When the source last had a complete, current view of the nodes.
    last_good: Option<Instant>,
    /// Whether the source failed since then.
    failing: bool,
    errors: BTreeMap<&'static str, u64>,
}

impl SourceHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, SourceState> {
        // A panic while holding this lock leaves plain numbers behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The source's view is complete and current.
    pub fn good(&self) {
        let mut state = self.lock();
        state.last_good = Some(Instant::now());
        state.failing = false;
    }

    /// The source failed (`kind` labels the counter); the agent keeps the last good view.
    pub fn error(&self, kind: &'static str) {
        let mut state = self.lock();
        state.failing = true;
        *state.errors.entry(kind).or_default() += 1;
    }

    /// Errors counted for `kind`.
    pub fn errors(&self, kind: &str) -> u64 {
        self.lock().errors.get(kind).copied().unwrap_or(0)
    }

    /// How old the view the agent works from is: zero while the source is healthy (its view
    /// is current), the time since its last good view while it fails, `None` before the
    /// first good view.
    pub fn snapshot_age(&self) -> Option<Duration> {
        let state = self.lock();
        let last = state.last_good?;
        Some(if state.failing { last.elapsed() } else { Duration::ZERO })
    }
}

fn row(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = write!(
        out,
        "# HELP cni_route_agent_{name} {help}\n# TYPE cni_route_agent_{name} {kind}\ncni_route_agent_{name} {value}\n"
    );
}

impl Metrics {
    /// Prometheus text format.
    pub fn render(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let gauges: [(&str, &str, &AtomicU64); 9] = [
            ("routes_desired", "Routes to other nodes' pod CIDRs the agent wants.", &self.routes_desired),
            (
                "routes_installed",
                "The agent's routes in the kernel after the last sync.",
                &self.routes_installed,
            ),
            (
                "nodes_off_link",
                "Nodes not on a connected subnet that no tunnel reaches.",
                &self.nodes_off_link,
            ),
            ("pod_cidrs_tunnelled", "Pod CIDRs routed through the VXLAN device.", &self.cidrs_tunnelled),
            (
                "nodes_without_address",
                "Nodes listed with pod CIDRs but no usable address (their last route is kept).",
                &self.nodes_without_address,
            ),
            (
                "pod_cidrs_without_address",
                "Other nodes' pod CIDRs with no node address of their family.",
                &self.pod_cidrs_without_address,
            ),
            (
                "pod_cidrs_unreachable",
                "Other nodes' pod CIDRs without a node address of their family that no route reaches: none kept, or one kept through the VXLAN device (the tunnel's entries for the node went with its address).",
                &self.pod_cidrs_unreachable,
            ),
            (
                "pod_cidr_conflicts",
                "Pod CIDR claims overlapping an earlier claim, not routed.",
                &self.pod_cidr_conflicts,
            ),
            ("sync_duration_seconds", "Duration of the last sync.", &self.sync_micros),
        ];
        for (name, help, value) in gauges {
            if name == "sync_duration_seconds" {
                row(&mut out, name, "gauge", help, format!("{:.6}", load(value) as f64 / 1e6));
            } else {
                row(&mut out, name, "gauge", help, load(value));
            }
        }
        let counters: [(&str, &str, &AtomicU64); 4] = [
            ("syncs_total", "Syncs run.", &self.syncs),
            ("sync_errors_total", "Syncs with an error.", &self.sync_errors),
            (
                "netlink_writes_total",
                "Route and nexthop adds, replaces and deletes sent.",
                &self.netlink_writes,
            ),
            ("source_events_total", "Events received from the node source.", &self.source_events),
        ];
        for (name, help, value) in counters {
            row(&mut out, name, "counter", help, load(value));
        }
        let state = self.source.lock();
        out.push_str(
            "# HELP cni_route_agent_source_errors_total Node source failures by kind.\n\
             # TYPE cni_route_agent_source_errors_total counter\n",
        );
        for (kind, count) in &state.errors {
            let _ = writeln!(out, "cni_route_agent_source_errors_total{{kind=\"{kind}\"}} {count}");
        }
        drop(state);
        if let Some(age) = self.source.snapshot_age() {
            row(
                &mut out,
                "source_snapshot_age_seconds",
                "gauge",
                "Age of the last good view of the nodes: 0 while the source is healthy.",
                format!("{:.3}", age.as_secs_f64()),
            );
        }
        row(
            &mut out,
            "ready",
            "gauge",
            "1 once the conflist is written and routes synced.",
            self.ready.load(Ordering::Relaxed) as u8,
        );
        row(
            &mut out,
            "masquerade_fully_random",
            "gauge",
            "1 while the masquerade picks source ports fully at random (the kernel supports it).",
            self.masquerade_fully_random.load(Ordering::Relaxed) as u8,
        );
        out.push_str(&crate::conntrack::render());
        out.push_str(&self.etcd.render());
        self.policy.render(&mut out);
        out
    }

    /// Why the node is not ready, if it is not: `/readyz` answers 503 with it.
    pub fn not_ready(&self, max_snapshot_age: Option<Duration>) -> Option<String> {
        if self.etcd.unreachable() {
            let last = self.etcd.last_error().unwrap_or_default();
            return Some(format!("no etcd endpoint reachable; last: {last}"));
        }
        if !self.ready.load(Ordering::Relaxed) {
            return Some("no conflist or no route sync yet".into());
        }
        let age = self.source.snapshot_age()?;
        match max_snapshot_age {
            Some(max) if age > max => {
                Some(format!("the node source has failed for {}s (bound {}s)", age.as_secs(), max.as_secs()))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_errors_are_counted_by_kind_and_age_only_grows_while_failing() {
        let m = Metrics::default();
        assert_eq!(m.source.snapshot_age(), None);
        m.source.good();
        assert_eq!(m.source.snapshot_age(), Some(Duration::ZERO));
        m.source.error("parse");
        m.source.error("parse");
        m.source.error("missing");
        assert!(m.source.snapshot_age().is_some());
        let text = m.render();
        assert!(text.contains("cni_route_agent_source_errors_total{kind=\"parse\"} 2"), "{text}");
        assert!(text.contains("cni_route_agent_source_errors_total{kind=\"missing\"} 1"), "{text}");
        m.ready.store(true, Ordering::Relaxed);
        assert_eq!(m.not_ready(Some(Duration::from_secs(3600))), None);
        assert!(m.not_ready(Some(Duration::ZERO)).is_some(), "failing longer than the bound");
        m.source.good();
        assert_eq!(m.not_ready(Some(Duration::ZERO)), None, "healthy again");
    }
}
