//! The reconciler: owns the kernel handle and what the agent last observed and did, and
//! brings the kernel to the plan for each snapshot the source publishes. The plan itself is
//! pure ([`crate::plan`], [`crate::nexthop::NexthopPlan`]); this is where it meets the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ipnetwork::IpNetwork;

use crate::error::AgentError;
use crate::kernel::{Applied, Kernel};
use crate::metrics::Metrics;
use crate::model::{NodeInfo, Snapshot};
use crate::nexthop::{Existing, NexthopPlan};
use crate::plan::{self, Conflict, Desired, Unaddressed};
use crate::vxlan::{self, VtepPlan};
use crate::{conflist, gateways, masq, nexthop, Options};

/// What was reported last, so each problem is logged once per change, not on every sync.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reported {
    off_link: Vec<(String, IpAddr)>,
    tunnelled: BTreeMap<IpNetwork, plan::Tunnel>,
    conflicts: Vec<Conflict>,
    without_address: Vec<Unaddressed>,
}

/// Inputs of the masquerade rule set: this node's pod CIDRs, and destinations kept unmasqueraded.
pub(crate) type MasqInputs = (Vec<IpNetwork>, Vec<IpNetwork>);

/// The masquerade's sources (this node's pod CIDRs, former ones still `retained` included)
/// and the destinations that keep the pods' source.
pub(crate) fn masq_inputs(
    opts: &Options,
    snap: &Snapshot,
    me: &NodeInfo,
    retained: &[IpNetwork],
) -> MasqInputs {
    let mut keep_source: Vec<IpNetwork> = if opts.cluster_cidrs.is_empty() {
        snap.values().flat_map(|n| n.pod_cidrs.iter().copied()).collect()
    } else {
        opts.cluster_cidrs.clone()
    };
    keep_source.extend(&opts.no_masquerade_cidrs);
    // Traffic to this node's former pods is pod traffic too.
    keep_source.extend(retained);
    let own: Vec<IpNetwork> = me.pod_cidrs.iter().chain(retained).copied().collect();
    (own, keep_source)
}

/// This node as the snapshot has it, with `--node-ip` overriding its addresses per family.
pub(crate) fn me_in(opts: &Options, snap: &Snapshot) -> Option<NodeInfo> {
    let mut me = snap.get(&opts.node_name).filter(|n| !n.pod_cidrs.is_empty())?.clone();
    for ip in &opts.node_ips {
        match ip {
            IpAddr::V4(v4) => me.ipv4 = Some(*v4),
            IpAddr::V6(v6) => me.ipv6 = Some(*v6),
        }
    }
    Some(me)
}

/// What applying the routes did.
struct RouteOutcome {
    applied: Applied,
    /// Netlink writes, routes and nexthops.
    writes: usize,
    errors: Vec<String>,
    nexthops: NexthopPlan,
    diff: plan::Diff,
}

/// The agent's own nexthops and routes in the kernel, as dumps read them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct KernelView {
    pub(crate) existing: Existing,
    pub(crate) have: BTreeMap<IpNetwork, IpAddr>,
}

impl KernelView {
    /// The view after every write of `nexthops` and `diff` succeeded: what a dump would read.
    pub(crate) fn after(mut self, nexthops: &NexthopPlan, diff: &plan::Diff) -> KernelView {
        let stale: BTreeSet<u32> = nexthops.stale.iter().copied().collect();
        self.existing.ours.retain(|_, id| !stale.contains(id));
        self.existing.used.retain(|id| !stale.contains(id));
        for (id, gw, _) in &nexthops.create {
            self.existing.ours.insert(*gw, *id);
            self.existing.used.insert(*id);
        }
        for (dst, _) in &diff.delete {
            self.have.remove(dst);
        }
        self.have.extend(diff.upsert.iter().copied());
        self
    }
}

/// Brings the kernel to the plan; one per agent.
pub struct Reconciler {
    opts: Options,
    kernel: Kernel,
    metrics: Arc<Metrics>,
    /// A sync has fully succeeded.
    synced: bool,
    conflist: Option<conflist::Inputs>,
    masq: Option<MasqInputs>,
    reported: Reported,
    /// The kernel as the last fully successful sync left it; `None`: dump it. At 20,000
    /// nodes the two dumps are most of a sync, and a source change (one node added) would
    /// pay for them again although only the agent's own writes changed the kernel since.
    /// Anything else that may have (a kernel event, an error, the tick) drops it.
    kernel_view: Option<KernelView>,
}

impl Reconciler {
    /// A reconciler over `kernel`, recording into `metrics`.
    pub fn new(opts: Options, kernel: Kernel, metrics: Arc<Metrics>) -> Reconciler {
        Reconciler {
            opts,
            kernel,
            metrics,
            synced: false,
            conflist: None,
            masq: None,
            reported: Reported::default(),
            kernel_view: None,
        }
    }

    /// The next sync dumps the kernel's routes and nexthops instead of trusting what the
    /// last one left: after a kernel event of ours, and on the periodic resync, which so
    /// also repairs what no event tells (a route added by hand with our protocol).
    pub fn kernel_may_have_changed(&mut self) {
        self.kernel_view = None;
    }

    /// Whether a sync has fully succeeded (routes in place and, once known, the conflist).
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// This node as the snapshot has it, with `--node-ip` overriding its addresses per family.
    fn me(&self, snap: &Snapshot) -> Option<NodeInfo> {
        me_in(&self.opts, snap)
    }

    /// One pass: masquerade, nexthops, routes, then the conflist. Errors of single route
    /// writes do not stop the others; they fail the sync as a whole.
    pub async fn sync(&mut self, snap: &Snapshot) -> Result<(), AgentError> {
        let start = Instant::now();
        let connected = self.kernel.connected().await?;
        let nets: Vec<IpNetwork> = connected.iter().map(|(net, _, _)| *net).collect();
        let KernelView { existing, have } = match self.kernel_view.take() {
            Some(view) => view,
            None => self.dump().await?,
        };
        let me = self.me(snap);
        let local: Vec<IpAddr> =
            me.iter().flat_map(|m| [m.ipv4.map(IpAddr::V4), m.ipv6.map(IpAddr::V6)]).flatten().collect();
        let tunnelling = plan::Tunnelling { backend: self.opts.backend, local: local.clone() };
        let desired = plan::desired_with(snap, &self.opts.node_name, &nets, &have, &tunnelling);
        self.report(&desired);
        // Before the conflist can name a new range (see crate::gateways); a failure here must
        // not keep routes from being written, so it fails the sync only at its end.
        let (retained, gateway_error) = match &me {
            Some(me) => self.bridge_gateways(me).await,
            None => (Vec::new(), None),
        };
        // Masquerade exceptions first: a route to a new node's pods must never exist while its
        // CIDR is still outside the exceptions (its pods would see the node address).
        if let Some(me) = &me {
            self.masquerade(snap, me, &retained)?;
        }
        let mut underlay_mtu = BTreeMap::new();
        for ip in &local {
            if let Some((_, index, _)) = connected.iter().find(|(_, _, a)| a == ip) {
                if let Some(mtu) = self.kernel.mtu_of_link(*index).await? {
                    underlay_mtu.insert(*ip, mtu);
                }
            }
        }
        let vtep = VtepPlan::new(&desired.tunnelled, &local, |ip| underlay_mtu.get(ip).copied());
        // A tunnel that cannot be set up (no vxlan module, the port taken) fails the sync
        // but must not keep the direct routes from being written.
        let mut tunnel_errors = Vec::new();
        let ensured =
            crate::kernel::vxlan::ensure(&self.kernel, &vtep, self.opts.vxlan).await.unwrap_or_else(|e| {
                tunnel_errors.push(e.to_string());
                crate::kernel::vxlan::Ensured::default()
            });
        if tunnel_errors.is_empty() {
            self.kernel.tunnel_links.set(&ensured.index);
        }
        let tunnel_oif: BTreeMap<IpNetwork, u32> =
            vtep.routes.iter().filter_map(|(cidr, dev)| Some((*cidr, *ensured.index.get(dev)?))).collect();
        let RouteOutcome { applied, mut writes, mut errors, nexthops, diff } =
            self.apply_routes(&desired, &have, &existing, &connected, &tunnel_oif).await;
        // Stale entries and unused devices only once no route needs them.
        let (cleaned, cleanup_errors) = crate::kernel::vxlan::cleanup(&self.kernel, &vtep)
            .await
            .unwrap_or_else(|e| (0, vec![e.to_string()]));
        writes += ensured.writes + cleaned;
        errors.extend(tunnel_errors);
        errors.extend(ensured.errors);
        errors.extend(cleanup_errors);
        errors.extend(gateway_error);
        self.record(&desired, &applied, writes, start);
        if !diff.is_empty() {
            tracing::info!(
                upserted = applied.upserted,
                deleted = applied.deleted,
                failed = applied.failed,
                "routes synced"
            );
        }
        for e in &errors {
            tracing::error!(error = %e, "route sync");
        }
        if !errors.is_empty() {
            self.metrics.sync_errors.fetch_add(1, Ordering::Relaxed);
            let summary = format!("{} route or nexthop changes failed", errors.len());
            if errors.iter().any(|e| crate::overrun::is_overrun_message(e)) {
                return Err(AgentError::Overrun(summary));
            }
            return Err(AgentError::Route(summary));
        }
        self.kernel_view = Some(KernelView { existing, have }.after(&nexthops, &diff));
        self.synced = true;
        if let Some(me) = me {
            self.write_conflist(&me, &connected, &desired).await?;
            self.metrics.ready.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Nexthops first (routes name them), then the routes, then the nexthops no route wants.
    async fn apply_routes(
        &self,
        desired: &Desired,
        have: &BTreeMap<IpNetwork, IpAddr>,
        existing: &Existing,
        connected: &[(IpNetwork, u32, IpAddr)],
        tunnel_oif: &BTreeMap<IpNetwork, u32>,
    ) -> RouteOutcome {
        let mut errors = Vec::new();
        let mut writes = 0;
        let nexthops = if self.kernel.nexthops {
            // Tunnelled routes name the VXLAN device, never a nexthop object.
            let gateways: BTreeSet<IpAddr> = desired
                .routes
                .iter()
                .filter(|(cidr, gw)| **gw != plan::tunnel_gateway(cidr))
                .map(|(_, gw)| *gw)
                .collect();
            let plan = NexthopPlan::new(existing, &gateways, connected);
            let (written, errs) = nexthop::add_async(plan.create.clone(), self.kernel.proto()).await;
            writes += written;
            errors.extend(errs);
            plan
        } else {
            NexthopPlan::default()
        };
        let mut diff = plan::diff(&desired.routes, have);
        // Without its device a tunnelled route cannot be written; the kernel's one (if any)
        // stays until the device is back.
        diff.upsert.retain(|(cidr, _)| {
            let orphan = desired.tunnelled.contains_key(cidr) && !tunnel_oif.contains_key(cidr);
            if orphan {
                errors.push(format!("route to {cidr}: no VXLAN device"));
            }
            !orphan
        });
        let (applied, route_errors) = self.kernel.apply(&diff, &nexthops.ids, tunnel_oif).await;
        errors.extend(route_errors);
        let (deleted, errs) = nexthop::del_async(nexthops.stale.clone()).await;
        writes += deleted + applied.upserted + applied.deleted;
        errors.extend(errs);
        RouteOutcome { applied, writes, errors, nexthops, diff }
    }

    /// Our nexthops and routes, from the kernel.
    async fn dump(&self) -> Result<KernelView, AgentError> {
        let existing = if self.kernel.nexthops {
            Existing::new(&nexthop::dump_async().await.map_err(AgentError::Route)?, self.kernel.proto())
        } else {
            Existing::default()
        };
        let have = self.kernel.routes(&existing.gateways()).await?;
        Ok(KernelView { existing, have })
    }

    /// The bridge's gateways for this node's pod CIDRs: the former ranges still leased, and
    /// what went wrong.
    async fn bridge_gateways(&self, me: &NodeInfo) -> (Vec<IpNetwork>, Option<String>) {
        let data_dir = std::path::Path::new(&self.opts.ipam_data_dir);
        match gateways::reconcile(&self.kernel, &me.pod_cidrs, data_dir, &self.opts.network_name).await {
            Ok(retained) => (retained, None),
            Err(e) => (Vec::new(), Some(format!("bridge gateways: {e}"))),
        }
    }

    /// `retained`: former pod CIDRs of this node still in use; their pods are masqueraded too.
    fn masquerade(
        &mut self,
        snap: &Snapshot,
        me: &NodeInfo,
        retained: &[IpNetwork],
    ) -> Result<(), AgentError> {
        if !self.opts.masquerade {
            return Ok(());
        }
        let want = masq_inputs(&self.opts, snap, me, retained);
        if self.masq.as_ref() != Some(&want) {
            let random = masq::apply(&want.0, &want.1, self.opts.masquerade_fully_random)?;
            self.metrics.masquerade_fully_random.store(random, Ordering::Relaxed);
            self.masq = Some(want);
        }
        Ok(())
    }

    async fn write_conflist(
        &mut self,
        me: &NodeInfo,
        connected: &[(IpNetwork, u32, IpAddr)],
        desired: &Desired,
    ) -> Result<(), AgentError> {
        // The tunnel's overhead: the largest of the underlays in use, or, when the overhead
        // is always taken, of the underlay a tunnel would use (IPv4 if the node has it).
        let mut overhead = desired.tunnelled.values().map(|t| vxlan::overhead(&t.remote)).max();
        if self.opts.vxlan_mtu_always && self.opts.backend != plan::Backend::HostGw {
            let underlay = me.ipv4.map(IpAddr::V4).or(me.ipv6.map(IpAddr::V6));
            overhead = overhead.or(underlay.map(|u| vxlan::overhead(&u)));
        }
        let mtu = match self.opts.mtu {
            Some(mtu) => Some(mtu),
            None => {
                let mine = |ip: &IpAddr| {
                    Some(*ip) == me.ipv4.map(IpAddr::V4) || Some(*ip) == me.ipv6.map(IpAddr::V6)
                };
                let underlay = match connected.iter().find(|(_, _, ip)| mine(ip)) {
                    Some((_, index, _)) => self.kernel.mtu_of_link(*index).await?,
                    None => None,
                };
                underlay.map(|m| m.saturating_sub(overhead.unwrap_or(0)))
            }
        };
        let inputs = conflist::Inputs {
            name: self.opts.network_name.clone(),
            pod_cidrs: me.pod_cidrs.clone(),
            mtu,
            data_dir: self.opts.ipam_data_dir.clone(),
            portmap: self.opts.portmap,
            // Policies trust pod source addresses: pods may send only from their own.
            spoof_checks: self.opts.policy != crate::PolicyOptions::Off,
        };
        if self.conflist.as_ref() == Some(&inputs) {
            return Ok(());
        }
        let text = serde_json::to_string_pretty(&conflist::render(&inputs))
            .map_err(|e| AgentError::Config(format!("rendering the conflist: {e}")))?
            + "\n";
        let (dir, name) = (&self.opts.cni_conf_dir, &self.opts.cni_conf_name);
        if conflist::write_if_changed(dir, name, &text)? {
            tracing::info!(path = %dir.join(name).display(), "wrote the CNI config");
        }
        self.conflist = Some(inputs);
        Ok(())
    }

    /// Logs what cannot be routed, once per change.
    fn report(&mut self, d: &Desired) {
        let now = Reported {
            off_link: d.off_link.clone(),
            tunnelled: d.tunnelled.clone(),
            conflicts: d.conflicts.clone(),
            without_address: d.without_address.clone(),
        };
        if now.off_link != self.reported.off_link {
            for (node, ip) in &now.off_link {
                tracing::warn!(%node, address = %ip, "node is not on a connected subnet and no tunnel reaches it: not routing to its pods");
            }
        }
        if now.tunnelled != self.reported.tunnelled {
            for (cidr, t) in &now.tunnelled {
                tracing::info!(node = %t.node, %cidr, remote = %t.remote, "routing through the VXLAN tunnel");
            }
        }
        if now.conflicts != self.reported.conflicts {
            for c in &now.conflicts {
                tracing::warn!(
                    node = %c.claimant, cidr = %c.cidr, owner = %c.owner, owner_cidr = %c.owner_cidr,
                    "pod CIDR overlaps another node's: not routing it"
                );
            }
        }
        if now.without_address != self.reported.without_address {
            for u in &now.without_address {
                match u.kept {
                    Some(_) if u.tunnel => tracing::warn!(
                        node = %u.node, cidr = %u.cidr,
                        "node has no address of the pod CIDR's family: its tunnelled route is kept but leads nowhere (no VTEP to send to); its pods there are unreachable"
                    ),
                    Some(gw) => tracing::warn!(
                        node = %u.node, cidr = %u.cidr, via = %gw,
                        "node has no address of the pod CIDR's family: keeping its last route"
                    ),
                    None => tracing::warn!(
                        node = %u.node, cidr = %u.cidr,
                        "node has no address of the pod CIDR's family: its pods there are unreachable"
                    ),
                }
            }
        }
        self.reported = now;
    }

    fn record(&self, d: &Desired, applied: &Applied, writes: usize, start: Instant) {
        let m = &self.metrics;
        let set = |gauge: &std::sync::atomic::AtomicU64, v: usize| gauge.store(v as u64, Ordering::Relaxed);
        m.syncs.fetch_add(1, Ordering::Relaxed);
        m.netlink_writes.fetch_add(writes as u64, Ordering::Relaxed);
        set(&m.routes_desired, d.routes.len());
        set(&m.routes_installed, d.routes.len() - applied.failed.min(d.routes.len()));
        set(&m.nodes_off_link, d.off_link.len());
        set(&m.cidrs_tunnelled, d.tunnelled.len());
        set(&m.nodes_without_address, d.nodes_without_address.len());
        set(&m.pod_cidrs_without_address, d.without_address.len());
        let unreachable: Vec<String> = d
            .without_address
            .iter()
            .filter(|u| u.kept.is_none() || u.tunnel)
            .map(|u| {
                format!(
                    "pod CIDR {} of node {}: the node has no address of its family: unreachable",
                    u.cidr, u.node
                )
            })
            .collect();
        set(&m.pod_cidrs_unreachable, unreachable.len());
        if let Ok(mut warnings) = m.warnings.lock() {
            *warnings = unreachable;
        }
        set(&m.pod_cidr_conflicts, d.conflicts.len());
        m.sync_micros.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_view_is_what_a_dump_after_the_writes_reads() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let net = |s: &str| -> IpNetwork { s.parse().unwrap() };
        let before = KernelView {
            existing: Existing {
                ours: [(ip("10.200.0.2"), 1), (ip("10.200.0.3"), 2)].into(),
                used: [1, 2, 7].into(),
            },
            have: [(net("10.244.2.0/24"), ip("10.200.0.2")), (net("10.244.3.0/24"), ip("10.200.0.3"))].into(),
        };
        // node-3 moved to .4 (new nexthop 3, the old one stale), node-5 added through .2.
        let nexthops =
            NexthopPlan { ids: BTreeMap::new(), create: vec![(3, ip("10.200.0.4"), 2)], stale: vec![2] };
        let diff = plan::Diff {
            upsert: vec![(net("10.244.3.0/24"), ip("10.200.0.4")), (net("10.244.5.0/24"), ip("10.200.0.2"))],
            delete: vec![],
        };
        let after = before.after(&nexthops, &diff);
        assert_eq!(after.existing.ours, [(ip("10.200.0.2"), 1), (ip("10.200.0.4"), 3)].into());
        assert_eq!(after.existing.used, [1, 3, 7].into(), "another owner's 7 stays in use");
        assert_eq!(
            after.have,
            [
                (net("10.244.2.0/24"), ip("10.200.0.2")),
                (net("10.244.3.0/24"), ip("10.200.0.4")),
                (net("10.244.5.0/24"), ip("10.200.0.2"))
            ]
            .into()
        );
        let gone = plan::Diff { upsert: vec![], delete: vec![(net("10.244.2.0/24"), ip("10.200.0.2"))] };
        let after = after.after(&NexthopPlan::default(), &gone);
        assert!(!after.have.contains_key(&net("10.244.2.0/24")));
    }
}
