//! `cni-route-agent`: one per node. Learns every node's pod CIDRs and address from a source,
//! keeps routes to the other nodes' pod CIDRs in the kernel (host-gw, no encapsulation),
//! writes the node's CNI config once it is ready, and masquerades pod traffic leaving the
//! cluster.

pub mod conflist;
pub mod error;
pub mod http;
pub mod install;
pub mod kernel;
pub mod masq;
pub mod model;
pub mod nexthop;
pub mod plan;
pub mod sources;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::error::AgentError;
use crate::kernel::Kernel;
use crate::model::Snapshot;

/// Where nodes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A JSON/YAML file, re-read on change.
    File(PathBuf),
    /// Node objects of a Kubernetes API server.
    Kubernetes(sources::kube::KubeOptions),
    /// Subnet leases in etcd (flannel's layout), for clusters without a pod CIDR allocator.
    Etcd(sources::etcd::EtcdOptions),
}

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's name.
    pub node_name: String,
    /// Where nodes come from.
    pub source: Source,
    /// The cluster's pod CIDRs (masquerade exceptions); empty: every node's pod CIDRs.
    pub cluster_cidrs: Vec<IpNetwork>,
    /// CNI config directory.
    pub cni_conf_dir: PathBuf,
    /// CNI config file name.
    pub cni_conf_name: String,
    /// CNI network name.
    pub network_name: String,
    /// host-local's data directory in the conflist.
    pub ipam_data_dir: String,
    /// Chain portmap in the conflist.
    pub portmap: bool,
    /// Masquerade pod traffic leaving the cluster.
    pub masquerade: bool,
    /// Address for /healthz, /readyz, /metrics.
    pub listen: SocketAddr,
    /// Periodic full resync.
    pub resync: Duration,
    /// The route protocol number that marks the agent's routes.
    pub route_protocol: u8,
    /// MTU for the conflist (default: the underlay link's).
    pub mtu: Option<u32>,
    /// Use nexthop objects where the kernel has them.
    pub nexthops: bool,
}

/// What the agent exposes on /metrics and /readyz.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Ready: conflist written and a route sync succeeded.
    pub ready: AtomicBool,
    /// Routes wanted.
    pub routes_desired: AtomicU64,
    /// Routes in the kernel after the last sync.
    pub routes_installed: AtomicU64,
    /// Duration of the last sync in microseconds.
    pub sync_micros: AtomicU64,
    /// Syncs run.
    pub syncs: AtomicU64,
    /// Syncs that failed in part or whole.
    pub sync_errors: AtomicU64,
    /// Netlink route writes (adds, replaces, deletes).
    pub netlink_writes: AtomicU64,
    /// Events from the source.
    pub source_events: AtomicU64,
    /// Nodes not on this node's L2 segment.
    pub nodes_off_link: AtomicU64,
    /// The source has published its first complete view.
    pub source_ready: AtomicBool,
}

impl Metrics {
    /// Prometheus text format.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, String); 9] = [
            (
                "routes_desired",
                "gauge",
                "Routes to other nodes' pod CIDRs the agent wants.",
                g(&self.routes_desired).to_string(),
            ),
            (
                "routes_installed",
                "gauge",
                "The agent's routes in the kernel after the last sync.",
                g(&self.routes_installed).to_string(),
            ),
            (
                "sync_duration_seconds",
                "gauge",
                "Duration of the last sync.",
                format!("{:.6}", g(&self.sync_micros) as f64 / 1e6),
            ),
            ("syncs_total", "counter", "Syncs run.", g(&self.syncs).to_string()),
            ("sync_errors_total", "counter", "Syncs with an error.", g(&self.sync_errors).to_string()),
            (
                "netlink_writes_total",
                "counter",
                "Route adds, replaces and deletes sent.",
                g(&self.netlink_writes).to_string(),
            ),
            (
                "source_events_total",
                "counter",
                "Events received from the node source.",
                g(&self.source_events).to_string(),
            ),
            (
                "nodes_off_link",
                "gauge",
                "Nodes whose address is not on a connected subnet.",
                g(&self.nodes_off_link).to_string(),
            ),
            (
                "ready",
                "gauge",
                "1 once the conflist is written and routes synced.",
                (self.ready.load(Ordering::Relaxed) as u8).to_string(),
            ),
        ];
        let mut s = String::new();
        for (name, kind, help, v) in rows {
            s.push_str(&format!(
                "# HELP cni_route_agent_{name} {help}\n# TYPE cni_route_agent_{name} {kind}\ncni_route_agent_{name} {v}\n"
            ));
        }
        s
    }
}

/// What nexthops the desired routes need: (gateway -> id, id -> gateway, ids to delete after
/// the routes, errors, nexthops written).
type NexthopPlan = (BTreeMap<IpAddr, u32>, BTreeMap<u32, IpAddr>, Vec<u32>, Vec<String>, usize);

fn nexthops(k: &Kernel, d: &plan::Desired, connected: &[(IpNetwork, u32, IpAddr)]) -> NexthopPlan {
    let all = match nexthop::dump() {
        Ok(a) => a,
        Err(e) => {
            return (BTreeMap::new(), BTreeMap::new(), vec![], vec![format!("dumping nexthops: {e}")], 0)
        }
    };
    let ours: BTreeMap<IpAddr, u32> =
        all.iter().filter(|n| n.proto == k.proto()).filter_map(|n| Some((n.gw?, n.id))).collect();
    let used: BTreeSet<u32> = all.iter().map(|n| n.id).collect();
    let want: Vec<IpAddr> = d.routes.values().copied().collect::<BTreeSet<_>>().into_iter().collect();
    let ids = nexthop::assign(&want, &ours, &used);
    let new: Vec<(u32, IpAddr, u32)> = ids
        .iter()
        .filter(|(gw, _)| !ours.contains_key(gw))
        .filter_map(|(gw, id)| {
            connected.iter().find(|(n, _, _)| n.contains(*gw)).map(|(_, oif, _)| (*id, *gw, *oif))
        })
        .collect();
    let (written, errors) = nexthop::add(&new, k.proto());
    let stale: Vec<u32> = ours.iter().filter(|(gw, _)| !ids.contains_key(gw)).map(|(_, id)| *id).collect();
    let by_id = ours.iter().map(|(g, i)| (*i, *g)).chain(ids.iter().map(|(g, i)| (*i, *g))).collect();
    (ids, by_id, stale, errors, written)
}

struct State {
    synced: bool,
    conflist: Option<conflist::Inputs>,
    masq: Option<(Vec<IpNetwork>, Vec<IpNetwork>)>,
    off_link: Vec<(String, IpAddr)>,
}

async fn sync(
    opts: &Options,
    k: &Kernel,
    snap: &Snapshot,
    st: &mut State,
    m: &Metrics,
) -> Result<(), AgentError> {
    let start = Instant::now();
    let connected = k.connected().await?;
    let nets: Vec<IpNetwork> = connected.iter().map(|(n, _, _)| *n).collect();
    let d = plan::desired(snap, &opts.node_name, &nets);
    if d.off_link != st.off_link {
        for (n, ip) in &d.off_link {
            tracing::warn!(node = %n, address = %ip, "node is not on a connected subnet: not routing to its pods");
        }
        st.off_link = d.off_link.clone();
    }
    for (cidr, kept, ignored) in &d.conflicts {
        tracing::warn!(%cidr, %kept, %ignored, "pod CIDR claimed twice");
    }
    // Masquerade exceptions first: a route to a new node's pods must never exist while its
    // CIDR is still outside the exceptions (its pods would see the node address).
    if let Some(me) = snap.get(&opts.node_name).filter(|n| !n.pod_cidrs.is_empty()) {
        if opts.masquerade {
            let cluster: Vec<IpNetwork> = if opts.cluster_cidrs.is_empty() {
                snap.values().flat_map(|n| n.pod_cidrs.iter().copied()).collect()
            } else {
                opts.cluster_cidrs.clone()
            };
            let want = (me.pod_cidrs.clone(), cluster);
            if st.masq.as_ref() != Some(&want) {
                masq::apply(&want.0, &want.1)?;
                st.masq = Some(want);
            }
        }
    }
    // Nexthop objects first (one per node address), so routes can point at them; the ones no
    // route wants any more go after the routes.
    let (nh_ids, nh_gw, stale_nh, mut errors, nh_writes) =
        if k.nexthops { nexthops(k, &d, &connected) } else { Default::default() };
    let have = k.routes(&nh_gw).await?;
    let diff = plan::diff(&d.routes, &have);
    let (applied, route_errors) = k.apply(&diff, &nh_ids).await;
    errors.extend(route_errors);
    let (deleted_nh, del_errors) = nexthop::del(&stale_nh);
    errors.extend(del_errors);
    m.netlink_writes.fetch_add((nh_writes + deleted_nh) as u64, Ordering::Relaxed);
    for e in &errors {
        tracing::error!(error = %e, "route sync");
    }
    m.syncs.fetch_add(1, Ordering::Relaxed);
    m.netlink_writes.fetch_add((applied.upserted + applied.deleted) as u64, Ordering::Relaxed);
    m.routes_desired.store(d.routes.len() as u64, Ordering::Relaxed);
    m.routes_installed.store((d.routes.len() - applied.failed.min(d.routes.len())) as u64, Ordering::Relaxed);
    m.nodes_off_link.store(d.off_link.len() as u64, Ordering::Relaxed);
    m.sync_micros.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    if !diff.is_empty() {
        tracing::info!(
            upserted = applied.upserted,
            deleted = applied.deleted,
            failed = applied.failed,
            "routes synced"
        );
    }
    if !errors.is_empty() {
        m.sync_errors.fetch_add(1, Ordering::Relaxed);
        return Err(AgentError::Source(format!("{} route changes failed", errors.len())));
    }
    st.synced = true;

    let Some(me) = snap.get(&opts.node_name).filter(|n| !n.pod_cidrs.is_empty()) else {
        return Ok(());
    };
    let mtu = match opts.mtu {
        Some(m) => Some(m),
        None => {
            let mine =
                |ip: &IpAddr| Some(*ip) == me.ipv4.map(IpAddr::V4) || Some(*ip) == me.ipv6.map(IpAddr::V6);
            match connected.iter().find(|(_, _, ip)| mine(ip)) {
                Some((_, index, _)) => k.mtu_of_link(*index).await?,
                None => None,
            }
        }
    };
    let inputs = conflist::Inputs {
        name: opts.network_name.clone(),
        pod_cidrs: me.pod_cidrs.clone(),
        mtu,
        data_dir: opts.ipam_data_dir.clone(),
        portmap: opts.portmap,
    };
    if st.conflist.as_ref() != Some(&inputs) {
        let text = serde_json::to_string_pretty(&conflist::render(&inputs)).expect("json") + "\n";
        if conflist::write_if_changed(&opts.cni_conf_dir, &opts.cni_conf_name, &text)? {
            tracing::info!(path = %opts.cni_conf_dir.join(&opts.cni_conf_name).display(), "wrote the CNI config");
        }
        st.conflist = Some(inputs);
    }
    m.ready.store(true, Ordering::Relaxed);
    Ok(())
}

/// Runs the agent until SIGTERM/SIGINT. Routes stay in place on exit, so pods keep working
/// through a restart.
pub async fn run(opts: Options) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::default());
    let (tx, mut rx) = watch::channel(Snapshot::new());
    {
        let m = metrics.clone();
        let addr = opts.listen;
        tokio::spawn(async move {
            if let Err(e) = http::serve(addr, m).await {
                tracing::error!(%e, "HTTP endpoint");
            }
        });
    }
    {
        let m = metrics.clone();
        let src = opts.source.clone();
        tokio::spawn(async move {
            let r = match src {
                Source::File(p) => sources::file::run(p, tx, m).await,
                Source::Kubernetes(o) => sources::kube::run(o, tx, m).await,
                Source::Etcd(o) => sources::etcd::run(o, tx, m).await,
            };
            if let Err(e) = r {
                tracing::error!(%e, "node source stopped");
            }
        });
    }
    let k = Kernel::new(opts.route_protocol, opts.nexthops)?;
    tracing::info!(nexthop_objects = k.nexthops, "kernel");
    let mut events = kernel::events(opts.route_protocol)?;
    let mut tick = tokio::time::interval(opts.resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::io("SIGINT handler"))?;
    let mut st = State { synced: false, conflist: None, masq: None, off_link: vec![] };
    tracing::info!(node = %opts.node_name, protocol = opts.route_protocol, "started");
    let mut source_alive = true;
    loop {
        tokio::select! {
            r = rx.changed(), if source_alive => if r.is_err() {
                // Keep serving the last snapshot; wake only on kernel events and ticks.
                tracing::warn!("node source ended; keeping the last nodes");
                source_alive = false;
            },
            Some(()) = events.recv() => while events.try_recv().is_ok() {},
            _ = tick.tick() => {},
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        if !metrics.source_ready.load(Ordering::SeqCst) {
            continue;
        }
        let snap = rx.borrow_and_update().clone();
        if let Err(e) = sync(&opts, &k, &snap, &mut st, &metrics).await {
            tracing::error!(%e, "sync failed; retrying on the next event or tick");
        }
        if !st.synced {
            metrics.ready.store(false, Ordering::Relaxed);
        }
    }
    tracing::info!("terminating: routes and rules stay in place");
    Ok(())
}
