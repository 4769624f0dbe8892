//! The masquerade rules under address reuse, backend changes and failing tools: one
//! attachment's teardown never removes another's rules, and a failure never reads as
//! "nothing there".

mod common;

use cni_conformance::{require_root, Netns};
use common::*;
use serde_json::{json, Value};

fn path(ns: &Netns) -> String {
    ns.path.display().to_string()
}

fn with_prev(conf: &Value, add: &cni_conformance::Out) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = add.json.clone();
    c
}

/// X is DELeted while Y is ADDed on a one-address pool: Y can only get X's address once X's
/// lease is released, and retries until it does. Whatever the interleaving, Y's masquerade
/// entry must survive X's DEL.
#[test]
fn reused_address_keeps_its_new_owners_masquerade() {
    require_root("reused_address_keeps_its_new_owners_masquerade");
    let w = World::new("reuse");
    let (x, y) = (Netns::new("rx"), Netns::new("ry"));
    let conf = w.conf("1.1.0", "10.40.0.0/30", json!({"ipMasq": true})); // one usable address
    for round in 0..15 {
        let ox = w.call("ADD", &format!("x{round}"), &path(&x), &conf);
        assert_eq!(ox.code, 0, "{}", ox.stdout);
        let (dx, oy) = std::thread::scope(|s| {
            let del = s.spawn(|| w.call("DEL", &format!("x{round}"), &path(&x), &conf));
            let add = s.spawn(|| loop {
                let o = w.call("ADD", &format!("y{round}"), &path(&y), &conf);
                if o.err_code() != Some(100) {
                    break o;
                }
            });
            (del.join().unwrap(), add.join().unwrap())
        });
        assert_eq!(dx.code, 0, "round {round}: DEL x: {}", dx.stdout);
        assert_eq!(oy.code, 0, "round {round}: ADD y: {}", oy.stdout);
        assert_eq!(ip_of(&ox, 0), ip_of(&oy, 0), "one address in the pool");
        let k = w.call("CHECK", &format!("y{round}"), &path(&y), &with_prev(&conf, &oy));
        assert_eq!(k.code, 0, "round {round}: CHECK y after x's DEL: {}", k.stdout);
        assert_eq!(w.masq_entries(), [format!("{} testnet/y{round}/eth0", ip_of(&oy, 0))]);
        assert_eq!(w.call("DEL", &format!("y{round}"), &path(&y), &conf).code, 0);
        assert!(w.masq_entries().is_empty(), "round {round}");
    }
}

/// A PATH directory holding links to the named tools only (plus scripts given by name).
fn tool_dir(w: &World, name: &str, links: &[&str], scripts: &[(&str, &str)]) -> String {
    let dir = w.tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for tool in links {
        let real = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(|d| format!("{d}/{tool}"))
            .find(|p| std::path::Path::new(p).exists());
        std::os::unix::fs::symlink(real.unwrap_or_else(|| panic!("{tool} not installed")), dir.join(tool))
            .unwrap();
    }
    for (tool, body) in scripts {
        let p = dir.join(tool);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    dir.display().to_string()
}

const IPTABLES_TOOLS: [&str; 4] =
    ["iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"];

fn cnib_chains(w: &World) -> Vec<String> {
    let saved = String::from_utf8_lossy(&w.node.run("iptables-save", &["-t", "nat"]).stdout).to_string();
    saved.lines().filter(|l| l.contains("CNIB-")).map(str::to_string).collect()
}

/// Rules made with one backend are removed by a DEL or GC configured (or defaulted) to the
/// other: by config, and by `nft` missing from PATH at ADD and present at DEL.
#[test]
fn teardown_sweeps_every_backend() {
    require_root("teardown_sweeps_every_backend");
    let w = World::new("sweep");
    let pod = Netns::new("sw");
    let base = w.conf("1.1.0", "10.41.0.0/24", json!({"ipMasq": true}));
    let with = |backend: &str| {
        let mut c = base.clone();
        c["ipMasqBackend"] = json!(backend);
        c
    };
    // By config, both ways.
    for (made, removed) in [("iptables", "nftables"), ("nftables", "iptables")] {
        let o = w.call("ADD", "c1", &path(&pod), &with(made));
        assert_eq!(o.code, 0, "{}", o.stdout);
        assert_eq!(cnib_chains(&w).is_empty(), made != "iptables");
        assert_eq!(w.masq_entries().is_empty(), made != "nftables");
        let d = w.call("DEL", "c1", &path(&pod), &with(removed));
        assert_eq!(d.code, 0, "{}", d.stdout);
        assert!(cnib_chains(&w).is_empty(), "{made} -> {removed}: {:?}", cnib_chains(&w));
        assert!(w.masq_entries().is_empty(), "{made} -> {removed}");
        assert!(w.leases().is_empty());
    }
    // By PATH: without nft, the default is iptables; with it, nftables.
    let no_nft = tool_dir(&w, "no-nft", &IPTABLES_TOOLS, &[]);
    let o = w.call_with("ADD", "c2", &path(&pod), "eth0", &[("PATH", &no_nft)], &base);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(!cnib_chains(&w).is_empty(), "iptables was the default without nft");
    assert_eq!(w.call("DEL", "c2", &path(&pod), &base).code, 0);
    assert!(cnib_chains(&w).is_empty(), "DEL with nft on PATH left {:?}", cnib_chains(&w));
    // And the reverse: made with nft, removed by a DEL that finds only iptables on PATH.
    let o = w.call("ADD", "c4", &path(&pod), &base);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert_eq!(w.masq_entries().len(), 1);
    assert_eq!(w.call_with("DEL", "c4", &path(&pod), "eth0", &[("PATH", &no_nft)], &base).code, 0);
    assert!(w.masq_entries().is_empty(), "DEL without nft on PATH left {:?}", w.masq_entries());
    // GC likewise.
    let o = w.call("ADD", "c3", &path(&pod), &with("iptables"));
    assert_eq!(o.code, 0, "{}", o.stdout);
    let mut gc = with("nftables");
    gc["cni.dev/valid-attachments"] = json!([]);
    let g = w.call("GC", "", "", &gc);
    assert_eq!(g.code, 0, "{}", g.stdout);
    assert!(cnib_chains(&w).is_empty(), "GC left {:?}", cnib_chains(&w));
    assert!(w.leases().is_empty());
}

/// A listing tool that fails is an error: DEL and GC fail and keep the lease (the rules are
/// still there), CHECK says what failed instead of "missing"; with the tool back, DEL works.
#[test]
fn listing_failures_are_errors_not_nothing_there() {
    require_root("listing_failures_are_errors_not_nothing_there");
    let w = World::new("lfail");
    let pod = Netns::new("lf");
    let conf = w.conf("1.1.0", "10.42.0.0/24", json!({"ipMasq": true, "ipMasqBackend": "iptables"}));
    let o = w.call("ADD", "c1", &path(&pod), &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    let broken = tool_dir(
        &w,
        "broken",
        &["iptables-restore", "ip6tables-restore"],
        &[
            ("iptables-save", "echo 'iptables-save: broken' >&2; exit 1"),
            ("ip6tables-save", "echo 'ip6tables-save: broken' >&2; exit 1"),
            ("nft", "echo 'Error: broken' >&2; exit 1"),
        ],
    );
    let env = [("PATH", broken.as_str())];
    let k = w.call_with("CHECK", "c1", &path(&pod), "eth0", &env, &with_prev(&conf, &o));
    assert_ne!(k.code, 0);
    assert!(k.stdout.contains("broken") && !k.stdout.contains("missing"), "{}", k.stdout);
    let d = w.call_with("DEL", "c1", &path(&pod), "eth0", &env, &conf);
    assert_ne!(d.code, 0, "DEL with a failing iptables-save must fail: {}", d.stdout);
    assert!(d.stdout.contains("iptables-save"), "{}", d.stdout);
    assert!(!cnib_chains(&w).is_empty());
    assert_eq!(w.leases().len(), 1, "the lease is kept while its rule is there");
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let g = w.call_with("GC", "", "", "eth0", &env, &gc);
    assert_ne!(g.code, 0, "GC with a failing iptables-save must fail: {}", g.stdout);
    assert_eq!(w.leases().len(), 1);
    // nftables: CHECK reads the maps and the hook over netlink, so a broken nft is no matter;
    // without the hook rules it fails.
    let nconf = w.conf("1.1.0", "10.42.0.0/24", json!({"ipMasq": true, "ipMasqBackend": "nftables"}));
    let p2 = Netns::new("lf2");
    let o2 = w.call("ADD", "c2", &path(&p2), &nconf);
    assert_eq!(o2.code, 0, "{}", o2.stdout);
    let k = w.call_with("CHECK", "c2", &path(&p2), "eth0", &env, &with_prev(&nconf, &o2));
    assert_eq!(k.code, 0, "{}", k.stdout);
    assert!(w.node.run("nft", &["flush", "chain", "inet", "cni_bridge", "postrouting"]).status.success());
    let k = w.call("CHECK", "c2", &path(&p2), &with_prev(&nconf, &o2));
    assert!(k.stdout.contains("not hooked"), "{}", k.stdout);
    // Tools back: everything goes.
    assert_eq!(w.call("DEL", "c1", &path(&pod), &conf).code, 0);
    assert_eq!(w.call("DEL", "c2", &path(&p2), &nconf).code, 0);
    assert!(cnib_chains(&w).is_empty() && w.masq_entries().is_empty() && w.leases().is_empty());
}

/// The elements of the spoof checks' sets (`bridge cni_bridge`), as `set owner` strings.
fn spoof_entries(w: &World) -> Vec<String> {
    let o = w.node.run("nft", &["-j", "list", "table", "bridge", "cni_bridge"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for e in item["set"]["elem"].as_array().into_iter().flatten() {
            out.push(format!(
                "{} {}",
                item["set"]["name"].as_str().unwrap_or(""),
                e["elem"]["comment"].as_str().unwrap_or("")
            ));
        }
    }
    out
}

/// The longest valid names and ids with ipMasq, in both backends, and both spoof checks:
/// ADD, CHECK, GC keeping it, GC and DEL removing it.
#[test]
fn longest_names_fit_the_rule_comments() {
    require_root("longest_names_fit_the_rule_comments");
    let w = World::new("long");
    let pod = Netns::new("lg");
    let id = "0123456789abcdef".repeat(4);
    for backend in ["nftables", "iptables"] {
        let extra =
            json!({"ipMasq": true, "ipMasqBackend": backend, "macspoofchk": true, "ipspoofchk": true});
        let mut conf = w.conf("1.1.0", "10.43.0.0/24", extra);
        conf["name"] = json!("n".repeat(59));
        let o = w.call("ADD", &id, &path(&pod), &conf);
        assert_eq!(o.code, 0, "{backend}: {}", o.stdout);
        let k = w.call("CHECK", &id, &path(&pod), &with_prev(&conf, &o));
        assert_eq!(k.code, 0, "{backend}: {}", k.stdout);
        let mut gc = conf.clone();
        gc["cni.dev/valid-attachments"] = json!([{"containerID": id, "ifname": "eth0"}]);
        assert_eq!(w.call("GC", "", "", &gc).code, 0);
        assert_eq!(w.call("CHECK", &id, &path(&pod), &with_prev(&conf, &o)).code, 0, "{backend}: GC kept it");
        // guarded, allowed, ipguarded, allowed4: one each.
        assert_eq!(spoof_entries(&w).len(), 4, "{backend}: {:?}", spoof_entries(&w));
        gc["cni.dev/valid-attachments"] = json!([]);
        assert_eq!(w.call("GC", "", "", &gc).code, 0);
        assert!(w.masq_entries().is_empty() && cnib_chains(&w).is_empty(), "{backend}: GC removed it");
        assert_eq!(spoof_entries(&w), Vec::<String>::new(), "{backend}: GC removed the spoof elements");
        assert_ne!(w.call("CHECK", &id, &path(&pod), &with_prev(&conf, &o)).code, 0);
        assert_eq!(w.call("DEL", &id, &path(&pod), &conf).code, 0);
    }
}

/// A tiny xorshift: the storm's choices, reproducible from the seed it prints.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// 124 pods on a /25 (125 addresses) with ipMasq, 12 workers (more than this machine's
/// cores) adding all, then doing random ADD/DEL/CHECK, each on its own pods as a runtime
/// serialises calls per pod. The pool stays nearly full, so a freed address goes to another
/// pod at once, often while its DEL is still running. Every CHECK of a live pod passes, no
/// address is held twice, and at the end the leases, veths and masquerade entries are
/// exactly the live pods'.
#[test]
fn storm_of_adds_dels_and_checks_keeps_every_live_pod_whole() {
    require_root("storm_of_adds_dels_and_checks_keeps_every_live_pod_whole");
    const PODS: usize = 124;
    const WORKERS: usize = 12;
    const OPS_PER_WORKER: usize = 50;
    let w = World::new("storm");
    let pods: Vec<Netns> = (0..PODS).map(|i| Netns::new(&format!("st{i}"))).collect();
    let conf = w.conf("1.1.0", "10.44.0.0/25", json!({"ipMasq": true}));
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("storm seed {seed}");
    let live: Vec<Option<cni_conformance::Out>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|worker| {
                let (w, conf, pods) = (&w, &conf, &pods);
                s.spawn(move || {
                    let mine: Vec<usize> = (worker..PODS).step_by(WORKERS).collect();
                    let mut state: Vec<Option<cni_conformance::Out>> = mine.iter().map(|_| None).collect();
                    let mut rng = Rng(seed.wrapping_mul(worker as u64 + 1) | 1);
                    let fill = 0..mine.len();
                    for step in fill.clone().chain(std::iter::repeat_n(usize::MAX, OPS_PER_WORKER)) {
                        let k = if fill.contains(&step) { step } else { rng.below(mine.len()) };
                        let (id, ns) = (format!("s{}", mine[k]), path(&pods[mine[k]]));
                        match (&state[k], rng.below(3)) {
                            (None, _) => {
                                let o = w.call("ADD", &id, &ns, conf);
                                assert_eq!(o.code, 0, "ADD {id}: {} (seed {seed})", o.stdout);
                                state[k] = Some(o);
                            }
                            (Some(added), 0) => {
                                let c = w.call("CHECK", &id, &ns, &with_prev(conf, added));
                                assert_eq!(c.code, 0, "CHECK {id}: {} (seed {seed})", c.stdout);
                            }
                            (Some(_), _) => {
                                let d = w.call("DEL", &id, &ns, conf);
                                assert_eq!(d.code, 0, "DEL {id}: {} (seed {seed})", d.stdout);
                                state[k] = None;
                            }
                        }
                    }
                    mine.into_iter().zip(state).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<Option<cni_conformance::Out>> = (0..PODS).map(|_| None).collect();
        for h in handles {
            for (i, st) in h.join().unwrap() {
                all[i] = st;
            }
        }
        all
    });
    let mut want: Vec<String> = Vec::new();
    for (i, added) in live.iter().enumerate() {
        let Some(added) = added else { continue };
        let c = w.call("CHECK", &format!("s{i}"), &path(&pods[i]), &with_prev(&conf, added));
        assert_eq!(c.code, 0, "final CHECK s{i}: {} (seed {seed})", c.stdout);
        want.push(format!("{} testnet/s{i}/eth0", ip_of(added, 0)));
    }
    let mut ips: Vec<String> = live.iter().flatten().map(|o| ip_of(o, 0).to_string()).collect();
    ips.sort();
    let n = ips.len();
    ips.dedup();
    assert_eq!(ips.len(), n, "an address is held twice (seed {seed})");
    let mut leases = w.leases();
    leases.sort();
    assert_eq!(leases, ips, "leases are the live pods' (seed {seed})");
    assert_eq!(w.veths().len(), n, "one veth per live pod (seed {seed})");
    let (mut have, mut want) = (w.masq_entries(), want);
    have.sort();
    want.sort();
    assert_eq!(have, want, "masquerade entries are the live pods' (seed {seed})");
    for (i, added) in live.iter().enumerate() {
        if added.is_some() {
            assert_eq!(w.call("DEL", &format!("s{i}"), &path(&pods[i]), &conf).code, 0);
        }
    }
    assert!(w.leases().is_empty() && w.veths().is_empty() && w.masq_entries().is_empty());
}

/// An element left for an address by another attachment (a crashed teardown, an older
/// version) is replaced by the ADD that now holds the address's lease, not kept with the
/// stale owner.
#[test]
fn add_takes_over_a_stale_element_for_its_address() {
    require_root("add_takes_over_a_stale_element_for_its_address");
    let w = World::new("stale");
    let pod = Netns::new("stl");
    let conf = w.conf("1.1.0", "10.45.0.0/30", json!({"ipMasq": true})); // one usable address
    let first = w.call("ADD", "old", &path(&pod), &conf);
    assert_eq!(first.code, 0, "{}", first.stdout);
    // A stale element: as if the old attachment's lease went without its element.
    let ip = ip_of(&first, 0);
    let o = w.node.run("nft", &["delete", "element", "inet", "cni_bridge", "pods4", &format!("{{ {ip} }}")]);
    assert!(o.status.success());
    let add = format!("{{ {ip} comment \"testnet/ghost/eth0\" : jump masq4-0a2d0000-30 }}");
    let o = w.node.run("nft", &["add", "element", "inet", "cni_bridge", "pods4", &add]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(w.call("DEL", "old", &path(&pod), &conf).code, 0);
    assert_eq!(w.masq_entries(), [format!("{ip} testnet/ghost/eth0")], "not ours: kept by DEL");
    let new = w.call("ADD", "new", &path(&pod), &conf);
    assert_eq!(new.code, 0, "{}", new.stdout);
    assert_eq!(w.masq_entries(), [format!("{ip} testnet/new/eth0")]);
    assert_eq!(w.call("CHECK", "new", &path(&pod), &with_prev(&conf, &new)).code, 0);
}

/// A second ADD for a live attachment fails (its interface exists) and its rollback must not
/// take the live attachment's rules or lease with it.
#[test]
fn failed_duplicate_add_leaves_the_live_attachment_whole() {
    require_root("failed_duplicate_add_leaves_the_live_attachment_whole");
    let w = World::new("dup");
    let pod = Netns::new("dp");
    let conf = w.conf("1.1.0", "10.46.0.0/24", json!({"ipMasq": true, "macspoofchk": true}));
    let first = w.call("ADD", "c1", &path(&pod), &conf);
    assert_eq!(first.code, 0, "{}", first.stdout);
    let again = w.call("ADD", "c1", &path(&pod), &conf);
    assert_ne!(again.code, 0, "{}", again.stdout);
    let k = w.call("CHECK", "c1", &path(&pod), &with_prev(&conf, &first));
    assert_eq!(k.code, 0, "the live attachment after a failed duplicate ADD: {}", k.stdout);
    assert_eq!(w.leases().len(), 1);
}

/// GC after a drain: thousands of stale entries go, in several transactions (one batch of
/// them all would not fit the socket's send buffer), and the live one stays.
#[test]
fn gc_removes_thousands_of_stale_entries() {
    require_root("gc_removes_thousands_of_stale_entries");
    let w = World::new("many");
    let pod = Netns::new("mn");
    let conf = w.conf("1.1.0", "10.47.0.0/16", json!({"ipMasq": true}));
    let live = w.call("ADD", "live", &path(&pod), &conf);
    assert_eq!(live.code, 0, "{}", live.stdout);
    let script: String = (0..4000)
        .map(|i| {
            format!(
                "add element inet cni_bridge pods4 {{ 10.47.{}.{} comment \"testnet/gone{i}/eth0\" : jump masq4-0a2f0000-16 }}\n",
                100 + i / 200,
                1 + i % 200
            )
        })
        .collect();
    let file = w.tmp.join("many.nft");
    std::fs::write(&file, script).unwrap();
    let o = w.node.run("nft", &["-f", &file.display().to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(w.masq_entries().len(), 4001);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "live", "ifname": "eth0"}]);
    let g = w.call("GC", "", "", &gc);
    assert_eq!(g.code, 0, "{}", g.stdout);
    assert_eq!(w.masq_entries(), [format!("{} testnet/live/eth0", ip_of(&live, 0))]);
}

/// `CNIB-` chain names are a 64-bit hash of the attachment: a runtime choosing ids on purpose
/// can make two collide. A test build forced to give every attachment the same chain
/// (CNI_TEST_CHAIN_HASH_COLLIDE) shows that the chain of one is never touched by the other:
/// the second ADD is refused (before: it flushed the first's chain and wrote its own subnet
/// there), and its DEL leaves the first's chain and jump.
#[test]
fn a_chain_name_collision_never_touches_the_other_attachments_chain() {
    require_root("chain_collision");
    let w = World::new("collide");
    let collide = [("CNI_TEST_CHAIN_HASH_COLLIDE", "1")];
    let first = w.conf("1.1.0", "10.53.0.0/24", json!({"ipMasq": true, "ipMasqBackend": "iptables"}));
    let mut second = w.conf("1.1.0", "10.54.0.0/24", json!({"ipMasq": true, "ipMasqBackend": "iptables"}));
    second["name"] = json!("othernet");
    second["bridge"] = json!("cni1");
    let (p1, p2) = (Netns::new("p1"), Netns::new("p2"));
    let o = w.call_with("ADD", "c1", &path(&p1), "eth0", &collide, &first);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    let before = nat_rules(&w);
    assert!(before.contains("-A CNIB-") && before.contains("10.53.0.0/24"), "{before}");
    let o = w.call_with("ADD", "c2", &path(&p2), "eth0", &collide, &second);
    assert_eq!(o.err_code(), Some(114), "a colliding chain must be refused: {} {}", o.stdout, o.stderr);
    assert!(o.stdout.contains("testnet/c1/eth0"), "names the chain's owner: {}", o.stdout);
    assert_eq!(nat_rules(&w), before, "the first attachment's chain and jump untouched");
    // The runtime's cleanup DEL of the refused ADD.
    let o = w.call_with("DEL", "c2", &path(&p2), "eth0", &collide, &second);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    assert_eq!(nat_rules(&w), before, "DEL of the other attachment leaves the chain");
    let o = w.call_with("DEL", "c1", &path(&p1), "eth0", &collide, &first);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    assert!(!nat_rules(&w).contains("CNIB-"), "{}", nat_rules(&w));
}

/// Both nat tables' rules (no counters, no comment lines).
fn nat_rules(w: &World) -> String {
    let mut all = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let out = w.node.run(tool, &["-t", "nat"]);
        for l in
            String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with('-') || l.starts_with(':'))
        {
            all.push_str(l.split(" [").next().unwrap_or(l));
            all.push('\n');
        }
    }
    all
}

/// The masquerade maps are keyed by address and shared by every network on the node: two
/// networks with the same subnet give the same address to two attachments. A DEL of X stopped
/// between listing its entries and removing them (a rendezvous, not a delay) while an ADD of Y
/// in the other network takes over the same key: before, the DEL removed Y's entry by key.
/// Rounds of DEL racing ADD, and of GC racing ADD.
#[test]
fn del_and_gc_racing_an_add_of_the_same_address_in_another_network_keep_its_entry() {
    require_root("nft_key_race");
    use std::os::unix::fs::MetadataExt;
    for (round, verb) in ["DEL", "GC", "DEL"].into_iter().enumerate() {
        let w = World::new("nftrace");
        let a = w.conf("1.1.0", "10.56.0.0/24", json!({"ipMasq": true, "ipMasqBackend": "nftables"}));
        let mut b = a.clone();
        b["name"] = json!("othernet");
        b["bridge"] = json!("cni1");
        let (px, py) = (Netns::new("px"), Netns::new("py"));
        let x = w.call("ADD", "x", &path(&px), &a);
        assert_eq!(x.code, 0, "{} {}", x.stdout, x.stderr);
        let pause = Pause::new(&format!("cni-nftrace-{}-{round}", std::process::id()));
        let (fifo, reached) = (pause.fifo.clone(), pause.reached.clone());
        let node_ino = std::fs::metadata(&w.node.path).unwrap().ino();
        let lock = std::path::PathBuf::from(format!("/run/cni-bridge/locks/masquerade-{node_ino}"));
        let fifo_s = fifo.display().to_string();
        let y_owner = format!("{} othernet/y/eth0", ip_of(&x, 0));
        let (removed, y) = std::thread::scope(|s| {
            let _release = ReleaseOnDrop(&pause);
            let env =
                [("CNI_TEST_PAUSE_AT", "masq-remove-after-list"), ("CNI_TEST_PAUSE_FIFO", fifo_s.as_str())];
            let (w, a, b, px, py) = (&w, &a, &b, &px, &py);
            let remover = s.spawn(move || match verb {
                "DEL" => w.call_with("DEL", "x", &path(px), "eth0", &env, a),
                _ => {
                    // x's sandbox is gone: GC with no valid attachment collects it.
                    let mut gc = a.clone();
                    gc["cni.dev/valid-attachments"] = json!([]);
                    w.call_with("GC", "", "", "eth0", &env, &gc)
                }
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !reached.exists() {
                assert!(std::time::Instant::now() < deadline, "round {round}: the {verb} never paused");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let adder = s.spawn(move || w.call("ADD", "y", &path(py), b));
            while !w.masq_entries().contains(&y_owner) && lock_waiters(&lock) == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the ADD neither added nor waits"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            std::fs::write(&fifo, b"go").unwrap();
            (remover.join().unwrap(), adder.join().unwrap())
        });
        assert_eq!(removed.code, 0, "round {round}: {verb}: {} {}", removed.stdout, removed.stderr);
        assert_eq!(y.code, 0, "round {round}: ADD y: {} {}", y.stdout, y.stderr);
        assert_eq!(ip_of(&y, 0), ip_of(&x, 0), "the same address in both networks");
        assert_eq!(
            w.masq_entries(),
            std::slice::from_ref(&y_owner),
            "round {round}: y's entry survives the {verb} of x"
        );
        let mut check = b.clone();
        check["prevResult"] = y.json.clone();
        let o = w.call("CHECK", "y", &path(&py), &check);
        assert_eq!(o.code, 0, "round {round}: {} {}", o.stdout, o.stderr);
        assert_eq!(w.call("DEL", "y", &path(&py), &b).code, 0);
    }
}

/// Waiters on a lock file in /proc/locks (lines `N: -> FLOCK ... <dev>:<inode> ...`).
fn lock_waiters(lock: &std::path::Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = std::fs::metadata(lock).map(|m| m.ino()) else { return 0 };
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let ino = ino.to_string();
    locks
        .lines()
        .filter(|l| l.contains("->") && l.split_whitespace().any(|w| w.rsplit(':').next() == Some(&ino)))
        .count()
}
