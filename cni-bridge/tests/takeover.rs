//! Taking over a node that the reference `bridge` + `host-local` network today (flannel's
//! host-gw layout: `cni0`, leases in `<dataDir>/<name>`, the reference's per-pod ipMasq
//! chains), without restarting its pods; and handing it back after `uninstall`.

mod common;

use std::path::Path;

use cni_conformance::traffic::tcp_exchange;
use cni_conformance::world::lease_files;
use cni_conformance::{invoke, require_root, Netns, Out};
use common::*;
use serde_json::{json, Value};

/// Flannel's delegate to the reference bridge (host-gw: no tunnel, routes by flannel).
fn reference_conf(data_dir: &str) -> Value {
    json!({
        "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge", "bridge": "cni0",
        "isGateway": true, "isDefaultGateway": true, "hairpinMode": true, "ipMasq": true,
        "ipam": {"type": "host-local", "subnet": "10.33.0.0/24", "dataDir": data_dir}
    })
}

/// What the route agent writes for the same node: our types, same name, bridge and leases.
fn our_conf(data_dir: &str) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": "cbr0", "type": "cni-bridge", "bridge": "cni0",
        "isGateway": true, "isDefaultGateway": true, "hairpinMode": true, "ipMasq": false,
        "ipam": {"type": "cni-host-local", "ranges": [[{"subnet": "10.33.0.0/24"}]],
                 "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data_dir}
    })
}

fn call(w: &World, bin: &Path, verb: &str, id: &str, pod: &Netns, conf: &Value) -> Out {
    let (netns, path) = (pod.path.display().to_string(), w.cni_path.clone());
    let env = [("CNI_CONTAINERID", id), ("CNI_NETNS", &netns), ("CNI_IFNAME", "eth0"), ("CNI_PATH", &path)];
    invoke(&w.node, bin, verb, &env, conf)
}

/// The reference's nat rules naming container `id` (its POSTROUTING jump), and its chains.
fn reference_masq(w: &World, id: &str) -> (Vec<String>, Vec<String>) {
    let saved = String::from_utf8_lossy(&w.node.run("iptables-save", &["-t", "nat"]).stdout).into_owned();
    let needle = format!("id: \\\"{id}\\\"");
    let jumps: Vec<String> = saved
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING ") && l.contains(&needle))
        .map(str::to_string)
        .collect();
    let chains: Vec<String> = jumps
        .iter()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "-j").nth(1))
        .filter(|c| saved.lines().any(|l| l.starts_with(&format!(":{c} "))))
        .map(str::to_string)
        .collect();
    (jumps, chains)
}

fn leases(w: &World) -> Vec<String> {
    lease_files(Path::new(&w.data_dir()), "cbr0")
}

#[test]
fn a_node_of_the_reference_plugins_is_taken_over_and_handed_back() {
    require_root("takeover");
    require_reference();
    let w = World::new("takeover");
    let data_dir = w.data_dir();
    let reference = Path::new(REFERENCE_DIR).join("bridge");
    let ours = Path::new(BRIDGE);
    let (refconf, conf) = (reference_conf(&data_dir), our_conf(&data_dir));
    let pods: Vec<Netns> = (0..6).map(|i| Netns::new(&format!("tk{i}"))).collect();
    // Today: two pods of the reference, each with its masquerade chain.
    for (i, id) in ["r1", "r2"].iter().enumerate() {
        let o = call(&w, &reference, "ADD", id, &pods[i], &refconf);
        assert_eq!(o.code, 0, "reference ADD {id}: {} {}", o.stdout, o.stderr);
        let (jumps, chains) = reference_masq(&w, id);
        assert!(jumps.len() == 1 && chains.len() == 1, "the reference's ipMasq rules of {id}: {jumps:?}");
    }
    let addr = |o: &Out| ip_of(o, 0);
    let leases_before = leases(&w);
    assert_eq!(leases_before.len(), 2);

    // Ours takes over: new pods get new addresses and reach the old ones.
    let o = call(&w, ours, "ADD", "o1", &pods[2], &conf);
    assert_eq!(o.code, 0, "our ADD on the reference's bridge: {} {}", o.stdout, o.stderr);
    let o1 = addr(&o);
    assert!(!leases_before.contains(&o1.to_string()), "{o1} handed out twice");
    let r1 = leases_before[0].parse().unwrap();
    assert_eq!(tcp_exchange(pods[0].file(), r1, pods[2].file()), Ok(o1), "new pod -> old pod");

    // The old pod's DEL through ours: its lease and all of its rules go, the reference's
    // masquerade chain included; the other old pod keeps its own.
    let o = call(&w, ours, "DEL", "r1", &pods[0], &conf);
    assert_eq!(o.code, 0, "our DEL of a reference pod: {} {}", o.stdout, o.stderr);
    assert_eq!(reference_masq(&w, "r1"), (vec![], vec![]), "the reference's rules of r1 stay behind");
    assert_eq!(reference_masq(&w, "r2").1.len(), 1, "r2's chain is r2's");
    assert!(!leases(&w).contains(&r1.to_string()), "r1's lease released");
    // The next ADDs never get an address in use.
    let o = call(&w, ours, "ADD", "o2", &pods[0], &conf);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    let o2 = addr(&o);
    assert!(o2 != o1 && o2.to_string() != leases_before[1], "{o2} handed out twice");

    // Back: uninstall (our conflist, tables and indexes go; leases and the bridge stay), then
    // the reference serves the node again, our pods included.
    let tmp = w.tmp.join("uninstall");
    std::fs::create_dir_all(tmp.join("bin")).unwrap();
    let conf_file = tmp.join("10-cni-route-agent.conflist");
    std::fs::write(&conf_file, "{}").unwrap();
    let mut un = std::process::Command::new(ours.with_file_name("cni-route-agent"));
    un.arg("uninstall").arg("--bin-dir").arg(tmp.join("bin")).arg("--conf-file").arg(&conf_file);
    un.arg("--data-dir").arg(&data_dir);
    w.node.enter(&mut un);
    let out = un.output().expect("run cni-route-agent uninstall (cargo build --workspace)");
    assert!(out.status.success(), "uninstall: {}", String::from_utf8_lossy(&out.stderr));
    let o = call(&w, &reference, "ADD", "r3", &pods[3], &refconf);
    assert_eq!(o.code, 0, "reference ADD after uninstall: {} {}", o.stdout, o.stderr);
    let r3 = addr(&o);
    assert!(![o1, o2].contains(&r3) && r3.to_string() != leases_before[1], "{r3} handed out twice");
    assert_eq!(tcp_exchange(pods[2].file(), o1, pods[3].file()), Ok(r3), "reference pod -> our pod");
    for (id, pod) in [("o1", &pods[2]), ("o2", &pods[0]), ("r2", &pods[1]), ("r3", &pods[3])] {
        let o = call(&w, &reference, "DEL", id, pod, &refconf);
        assert_eq!(o.code, 0, "reference DEL {id}: {} {}", o.stdout, o.stderr);
    }
    assert!(leases(&w).is_empty(), "{:?}", leases(&w));
    for id in ["r2", "r3"] {
        assert_eq!(reference_masq(&w, id), (vec![], vec![]));
    }
}

/// A PATH directory whose `iptables-save` and `ip6tables-save` log each run to `log` and run
/// the real tool; the other tools are the real ones.
fn counting_tools(w: &World, log: &Path) -> String {
    let dir = w.tmp.join("counting");
    std::fs::create_dir_all(&dir).unwrap();
    for tool in ["iptables-save", "ip6tables-save"] {
        let p = dir.join(tool);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho {tool} >> {}\nexec /usr/sbin/{tool} \"$@\"\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", dir.display())
}

/// DEL's two sweeps of the `nat` table (our iptables masquerade, the reference's rules) read
/// one dump per family: our pod's DEL, with both our chain and a reference pod's chain in the
/// table, runs `iptables-save` once, removes its own rules and leaves the reference pod's.
#[test]
fn del_dumps_each_nat_table_once_for_both_sweeps() {
    require_root("del_dumps_each_nat_table_once_for_both_sweeps");
    require_reference();
    let w = World::new("natonce");
    let data_dir = w.data_dir();
    let reference = Path::new(REFERENCE_DIR).join("bridge");
    let ours = Path::new(BRIDGE);
    let refconf = reference_conf(&data_dir);
    let mut conf = our_conf(&data_dir);
    conf["ipMasq"] = json!(true);
    conf["ipMasqBackend"] = json!("iptables");
    let pods: Vec<Netns> = (0..2).map(|i| Netns::new(&format!("no{i}"))).collect();
    let o = call(&w, &reference, "ADD", "r1", &pods[0], &refconf);
    assert_eq!(o.code, 0, "reference ADD: {} {}", o.stdout, o.stderr);
    let o = call(&w, ours, "ADD", "o1", &pods[1], &conf);
    assert_eq!(o.code, 0, "our ADD: {} {}", o.stdout, o.stderr);
    let saved = || String::from_utf8_lossy(&w.node.run("iptables-save", &["-t", "nat"]).stdout).into_owned();
    assert!(saved().contains("cni-bridge cbr0/o1/eth0"), "{}", saved());

    let log = w.tmp.join("saves.log");
    let path = counting_tools(&w, &log);
    let (netns, cni_path) = (pods[1].path.display().to_string(), w.cni_path.clone());
    let env = [
        ("CNI_CONTAINERID", "o1"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", cni_path.as_str()),
        ("PATH", path.as_str()),
    ];
    let o = invoke(&w.node, ours, "DEL", &env, &conf);
    assert_eq!(o.code, 0, "our DEL: {} {}", o.stdout, o.stderr);
    let runs = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(runs.lines().filter(|l| *l == "iptables-save").count(), 1, "iptables-save runs: {runs:?}");
    assert!(!saved().contains("cbr0/o1/eth0"), "our rules stay behind: {}", saved());
    assert_eq!(reference_masq(&w, "r1").1.len(), 1, "the reference pod's chain is its own");
    let o = call(&w, &reference, "DEL", "r1", &pods[0], &refconf);
    assert_eq!(o.code, 0, "reference DEL: {} {}", o.stdout, o.stderr);
}
