//! The `etcd` source against a real etcd on 127.0.0.1: claims, convergence, restarts, lease
//! expiry and racing claims; TLS with client certificates (made here with rcgen, so no key
//! material lives in the repository), user/password authentication, rotation and the named
//! errors. Each test runs its own etcd, killed by PID when the test ends.

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cni_route_agent::error::AgentError;
use cni_route_agent::model::Snapshot;
use cni_route_agent::sources::etcd::{nth_subnet, run, start_offset, subnet_key, EtcdOptions};
use cni_route_agent::sources::etcd_tls::{EtcdTls, Kind};
use cni_route_agent::Metrics;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, Permission, TlsOptions};
use ipnetwork::IpNetwork;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod common;
use common::Tmp;

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
    /// How the test's own client connects.
    client_opts: Option<ConnectOptions>,
    peer: String,
    /// Member name and `--initial-cluster`; `None`: a cluster of one.
    member: Option<(String, String)>,
}

/// The server side of a TLS etcd: its certificate and the CA its clients' certificates must
/// chain to (`--client-cert-auth`).
struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl Etcd {
    fn spawn(client_port: u16) -> Etcd {
        let dir = std::env::temp_dir().join(format!("etcd-source-{}-{client_port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peer = format!("http://127.0.0.1:{}", free_port());
        let mut e = Etcd {
            child: None,
            dir,
            url: format!("http://127.0.0.1:{client_port}"),
            client_opts: None,
            peer,
            member: None,
        };
        e.launch(None);
        e
    }

    /// etcd requiring TLS client certificates signed by `pki`'s CA, answering (bounded).
    fn spawn_tls(pki: &Pki) -> Etcd {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("etcd-source-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peer = format!("http://127.0.0.1:{}", free_port());
        let url = format!("http://127.0.0.1:{port}");
        let mut e = Etcd { child: None, dir, url, client_opts: Some(pki.client_opts()), peer, member: None };
        e.launch(Some(&pki.server()));
        e
    }

    /// (Re)starts etcd on its data directory and URL, with TLS if given.
    fn launch(&mut self, tls: Option<&ServerTls>) {
        let mut cmd = Command::new("/usr/bin/etcd");
        cmd.arg("--data-dir").arg(&self.dir);
        if let Some(t) = tls {
            self.url = self.url.replacen("http://", "https://", 1);
            cmd.arg("--cert-file").arg(&t.cert).arg("--key-file").arg(&t.key);
            cmd.arg("--trusted-ca-file").arg(&t.client_ca).arg("--client-cert-auth");
        }
        let (url, peer) = (&self.url, &self.peer);
        let child = cmd
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
            .args(
                match &self.member {
                    Some((name, cluster)) => [name.clone(), cluster.clone()],
                    None => ["default".to_string(), format!("default={peer}")],
                }
                .iter()
                .zip(["--name", "--initial-cluster"])
                .flat_map(|(v, flag)| [flag.to_string(), v.clone()]),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/bin/etcd");
        self.child = Some(child);
    }

    /// A cluster of three members on loopback, answering (bounded).
    async fn cluster() -> Vec<Etcd> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect();
        let mut members = vec![];
        for (i, (client, peer)) in ports.iter().enumerate() {
            let dir = std::env::temp_dir().join(format!("etcd-source-{}-{client}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let mut e = Etcd {
                child: None,
                dir,
                url: format!("http://127.0.0.1:{client}"),
                client_opts: None,
                peer: format!("http://127.0.0.1:{peer}"),
                member: Some((format!("m{i}"), initial.join(","))),
            };
            e.launch(None);
            members.push(e);
        }
        for m in &members {
            m.client().await;
        }
        members
    }

    /// Kills it (by PID), data kept.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
            if let Ok(mut c) = Client::connect([&self.url], self.client_opts.clone()).await {
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
        self.stop();
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
    start_with(options(&[url], prefix, name, addrs, dual))
}

fn options(urls: &[&str], prefix: &str, name: &str, addrs: &[&str], dual: bool) -> EtcdOptions {
    let mut cluster_cidrs = vec![V4.parse().unwrap()];
    if dual {
        cluster_cidrs.push(V6.parse().unwrap());
    }
    EtcdOptions {
        endpoints: urls.iter().map(|u| u.to_string()).collect(),
        prefix: prefix.to_string(),
        cluster_cidrs,
        subnet_len_v4: 24,
        subnet_len_v6: 64,
        node_name: name.to_string(),
        node_addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        lease_ttl: TTL,
        tls: Box::new(EtcdTls { reload_every: Duration::from_millis(100), ..Default::default() }),
    }
}

fn start_with(opts: EtcdOptions) -> Node {
    let (tx, rx) = watch::channel(None);
    let metrics = Arc::new(Metrics::default());
    let name = opts.node_name.clone();
    let task = tokio::spawn(run(opts, tx, metrics.clone()));
    Node { name, rx, task, metrics }
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
        while a.metrics.source.errors("unreachable") == 0 {
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

/// A CA of the test's own, and certificates it signs for 127.0.0.1, as PEM files in `dir`.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca: PathBuf,
}

/// A certificate and its key, as files.
#[derive(Clone)]
struct Pair {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages =
            vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, cert.pem()).unwrap();
        Pki { dir: dir.to_path_buf(), issuer: rcgen::Issuer::new(params, key), ca }
    }

    /// A certificate for 127.0.0.1, usable by a server and a client; expired if asked.
    fn leaf(&self, name: &str, expired: bool) -> Pair {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }

    fn server(&self) -> ServerTls {
        let p = self.leaf("server", false);
        ServerTls { cert: p.cert, key: p.key, client_ca: self.ca.clone() }
    }

    /// Options for the test's own client.
    fn client_opts(&self) -> ConnectOptions {
        let p = self.leaf("test-client", false);
        let read = |p: &Path| std::fs::read(p).unwrap();
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)))
            .identity(Identity::from_pem(read(&p.cert), read(&p.key)));
        ConnectOptions::new().with_tls(tls)
    }
}

/// A node's credential files, at fixed paths as a mounted Secret has them.
struct Creds {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Creds {
    fn new(dir: &Path, node: &str) -> Creds {
        let d = dir.join(node);
        std::fs::create_dir_all(&d).unwrap();
        Creds { ca: d.join("ca.pem"), cert: d.join("cert.pem"), key: d.join("key.pem") }
    }

    /// Replaces the files the way a rotation does: each written aside and renamed over.
    fn install(&self, ca: &Path, pair: &Pair) {
        for (from, to) in [(ca, &self.ca), (&pair.cert, &self.cert), (&pair.key, &self.key)] {
            let tmp = to.with_extension("new");
            std::fs::copy(from, &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
    }

    fn tls(&self) -> EtcdTls {
        EtcdTls {
            ca_file: Some(self.ca.clone()),
            cert_file: Some(self.cert.clone()),
            key_file: Some(self.key.clone()),
            reload_every: Duration::from_millis(100),
            ..Default::default()
        }
    }
}

/// Waits (bounded) until `cond` holds of the node's metrics.
async fn until_metrics(n: &Node, what: &str, cond: impl Fn(&Metrics) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond(&n.metrics) {
        assert!(
            Instant::now() < deadline,
            "{}: timed out waiting for {what}; last error: {:?}",
            n.name,
            n.metrics.etcd.last_error()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tls_node(url: &str, prefix: &str, name: &str, addr: &str, tls: EtcdTls) -> Node {
    let mut o = options(&[url], prefix, name, &[addr], false);
    o.tls = Box::new(tls);
    start_with(o)
}

async fn kv_of(c: &mut Client, key: &str) -> (i64, i64) {
    let r = c.get(key, None).await.unwrap();
    let kv = r.kvs().first().expect("key present");
    (kv.lease(), kv.mod_revision())
}

#[tokio::test]
async fn client_certificates_rotate_without_touching_keys_and_a_wrong_ca_keeps_the_nodes() {
    let tmp = Tmp::new("tls");
    let (pki1, pki2) = (Pki::new(&tmp.0.join("pki1"), "one"), Pki::new(&tmp.0.join("pki2"), "two"));
    let mut etcd = Etcd::spawn_tls(&pki1);
    let mut c = etcd.client().await;
    let (ca, cb) = (Creds::new(&tmp.0, "a"), Creds::new(&tmp.0, "b"));
    ca.install(&pki1.ca, &pki1.leaf("a-1", false));
    cb.install(&pki1.ca, &pki1.leaf("b-1", false));
    let mut a = tls_node(&etcd.url, "/s", "a", "10.200.0.1", ca.tls());
    let mut b = tls_node(&etcd.url, "/s", "b", "10.200.0.2", cb.tls());
    let snap = a.until("both nodes over TLS", complete(&["a", "b"], 1)).await;
    b.until("both nodes over TLS", complete(&["a", "b"], 1)).await;
    let a_key = subnet_key("/s", &snap["a"].pod_cidrs[0]);
    let before = kv_of(&mut c, &a_key).await;

    // Rotated while connected: taken up, the key neither rewritten nor moved to another lease.
    let events = a.metrics.source_events.load(Ordering::Relaxed);
    ca.install(&pki1.ca, &pki1.leaf("a-2", false));
    // The new session's first list is the only event: nothing else changes meanwhile.
    let listed = |m: &Metrics| m.etcd.reloads() == 1 && m.source_events.load(Ordering::Relaxed) > events;
    until_metrics(&a, "a session on the new files", listed).await;
    assert_eq!(kv_of(&mut c, &a_key).await, before, "same lease, no write");
    assert_eq!(*a.rx.borrow(), Some(snap.clone()));

    // Rotated to an expired certificate: refused and named; the working connection stays.
    cb.install(&pki1.ca, &pki1.leaf("b-old", true));
    until_metrics(&b, "the expired certificate", |m| m.etcd.errors(Kind::ExpiredCert) >= 1).await;
    let err = b.metrics.etcd.last_error().unwrap();
    assert!(err.contains("expired at 2001-01-01") && err.contains("cert.pem"), "{err}");
    assert_eq!(b.metrics.etcd.reloads(), 0);
    assert!(!b.metrics.etcd.unreachable());
    cb.install(&pki1.ca, &pki1.leaf("b-2", false));
    until_metrics(&b, "the good certificate", |m| m.etcd.reloads() == 1).await;

    // etcd now serves a certificate of another CA: both name the wrong CA, stop being ready,
    // and publish nothing, so routes stay.
    etcd.stop();
    etcd.launch(Some(&pki2.server()));
    for n in [&a, &b] {
        until_metrics(n, "the wrong CA", |m| m.etcd.errors(Kind::WrongCa) >= 1 && m.etcd.unreachable()).await;
        let err = n.metrics.etcd.last_error().unwrap();
        assert!(err.contains(&etcd.url) && err.contains("not signed by the CA of --etcd-cafile"), "{err}");
        let text = n.metrics.render();
        assert!(text.contains("cni_route_agent_etcd_unreachable 1\n"), "{text}");
        assert_eq!(*n.rx.borrow(), Some(snap.clone()), "{}: nothing published", n.name);
    }

    // The new CA's files arrive: a is back without a restart, on its subnet.
    ca.install(&pki2.ca, &pki2.leaf("a-3", false));
    until_metrics(&a, "a back", |m| !m.etcd.unreachable()).await;
    a.until("a on its subnet", |s| s.get("a").is_some_and(|n| n.pod_cidrs == snap["a"].pod_cidrs)).await;
    cb.install(&pki2.ca, &pki2.leaf("b-3", false));
    until_metrics(&b, "b back", |m| !m.etcd.unreachable()).await;
    for n in [&mut a, &mut b] {
        n.until("both back on their subnets", |s| *s == snap).await;
    }
}

#[tokio::test]
async fn wrong_client_credentials_are_named_and_nothing_is_published() {
    let tmp = Tmp::new("tls-bad");
    let (pki1, pki2) = (Pki::new(&tmp.0.join("pki1"), "one"), Pki::new(&tmp.0.join("pki2"), "two"));
    let etcd = Etcd::spawn_tls(&pki1);
    etcd.client().await;
    let good = pki1.leaf("good", false);
    let case = |node: &str, ca: &Path, pair: &Pair| {
        let c = Creds::new(&tmp.0, node);
        c.install(ca, pair);
        c
    };
    let expired = case("expired", &pki1.ca, &pki1.leaf("old", true));
    let other = pki1.leaf("other", false);
    let mismatch = case("mismatch", &pki1.ca, &Pair { cert: good.cert.clone(), key: other.key.clone() });
    let wrong_ca = case("wrong-ca", &pki2.ca, &good);
    let foreign = case("foreign", &pki1.ca, &pki2.leaf("foreign", false));
    let no_cert = EtcdTls { ca_file: Some(pki1.ca.clone()), ..Default::default() };
    let cases = [
        (expired.tls(), Kind::ExpiredCert, "expired at 2001-01-01"),
        (mismatch.tls(), Kind::KeyMismatch, "is not the key of the certificate"),
        (wrong_ca.tls(), Kind::WrongCa, "not signed by the CA of --etcd-cafile"),
        (foreign.tls(), Kind::CertRejected, "refused our client certificate"),
        (no_cert, Kind::CertRejected, "refused our client certificate"),
    ];
    for (i, (tls, kind, text)) in cases.into_iter().enumerate() {
        let n = tls_node(&etcd.url, "/w", &format!("n{i}"), "10.200.0.1", tls);
        until_metrics(&n, kind.label(), |m| m.etcd.errors(kind) >= 1 && m.etcd.unreachable()).await;
        let err = n.metrics.etcd.last_error().unwrap();
        assert!(err.contains(text), "{}: {err}", kind.label());
        assert!(n.rx.borrow().is_none(), "nothing published");
        n.kill().await;
    }
    // Plain HTTP spoken to the TLS etcd.
    let http = etcd.url.replacen("https://", "http://", 1);
    let n = start_with(options(&[&http], "/w", "plain", &["10.200.0.1"], false));
    until_metrics(&n, "plain_http", |m| m.etcd.errors(Kind::PlainHttp) >= 1 && m.etcd.unreachable()).await;
    let err = n.metrics.etcd.last_error().unwrap();
    assert!(err.contains(&http) && err.contains("expect TLS?"), "{err}");
}

#[tokio::test]
async fn user_and_password_from_a_file_with_failover_and_named_refusals() {
    let tmp = Tmp::new("auth");
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.user_add("root", "rootpw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("agents").await.unwrap();
    c.role_grant_permission("agents", Permission::read_write("/u/").with_prefix()).await.unwrap();
    c.user_add("agent", "s3cret pass", None).await.unwrap();
    c.user_grant_role("agent", "agents").await.unwrap();
    c.auth_enable().await.unwrap();
    // Written aside and renamed over, as a Secret update is.
    let pw = |name: &str, text: &str| {
        let p = tmp.0.join(name);
        std::fs::write(p.with_extension("new"), text).unwrap();
        std::fs::rename(p.with_extension("new"), &p).unwrap();
        p
    };
    let auth = |file: PathBuf| EtcdTls {
        username: Some("agent".into()),
        password_file: Some(file),
        reload_every: Duration::from_millis(100),
        ..Default::default()
    };
    // The first endpoint is dead: both go on to the second.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut nodes = vec![];
    for (name, addr) in [("p", "10.200.0.1"), ("q", "10.200.0.2")] {
        let mut o = options(&[&dead, &etcd.url], "/u", name, &[addr], false);
        o.tls = Box::new(auth(pw("good", "s3cret pass\n")));
        nodes.push(start_with(o));
    }
    for n in &mut nodes {
        n.until("both nodes with a password", complete(&["p", "q"], 1)).await;
        let err = n.metrics.etcd.last_error().unwrap_or_default();
        assert!(err.contains(&dead), "the dead endpoint named: {err}");
        assert!(!n.metrics.etcd.unreachable());
    }

    let mut wrong = options(&[&etcd.url], "/u", "r", &["10.200.0.3"], false);
    wrong.tls = Box::new(auth(pw("wrong", "guess\n")));
    let r = start_with(wrong);
    until_metrics(&r, "auth refused", |m| m.etcd.errors(Kind::AuthRefused) >= 1 && m.etcd.unreachable())
        .await;
    let err = r.metrics.etcd.last_error().unwrap();
    assert!(err.contains(&etcd.url) && err.contains("refused the user or password"), "{err}");
    assert!(!err.contains("guess"), "the password is never logged: {err}");

    // TLS spoken to a plain-HTTP etcd.
    let https = etcd.url.replacen("http://", "https://", 1);
    let mut plain = options(&[&https], "/u", "s", &["10.200.0.4"], false);
    plain.tls =
        Box::new(EtcdTls { ca_file: Some(Pki::new(&tmp.0, "x").ca), ..auth(pw("good", "s3cret pass\n")) });
    let s = start_with(plain);
    until_metrics(&s, "plain HTTP", |m| m.etcd.errors(Kind::PlainHttp) >= 1).await;
    let err = s.metrics.etcd.last_error().unwrap();
    assert!(err.contains(&https) && err.contains("plain HTTP?"), "{err}");
    assert!(r.rx.borrow().is_none() && s.rx.borrow().is_none());

    // A password file rotated before etcd knows the password: refused, named, and the working
    // connection kept. Then etcd's password changes and the file again: taken up.
    let snap = nodes[0].rx.borrow().clone().unwrap_or_default();
    pw("good", "n3w\n");
    for n in &nodes {
        until_metrics(n, "the new password refused", |m| m.etcd.errors(Kind::AuthRefused) >= 1).await;
        assert!(!n.metrics.etcd.unreachable() && n.metrics.etcd.reloads() == 0);
    }
    let root = ConnectOptions::new().with_user("root", "rootpw");
    let mut c = Client::connect([&etcd.url], Some(root)).await.unwrap();
    c.user_change_password("agent", "n3w pass 2").await.unwrap();
    pw("good", "n3w pass 2\n");
    for n in &nodes {
        until_metrics(n, "the new password", |m| m.etcd.reloads() == 1).await;
    }
    let mut t = options(&[&etcd.url], "/u", "t", &["10.200.0.5"], false);
    t.tls = Box::new(auth(tmp.0.join("good")));
    let _t = start_with(t);
    for n in &mut nodes {
        let s = n.until("a node joining", complete(&["p", "q", "t"], 1)).await;
        assert!(s["p"] == snap["p"] && s["q"] == snap["q"]);
    }
}

#[tokio::test]
async fn nodes_fail_over_to_another_member_without_rewriting_their_keys() {
    let mut members = Etcd::cluster().await;
    let urls: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let mut nodes: Vec<Node> = [("x", "10.200.0.1"), ("y", "10.200.0.2")]
        .into_iter()
        .map(|(name, addr)| start_with(options(&urls, "/f", name, &[addr], false)))
        .collect();
    let mut snap = Snapshot::new();
    for n in &mut nodes {
        snap = n.until("both nodes", complete(&["x", "y"], 1)).await;
    }
    let mut c = members[1].client().await;
    let keys: Vec<String> = ["x", "y"].iter().map(|n| subnet_key("/f", &snap[*n].pod_cidrs[0])).collect();
    let mut before = vec![];
    for k in &keys {
        before.push(kv_of(&mut c, k).await);
    }
    // Both talk to the first member: it goes away.
    let first = members[0].url.clone();
    members[0].stop();
    for n in &nodes {
        let named = |m: &Metrics| {
            m.etcd.last_error().is_some_and(|e| e.contains(&first) && e.contains("connection was lost"))
        };
        until_metrics(n, "the first member's failure, named", named).await;
    }
    // Still alive through the others: a new node is seen by both.
    let _z = start_with(options(&urls[1..], "/f", "z", &["10.200.0.3"], false));
    for n in &mut nodes {
        let s = n.until("the new node", complete(&["x", "y", "z"], 1)).await;
        assert!(["x", "y"].iter().all(|k| s[*k] == snap[*k]), "{}: same subnets", n.name);
        assert!(!n.metrics.etcd.unreachable());
    }
    for (k, b) in keys.iter().zip(&before) {
        assert_eq!(kv_of(&mut c, k).await, *b, "{k}: same lease, not rewritten");
    }
}
