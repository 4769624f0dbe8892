//! `cni-route-agent`: one per node. Learns every node's pod CIDRs and address from a source,
//! keeps routes to the other nodes' pod CIDRs in the kernel (host-gw, no encapsulation),
//! writes the node's CNI config once it is ready, and masquerades pod traffic leaving the
//! cluster.

pub mod conflist;
pub mod conntrack;
pub mod doctor;
pub mod dryrun;
pub mod error;
pub mod gateways;
pub mod handback;
pub mod http;
pub mod install;
pub mod kernel;
pub mod masq;
pub mod metrics;
pub mod model;
pub mod nexthop;
pub mod options;
pub mod overrun;
pub mod plan;
pub mod policy;
pub mod probe;
pub mod reconcile;
pub mod sources;
pub mod vxlan;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::error::AgentError;
use crate::kernel::Kernel;
pub use crate::metrics::Metrics;
use crate::model::Snapshot;
pub use crate::options::{Options, PolicyOptions, Source};
use crate::reconcile::Reconciler;

/// Starts NetworkPolicy enforcement, or removes what an earlier agent enforced.
fn start_policy(opts: &Options, metrics: &Arc<Metrics>) {
    let (tx, rx) = watch::channel(None);
    let source = match opts.policy.clone() {
        PolicyOptions::Off => {
            match policy::remove(policy::TABLE) {
                Ok(()) => tracing::info!("network policy off: no policy table"),
                Err(e) => tracing::warn!(%e, "network policy off: could not remove the policy table"),
            }
            return;
        }
        PolicyOptions::Manifests(path) => {
            let metrics = metrics.clone();
            tokio::spawn(async move { policy::objects::run(path, tx, metrics).await })
        }
        PolicyOptions::Kubernetes(kube) => {
            let metrics = metrics.clone();
            tokio::spawn(async move { sources::kube_policy::run(kube, tx, metrics).await })
        }
    };
    metrics.policy.enabled.store(true, Ordering::Relaxed);
    tokio::spawn(async move {
        if let Ok(Err(e)) = source.await {
            tracing::error!(%e, "policy source stopped; enforcing its last view");
        }
    });
    tokio::spawn(policy::run(opts.node_name.clone(), rx, metrics.clone(), opts.resync));
}

/// Runs the agent until SIGTERM/SIGINT. Routes stay in place on exit, so pods keep working
/// through a restart.
pub async fn run(mut opts: Options) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::default());
    let kernel = Kernel::new(opts.route_protocol, opts.nexthops).await?;
    tracing::info!(nexthop_objects = kernel.nexthops, "kernel");
    if let Source::Etcd(etcd) = &mut opts.source {
        if etcd.node_addrs.is_empty() {
            // Other nodes route to what this node publishes: never an empty list.
            etcd.node_addrs = kernel.node_addresses().await?;
            tracing::info!(addresses = ?etcd.node_addrs, "no --node-ip: publishing the default route's link's addresses");
        }
    }
    // `None` until the source has a complete view: until then the agent does not sync at
    // all, so a restart never deletes routes before the source has spoken.
    let (tx, mut rx) = watch::channel::<Option<Snapshot>>(None);
    {
        let metrics = metrics.clone();
        let (addr, max_age) = (opts.listen, opts.max_snapshot_age);
        tokio::spawn(async move {
            if let Err(e) = http::serve(addr, metrics, max_age).await {
                tracing::error!(%e, "HTTP endpoint");
            }
        });
    }
    {
        let metrics = metrics.clone();
        let source = opts.source.clone();
        tokio::spawn(async move {
            let result = match source {
                Source::File(path) => sources::file::run(path, tx, metrics).await,
                Source::Kubernetes(kube) => sources::kube::run(kube, tx, metrics).await,
                Source::Etcd(etcd) => sources::etcd::run(etcd, tx, metrics).await,
            };
            if let Err(e) = result {
                tracing::error!(%e, "node source stopped");
            }
        });
    }
    start_policy(&opts, &metrics);
    let mut events = kernel::events(opts.route_protocol, kernel.tunnel_links.clone())?;
    let mut tick = tokio::time::interval(opts.resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::io("SIGINT handler"))?;
    tracing::info!(node = %opts.node_name, protocol = opts.route_protocol, "started");
    let mut reconciler = Reconciler::new(opts, kernel, metrics.clone());
    let mut source_alive = true;
    // Resyncs in a row after an overrun: see crate::overrun.
    let mut in_a_row = 0;
    let mut resync_now = false;
    let mut nodes: Option<Snapshot> = None;
    loop {
        if std::mem::take(&mut resync_now) {
            // No waiting: the tick may be 30 s away.
            reconciler.kernel_may_have_changed();
        } else {
            tokio::select! {
                r = rx.changed(), if source_alive => if r.is_err() {
                    // Keep serving the last snapshot; wake only on kernel events and ticks.
                    tracing::warn!("node source ended; keeping the last nodes");
                    source_alive = false;
                },
                Some(()) = events.recv() => {
                    while events.try_recv().is_ok() {}
                    reconciler.kernel_may_have_changed();
                }
                _ = tick.tick() => reconciler.kernel_may_have_changed(),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        // A kernel event that came with a source change must not wait for the sync after.
        if events.try_recv().is_ok() {
            while events.try_recv().is_ok() {}
            reconciler.kernel_may_have_changed();
        }
        // The sync awaits, so it cannot hold the channel's lock: it works from the agent's own
        // copy, brought up to date node by node rather than copied whole.
        {
            let published = rx.borrow_and_update();
            let Some(published) = published.as_ref() else { continue };
            match &mut nodes {
                Some(nodes) => model::refresh(nodes, published),
                None => nodes = Some(published.clone()),
            }
        }
        let Some(snap) = &nodes else { continue };
        let result = reconciler.sync(snap).await;
        match (overrun::next(&result, in_a_row), &result) {
            (overrun::Next::ResyncNow, Err(e)) => {
                in_a_row += 1;
                resync_now = true;
                tracing::warn!(%e, attempt = in_a_row, "sync lost netlink messages; resyncing at once");
            }
            (_, Err(e)) => {
                in_a_row = 0;
                tracing::error!(%e, "sync failed; retrying on the next event or tick");
            }
            (_, Ok(())) => in_a_row = 0,
        }
        if !reconciler.synced() {
            metrics.ready.store(false, Ordering::Relaxed);
        }
    }
    tracing::info!("terminating: routes and rules stay in place");
    Ok(())
}
