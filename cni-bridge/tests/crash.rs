//! Crash tests: a test build of cni-bridge killed (SIGKILL) at each named step of ADD and
//! DEL (`cni_proto::crash_point`, env CNI_TEST_CRASH_AT), then the runtime's recovery: DEL
//! with the same arguments, or GC with the valid attachments once the sandbox is gone.
//! Afterwards nothing of the attachment is left (no lease, no veth, no masquerade or
//! spoof-check entry, no chain), and the next ADD for the pod works.

mod common;

use cni_conformance::{require_root, Netns};
use common::*;
use serde_json::{json, Value};

/// Every crash point of ADD, in the order ADD reaches them.
const ADD_STEPS: [&str; 9] = [
    "bridge-add-after-ipam",
    "bridge-add-after-masquerade",
    "bridge-add-after-bridge",
    "bridge-add-after-veth",
    "bridge-add-after-spoof-check",
    "bridge-add-after-addresses",
    "bridge-add-after-routes",
    "bridge-add-after-gateway",
    "bridge-add-before-result",
];

/// Every step at which a test build's ADD can be made to fail (CNI_TEST_FAIL_AT): the crash
/// points, and the moments right after the bridge and the veth pair are created.
fn fail_steps() -> Vec<&'static str> {
    let mut steps = ADD_STEPS.to_vec();
    steps.extend(["bridge-add-bridge-created", "bridge-add-veth-created"]);
    steps
}

/// Every crash point of DEL.
const DEL_STEPS: [&str; 3] = ["bridge-del-after-ipam", "bridge-del-after-rules", "bridge-del-after-link"];

/// Every rule of the node: the nftables ruleset and both iptables nat tables (the iptables
/// backend's per-attachment chains).
fn rules(w: &World) -> String {
    let mut all = w.ruleset();
    for tool in ["iptables-save", "ip6tables-save"] {
        let out = w.node.run(tool, &["-t", "nat"]);
        // Drop the comment lines that carry a timestamp.
        all.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n")),
        );
    }
    all
}

struct Node {
    w: World,
    conf: Value,
    /// The ruleset with the tables and chains made, and no attachment.
    baseline: String,
}

impl Node {
    fn new(tag: &str) -> Node {
        Node::with_backend(tag, "nftables")
    }

    fn with_backend(tag: &str, backend: &str) -> Node {
        let w = World::new(tag);
        let conf = w.conf(
            "1.1.0",
            "10.46.0.0/24",
            json!({"ipMasq": true, "ipMasqBackend": backend, "macspoofchk": true, "ipspoofchk": true, "isDefaultGateway": true}),
        );
        let warm = Netns::new("warm");
        let path = warm.path.display().to_string();
        assert_eq!(w.call("ADD", "warm", &path, &conf).code, 0);
        assert_eq!(w.call("DEL", "warm", &path, &conf).code, 0);
        let baseline = rules(&w);
        Node { w, conf, baseline }
    }

    fn call(&self, cmd: &str, id: &str, pod: &Netns, crash_at: Option<&str>) -> cni_conformance::Out {
        let env: Vec<(&str, &str)> = crash_at.map(|s| ("CNI_TEST_CRASH_AT", s)).into_iter().collect();
        self.w.call_with(cmd, id, &pod.path.display().to_string(), "eth0", &env, &self.conf)
    }

    fn crash(&self, cmd: &str, id: &str, pod: &Netns, step: &str) {
        let o = self.call(cmd, id, pod, Some(step));
        assert_eq!(o.code, -1, "{step}: {cmd} was not killed there: {} {}", o.stdout, o.stderr);
        assert!(o.stdout.is_empty(), "{step}: {}", o.stdout);
    }

    fn assert_clean(&self, step: &str) {
        assert!(self.w.leases().is_empty(), "{step}: lease left: {:?}", self.w.leases());
        assert_eq!(self.w.wait_no_veths(), Vec::<String>::new(), "{step}: veth left");
        assert!(self.w.masq_entries().is_empty(), "{step}: masquerade entry left");
        assert_eq!(rules(&self.w), self.baseline, "{step}: rules left");
    }

    /// The runtime's recovery by DEL with the same arguments: it succeeds and leaves nothing,
    /// and the next ADD for the pod works.
    fn assert_del_recovers(&self, pod: &Netns, step: &str) {
        let o = self.call("DEL", "c1", pod, None);
        assert_eq!(o.code, 0, "{step}: DEL after the crash: {} {}", o.stdout, o.stderr);
        assert_eq!(pod.links(), ["lo"], "{step}: pod interface left");
        self.assert_clean(step);
        self.assert_next_add_works("c1", pod, step);
    }

    /// The next ADD for the pod works, and its DEL cleans up.
    fn assert_next_add_works(&self, id: &str, pod: &Netns, step: &str) {
        let o = self.call("ADD", id, pod, None);
        assert_eq!(o.code, 0, "{step}: ADD after recovery: {} {}", o.stdout, o.stderr);
        assert_ne!(rules(&self.w), self.baseline, "{step}: the ADD made its rules");
        assert_eq!(self.call("DEL", id, pod, None).code, 0, "{step}");
        self.assert_clean(step);
    }
}

#[test]
fn add_killed_at_each_step_then_del_leaves_nothing() {
    require_root("crash_add_del");
    let node = Node::new("crashdel");
    for step in ADD_STEPS {
        let pod = Netns::new("pod");
        node.crash("ADD", "c1", &pod, step);
        node.assert_del_recovers(&pod, step);
    }
}

#[test]
fn add_killed_at_each_step_then_del_leaves_no_iptables_chain() {
    require_root("crash_add_del_iptables");
    let node = Node::with_backend("crashipt", "iptables");
    for step in ADD_STEPS {
        let pod = Netns::new("pod");
        node.crash("ADD", "c1", &pod, step);
        node.assert_del_recovers(&pod, step);
    }
}

#[test]
fn add_killed_at_each_step_then_gc_leaves_nothing() {
    require_root("crash_add_gc");
    let node = Node::new("crashgc");
    // A live pod the GCs must keep.
    let live = Netns::new("live");
    let o = node.call("ADD", "live", &live, None);
    assert_eq!(o.code, 0, "{}", o.stdout);
    let live_lease = node.w.leases();
    let mut gc = node.conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "live", "ifname": "eth0"}]);
    for step in ADD_STEPS {
        let pod = Netns::new("pod");
        node.crash("ADD", "c1", &pod, step);
        // The runtime removes the dead sandbox, then collects what it no longer knows.
        drop(pod);
        let o = node.w.call("GC", "", "", &gc);
        assert_eq!(o.code, 0, "{step}: GC: {} {}", o.stdout, o.stderr);
        assert_eq!(node.w.leases(), live_lease, "{step}: lease left");
        assert_eq!(node.w.masq_entries().len(), 1, "{step}: only the live pod's entry stays");
        let stale_veths = node.w.veths();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut veths = stale_veths;
        while veths.len() > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            veths = node.w.veths();
        }
        assert_eq!(veths.len(), 1, "{step}: veth left: {veths:?}");
        let pod = Netns::new("pod");
        let o = node.call("ADD", "c1", &pod, None);
        assert_eq!(o.code, 0, "{step}: ADD after GC: {} {}", o.stdout, o.stderr);
        assert_eq!(node.call("DEL", "c1", &pod, None).code, 0, "{step}");
    }
    assert_eq!(node.call("DEL", "live", &live, None).code, 0);
    node.assert_clean("end");
}

#[test]
fn del_killed_at_each_step_then_del_again_leaves_nothing() {
    require_root("crash_del");
    let node = Node::new("crashdel2");
    for step in DEL_STEPS {
        let pod = Netns::new("pod");
        let o = node.call("ADD", "c1", &pod, None);
        assert_eq!(o.code, 0, "{step}: {}", o.stdout);
        node.crash("DEL", "c1", &pod, step);
        node.assert_del_recovers(&pod, step);
    }
}

#[test]
fn add_failing_at_each_step_undoes_everything_by_itself() {
    require_root("fail_add");
    let id = "failing-attachment";
    for step in fail_steps() {
        // A node of its own each time: the failing ADD is its first, so it made the bridge.
        let w = World::new("failadd");
        let conf = w.conf(
            "1.1.0",
            "10.49.0.0/24",
            json!({"ipMasq": true, "macspoofchk": true, "isDefaultGateway": true}),
        );
        let pod = Netns::new("pod");
        let path = pod.path.display().to_string();
        let o = w.call_with("ADD", id, &path, "eth0", &[("CNI_TEST_FAIL_AT", step)], &conf);
        assert_eq!(o.err_code(), Some(5), "{step}: {} {}", o.stdout, o.stderr);
        assert!(o.stdout.contains(step), "{step}: {}", o.stdout);
        // No DEL: a failed ADD leaves nothing by itself.
        assert_eq!(pod.links(), ["lo"], "{step}: pod interface left");
        assert_eq!(w.node.links(), ["lo"], "{step}: the bridge this ADD made, or a veth, left");
        assert!(w.leases().is_empty(), "{step}: lease left: {:?}", w.leases());
        assert!(w.masq_entries().is_empty(), "{step}: masquerade entry left");
        assert!(!rules(&w).contains(id), "{step}: a rule of the attachment left: {}", rules(&w));
        let o = w.call("ADD", id, &path, &conf);
        assert_eq!(o.code, 0, "{step}: the next ADD: {} {}", o.stdout, o.stderr);
        assert_eq!(w.call("DEL", id, &path, &conf).code, 0, "{step}");
    }
}

/// The bridge lock's waiters in /proc/locks (lines `N: -> FLOCK ... <dev>:<inode> ...`).
fn lock_waiters(lock: &std::path::Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = std::fs::metadata(lock).map(|m| m.ino()) else { return 0 };
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks
        .lines()
        .filter(|l| {
            l.contains("->") && l.split_whitespace().any(|w| w.rsplit(':').next() == Some(&ino.to_string()))
        })
        .count()
}

/// Hostile: the ADD that made the bridge fails and, in its rollback, has found the bridge
/// without ports; many ADDs for other pods run at that moment. Before: they attached to the
/// bridge, then the rollback deleted it under them. Each round stops the rollback right
/// between its check and its delete (a rendezvous, not a delay), lets the others run until
/// each has attached a port or waits for the bridge lock, then lets the rollback go on.
#[test]
fn many_adds_racing_the_rollback_of_the_add_that_made_the_bridge_all_keep_their_bridge() {
    require_root("rollback_race");
    use std::os::unix::fs::MetadataExt;
    const RACERS: usize = 6;
    for round in 0..3 {
        let w = World::new("rbrace");
        let conf = w.conf("1.1.0", "10.51.0.0/24", json!({}));
        let pause = Pause::new(&format!("cni-rbrace-{}-{round}", std::process::id()));
        let (fifo, reached) = (pause.fifo.clone(), pause.reached.clone());
        let node_ino = std::fs::metadata(&w.node.path).unwrap().ino();
        let lock = std::path::PathBuf::from(format!("/run/cni-bridge/locks/bridge-{node_ino}-cni0"));
        let maker = Netns::new("maker");
        let pods: Vec<Netns> = (0..RACERS).map(|_| Netns::new("racer")).collect();
        let fifo_s = fifo.display().to_string();
        let added = std::thread::scope(|s| {
            let _release = ReleaseOnDrop(&pause);
            let env = [
                ("CNI_TEST_FAIL_AT", "bridge-add-bridge-created"),
                ("CNI_TEST_PAUSE_AT", "bridge-rollback-before-delete"),
                ("CNI_TEST_PAUSE_FIFO", fifo_s.as_str()),
            ];
            let maker_path = maker.path.display().to_string();
            let (w, conf) = (&w, &conf);
            let failing = s.spawn(move || w.call_with("ADD", "maker", &maker_path, "eth0", &env, conf));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !reached.exists() {
                assert!(std::time::Instant::now() < deadline, "round {round}: the rollback never paused");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let racers: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, pod)| {
                    let path = pod.path.display().to_string();
                    s.spawn(move || w.call("ADD", &format!("racer{i}"), &path, conf))
                })
                .collect();
            let ports = || {
                w.node.ip(&["link", "show", "master", "cni0"]).lines().filter(|l| l.contains("veth")).count()
            };
            while ports() == 0 && lock_waiters(&lock) < RACERS {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: racers neither attached nor wait"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // Release the rollback.
            std::fs::write(&fifo, b"go").unwrap();
            let o = failing.join().unwrap();
            assert_eq!(o.err_code(), Some(5), "round {round}: {} {}", o.stdout, o.stderr);
            racers.into_iter().map(|r| r.join().unwrap()).collect::<Vec<_>>()
        });
        for (i, (pod, o)) in pods.iter().zip(&added).enumerate() {
            assert_eq!(o.code, 0, "round {round}: racer {i}: {} {}", o.stdout, o.stderr);
            let path = pod.path.display().to_string();
            let mut check = conf.clone();
            check["prevResult"] = o.json.clone();
            let o = w.call("CHECK", &format!("racer{i}"), &path, &check);
            assert_eq!(o.code, 0, "round {round}: racer {i} lost its bridge: {} {}", o.stdout, o.stderr);
        }
        let ports = w.node.ip(&["link", "show", "master", "cni0"]);
        assert_eq!(ports.lines().filter(|l| l.contains("veth")).count(), RACERS, "round {round}: {ports}");
        for (i, pod) in pods.iter().enumerate() {
            assert_eq!(w.call("DEL", &format!("racer{i}"), &pod.path.display().to_string(), &conf).code, 0);
        }
    }
}

/// With `vlan` and isGateway, ADD also makes the shared `<bridge>.<vlan>` pair, one end a port
/// of the bridge. A failure after that must still remove the bridge this ADD made (before: the
/// pair's port kept it). This kernel has no bridge VLAN filtering, so the test build is told to
/// skip the filtering itself (CNI_TEST_VLAN_WITHOUT_FILTERING): the rollback path is the same.
#[test]
fn add_with_vlan_failing_after_the_vlan_gateway_exists_removes_the_bridge_it_made() {
    require_root("fail_add_vlan");
    for step in ["bridge-add-after-gateway", "bridge-add-before-result"] {
        let w = World::new("failvlan");
        let conf = w.conf("1.1.0", "10.52.0.0/24", json!({"vlan": 100, "isDefaultGateway": true}));
        let pod = Netns::new("pod");
        let path = pod.path.display().to_string();
        let env = [("CNI_TEST_FAIL_AT", step), ("CNI_TEST_VLAN_WITHOUT_FILTERING", "1")];
        let o = w.call_with("ADD", "vlan-c1", &path, "eth0", &env, &conf);
        assert_eq!(o.err_code(), Some(5), "{step}: {} {}", o.stdout, o.stderr);
        assert_eq!(pod.links(), ["lo"], "{step}: pod interface left");
        assert_eq!(w.node.links(), ["lo"], "{step}: the bridge this ADD made, or its VLAN gateway, left");
        assert!(w.leases().is_empty(), "{step}: lease left");
        // A bridge that existed before, with another pod on the VLAN, keeps both.
        let other = Netns::new("other");
        let env = [("CNI_TEST_VLAN_WITHOUT_FILTERING", "1")];
        let first = w.call_with("ADD", "vlan-c0", &other.path.display().to_string(), "eth0", &env, &conf);
        assert_eq!(first.code, 0, "{step}: {} {}", first.stdout, first.stderr);
        let env = [("CNI_TEST_FAIL_AT", step), ("CNI_TEST_VLAN_WITHOUT_FILTERING", "1")];
        let o = w.call_with("ADD", "vlan-c1", &path, "eth0", &env, &conf);
        assert_eq!(o.err_code(), Some(5), "{step}: {} {}", o.stdout, o.stderr);
        let links = w.node.links();
        assert!(
            links.contains(&"cni0".to_string()) && links.contains(&"cni0.100".to_string()),
            "{step}: {links:?}"
        );
        assert_eq!(w.veths().len(), 2, "{step}: the other pod's port and the VLAN gateway's");
    }
}
