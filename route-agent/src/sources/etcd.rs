//! The `etcd` source, for clusters without a pod CIDR allocator: every agent claims one subnet
//! per family of the cluster CIDRs, holds it with a lease it keeps alive, and watches everyone's.
//!
//! ```text
//! <prefix>/subnets/v4/10.244.3.0-24       {"node":"node-1","addresses":["10.200.0.11","fd00:200::11"]}
//! <prefix>/subnets/v6/fd00:10:244:3::-64  {"node":"node-1","addresses":["10.200.0.11","fd00:200::11"]}
//! <prefix>/last/v4/node-1                 10.244.3.0/24
//! <prefix>/last/v6/node-1                 fd00:10:244:3::/64
//! ```
//!
//! Subnet keys are attached to their node's lease; `last` records have none.
//!
//! A claim is a transaction that puts the subnet key only if it does not exist, so two nodes never
//! hold one subnet; the loser tries the next one. Candidates are scanned from a hash of the node
//! name, so nodes rarely race. After a restart a node moves its own keys to its new lease; the
//! `last` record lets it take the same subnet back even if its lease expired while it was down.
//! A node whose lease expires loses its keys and so leaves every snapshot.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::AgentError;
use crate::model::{NodeInfo, Snapshot};
use crate::sources::etcd_tls::{classify, connect, At, EtcdTls, Failure, Kind, Material, Reporter};
use crate::sources::publish;
use crate::Metrics;

/// Settings of the `etcd` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// The etcd members' client URLs; the client fails over between them.
    pub endpoints: Vec<String>,
    /// The prefix of every key the agent reads and writes (`<prefix>/subnets/...`, `<prefix>/last/...`).
    pub prefix: String,
    /// The cluster CIDRs to carve node subnets from (one per family at most).
    pub cluster_cidrs: Vec<IpNetwork>,
    /// Prefix length of an IPv4 node subnet.
    pub subnet_len_v4: u8,
    /// Prefix length of an IPv6 node subnet.
    pub subnet_len_v6: u8,
    /// This node's name: the value its subnet claim records, and the key of its last claim.
    pub node_name: String,
    /// This node's addresses (one per family at most).
    pub node_addrs: Vec<IpAddr>,
    /// Lease TTL in seconds.
    pub lease_ttl: i64,
    /// TLS and authentication (boxed: it would make `Source` large).
    pub tls: Box<EtcdTls>,
}

/// The value of a subnet key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetValue {
    /// The node holding the subnet.
    pub node: String,
    /// The node's addresses.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

/// Claim transactions lost to other nodes before a session gives up (and starts over).
const MAX_CONFLICTS: usize = 64;
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

fn tag(net: &IpNetwork) -> &'static str {
    if net.is_ipv4() {
        "v4"
    } else {
        "v6"
    }
}

fn root(prefix: &str) -> &str {
    prefix.trim_end_matches('/')
}

/// The key holding `subnet` under `prefix`.
pub fn subnet_key(prefix: &str, subnet: &IpNetwork) -> String {
    format!("{}/subnets/{}/{}", root(prefix), tag(subnet), subnet.to_string().replace('/', "-"))
}

/// The subnet a key under `prefix` names, if it names one.
pub fn parse_key(prefix: &str, key: &str) -> Option<IpNetwork> {
    let rest = key.strip_prefix(root(prefix))?.strip_prefix("/subnets/")?;
    let (t, cidr) = rest.split_once('/')?;
    let (ip, len) = cidr.rsplit_once('-')?;
    let net = IpNetwork::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    (net.ip() == net.network() && t == tag(&net)).then_some(net)
}

/// Parses a subnet key's value; `None` if it is not one.
pub fn parse_value(value: &[u8]) -> Option<SubnetValue> {
    serde_json::from_slice(value).ok()
}

/// How many `/len` subnets `cluster` holds (saturating); `None` if `len` does not fit in it.
pub fn subnet_count(cluster: &IpNetwork, len: u8) -> Option<u128> {
    let bits = if cluster.is_ipv4() { 32 } else { 128 };
    (cluster.prefix() <= len && len <= bits)
        .then(|| 1u128.checked_shl(u32::from(len - cluster.prefix())).unwrap_or(u128::MAX))
}

/// The `i`-th `/len` subnet of `cluster`.
pub fn nth_subnet(cluster: &IpNetwork, len: u8, i: u128) -> IpNetwork {
    let (base, bits) = match cluster.network() {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    let addr = base.wrapping_add(i.checked_shl(u32::from(bits - len)).unwrap_or(0));
    let ip = match cluster {
        IpNetwork::V4(_) => IpAddr::V4(Ipv4Addr::from(addr as u32)),
        IpNetwork::V6(_) => IpAddr::V6(Ipv6Addr::from(addr)),
    };
    IpNetwork::new(ip, len).expect("prefix length checked by subnet_count")
}

/// Where `node` starts scanning `count` subnets. FNV-1a rather than std's hasher: the offset must
/// not change between builds, or restarted nodes would drift.
pub fn start_offset(node: &str, count: u128) -> u128 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, node.as_bytes());
    u128::from(std::hash::Hasher::finish(&h)) % count.max(1)
}

/// The cluster CIDRs (normalized) with their subnet lengths, checked.
fn families(opts: &EtcdOptions) -> Result<Vec<(IpNetwork, u8)>, AgentError> {
    let bad = |m: String| Err(AgentError::Config(format!("etcd source: {m}")));
    if opts.cluster_cidrs.is_empty() || opts.endpoints.is_empty() || opts.lease_ttl <= 0 {
        return bad("needs --cluster-cidr, --etcd-endpoints and a positive --lease-ttl".into());
    }
    let mut out: Vec<(IpNetwork, u8)> = vec![];
    for c in &opts.cluster_cidrs {
        let c = IpNetwork::new(c.network(), c.prefix()).map_err(|e| AgentError::Config(e.to_string()))?;
        let len = if c.is_ipv4() { opts.subnet_len_v4 } else { opts.subnet_len_v6 };
        if subnet_count(&c, len).is_none() {
            return bad(format!("/{len} subnets do not fit in {c}"));
        }
        if out.iter().any(|(o, _)| o.is_ipv4() == c.is_ipv4()) {
            return bad(format!("more than one cluster CIDR of the family of {c}"));
        }
        out.push((c, len));
    }
    Ok(out)
}

/// What a session leaves to the next one.
#[derive(Default)]
struct Carry {
    /// Subnets held in an earlier session: a lost lease must not move this node's pods.
    mine: BTreeMap<&'static str, IpNetwork>,
    /// The lease of the last session, taken over if still alive, so a reconnection (a
    /// certificate rotation, a member going away) rewrites no key.
    lease: Option<i64>,
    /// Index of the endpoint to try first.
    endpoint: usize,
    /// Credential files that failed their checks: not reported again until they change.
    rejected: Option<Material>,
    /// New credential files and a connection of the endpoint in use made with them.
    next: Option<(Material, Client)>,
    reporter: Reporter,
}

/// Why a session ended.
enum End {
    /// The credential files changed and work: go on with `Carry::next`.
    Reload,
    /// It failed; `connected`: after an endpoint had answered.
    Failed { failures: Vec<Failure>, connected: bool },
}

impl From<Failure> for End {
    fn from(f: Failure) -> End {
        End::Failed { failures: vec![f], connected: true }
    }
}

/// Claims this node's subnets, keeps them alive, and publishes every node's.
pub async fn run(
    opts: EtcdOptions,
    tx: watch::Sender<Option<Snapshot>>,
    metrics: Arc<Metrics>,
) -> Result<(), AgentError> {
    let fams = families(&opts)?;
    let opts = EtcdOptions { endpoints: opts.tls.endpoints(&opts.endpoints)?, ..opts };
    metrics.etcd.activate();
    let mut carry = Carry::default();
    let mut backoff = MIN_BACKOFF;
    loop {
        match session(&opts, &fams, &tx, &metrics, &mut carry, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(End::Reload) => {
                tracing::info!("etcd source: credential files changed; reconnecting with them");
                metrics.etcd.reloaded();
                continue;
            }
            Err(End::Failed { failures, connected }) => {
                // Routes stay as they are; only readiness says the source is gone.
                if !connected {
                    metrics.etcd.set_unreachable(true);
                } else if failures.iter().any(|f| f.kind != Kind::Claim) {
                    carry.endpoint += 1;
                }
                for f in failures {
                    metrics.source.error(f.kind.label());
                    carry.reporter.fail(&metrics.etcd, f);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = tx.closed() => return Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type Subnets = BTreeMap<String, (IpNetwork, SubnetValue)>;

fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Option<(String, (IpNetwork, SubnetValue))> {
    let key = std::str::from_utf8(key).ok()?;
    let net = parse_key(prefix, key)?;
    let v = parse_value(value);
    if v.is_none() {
        tracing::warn!(key, "etcd source: ignoring a subnet whose value is not valid");
    }
    Some((key.to_string(), (net, v?)))
}

/// Puts this node's subnet key on `lease` and records the subnet as its last, if `cond` holds.
fn claim_txn(cond: Compare, key: &[u8], value: &str, lease: i64, last_key: &str, net: IpNetwork) -> Txn {
    Txn::new().when([cond]).and_then([
        TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease))),
        TxnOp::put(last_key, net.to_string(), None),
    ])
}

fn snapshot(subnets: &Subnets) -> Snapshot {
    let mut by_node: BTreeMap<&str, (Vec<IpNetwork>, Vec<IpAddr>)> = BTreeMap::new();
    for (net, v) in subnets.values() {
        let e = by_node.entry(&v.node).or_default();
        e.0.push(*net);
        e.1.extend(&v.addresses);
    }
    by_node.into_iter().map(|(n, (c, a))| (n.to_string(), NodeInfo::with_addresses(n, c, &a))).collect()
}

/// Keeps `id` alive if etcd still has it; `None` if it expired.
async fn take_over(
    c: &mut Client,
    id: i64,
) -> Result<Option<(LeaseKeeper, LeaseKeepAliveStream)>, etcd_client::Error> {
    let (mut keeper, mut acks) = c.lease_keep_alive(id).await?;
    keeper.keep_alive().await?;
    Ok(acks.message().await?.is_some_and(|a| a.ttl() > 0).then_some((keeper, acks)))
}

/// The credential files, read and checked.
fn credentials(tls: &EtcdTls, carry: &mut Carry) -> Result<Material, End> {
    let failed = |f: Failure| End::Failed { failures: vec![f], connected: false };
    let m = tls.read().map_err(failed)?;
    tls.validate(&m, std::time::SystemTime::now()).map_err(failed)?;
    for f in [&tls.ca_file, &tls.cert_file, &tls.key_file, &tls.password_file].into_iter().flatten() {
        carry.reporter.ok(&At::File(f.display().to_string()));
    }
    Ok(m)
}

/// New credential files, if they changed and pass their checks.
fn poll_credentials(
    tls: &EtcdTls,
    inuse: &Material,
    carry: &mut Carry,
    metrics: &Metrics,
) -> Option<Material> {
    let m = match tls.read() {
        Ok(m) if m == *inuse || carry.rejected.as_ref() == Some(&m) => return None,
        Ok(m) => m,
        Err(f) => {
            carry.reporter.fail(&metrics.etcd, f);
            return None;
        }
    };
    match tls.validate(&m, std::time::SystemTime::now()) {
        Ok(()) => Some(m),
        Err(f) => {
            carry.reporter.fail(&metrics.etcd, f);
            carry.rejected = Some(m);
            None
        }
    }
}

/// Connects with new credential files while the old connection still serves; `Err(Reload)`
/// with the new connection in `carry` if that works. If it does not (a password etcd does not
/// know yet, a CA that is not the server's), the old connection is kept: it still works and
/// routes stay. The endpoint in use only: this runs between keepalives.
async fn try_credentials(
    opts: &EtcdOptions,
    m: Material,
    carry: &mut Carry,
    metrics: &Metrics,
) -> Result<(), End> {
    let ep = std::slice::from_ref(&opts.endpoints[carry.endpoint]);
    match connect(ep, 0, &m).await {
        Ok((c, _, _)) => {
            carry.next = Some((m, c));
            Err(End::Reload)
        }
        Err(failures) => {
            for f in failures {
                carry.reporter.fail(&metrics.etcd, f);
            }
            carry.rejected = Some(m);
            Ok(())
        }
    }
}

async fn session(
    opts: &EtcdOptions,
    fams: &[(IpNetwork, u8)],
    tx: &watch::Sender<Option<Snapshot>>,
    metrics: &Metrics,
    carry: &mut Carry,
    backoff: &mut Duration,
) -> Result<(), End> {
    carry.rejected = None;
    let (material, mut c) = match carry.next.take() {
        Some(next) => next,
        None => {
            let material = credentials(&opts.tls, carry)?;
            let n = opts.endpoints.len();
            let (c, i, skipped) = connect(&opts.endpoints, carry.endpoint % n, &material)
                .await
                .map_err(|failures| End::Failed { failures, connected: false })?;
            for f in skipped {
                carry.reporter.fail(&metrics.etcd, f);
            }
            carry.endpoint = i;
            (material, c)
        }
    };
    let i = carry.endpoint;
    let ep = opts.endpoints[i].as_str();
    carry.reporter.ok(&At::Endpoint(ep.to_string()));
    let err = |what: &'static str| move |e: etcd_client::Error| End::from(classify(ep, what, &e));
    let lost =
        |message: String| End::from(Failure { kind: Kind::Claim, at: At::Endpoint(ep.to_string()), message });
    let kept = match carry.lease {
        Some(id) => take_over(&mut c, id).await.map_err(err("lease keepalive"))?.map(|k| (id, k)),
        None => None,
    };
    let (id, (mut keeper, mut acks)) = match kept {
        Some(k) => k,
        None => {
            let lease = c.lease_grant(opts.lease_ttl, None).await.map_err(err("lease grant"))?;
            (lease.id(), c.lease_keep_alive(lease.id()).await.map_err(err("lease keepalive"))?)
        }
    };
    carry.lease = Some(id);
    let me = SubnetValue { node: opts.node_name.clone(), addresses: opts.node_addrs.clone() };
    let value = serde_json::to_string(&me).expect("json");
    for &(cluster, len) in fams {
        let want = Claim {
            cluster,
            len,
            lease: id,
            value: &value,
            remembered: carry.mine.get(tag(&cluster)).copied(),
        };
        let net = claim(&mut c, opts, ep, want).await?;
        tracing::info!(node = %opts.node_name, subnet = %net, lease = id, endpoint = ep, "etcd source: holding subnet");
        carry.mine.insert(tag(&cluster), net);
    }
    *backoff = MIN_BACKOFF;
    let mut tick = tokio::time::interval(Duration::from_millis(opts.lease_ttl.max(1) as u64 * 1000 / 3));
    let mut reload = tokio::time::interval(opts.tls.reload_every.max(Duration::from_millis(100)));
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dir = format!("{}/subnets/", root(&opts.prefix));
    let mine = carry.mine.clone();
    let held = |s: &Subnets| {
        mine.values().all(|n| s.get(&subnet_key(&opts.prefix, n)).is_some_and(|(_, v)| *v == me))
    };
    loop {
        let list = c.get(dir.as_str(), Some(GetOptions::new().with_prefix())).await.map_err(err("list"))?;
        let rev = list.header().map_or(0, |h| h.revision());
        let mut subnets: Subnets =
            list.kvs().iter().filter_map(|kv| decode(&opts.prefix, kv.key(), kv.value())).collect();
        publish(tx, snapshot(&subnets), metrics);
        metrics.etcd.set_unreachable(false);
        let wopts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
        let mut w = c.watch(dir.as_str(), Some(wopts)).await.map_err(err("watch"))?;
        loop {
            // Our keys gone (lease expired, or deleted by hand): claim again in a new session.
            if !held(&subnets) {
                carry.lease = None;
                return Err(lost(format!("lost this node's subnets (lease {id:x})")));
            }
            tokio::select! {
                _ = tick.tick() => keeper.keep_alive().await.map_err(err("lease keepalive"))?,
                a = acks.message() => match a.map_err(err("lease keepalive"))? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => {
                        carry.lease = None;
                        return Err(lost(format!("lease {id:x} expired")));
                    }
                },
                m = w.message() => match m.map_err(err("watch"))? {
                    Some(r) if r.canceled() || r.compact_revision() > 0 => {
                        tracing::warn!(reason = r.cancel_reason(), "etcd source: watch canceled; listing again");
                        break;
                    }
                    Some(r) if !r.events().is_empty() => {
                        for kv in r.events().iter().filter_map(|e| e.kv().map(|kv| (e.event_type(), kv))) {
                            let key = String::from_utf8_lossy(kv.1.key()).into_owned();
                            match (kv.0, decode(&opts.prefix, kv.1.key(), kv.1.value())) {
                                (EventType::Put, Some((k, v))) => subnets.insert(k, v),
                                _ => subnets.remove(&key),
                            };
                        }
                        publish(tx, snapshot(&subnets), metrics);
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = reload.tick() => {
                    if let Some(m) = poll_credentials(&opts.tls, &material, carry, metrics) {
                        try_credentials(opts, m, carry, metrics).await?;
                    }
                }
                _ = tx.closed() => return Ok(()),
            }
        }
    }
}

/// What `claim` is to take.
struct Claim<'a> {
    cluster: IpNetwork,
    len: u8,
    lease: i64,
    value: &'a str,
    remembered: Option<IpNetwork>,
}

/// Takes a `/len` subnet of `cluster` for this node on `lease`: its own key if it still has one,
/// else the first free one of `remembered`, the `last` record, and a scan from its start offset.
async fn claim(c: &mut Client, opts: &EtcdOptions, ep: &str, want: Claim<'_>) -> Result<IpNetwork, Failure> {
    let Claim { cluster, len, lease, value, remembered } = want;
    let err = |what: &'static str| move |e: etcd_client::Error| classify(ep, what, &e);
    let lost = |message: String| Failure { kind: Kind::Claim, at: At::Endpoint(ep.to_string()), message };
    let last_key = format!("{}/last/{}/{}", root(&opts.prefix), tag(&cluster), opts.node_name);
    let fits = |n: &IpNetwork| n.prefix() == len && cluster.contains(n.network());
    let dir = format!("{}/subnets/{}/", root(&opts.prefix), tag(&cluster));
    let listed = c.get(dir.as_str(), Some(GetOptions::new().with_prefix())).await.map_err(err("list"))?;
    let mut taken = HashSet::new();
    for kv in listed.kvs() {
        let Some(net) = std::str::from_utf8(kv.key()).ok().and_then(|k| parse_key(&opts.prefix, k)) else {
            continue;
        };
        taken.insert(net);
        if fits(&net) && kv.lease() == lease && kv.value() == value.as_bytes() {
            // Already ours on this very lease (a reconnection): nothing to write.
            return Ok(net);
        }
        if fits(&net) && parse_value(kv.value()).is_some_and(|v| v.node == opts.node_name) {
            // Ours from before a restart, still on the old lease: move it (and refresh the
            // addresses) unless someone touched it since the list.
            let same = Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision());
            let t = claim_txn(same, kv.key(), value, lease, &last_key, net);
            if c.txn(t).await.map_err(err("claim"))?.succeeded() {
                return Ok(net);
            }
        }
    }
    let last = c.get(last_key.as_str(), None).await.map_err(err("get"))?;
    let last = last.kvs().first().and_then(|kv| kv.value_str().ok()?.parse::<IpNetwork>().ok());
    let count = subnet_count(&cluster, len).expect("checked by families");
    let start = start_offset(&opts.node_name, count);
    let scan = (0..count)
        .map(|k| nth_subnet(&cluster, len, if k < count - start { start + k } else { k - (count - start) }));
    let mut conflicts = 0;
    for net in remembered.into_iter().chain(last).chain(scan) {
        if !fits(&net) || !taken.insert(net) {
            continue;
        }
        let key = subnet_key(&opts.prefix, &net);
        let absent = Compare::version(key.as_str(), CompareOp::Equal, 0);
        let t = claim_txn(absent, key.as_bytes(), value, lease, &last_key, net);
        if c.txn(t).await.map_err(err("claim"))?.succeeded() {
            return Ok(net);
        }
        conflicts += 1;
        if conflicts >= MAX_CONFLICTS {
            return Err(lost(format!("{conflicts} claims in {cluster} lost to other nodes")));
        }
    }
    Err(lost(format!("no free /{len} subnet left in {cluster}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn keys_round_trip_and_reject_strangers() {
        assert_eq!(subnet_key("/r/", &net("10.244.3.0/24")), "/r/subnets/v4/10.244.3.0-24");
        assert_eq!(subnet_key("/r", &net("fd00:10:244:3::/64")), "/r/subnets/v6/fd00:10:244:3::-64");
        for n in [net("10.244.3.0/24"), net("fd00:10:244:3::/64")] {
            assert_eq!(parse_key("/r", &subnet_key("/r", &n)), Some(n));
        }
        for k in ["/r/subnets/v6/10.0.0.0-8", "/r/subnets/v4/10.0.0.1-8", "/x/subnets/v4/10.0.0.0-8"] {
            assert_eq!(parse_key("/r", k), None, "{k}");
        }
        assert_eq!(parse_key("/r", "/r/last/v4/a"), None);
    }

    #[test]
    fn enumerates_subnets_from_a_stable_offset() {
        let c = net("10.244.0.0/16");
        assert_eq!(subnet_count(&c, 24), Some(256));
        assert!(subnet_count(&c, 15).is_none() && subnet_count(&c, 33).is_none());
        let all: HashSet<_> = (0..256).map(|i| nth_subnet(&c, 24, i)).collect();
        assert!(all.len() == 256 && all.iter().all(|n| n.prefix() == 24 && c.contains(n.network())));
        assert_eq!(nth_subnet(&c, 24, 255), net("10.244.255.0/24"));
        assert_eq!(nth_subnet(&net("fd00:10:244::/56"), 64, 3), net("fd00:10:244:3::/64"));
        assert_eq!(subnet_count(&net("::/0"), 128), Some(u128::MAX));
        // Pinned: a change here moves every node's first choice.
        assert_eq!([start_offset("node-1", 256), start_offset("node-2", 256)], [195, 118]);
    }

    #[test]
    fn parses_values_and_builds_snapshots() {
        let v = parse_value(br#"{"node":"a","addresses":["10.200.0.1","fd00::1"]}"#).unwrap();
        assert!(parse_value(br#"{"node":"b"}"#).unwrap().addresses.is_empty());
        assert!(parse_value(br#"{"node":"a","addresses":["nope"]}"#).is_none());
        assert!(parse_value(b"10.244.0.0/24").is_none());
        let nets = [net("10.244.1.0/24"), net("fd00:1::/64")];
        let a = &snapshot(&nets.map(|n| (subnet_key("/p", &n), (n, v.clone()))).into())["a"];
        assert_eq!(a.pod_cidrs, nets);
        assert_eq!(a.ipv4.unwrap().to_string(), "10.200.0.1");
        assert_eq!(a.ipv6.unwrap().to_string(), "fd00::1");
    }
}
