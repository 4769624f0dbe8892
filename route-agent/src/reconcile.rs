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
use crate::{conflist, masq, nexthop, Options};

/// What was reported last, so each problem is logged once per change, not on every sync.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reported {
    off_link: Vec<(String, IpAddr)>,
    conflicts: Vec<Conflict>,
    without_address: Vec<Unaddressed>,
}

/// Inputs of the masquerade rule set: this node's pod CIDRs, and destinations kept unmasqueraded.
type MasqInputs = (Vec<IpNetwork>, Vec<IpNetwork>);

/// What applying the routes did.
struct RouteOutcome {
    applied: Applied,
    /// Netlink writes, routes and nexthops.
    writes: usize,
    errors: Vec<String>,
    diff_empty: bool,
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
        }
    }

    /// Whether a sync has fully succeeded (routes in place and, once known, the conflist).
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// This node as the snapshot has it, with `--node-ip` overriding its addresses per family.
    fn me(&self, snap: &Snapshot) -> Option<NodeInfo> {
        let mut me = snap.get(&self.opts.node_name).filter(|n| !n.pod_cidrs.is_empty())?.clone();
        for ip in &self.opts.node_ips {
            match ip {
                IpAddr::V4(v4) => me.ipv4 = Some(*v4),
                IpAddr::V6(v6) => me.ipv6 = Some(*v6),
            }
        }
        Some(me)
    }

    /// One pass: masquerade, nexthops, routes, then the conflist. Errors of single route
    /// writes do not stop the others; they fail the sync as a whole.
    pub async fn sync(&mut self, snap: &Snapshot) -> Result<(), AgentError> {
        let start = Instant::now();
        let connected = self.kernel.connected().await?;
        let nets: Vec<IpNetwork> = connected.iter().map(|(net, _, _)| *net).collect();
        let existing = if self.kernel.nexthops {
            Existing::new(&nexthop::dump_async().await.map_err(AgentError::Route)?, self.kernel.proto())
        } else {
            Existing::default()
        };
        let have = self.kernel.routes(&existing.gateways()).await?;
        let desired = plan::desired(snap, &self.opts.node_name, &nets, &have);
        self.report(&desired);
        let me = self.me(snap);
        // Masquerade exceptions first: a route to a new node's pods must never exist while its
        // CIDR is still outside the exceptions (its pods would see the node address).
        if let Some(me) = &me {
            self.masquerade(snap, me)?;
        }
        let RouteOutcome { applied, writes, errors, diff_empty } =
            self.apply_routes(&desired, &have, &existing, &connected).await;
        self.record(&desired, &applied, writes, start);
        if !diff_empty {
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
            return Err(AgentError::Route(format!("{} route or nexthop changes failed", errors.len())));
        }
        self.synced = true;
        if let Some(me) = me {
            self.write_conflist(&me, &connected).await?;
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
    ) -> RouteOutcome {
        let mut errors = Vec::new();
        let mut writes = 0;
        let nexthops = if self.kernel.nexthops {
            let gateways: BTreeSet<IpAddr> = desired.routes.values().copied().collect();
            let plan = NexthopPlan::new(existing, &gateways, connected);
            let (written, errs) = nexthop::add_async(plan.create.clone(), self.kernel.proto()).await;
            writes += written;
            errors.extend(errs);
            plan
        } else {
            NexthopPlan::default()
        };
        let diff = plan::diff(&desired.routes, have);
        let (applied, route_errors) = self.kernel.apply(&diff, &nexthops.ids).await;
        errors.extend(route_errors);
        let (deleted, errs) = nexthop::del_async(nexthops.stale).await;
        writes += deleted + applied.upserted + applied.deleted;
        errors.extend(errs);
        RouteOutcome { applied, writes, errors, diff_empty: diff.is_empty() }
    }

    fn masquerade(&mut self, snap: &Snapshot, me: &NodeInfo) -> Result<(), AgentError> {
        if !self.opts.masquerade {
            return Ok(());
        }
        let mut keep_source: Vec<IpNetwork> = if self.opts.cluster_cidrs.is_empty() {
            snap.values().flat_map(|n| n.pod_cidrs.iter().copied()).collect()
        } else {
            self.opts.cluster_cidrs.clone()
        };
        keep_source.extend(&self.opts.no_masquerade_cidrs);
        let want = (me.pod_cidrs.clone(), keep_source);
        if self.masq.as_ref() != Some(&want) {
            masq::apply(&want.0, &want.1)?;
            self.masq = Some(want);
        }
        Ok(())
    }

    async fn write_conflist(
        &mut self,
        me: &NodeInfo,
        connected: &[(IpNetwork, u32, IpAddr)],
    ) -> Result<(), AgentError> {
        let mtu = match self.opts.mtu {
            Some(mtu) => Some(mtu),
            None => {
                let mine = |ip: &IpAddr| {
                    Some(*ip) == me.ipv4.map(IpAddr::V4) || Some(*ip) == me.ipv6.map(IpAddr::V6)
                };
                match connected.iter().find(|(_, _, ip)| mine(ip)) {
                    Some((_, index, _)) => self.kernel.mtu_of_link(*index).await?,
                    None => None,
                }
            }
        };
        let inputs = conflist::Inputs {
            name: self.opts.network_name.clone(),
            pod_cidrs: me.pod_cidrs.clone(),
            mtu,
            data_dir: self.opts.ipam_data_dir.clone(),
            portmap: self.opts.portmap,
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
            conflicts: d.conflicts.clone(),
            without_address: d.without_address.clone(),
        };
        if now.off_link != self.reported.off_link {
            for (node, ip) in &now.off_link {
                tracing::warn!(%node, address = %ip, "node is not on a connected subnet: not routing to its pods");
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
        set(&m.nodes_without_address, d.nodes_without_address.len());
        set(&m.pod_cidrs_without_address, d.without_address.len());
        set(&m.pod_cidr_conflicts, d.conflicts.len());
        m.sync_micros.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}
