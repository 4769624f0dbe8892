//! The `etcd` source against a real etcd on 127.0.0.1: claims, convergence, restarts, lease
//! expiry and racing claims. Each test runs its own etcd, killed by PID when the test ends.

use std::net::{IpAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cni_route_agent::error::AgentError;
use cni_route_agent::model::Snapshot;
use cni_route_agent::sources::etcd::{nth_subnet, run, start_offset, subnet_key, EtcdOptions};
use cni_route_agent::Metrics;
use etcd_client::{Client, GetOptions};
use ipnetwork::IpNetwork;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The smallest TTL etcd grants with its default election timeout.
const TTL: i64 = 2;
const DEADLINE: Duration = Duration::from_secs(30);
const V4: &str = "10.244.0.0/16";
const V6: &str = "fd00:10:244::/56";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An etcd we started, killed by its PID on drop (panics included), data directory removed.
struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    url: String,
}

impl Etcd {
    fn spawn(client_port: u16) -> Etcd {
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{}", free_port());
        let dir = std::env::temp_dir().join(format!("etcd-source-{}-{client_port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new("/usr/bin/etcd")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/bin/etcd");
        Etcd { child: Some(child), dir, url }
    }

    /// Starts etcd and waits until it answers.
    async fn start() -> Etcd {
        let e = Etcd::spawn(free_port());
        e.client().await;
        e
    }

    /// A client, once etcd answers (bounded).
    async fn client(&self) -> Client {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(mut c) = Client::connect([&self.url], None).await {
                if c.status().await.is_ok() {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "etcd at {} did not answer", self.url);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One source, as the agent runs it, in a task of the test's runtime.
struct Node {
    name: String,
    rx: watch::Receiver<Option<Snapshot>>,
    task: JoinHandle<Result<(), AgentError>>,
    metrics: Arc<Metrics>,
}

fn start(url: &str, prefix: &str, name: &str, addrs: &[&str], dual: bool) -> Node {
    let mut cluster_cidrs = vec![V4.parse().unwrap()];
    if dual {
        cluster_cidrs.push(V6.parse().unwrap());
    }
    let opts = EtcdOptions {
        endpoints: vec![url.to_string()],
        prefix: prefix.to_string(),
        cluster_cidrs,
        subnet_len_v4: 24,
        subnet_len_v6: 64,
        node_name: name.to_string(),
        node_addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        lease_ttl: TTL,
    };
    let (tx, rx) = watch::channel(None);
    let metrics = Arc::new(Metrics::default());
    let task = tokio::spawn(run(opts, tx, metrics.clone()));
    Node { name: name.to_string(), rx, task, metrics }
}

impl Node {
    /// Stops it as a crash would: no revoke, the lease just stops being kept alive.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Its snapshot once `cond` holds (bounded).
    async fn until(&mut self, what: &str, mut cond: impl FnMut(&Snapshot) -> bool) -> Snapshot {
        let published = self.rx.wait_for(|s| s.as_ref().is_some_and(&mut cond));
        let r =
            tokio::time::timeout(DEADLINE, published).await.map(|r| r.map(|s| s.clone().unwrap_or_default()));
        match r {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => panic!("{}: source ended while waiting for {what}", self.name),
            Err(_) => panic!("{}: timed out waiting for {what}; last: {:?}", self.name, *self.rx.borrow()),
        }
    }

    fn subnets(&self) -> Vec<IpNetwork> {
        self.rx
            .borrow()
            .as_ref()
            .and_then(|s| s.get(&self.name))
            .map(|n| n.pod_cidrs.clone())
            .unwrap_or_default()
    }
}

fn complete<'a>(names: &'a [&'a str], per_node: usize) -> impl FnMut(&Snapshot) -> bool + 'a {
    move |s| {
        s.len() == names.len()
            && names.iter().all(|n| s.get(*n).is_some_and(|i| i.pod_cidrs.len() == per_node))
    }
}

async fn lease_of(c: &mut Client, key: &str) -> Option<i64> {
    c.get(key, None).await.unwrap().kvs().first().map(|kv| kv.lease())
}

#[tokio::test]
async fn nodes_claim_distinct_subnets_converge_and_keep_them_across_restarts() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let names = ["node-a", "node-b", "node-c"];
    let addrs =
        [["10.200.0.11", "fd00:200::11"], ["10.200.0.12", "fd00:200::12"], ["10.200.0.13", "fd00:200::13"]];
    let mut nodes: Vec<Node> =
        names.iter().zip(&addrs).map(|(n, a)| start(&etcd.url, "/t", n, a, true)).collect();
    for n in &mut nodes {
        n.until("all three nodes, dual-stack", complete(&names, 2)).await;
    }
    let snap = nodes[0].rx.borrow().clone().expect("published");
    for n in &nodes {
        assert_eq!(n.rx.borrow().as_ref(), Some(&snap), "{} sees the same nodes", n.name);
    }
    let (v4, v6): (IpNetwork, IpNetwork) = (V4.parse().unwrap(), V6.parse().unwrap());
    let mut seen = std::collections::HashSet::new();
    for (name, a) in names.iter().zip(&addrs) {
        let info = &snap[*name];
        assert_eq!(info.ipv4.map(IpAddr::V4), Some(a[0].parse().unwrap()));
        assert_eq!(info.ipv6.map(IpAddr::V6), Some(a[1].parse().unwrap()));
        let [s4, s6] = info.pod_cidrs[..] else { panic!("{name}: {:?}", info.pod_cidrs) };
        assert!(s4.prefix() == 24 && v4.contains(s4.network()), "{name}: {s4}");
        assert!(s6.prefix() == 64 && v6.contains(s6.network()), "{name}: {s6}");
        assert!(seen.insert(s4) && seen.insert(s6), "{name}: {s4} or {s6} claimed twice");
    }

    // A restart within the TTL moves node-b's keys to its new lease, subnets unchanged.
    let b_key = subnet_key("/t", &snap["node-b"].pod_cidrs[0]);
    let old_lease = lease_of(&mut c, &b_key).await.expect("node-b's key");
    nodes.remove(1).kill().await;
    let mut b = start(&etcd.url, "/t", "node-b", &addrs[1], true);
    let again = b.until("node-b back with all nodes", complete(&names, 2)).await;
    assert_eq!(again, snap, "same subnets after a restart");
    let deadline = Instant::now() + DEADLINE;
    while c.lease_time_to_live(old_lease, None).await.unwrap().ttl() > 0 {
        assert!(Instant::now() < deadline, "old lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_lease = lease_of(&mut c, &b_key).await;
    assert!(new_lease.is_some_and(|l| l != old_lease), "key survives the old lease: {new_lease:?}");
    nodes.insert(1, b);
    for n in &nodes {
        assert_eq!(n.rx.borrow().as_ref(), Some(&snap), "{}: nothing changed for the others", n.name);
    }

    // A lost lease (revoked here, as an expiry while partitioned would) is granted again and
    // the same subnets claimed again.
    let a_key = subnet_key("/t", &snap["node-a"].pod_cidrs[1]);
    let lost = lease_of(&mut c, &a_key).await.expect("node-a's key");
    c.lease_revoke(lost).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while lease_of(&mut c, &a_key).await.is_none_or(|l| l == lost) {
        assert!(Instant::now() < deadline, "node-a never claimed again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in &mut nodes {
        n.until("node-a back on its subnets", |s| *s == snap).await;
    }
}

#[tokio::test]
async fn waits_for_etcd_and_drops_nodes_whose_lease_expired() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // Started before etcd: the source retries instead of giving up, and says so.
    let mut a = start(&url, "/e", "early", &["10.200.0.1"], false);
    let failed = tokio::time::timeout(DEADLINE, async {
        while a.metrics.source.errors("unavailable") + a.metrics.source.errors("connect") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    failed.await.expect("the failed connection counted");
    assert_eq!(a.metrics.source.snapshot_age(), None, "no good view yet");
    let etcd = Etcd::spawn(port);
    let mut b = start(&etcd.url, "/e", "late", &["10.200.0.2"], false);
    a.until("both nodes", complete(&["early", "late"], 1)).await;
    b.until("both nodes", complete(&["early", "late"], 1)).await;
    assert!(!a.task.is_finished());
    assert_eq!(a.metrics.source.snapshot_age(), Some(Duration::ZERO), "healthy once connected");
    b.kill().await;
    let s = a.until("late's lease to expire", |s| !s.contains_key("late")).await;
    assert_eq!(s.keys().collect::<Vec<_>>(), ["early"]);
}

#[tokio::test]
async fn racing_claims_end_distinct_and_a_node_reclaims_its_subnet_after_expiry() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let v4: IpNetwork = V4.parse().unwrap();
    // Three names that start their scans at the same subnet, so their first claims collide.
    let off = start_offset("racer-0", 256);
    let racers: Vec<String> =
        (0..).map(|i| format!("racer-{i}")).filter(|n| start_offset(n, 256) == off).take(3).collect();
    let watcher =
        (0..).map(|i| format!("watcher-{i}")).find(|n| (start_offset(n, 256) + 256 - off) % 256 > 8).unwrap();
    let mut w = start(&etcd.url, "/r", &watcher, &["10.200.0.1"], false);
    w.until("the watcher's own subnet", |s| s.len() == 1).await;
    let mut rs: Vec<Node> =
        racers.iter().map(|n| start(&etcd.url, "/r", n, &["10.200.0.2"], false)).collect();
    let mut all: Vec<&str> = racers.iter().map(String::as_str).collect();
    all.push(&watcher);
    let snap = w.until("all four", complete(&all, 1)).await;
    let subnets: std::collections::HashSet<_> = snap.values().map(|n| n.pod_cidrs[0]).collect();
    assert_eq!(subnets.len(), 4, "distinct subnets: {snap:?}");
    let keys = c.get("/r/subnets/v4/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(keys.kvs().len(), 4);
    for r in &mut rs {
        r.until("all four", complete(&all, 1)).await;
    }

    // A loser of the race, down longer than its TTL, takes its subnet back even though its
    // first choice is free again.
    let first_choice = nth_subnet(&v4, 24, off);
    let i = rs.iter().position(|r| r.subnets() != [first_choice]).expect("two racers lost");
    let (name, had) = (racers[i].clone(), rs[i].subnets());
    for r in rs {
        r.kill().await;
    }
    w.until("the racers' leases to expire", |s| s.len() == 1).await;
    let mut back = start(&etcd.url, "/r", &name, &["10.200.0.2"], false);
    back.until("the racer back", |s| s.contains_key(&name) && s.len() == 2).await;
    assert_eq!(back.subnets(), had, "{name} reclaims its subnet, not its first choice {first_choice}");
    w.until("the watcher to see it", |s| s.get(&name).is_some_and(|n| n.pod_cidrs == had)).await;
}
