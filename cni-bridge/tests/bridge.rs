//! The built `cni-bridge` run as a runtime runs it, inside a node namespace, with pods made
//! like pause containers.

mod common;

use cni_conformance::traffic::tcp_exchange;
use cni_conformance::{require_root, Netns, Out, Pause};
use common::*;
use serde_json::{json, Value};

const VERSIONS: [&str; 7] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn port_of(node: &Netns, veth: &str) -> Value {
    node.ip_json(&["link", "show", "dev", veth])[0].clone()
}

#[test]
fn add_and_del_for_every_version() {
    require_root("add_and_del_for_every_version");
    for v in VERSIONS {
        let w = World::new("ver");
        let pod = Netns::new("pod");
        let pod_path = pod.path.display().to_string();
        let conf =
            w.conf(v, "10.22.0.0/24", json!({"hairpinMode": true, "mtu": 1400, "isDefaultGateway": true}));
        let o = w.call("ADD", "c1", &pod_path, &conf);
        assert_eq!(o.code, 0, "{v}: {} {}", o.stdout, o.stderr);
        assert_eq!(o.json["cniVersion"], v);
        if v == "0.1.0" || v == "0.2.0" {
            assert_eq!(o.json["ip4"]["ip"], "10.22.0.2/24", "{v}");
            assert_eq!(o.json["ip4"]["gateway"], "10.22.0.1");
        } else {
            let ifs = o.json["interfaces"].as_array().unwrap();
            assert_eq!(ifs.len(), 3, "{v}");
            assert_eq!(ifs[0]["name"], "cni0");
            assert!(ifs[1]["name"].as_str().unwrap().starts_with("veth"));
            assert_eq!(ifs[2]["name"], "eth0");
            assert_eq!(ifs[2]["sandbox"], pod_path.as_str());
            for i in ifs {
                assert_eq!(i["mac"].as_str().unwrap().len(), 17);
            }
            assert_eq!(o.json["ips"][0]["interface"], 2);
            assert_eq!(o.json["ips"][0]["address"], "10.22.0.2/24");
            assert_eq!(o.json["ips"][0].get("version").is_some(), v.starts_with("0."), "{v}");
            assert_eq!(ifs[2].get("mtu").is_some(), v == "1.1.0");
        }
        // Host: lo, the bridge and one veth, which is a hairpin port of the bridge.
        let links = w.node.links();
        assert_eq!(links.len(), 3, "{links:?}");
        let veth = w.veths()[0].clone();
        let port = port_of(&w.node, &veth);
        assert_eq!(port["master"], "cni0");
        assert_eq!(port["linkinfo"]["info_slave_data"]["hairpin"], true);
        assert_eq!(port["mtu"], 1400);
        let br_addrs = w.node.ip(&["-br", "addr", "show", "dev", "cni0"]);
        assert!(br_addrs.contains("10.22.0.1/24"), "{br_addrs}");
        // Pod: eth0 up with the address, MTU, and a default route via the gateway.
        let eth0 = pod.ip_json(&["addr", "show", "dev", "eth0"])[0].clone();
        assert_eq!(eth0["operstate"], "UP");
        assert_eq!(eth0["mtu"], 1400);
        assert!(pod.ip(&["-br", "addr"]).contains("10.22.0.2/24"));
        assert!(pod.ip(&["route"]).contains("default via 10.22.0.1 dev eth0"), "{}", pod.ip(&["route"]));
        assert_eq!(w.leases(), ["10.22.0.2"]);
        let d = w.call("DEL", "c1", &pod_path, &conf);
        assert_eq!(d.code, 0, "{v}: {}", d.stdout);
        assert!(w.veths().is_empty(), "{v}: veth left");
        assert!(!pod.links().contains(&"eth0".to_string()));
        assert!(w.leases().is_empty());
        assert!(w.node.links().contains(&"cni0".to_string()), "DEL never deletes the bridge");
    }
}

#[test]
fn pods_reach_each_other_the_gateway_and_keep_their_source_address() {
    require_root("pods_reach_each_other");
    let w = World::new("traffic");
    let a = Netns::new("pa");
    let b = Pause::new(); // the /proc/PID/ns/net form
    let conf = w.conf("1.1.0", "10.23.0.0/24", json!({"hairpinMode": true}));
    let oa = w.call("ADD", "a", &a.path.display().to_string(), &conf);
    let ob = w.call("ADD", "b", &b.path.display().to_string(), &conf);
    assert_eq!((oa.code, ob.code), (0, 0), "{} {}", oa.stdout, ob.stdout);
    let (ipa, ipb) = (ip_of(&oa, 0), ip_of(&ob, 0));
    assert_eq!(tcp_exchange(a.file(), ipa, b.file()), Ok(ipb), "b -> a, source preserved");
    assert_eq!(tcp_exchange(b.file(), ipb, a.file()), Ok(ipa), "a -> b");
    let gw: std::net::IpAddr = "10.23.0.1".parse().unwrap();
    assert_eq!(tcp_exchange(w.node.file(), gw, a.file()), Ok(ipa), "pod -> gateway on the node");
    assert_eq!(w.call("DEL", "a", &a.path.display().to_string(), &conf).code, 0);
    assert_eq!(w.call("DEL", "b", &b.path.display().to_string(), &conf).code, 0);
    assert!(w.veths().is_empty());
}

#[test]
fn del_succeeds_with_empty_or_vanished_netns_and_releases_everything() {
    require_root("del_forms");
    let w = World::new("del");
    let conf = w.conf("1.0.0", "10.24.0.0/24", json!({"ipMasq": true}));
    // Empty CNI_NETNS (containerd's ctr): lease and masquerade still released.
    let pod = Netns::new("p1");
    assert_eq!(w.call("ADD", "c1", &pod.path.display().to_string(), &conf).code, 0);
    assert_eq!(w.masq_entries(), ["10.24.0.2 testnet/c1/eth0"]);
    let o = w.call("DEL", "c1", "", &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(w.leases().is_empty());
    assert!(w.masq_entries().is_empty(), "masquerade entry leaked");
    drop(pod);
    // The namespace removed before DEL.
    let pod = Netns::new("p2");
    let path = pod.path.display().to_string();
    assert_eq!(w.call("ADD", "c2", &path, &conf).code, 0);
    drop(pod);
    let o = w.call("DEL", "c2", &path, &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(w.leases().is_empty(), "lease leaked");
    assert!(w.masq_entries().is_empty(), "masquerade entry leaked");
    // The kernel removes a dead namespace's veth pair asynchronously; wait for it (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !w.veths().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(w.veths().is_empty(), "veth of a removed namespace left");
    // Repeated, and for a container never added.
    assert_eq!(w.call("DEL", "c2", &path, &conf).code, 0);
    assert_eq!(w.call("DEL", "never", "", &conf).code, 0);
}

#[test]
fn check_passes_then_fails_after_tampering() {
    require_root("check");
    let w = World::new("check");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = w.conf("1.1.0", "10.25.0.0/24", json!({"hairpinMode": true, "ipMasq": true, "mtu": 1450}));
    let o = w.call("ADD", "c1", &path, &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    let mut c = conf.clone();
    c["prevResult"] = o.json.clone();
    let k = w.call("CHECK", "c1", &path, &c);
    assert_eq!(k.code, 0, "{} {}", k.stdout, k.stderr);
    let veth = w.veths()[0].clone();
    // Hairpin off: the reference's CHECK would not notice; ours does.
    w.node.ip(&["link", "set", "dev", &veth, "type", "bridge_slave", "hairpin", "off"]);
    let k = w.call("CHECK", "c1", &path, &c);
    assert_eq!(k.err_code(), Some(115), "{}", k.stdout);
    assert!(k.stdout.contains("hairpin"));
    w.node.ip(&["link", "set", "dev", &veth, "type", "bridge_slave", "hairpin", "on"]);
    assert_eq!(w.call("CHECK", "c1", &path, &c).code, 0);
    pod.ip(&["addr", "flush", "dev", "eth0"]);
    let k = w.call("CHECK", "c1", &path, &c);
    assert_eq!(k.err_code(), Some(115), "{}", k.stdout);
    assert!(k.stdout.contains("10.25.0.2"), "{}", k.stdout);
    // CHECK without prevResult is a config error; below 0.4.0 it is not allowed at all.
    assert_eq!(w.call("CHECK", "c1", &path, &conf).err_code(), Some(7));
    assert_eq!(w.call("CHECK", "c1", &path, &w.conf("0.3.1", "10.25.0.0/24", json!({}))).err_code(), Some(1));
    assert_eq!(w.call("DEL", "c1", &path, &c).code, 0);
}

#[test]
fn fifty_parallel_adds_and_dels() {
    require_root("parallel");
    let w = World::new("par");
    let pods: Vec<Netns> = (0..50).map(|i| Netns::new(&format!("pp{i}"))).collect();
    let conf = w.conf("1.0.0", "10.26.0.0/24", json!({"ipMasq": true, "hairpinMode": true}));
    let run = |cmd: &'static str| -> Vec<cni_conformance::Out> {
        std::thread::scope(|s| {
            let hs: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let (w, conf) = (&w, &conf);
                    s.spawn(move || w.call(cmd, &format!("c{i}"), &p.path.display().to_string(), conf))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let adds = run("ADD");
    let mut ips: Vec<String> = adds
        .iter()
        .map(|o| {
            assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
            ip_of(o, 0).to_string()
        })
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50);
    assert_eq!(w.veths().len(), 50);
    assert_eq!(w.masq_entries().len(), 50);
    assert!(run("DEL").iter().all(|o| o.code == 0));
    assert!(w.veths().is_empty());
    assert!(w.leases().is_empty());
    assert!(w.masq_entries().is_empty());
}

#[test]
fn exhausted_range_leaves_nothing_behind() {
    require_root("exhausted");
    let w = World::new("exh");
    let (p1, p2) = (Netns::new("p1"), Netns::new("p2"));
    let conf = w.conf("1.0.0", "10.27.0.0/30", json!({"ipMasq": true})); // one usable address
    assert_eq!(w.call("ADD", "c1", &p1.path.display().to_string(), &conf).code, 0);
    let o = w.call("ADD", "c2", &p2.path.display().to_string(), &conf);
    assert_eq!(o.err_code(), Some(100), "{}", o.stdout);
    assert!(o.stdout.contains("10.27.0.1-10.27.0.2"), "{}", o.stdout);
    assert_eq!(w.veths().len(), 1, "the failed ADD made no veth");
    assert_eq!(p2.links(), ["lo"]);
    assert_eq!(w.leases(), ["10.27.0.2"]);
    assert_eq!(w.masq_entries().len(), 1);
}

#[test]
fn bad_input_touches_nothing() {
    require_root("bad_input");
    let w = World::new("bad");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let base = |extra: Value| w.conf("1.0.0", "10.28.0.0/24", extra);
    let cases: Vec<(Value, u64, &str)> = vec![
        (base(json!({"hairpinMode": true, "promiscMode": true})), 7, "hairpin"),
        (base(json!({"vlan": 5000})), 7, "VLAN"),
        (base(json!({"mtu": 20})), 7, "mtu"),
        (base(json!({"ipMasqBackend": "pf"})), 7, "ipMasqBackend"),
        (base(json!({"bridge": "this-name-is-too-long"})), 7, "bridge name"),
        (base(json!({"runtimeConfig": {"mac": "zz"}})), 7, "MAC"),
        (base(json!({"disableContainerInterface": true})), 7, "IPAM"),
        (base(json!({"ipspoofchk": true, "ipam": {}})), 7, "ipspoofchk needs ipam"),
        (base(json!({"ipspoofchk": "yes"})), 7, "boolean"),
        (w.conf("1.0.0", "10.28.0.5/24", json!({})), 7, "host bits"),
        (w.conf("4.0.0", "10.28.0.0/24", json!({})), 1, "incompatible"),
    ];
    for (conf, code, needle) in cases {
        let o = w.call("ADD", "c1", &path, &conf);
        assert_eq!(o.err_code(), Some(code), "{conf}: {}", o.stdout);
        assert!(o.stdout.contains(needle), "{needle} not in {}", o.stdout);
    }
    let o = cni_conformance::plugin::invoke_raw(
        &w.node,
        &w.main_plugin(),
        "ADD",
        &[("CNI_CONTAINERID", "c"), ("CNI_NETNS", &path), ("CNI_IFNAME", "eth0"), ("CNI_PATH", "/x")],
        b"{\"cniVersion\":",
        false,
    );
    assert_eq!(o.err_code(), Some(6));
    // CNI_NETNS: a plain file, a missing path, and the node's own namespace.
    let file = w.tmp.join("not-a-netns");
    std::fs::write(&file, "").unwrap();
    for ns in [file.display().to_string(), "/run/netns/does-not-exist".to_string()] {
        let o = w.call("ADD", "c1", &ns, &base(json!({})));
        assert_eq!(o.err_code(), Some(4), "{ns}: {}", o.stdout);
        assert!(o.stdout.contains("CNI_NETNS"));
    }
    let own = w.node.path.display().to_string();
    let o = cni_conformance::plugin::invoke_raw(
        &w.node,
        &w.main_plugin(),
        "ADD",
        &[("CNI_CONTAINERID", "c"), ("CNI_NETNS", &own), ("CNI_IFNAME", "eth0"), ("CNI_PATH", "/x")],
        base(json!({})).to_string().as_bytes(),
        true,
    );
    assert_eq!(o.err_code(), Some(4), "{}", o.stdout);
    assert!(o.stdout.contains("namespace the plugin runs in"), "{}", o.stdout);
    // DEL with the plugin's own namespace is refused too: CNI_IFNAME is never deleted there.
    let o = cni_conformance::plugin::invoke_raw(
        &w.node,
        &w.main_plugin(),
        "DEL",
        &[("CNI_CONTAINERID", "c"), ("CNI_NETNS", &own), ("CNI_IFNAME", "lo"), ("CNI_PATH", "/x")],
        base(json!({})).to_string().as_bytes(),
        true,
    );
    assert_eq!(o.err_code(), Some(4), "{}", o.stdout);
    assert!(o.stdout.contains("namespace the plugin runs in"), "{}", o.stdout);
    assert_eq!(w.node.links(), ["lo"], "bad input created links");
    assert_eq!(pod.links(), ["lo"]);
    assert!(w.leases().is_empty());
    assert!(w.masq_entries().is_empty());
}

#[test]
fn existing_bridge_cases() {
    require_root("existing_bridge");
    let w = World::new("exist");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    // A non-bridge link named like the bridge.
    w.node.ip(&["link", "add", "cni0", "type", "veth", "peer", "name", "cni0p"]);
    let o = w.call("ADD", "c1", &path, &w.conf("1.0.0", "10.29.0.0/24", json!({})));
    assert_eq!(o.err_code(), Some(110), "{}", o.stdout);
    w.node.ip(&["link", "del", "cni0"]);
    // A bridge holding another address: an error without forceAddress, replaced with it.
    w.node.ip(&["link", "add", "cni0", "type", "bridge"]);
    w.node.ip(&["addr", "add", "10.99.0.1/24", "dev", "cni0"]);
    let o = w.call("ADD", "c1", &path, &w.conf("1.0.0", "10.29.0.0/24", json!({})));
    assert_eq!(o.err_code(), Some(111), "{}", o.stdout);
    assert!(w.veths().is_empty() && w.leases().is_empty(), "rolled back");
    assert_eq!(pod.links(), ["lo"]);
    let o = w.call("ADD", "c1", &path, &w.conf("1.0.0", "10.29.0.0/24", json!({"forceAddress": true})));
    assert_eq!(o.code, 0, "{}", o.stdout);
    let a = w.node.ip(&["-br", "addr", "show", "dev", "cni0"]);
    assert!(a.contains("10.29.0.1/24") && !a.contains("10.99.0.1"), "{a}");
}

#[test]
fn mac_from_args_and_bridge_mac_is_pinned() {
    require_root("mac");
    let w = World::new("mac");
    let (p1, p2) = (Netns::new("p1"), Netns::new("p2"));
    let mut conf = w.conf("1.1.0", "10.30.0.0/24", json!({}));
    let o = w.call_with(
        "ADD",
        "c1",
        &p1.path.display().to_string(),
        "eth0",
        &[("CNI_ARGS", "IgnoreUnknown=1;MAC=02:11:22:33:44:55")],
        &conf,
    );
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert_eq!(o.json["interfaces"][2]["mac"], "02:11:22:33:44:55");
    let br_mac = o.json["interfaces"][0]["mac"].clone();
    conf["runtimeConfig"] = json!({"mac": "02:aa:bb:cc:dd:ee"});
    let o = w.call_with(
        "ADD",
        "c2",
        &p2.path.display().to_string(),
        "eth0",
        &[("CNI_ARGS", "MAC=02:11:22:33:44:66")],
        &conf,
    );
    assert_eq!(o.json["interfaces"][2]["mac"], "02:aa:bb:cc:dd:ee", "runtimeConfig wins over CNI_ARGS");
    assert_eq!(o.json["interfaces"][0]["mac"], br_mac, "the bridge MAC does not follow its ports");
    let show = p2.ip(&["link", "show", "eth0"]);
    assert!(show.contains("02:aa:bb:cc:dd:ee"), "{show}");
}

#[test]
fn interop_with_the_reference_plugins_both_ways() {
    require_root("interop");
    require_reference();
    let w = World::new("interop");
    let (p1, p2) = (Netns::new("p1"), Netns::new("p2"));
    // Our bridge with the reference host-local.
    let mut conf = w.conf("1.0.0", "10.31.0.0/24", json!({}));
    conf["ipam"]["type"] = json!("host-local");
    let o = w.call("ADD", "c1", &p1.path.display().to_string(), &conf);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    assert_eq!(o.json["ips"][0]["address"], "10.31.0.2/24");
    assert_eq!(w.call("DEL", "c1", &p1.path.display().to_string(), &conf).code, 0);
    assert!(w.leases().is_empty());
    // The reference bridge with our host-local, on the same bridge and lease dir.
    let refconf = {
        let mut c = w.conf("1.0.0", "10.31.0.0/24", json!({}));
        c["type"] = json!("bridge");
        c
    };
    let env_path = w.cni_path.clone();
    let env = [
        ("CNI_CONTAINERID", "c2"),
        ("CNI_NETNS", p2.path.to_str().unwrap()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", env_path.as_str()),
    ];
    let bin = std::path::Path::new(REFERENCE_DIR).join("bridge");
    let o = cni_conformance::invoke(&w.node, &bin, "ADD", &env, &refconf);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    assert_eq!(o.json["ips"][0]["address"], "10.31.0.3/24", "round robin continued");
    assert_eq!(w.leases(), ["10.31.0.3"]);
    let o = cni_conformance::invoke(&w.node, &bin, "DEL", &env, &refconf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(w.leases().is_empty());
}

#[test]
fn status_gc_and_version() {
    require_root("status_gc");
    let w = World::new("gc");
    let (p1, p2) = (Netns::new("p1"), Netns::new("p2"));
    let conf = w.conf("1.1.0", "10.32.0.0/24", json!({"ipMasq": true}));
    assert_eq!(w.call("ADD", "a", &p1.path.display().to_string(), &conf).code, 0);
    assert_eq!(w.call("ADD", "b", &p2.path.display().to_string(), &conf).code, 0);
    assert_eq!(w.call("STATUS", "", "", &conf).code, 0);
    let mut g = conf.clone();
    g["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
    let o = w.call("GC", "", "", &g);
    assert_eq!((o.code, o.stdout.as_str()), (0, ""), "{}", o.stderr);
    assert_eq!(w.leases(), ["10.32.0.2"]);
    assert_eq!(w.masq_entries(), ["10.32.0.2 testnet/a/eth0"]);
    let v =
        w.call_with("VERSION", "", "dummy", "", &[("CNI_PATH", "dummy")], &json!({"cniVersion": "1.1.0"}));
    assert_eq!(v.json["supportedVersions"].as_array().unwrap().len(), 7);
}

/// Whether the kernel has CONFIG_BRIDGE_VLAN_FILTERING, probed in a node namespace.
fn kernel_has_vlan_filtering(w: &World) -> bool {
    let probe = w.node.run("ip", &["link", "add", "vfprobe", "type", "bridge", "vlan_filtering", "1"]);
    if probe.status.success() {
        w.node.ip(&["link", "del", "vfprobe"]);
    }
    probe.status.success()
}

#[test]
fn vlan_trunk_config_is_validated() {
    require_root("vlan config");
    let w = World::new("vlancfg");
    let p1 = Netns::new("p1");
    let bad = w.conf("1.1.0", "10.33.0.0/24", json!({"vlanTrunk": [{"minID": 5}]}));
    assert_eq!(w.call("ADD", "c0", &p1.path.display().to_string(), &bad).err_code(), Some(7));
    assert_eq!(w.node.links(), ["lo"], "nothing created");
}

// Kernel-dependent: exactly one of the next two applies to a given kernel. libtest cannot
// decide "ignored" at run time, so both are ignored with the reason, and scripts/test probes
// the kernel and runs the one that applies with --ignored; the other stays reported ignored.
#[test]
#[ignore = "needs a kernel without CONFIG_BRIDGE_VLAN_FILTERING; scripts/test runs it there"]
fn vlan_refused_cleanly_without_kernel_support() {
    require_root("vlan refusal");
    let w = World::new("vlanno");
    assert!(
        !kernel_has_vlan_filtering(&w),
        "this kernel has bridge VLAN filtering: run vlan_access_trunk_and_gateway_interface"
    );
    let p1 = Netns::new("p1");
    let conf = w.conf("1.1.0", "10.33.0.0/24", json!({"vlan": 100}));
    let o = w.call("ADD", "c1", &p1.path.display().to_string(), &conf);
    assert_eq!(o.err_code(), Some(2), "{}", o.stdout);
    assert!(o.stdout.contains("CONFIG_BRIDGE_VLAN_FILTERING"), "{}", o.stdout);
    assert_eq!(w.node.links(), ["lo"], "nothing created");
    assert_eq!(p1.links(), ["lo"]);
    assert!(w.leases().is_empty(), "lease rolled back");
}

#[test]
#[ignore = "needs CONFIG_BRIDGE_VLAN_FILTERING; scripts/test runs it on kernels that have it"]
fn vlan_access_trunk_and_gateway_interface() {
    require_root("vlan");
    let w = World::new("vlan");
    assert!(
        kernel_has_vlan_filtering(&w),
        "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)"
    );
    let (p1, p2) = (Netns::new("p1"), Netns::new("p2"));
    let conf = w.conf(
        "1.1.0",
        "10.33.0.0/24",
        json!({"vlan": 100, "vlanTrunk": [{"id": 7}, {"minID": 200, "maxID": 203}]}),
    );
    let o = w.call("ADD", "c1", &p1.path.display().to_string(), &conf);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    // The gateway lives on cni0.100, reported as a fourth interface.
    assert_eq!(o.json["interfaces"][3]["name"], "cni0.100", "{}", o.stdout);
    assert!(w.node.ip(&["-br", "addr", "show", "dev", "cni0.100"]).contains("10.33.0.1/24"));
    let br = w.node.ip_json(&["link", "show", "dev", "cni0"])[0].clone();
    assert_eq!(br["linkinfo"]["info_data"]["vlan_filtering"], 1);
    let veth = o.json["interfaces"][1]["name"].as_str().unwrap().to_string();
    let vl = w.node.run("bridge", &["-j", "vlan", "show", "dev", &veth]);
    let v: Value = serde_json::from_slice(&vl.stdout).unwrap();
    let vlans = v[0]["vlans"].as_array().unwrap().clone();
    let has = |vid: u64, pvid: bool| {
        vlans.iter().any(|x| {
            let start = x["vlan"].as_u64().unwrap();
            let end = x.get("vlanEnd").and_then(Value::as_u64).unwrap_or(start);
            let flags: Vec<&str> = x["flags"]
                .as_array()
                .map(|f| f.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            (start..=end).contains(&vid) && flags.contains(&"PVID") == pvid
        })
    };
    assert!(has(100, true), "access VLAN 100 is the PVID: {vlans:?}");
    assert!(has(7, false) && has(200, false) && has(203, false), "trunk: {vlans:?}");
    assert!(!has(1, false) && !has(1, true), "default VLAN 1 removed: {vlans:?}");
    // A second pod on the same VLAN reaches the first one and the gateway.
    let o2 = w.call("ADD", "c2", &p2.path.display().to_string(), &conf);
    assert_eq!(o2.code, 0, "{}", o2.stdout);
    assert_eq!(tcp_exchange(p1.file(), ip_of(&o, 0), p2.file()), Ok(ip_of(&o2, 0)));
    assert_eq!(tcp_exchange(w.node.file(), "10.33.0.1".parse().unwrap(), p1.file()), Ok(ip_of(&o, 0)));
    // preserveDefaultVlan keeps VLAN 1.
    let p3 = Netns::new("p3");
    let keep = w.conf("1.1.0", "10.33.0.0/24", json!({"vlan": 100, "preserveDefaultVlan": true}));
    let o3 = w.call("ADD", "c3", &p3.path.display().to_string(), &keep);
    let veth3 = o3.json["interfaces"][1]["name"].as_str().unwrap().to_string();
    let out =
        String::from_utf8_lossy(&w.node.run("bridge", &["vlan", "show", "dev", &veth3]).stdout).to_string();
    assert!(out.contains(" 1") && out.contains("100 PVID"), "{out}");
}

#[test]
fn mac_spoof_check_drops_foreign_source_macs() {
    require_root("macspoofchk");
    let w = World::new("spoof");
    let (p1, p2) = (Netns::new("p1"), Netns::new("p2"));
    let conf = w.conf("1.1.0", "10.34.0.0/24", json!({"macspoofchk": true}));
    let o1 = w.call("ADD", "c1", &p1.path.display().to_string(), &conf);
    let o2 = w.call("ADD", "c2", &p2.path.display().to_string(), &conf);
    assert_eq!((o1.code, o2.code), (0, 0), "{} {}", o1.stdout, o2.stdout);
    assert_eq!(tcp_exchange(p1.file(), ip_of(&o1, 0), p2.file()), Ok(ip_of(&o2, 0)), "own MAC passes");
    let mut c = conf.clone();
    c["prevResult"] = o2.json.clone();
    assert_eq!(w.call("CHECK", "c2", &p2.path.display().to_string(), &c).code, 0);
    // The pod changes its MAC: its frames are dropped on the bridge.
    p2.ip(&["link", "set", "dev", "eth0", "address", "02:de:ad:be:ef:01"]);
    p1.ip(&["neigh", "flush", "all"]);
    assert!(tcp_exchange(p1.file(), ip_of(&o1, 0), p2.file()).is_err(), "spoofed MAC got through");
    assert_eq!(w.call("DEL", "c2", &p2.path.display().to_string(), &conf).code, 0);
    assert_eq!(w.call("DEL", "c1", &p1.path.display().to_string(), &conf).code, 0);
    let left = w.node.run("nft", &["list", "table", "bridge", "cni_bridge"]);
    let text = String::from_utf8_lossy(&left.stdout);
    assert!(!text.contains("testnet/"), "spoof entries left: {text}");
}

#[test]
fn masquerade_hides_pods_from_outside_but_not_from_each_other_with_both_backends() {
    require_root("masquerade");
    for backend in ["nftables", "iptables"] {
        let w = World::new("masq");
        let ext = Netns::new("ext");
        // The node's "uplink" to the outside world: a veth between the two namespaces.
        w.node.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", &ext.name]);
        w.node.ip(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
        w.node.ip(&["link", "set", "up0", "up"]);
        ext.ip(&["addr", "add", "192.0.2.2/24", "dev", "up1"]);
        ext.ip(&["link", "set", "up1", "up"]);
        let (a, b) = (Netns::new("a"), Netns::new("b"));
        let conf = w.conf("1.1.0", "10.35.0.0/24", json!({"ipMasq": true, "ipMasqBackend": backend}));
        let oa = w.call("ADD", "a", &a.path.display().to_string(), &conf);
        let ob = w.call("ADD", "b", &b.path.display().to_string(), &conf);
        assert_eq!((oa.code, ob.code), (0, 0), "{backend}: {} {}", oa.stdout, ob.stdout);
        let outside = tcp_exchange(ext.file(), "192.0.2.2".parse().unwrap(), a.file());
        assert_eq!(outside, Ok("192.0.2.1".parse().unwrap()), "{backend}: outside sees the node address");
        assert_eq!(
            tcp_exchange(b.file(), ip_of(&ob, 0), a.file()),
            Ok(ip_of(&oa, 0)),
            "{backend}: pod to pod keeps its source"
        );
        let mut c = conf.clone();
        c["prevResult"] = oa.json.clone();
        assert_eq!(w.call("CHECK", "a", &a.path.display().to_string(), &c).code, 0, "{backend}");
        assert_eq!(w.call("DEL", "a", "", &conf).code, 0);
        assert_eq!(w.call("DEL", "b", &b.path.display().to_string(), &conf).code, 0);
        let saved = String::from_utf8_lossy(&w.node.run("iptables-save", &["-t", "nat"]).stdout).to_string();
        assert!(!saved.contains("CNIB-"), "{backend}: iptables rules left: {saved}");
        assert!(w.masq_entries().is_empty(), "{backend}: nft entries left");
        let k = w.call("CHECK", "a", &a.path.display().to_string(), &c);
        assert_ne!(k.code, 0, "{backend}: CHECK after DEL must fail");
    }
}

#[test]
fn bad_delegated_ipam_results_are_refused_and_rolled_back() {
    require_root("bad_ipam_result");
    let w = World::new("badres");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let ip = |address: &str, gateway: Option<&str>| match gateway {
        Some(g) => json!({"address": address, "gateway": g}),
        None => json!({"address": address}),
    };
    let cases: Vec<(Value, &str)> = vec![
        (json!({"ips": [ip("fd00::5/64", Some("10.0.0.1"))]}), "family"),
        (json!({"ips": [ip("10.40.0.5/24", Some("fd00::1"))]}), "family"),
        (json!({"ips": [ip("10.40.0.5/24", Some("10.41.0.1"))]}), "outside"),
        (json!({"ips": [ip("10.40.0.5/24", Some("10.40.0.5"))]}), "own address"),
        (
            json!({"ips": [{"address": "10.40.0.5/24", "gateway": "10.40.0.1", "interface": 3}]}),
            "interface 3",
        ),
        (json!({"ips": []}), "no IP"),
        (json!({}), "no IP"),
        (json!({"ips": [ip("10.40.0.5/32", None)]}), "no gateway"),
        (json!({"ips": [ip("255.255.255.255/32", None)]}), "no gateway"),
    ];
    let configs = [json!({"ipMasq": true}), json!({"isDefaultGateway": true, "ipMasq": true})];
    for ((mut result, needle), extra) in
        cases.into_iter().flat_map(|c| configs.iter().map(move |x| (c.clone(), x)))
    {
        result["cniVersion"] = json!("1.0.0");
        let cni_path = w.fake_ipam(&result);
        let mut conf = w.conf("1.0.0", "10.40.0.0/24", extra.clone());
        conf["ipam"] = json!({"type": "fake-ipam"});
        let o = w.call_with("ADD", "c1", &path, "eth0", &[("CNI_PATH", &cni_path)], &conf);
        assert_eq!(o.err_code(), Some(118), "{result}: {} {}", o.stdout, o.stderr);
        assert!(o.stdout.contains(needle), "{needle:?} not in {}", o.stdout);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
        assert_eq!(w.fake_ipam_calls(), ["ADD", "DEL"], "{result}: the lease is released");
        assert_eq!(w.node.links(), ["lo"], "{result}: links left on the node");
        assert_eq!(pod.links(), ["lo"], "{result}: links left in the pod");
        assert!(w.masq_entries().is_empty(), "{result}: masquerade entry left");
    }
}

#[test]
fn a_delegated_ipam_that_exits_0_with_an_unusable_result_is_asked_to_release_it() {
    require_root("garbage_ipam_result");
    let w = World::new("garbage");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    // Exit 0 means the plugin allocated, whatever it printed: the lease must be released.
    for result in [json!("garbage"), json!([1, 2]), json!({"cniVersion": "1.0.0", "ips": "x"})] {
        let cni_path = w.fake_ipam(&result);
        let mut conf = w.conf("1.0.0", "10.40.0.0/24", json!({"ipMasq": true}));
        conf["ipam"] = json!({"type": "fake-ipam"});
        let o = w.call_with("ADD", "c1", &path, "eth0", &[("CNI_PATH", &cni_path)], &conf);
        assert!(o.err_code().is_some(), "{result}: a CNI error: {} {}", o.stdout, o.stderr);
        assert_eq!(w.fake_ipam_calls(), ["ADD", "DEL"], "{result}: the lease is released");
        assert_eq!(w.node.links(), ["lo"], "{result}: links left on the node");
        assert_eq!(pod.links(), ["lo"], "{result}: links left in the pod");
    }
}

#[test]
fn del_releases_everything_when_netns_is_no_namespace_any_more() {
    require_root("del_stale_netns");
    let w = World::new("stale");
    let conf = w.conf("1.0.0", "10.41.0.0/24", json!({"ipMasq": true}));
    // An unmounted bind mount: the file stays, empty; the namespace lives on elsewhere,
    // holding the veth pair, so the host veth (named in prevResult) must go too.
    let pod = Netns::new("pod");
    let mount_point = w.tmp.join("netns-bind");
    std::fs::write(&mount_point, "").unwrap();
    let mp = mount_point.display().to_string();
    let st =
        std::process::Command::new("mount").args(["--bind", &pod.path.display().to_string(), &mp]).status();
    assert!(st.unwrap().success(), "bind mount");
    let add = w.call("ADD", "c1", &mp, &conf);
    let unmount = std::process::Command::new("umount").arg(&mp).status();
    assert!(unmount.unwrap().success(), "umount");
    assert_eq!(add.code, 0, "{}", add.stdout);
    assert_eq!(w.veths().len(), 1);
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = add.json.clone();
    let o = w.call("DEL", "c1", &mp, &with_prev);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    assert!(w.leases().is_empty(), "lease leaked");
    assert!(w.masq_entries().is_empty(), "masquerade entry leaked");
    assert!(w.veths().is_empty(), "host veth left");
    assert!(!pod.links().contains(&"eth0".to_string()), "the pod end goes with the host end");
    assert_eq!(w.call("DEL", "c1", &mp, &with_prev).code, 0, "repeated");
    // A regular file with content, and a directory, without prevResult.
    let pod2 = Netns::new("pod2");
    let add = w.call("ADD", "c2", &pod2.path.display().to_string(), &conf);
    assert_eq!(add.code, 0, "{}", add.stdout);
    let regular = w.tmp.join("regular");
    std::fs::write(&regular, "not a namespace").unwrap();
    for ns in [regular.display().to_string(), w.tmp.display().to_string()] {
        let o = w.call("DEL", "c2", &ns, &conf);
        assert_eq!(o.code, 0, "{ns}: {} {}", o.stdout, o.stderr);
        assert!(w.leases().is_empty(), "{ns}: lease leaked");
        assert!(w.masq_entries().is_empty(), "{ns}: masquerade entry leaked");
    }
    // The plugin's own namespace is still refused: CNI_IFNAME there is the node's.
    let own = w.node.path.display().to_string();
    let o = cni_conformance::plugin::invoke_raw(
        &w.node,
        &w.main_plugin(),
        "DEL",
        &[("CNI_CONTAINERID", "c2"), ("CNI_NETNS", &own), ("CNI_IFNAME", "eth0"), ("CNI_PATH", "/x")],
        conf.to_string().as_bytes(),
        true,
    );
    assert_eq!(o.err_code(), Some(4), "{}", o.stdout);
}

#[test]
fn failed_add_removes_the_bridge_it_created() {
    require_root("failed_add_bridge");
    let w = World::new("brroll");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    // A route the kernel refuses (its gateway is reachable from no pod subnet): ADD fails
    // after it has created the bridge, the veth and the masquerade entry.
    let mut conf = w.conf("1.0.0", "10.42.0.0/24", json!({"ipMasq": true}));
    conf["ipam"]["routes"] = json!([{"dst": "10.50.0.0/16", "gw": "10.99.0.1"}]);
    let o = w.call("ADD", "c1", &path, &conf);
    assert_eq!(o.err_code(), Some(113), "{}", o.stdout);
    assert_eq!(w.node.links(), ["lo"], "the bridge this ADD created is left");
    assert_eq!(pod.links(), ["lo"]);
    assert!(w.leases().is_empty());
    assert!(w.masq_entries().is_empty());
    // A range gateway outside its subnet: refused (by IPAM or by the result check) before
    // anything is made.
    let mut conf = w.conf("1.0.0", "10.42.0.0/24", json!({}));
    conf["ipam"]["gateway"] = json!("10.99.0.1");
    let o = w.call("ADD", "c1", &path, &conf);
    assert!(matches!(o.err_code(), Some(7) | Some(118)), "{}", o.stdout);
    assert_eq!(w.node.links(), ["lo"]);
    assert!(w.leases().is_empty());
    // A bridge that existed before stays, and keeps its other pods.
    let other = Netns::new("other");
    let conf = w.conf("1.0.0", "10.42.0.0/24", json!({}));
    let first = w.call("ADD", "c0", &other.path.display().to_string(), &conf);
    assert_eq!(first.code, 0, "{}", first.stdout);
    let mut bad = conf.clone();
    bad["ipam"]["routes"] = json!([{"dst": "10.50.0.0/16", "gw": "10.99.0.1"}]);
    assert_eq!(w.call("ADD", "c1", &path, &bad).err_code(), Some(113));
    assert!(w.node.links().contains(&"cni0".to_string()));
    assert_eq!(w.veths().len(), 1);
    assert_eq!(w.leases(), [ip_of(&first, 0).to_string()]);
}

#[test]
fn a_300_character_container_id_leaves_nothing_when_refused() {
    require_root("long_id");
    let w = World::new("longid");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let id = "a".repeat(300);
    let conf = w.conf("1.0.0", "10.43.0.0/24", json!({"ipMasq": true}));
    let o = w.call("ADD", &id, &path, &conf);
    eprintln!("ADD with a 300-character id: {} {}", o.code, o.stdout);
    if o.code == 0 {
        assert_eq!(w.call("DEL", &id, &path, &conf).code, 0);
        assert!(w.veths().is_empty() && w.leases().is_empty() && w.masq_entries().is_empty());
    } else {
        assert!(o.err_code().is_some(), "a CNI error on stdout: {}", o.stdout);
        assert_eq!(w.node.links(), ["lo"], "{}: left links", o.stdout);
        assert_eq!(pod.links(), ["lo"]);
        assert!(w.leases().is_empty() && w.masq_entries().is_empty(), "{}", o.stdout);
    }
}

/// Runs `f` on a thread inside `ns`.
fn in_ns<T: Send + 'static>(ns: std::fs::File, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread")
}

#[test]
fn ipv6_gateway_can_be_bound_the_moment_add_returns_and_is_reached_from_the_pod() {
    require_root("ipv6_nodad");
    let w = World::new("nodad");
    let pod = Netns::new("pod");
    let mut conf = w.conf("1.0.0", "fd00:44::/64", json!({"isDefaultGateway": true}));
    conf["ipam"]["routes"] = json!([]);
    let o = w.call("ADD", "c1", &pod.path.display().to_string(), &conf);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    // Right away, no retry: a listener on the node at the gateway address (a tentative
    // address cannot even be bound), and a connect from the pod. That the first neighbour
    // solicitation is answered is checked through the kernel's state, not a timer, in
    // ipv6_addresses_answer_their_neighbours_the_moment_add_returns.
    let listener = in_ns(w.node.file(), || std::net::TcpListener::bind("[fd00:44::1]:0"));
    let listener = listener.expect("bind the gateway address on the node right after ADD");
    let addr = listener.local_addr().unwrap();
    let connected = in_ns(pod.file(), move || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
    });
    assert!(connected.is_ok(), "connect {addr} from the pod: {connected:?}");
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), ip_of(&o, 0));
}

#[test]
fn del_reports_a_pod_interface_the_kernel_refuses_to_delete_and_both_delete_paths_clean_up() {
    require_root("del_paths");
    let w = World::new("delp");
    let conf = w.conf("1.0.0", "10.26.0.0/24", json!({}));
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    assert_eq!(w.call("ADD", "c1", &path, &conf).code, 0);
    // The kernel will not delete a namespace's loopback: the error comes back as the CNI
    // error JSON, from this process (the default) and from the child that sends the delete
    // (CNI_BRIDGE_DEL_DETACH=1).
    for detach in [&[][..], &[("CNI_BRIDGE_DEL_DETACH", "1")][..]] {
        let o = w.call_with("DEL", "c1", &path, "lo", detach, &conf);
        assert_ne!(o.code, 0, "{detach:?}: {}", o.stdout);
        let err: Value = serde_json::from_str(&o.stdout).unwrap();
        let msg = err["msg"].as_str().unwrap_or_default();
        assert!(msg.contains("deleting") && msg.contains("not supported"), "{detach:?}: {}", o.stdout);
        assert_eq!(w.veths().len(), 1, "eth0's pair untouched");
    }
    // Both delete paths release everything.
    let o = w.call("DEL", "c1", &path, &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(w.veths().is_empty() && w.leases().is_empty(), "released");
    assert_eq!(w.call("ADD", "c2", &path, &conf).code, 0);
    let o = w.call_with("DEL", "c2", &path, "eth0", &[("CNI_BRIDGE_DEL_DETACH", "1")], &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(w.veths().is_empty() && w.leases().is_empty(), "released, CNI_BRIDGE_DEL_DETACH=1");
}

#[test]
fn del_keeps_the_lease_while_the_pod_interface_cannot_be_deleted() {
    require_root("del_keeps_lease");
    let w = World::new("delkeep");
    let conf = w.conf("1.0.0", "10.27.0.0/24", json!({"ipMasq": true}));
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    assert_eq!(w.call("ADD", "c1", &path, &conf).code, 0);
    // The kernel refuses to delete a loopback device: named eth0, it stands for a pod
    // interface whose delete fails. Releasing the lease now would hand the address to the
    // next pod while the old interface may still hold it.
    pod.ip(&["link", "set", "eth0", "name", "eth9"]);
    pod.ip(&["link", "set", "lo", "down"]);
    pod.ip(&["link", "set", "lo", "name", "eth0"]);
    let o = w.call("DEL", "c1", &path, &conf);
    assert_ne!(o.code, 0, "DEL must fail: {}", o.stdout);
    assert_eq!(w.leases().len(), 1, "the lease is kept while the interface is not deleted");
    // Once the interface can go, a retried DEL releases everything.
    pod.ip(&["link", "set", "eth0", "name", "lo"]);
    pod.ip(&["link", "set", "eth9", "name", "eth0"]);
    let o = w.call("DEL", "c1", &path, &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(w.leases().is_empty() && w.veths().is_empty());
}

#[test]
fn a_fifo_as_cni_netns_is_refused_by_add_and_released_by_del_without_hanging() {
    require_root("fifo_netns");
    let w = World::new("fifo");
    let conf = w.conf("1.0.0", "10.28.0.0/24", json!({}));
    let fifo = w.tmp.join("netns-fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let path = fifo.display().to_string();
    // Run in a thread with a deadline: an open that blocks on the FIFO must fail the test,
    // not hang the suite.
    let (done, finished) = std::sync::mpsc::channel();
    let (conf2, path2) = (conf.clone(), path.clone());
    std::thread::scope(|s| {
        s.spawn(|| {
            let add = w.call("ADD", "c1", &path2, &conf2);
            let del = w.call("DEL", "c1", &path2, &conf2);
            let _ = done.send((add, del));
        });
        let got = finished.recv_timeout(std::time::Duration::from_secs(20));
        if got.is_err() {
            // Unblock the plugin stuck on the FIFO so the scope can end, then fail.
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
            panic!("ADD or DEL blocked on a FIFO given as CNI_NETNS");
        }
        let (add, del) = got.unwrap();
        assert_eq!(add.err_code(), Some(4), "{}", add.stdout);
        assert_eq!(del.code, 0, "{}", del.stdout);
    });
    assert!(w.leases().is_empty() && w.veths().is_empty());
}

/// The IPv6 multicast groups joined in `ns`, as `(ifindex, group in 32 hex digits)`.
fn joined_groups(ns: std::fs::File) -> Vec<(u32, String)> {
    in_ns(ns, || {
        let table = std::fs::read_to_string("/proc/thread-self/net/igmp6").expect("igmp6");
        let row = |l: &str| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.parse().ok()?, f.get(2)?.to_string()))
        };
        table.lines().filter_map(row).collect()
    })
}

/// Where neighbours ask for `ip`: ff02::1:ffXX:XXXX, in igmp6's notation.
fn solicited_node(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V6(v6) = ip else { panic!("{ip} is no IPv6 address") };
    let o = v6.octets();
    format!("ff0200000000000000000001ff{:02x}{:02x}{:02x}", o[13], o[14], o[15])
}

fn ifindex(ns: &Netns, name: &str) -> u32 {
    let v = ns.ip_json(&["link", "show", "dev", name]);
    v[0]["ifindex"].as_u64().unwrap_or_else(|| panic!("no {name}: {v}")) as u32
}

#[test]
fn ipv6_addresses_answer_their_neighbours_the_moment_add_returns() {
    require_root("ipv6_ready");
    // A neighbour solicitation for an address is answered only once the kernel has joined
    // the address's solicited-node group, on a work queue after the address is added. Seen
    // on a new bridge: the pod's first packet to its gateway went unanswered for 1 s, in one
    // ADD of ten. So many fresh nodes, and the kernel's state read right after each ADD.
    let mut late = Vec::new();
    for i in 0..30 {
        let w = World::new("v6ready");
        let pod = Netns::new("pod");
        let conf = w.conf("1.0.0", "fd00:45::/64", json!({"isDefaultGateway": true}));
        let o = w.call("ADD", &format!("c{i}"), &pod.path.display().to_string(), &conf);
        assert_eq!(o.code, 0, "{}", o.stdout);
        let node_groups = joined_groups(w.node.file());
        let pod_groups = joined_groups(pod.file());
        let gateway = (ifindex(&w.node, "cni0"), solicited_node("fd00:45::1".parse().unwrap()));
        let own = (ifindex(&pod, "eth0"), solicited_node(ip_of(&o, 0)));
        if !node_groups.contains(&gateway) {
            late.push(format!("node {i}: the gateway fd00:45::1 on cni0"));
        }
        if !pod_groups.contains(&own) {
            late.push(format!("node {i}: the pod's {}", ip_of(&o, 0)));
        }
        let port = o.json["interfaces"][1]["name"].as_str().unwrap().to_string();
        let state = w.node.ip_json(&["-d", "link", "show", "dev", &port]);
        assert_eq!(state[0]["linkinfo"]["info_slave_data"]["state"], "forwarding", "{port}: {state}");
    }
    assert!(late.is_empty(), "not answering neighbours when ADD returned: {late:#?}");
}

#[test]
fn enabledad_returns_after_duplicate_address_detection_and_fails_on_a_duplicate() {
    require_root("enabledad");
    let w = World::new("dad");
    let conf = w.conf("1.0.0", "fd00:46::/64", json!({"enabledad": true}));
    let first = Netns::new("pod");
    let o = w.call("ADD", "c1", &first.path.display().to_string(), &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    let first_address = ip_of(&o, 0).to_string();
    // The reference settles: no address of the pod is still tentative when ADD returns.
    let addrs = first.ip_json(&["-6", "addr", "show", "dev", "eth0", "scope", "global"]);
    let mut info = addrs[0]["addr_info"].as_array().cloned().unwrap_or_default();
    info.retain(|a| a.get("local").is_some());
    assert_eq!(info.len(), 1, "{addrs}");
    assert_eq!(info[0]["tentative"], Value::Null, "tentative after ADD: {addrs}");
    // The next pod's address (host-local hands them out in order) is already used by the
    // first pod: duplicate address detection fails, ADD fails and leaves nothing behind.
    let next = "fd00:46::3";
    first.ip(&["-6", "addr", "add", &format!("{next}/64"), "dev", "eth0", "nodad"]);
    let second = Netns::new("pod");
    let o = w.call("ADD", "c2", &second.path.display().to_string(), &conf);
    assert_eq!(o.err_code(), Some(116), "{} {}", o.stdout, o.stderr);
    assert!(o.stdout.contains(next) && o.stdout.contains("duplicate"), "{}", o.stdout);
    assert_eq!(second.links(), ["lo"], "the pod interface is rolled back");
    assert_eq!(w.veths().len(), 1, "only the first pod's pair is left");
    assert_eq!(w.leases(), [first_address], "the second pod's lease is released");
}

#[test]
fn a_bridge_someone_set_down_is_set_up_again_by_add() {
    require_root("bridge_down");
    let w = World::new("brdown");
    let conf = w.conf("1.0.0", "10.47.0.0/24", json!({}));
    let (a, b) = (Netns::new("pod"), Netns::new("pod"));
    let oa = w.call("ADD", "a", &a.path.display().to_string(), &conf);
    assert_eq!(oa.code, 0, "{}", oa.stdout);
    w.node.ip(&["link", "set", "cni0", "down"]);
    let ob = w.call("ADD", "b", &b.path.display().to_string(), &conf);
    assert_eq!(ob.code, 0, "{}", ob.stdout);
    let flags = w.node.ip_json(&["link", "show", "dev", "cni0"]);
    assert!(flags[0]["flags"].as_array().unwrap().contains(&json!("UP")), "{flags}");
    tcp_exchange(a.file(), ip_of(&oa, 0), b.file()).expect("pod b reaches pod a");
}

/// A pid namespace whose init (`sleep`) never reaps: what a plugin's orphans meet where init
/// does not reap (containerd, k3s or a Go daemon as a container's PID 1 without `--init`).
/// Killed on drop.
struct NoReaper {
    unshare: std::process::Child,
    init: i32,
}

impl NoReaper {
    fn new() -> NoReaper {
        let unshare = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--kill-child", "sleep", "infinity"])
            .spawn()
            .expect("unshare (util-linux)");
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        let mut sandbox = NoReaper { unshare, init: 0 };
        let start = std::time::Instant::now();
        while sandbox.init == 0 {
            let listed = std::fs::read_to_string(&children).unwrap_or_default();
            sandbox.init = listed.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(0);
            assert!(start.elapsed().as_secs() < 10, "the sandbox's init did not start");
            std::thread::yield_now();
        }
        sandbox
    }

    /// The init's children and their states (`Z` for a zombie).
    fn children(&self) -> Vec<(i32, char)> {
        let listed = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.init)).unwrap();
        let state = |pid: i32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit(')').next().and_then(|rest| rest.trim().chars().next()).unwrap_or('?')
        };
        listed.split_whitespace().filter_map(|p| p.parse().ok()).map(|p| (p, state(p))).collect()
    }

    /// Runs `argv` in this pid namespace, to its end.
    fn run(&self, argv: &[&str]) {
        let target = self.init.to_string();
        let status = std::process::Command::new("nsenter")
            .args(["--target", &target, "--pid", "--mount", "--"])
            .args(argv)
            .status()
            .expect("nsenter");
        assert!(status.success(), "{argv:?}: {status}");
    }

    /// Runs the plugin in the node namespace and in this pid namespace, as a runtime there.
    fn call(&self, w: &World, cmd: &str, id: &str, pod: &Netns, env: &[(&str, &str)], conf: &Value) -> Out {
        let mut nsenter = std::process::Command::new("nsenter");
        nsenter.args(["--target", &self.init.to_string(), "--pid", "--mount", "--"]).arg(w.main_plugin());
        let netns = pod.path.display().to_string();
        let vars = [
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", &w.cni_path),
        ];
        let vars: Vec<(&str, &str)> = vars.iter().chain(env).copied().collect();
        cni_conformance::plugin::invoke_through(&w.node, nsenter, cmd, &vars, conf.to_string().as_bytes())
    }
}

impl NoReaper {
    /// The plugin's record of detached children for this pid namespace.
    fn record_path(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let pid_ns = std::fs::metadata(format!("/proc/{}/ns/pid", self.init)).unwrap().ino();
        format!("/run/cni-bridge/detached-children-{pid_ns}")
    }
}

impl Drop for NoReaper {
    fn drop(&mut self) {
        if self.init != 0 {
            let _ = std::fs::remove_file(self.record_path());
        }
        // --kill-child: the init (and with it the namespace's zombies) goes with unshare.
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

#[test]
fn a_detached_del_waits_for_the_kernel_itself_once_a_child_is_left_a_zombie() {
    require_root("no_reaper");
    let w = World::new("noreap");
    let conf = w.conf("1.0.0", "10.48.0.0/24", json!({}));
    let last = Netns::new("pod");
    assert_eq!(w.call("ADD", "c1", &last.path.display().to_string(), &conf).code, 0);
    let sandbox = NoReaper::new();
    // An orphan that ended there: a zombie of the sandbox's init, as a detached DEL's child
    // becomes when it outlives its DEL. (A DEL's own child usually does, but not always: a
    // DEL that finishes after it reaps it. So the test makes its own.)
    // The orphan outlives the shell that started it, whatever that shell reaps.
    sandbox.run(&["sh", "-c", "sleep 0.1 & exit 0"]);
    let start = std::time::Instant::now();
    let zombie = loop {
        if let Some((pid, _)) = sandbox.children().into_iter().find(|(_, state)| *state == 'Z') {
            break pid;
        }
        assert!(start.elapsed().as_secs() < 10, "no zombie under the sandbox: {:?}", sandbox.children());
        std::thread::yield_now();
    };
    // Recorded as a detached DEL records its child: PID as the sandbox sees it, start time,
    // and the DEL that forked it (long gone). A zombie of any age counts: no grace period.
    let status = std::fs::read_to_string(format!("/proc/{zombie}/status")).unwrap();
    let nspid =
        status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap().split_whitespace().last().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{zombie}/stat")).unwrap();
    let started = stat.rsplit(')').next().unwrap().split_whitespace().nth(19).unwrap();
    std::fs::create_dir_all("/run/cni-bridge").unwrap();
    let mut record =
        std::fs::OpenOptions::new().create(true).append(true).open(sandbox.record_path()).unwrap();
    std::io::Write::write_all(&mut record, format!("{nspid} {started} 0\n").as_bytes()).unwrap();
    // The next detached DEL finds it and deletes in its own process: no new child.
    let o = sandbox.call(&w, "DEL", "c1", &last, &[("CNI_BRIDGE_DEL_DETACH", "1")], &conf);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    assert!(o.stderr.contains("still a zombie"), "says why it waits: {}", o.stderr);
    assert_eq!(sandbox.children(), [(zombie, 'Z')], "the DEL left no process behind");
    assert!(w.veths().is_empty() && w.leases().is_empty(), "{:?} {:?}", w.veths(), w.leases());
    assert_eq!(last.links(), ["lo"]);
}

#[test]
fn a_bridge_someone_made_with_dad_can_solicit_for_its_pods_when_add_returns() {
    require_root("foreign_bridge_dad");
    let w = World::new("fdad");
    // Made by someone else, with the namespace's defaults: its link-local address goes
    // through duplicate address detection once the first port brings its carrier up.
    w.node.ip(&["link", "add", "cni0", "type", "bridge"]);
    w.node.ip(&["link", "set", "cni0", "up"]);
    let pod = Netns::new("pod");
    let mut conf = w.conf("1.0.0", "fd00:45::/64", json!({}));
    conf["ipam"]["routes"] = json!([]);
    let o = w.call("ADD", "c1", &pod.path.display().to_string(), &conf);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    // The kernel solicits a forwarded packet's next hop only from a non-tentative link-local
    // address: checked through the kernel's state the moment ADD returns, not a timer.
    let link_local = w.node.ip(&["-6", "addr", "show", "dev", "cni0", "scope", "link"]);
    assert!(link_local.contains("fe80:"), "no link-local address: {link_local}");
    assert!(!link_local.contains("tentative"), "still tentative: {link_local}");
}

/// ADDs `n` pods (each in its own namespace) from the test process: `(id, pod)` pairs.
fn added_pods(w: &World, conf: &Value, n: usize) -> Vec<(String, Netns)> {
    (0..n)
        .map(|i| {
            let pod = Netns::new(&format!("b{i}"));
            let id = format!("c{i}");
            let o = w.call("ADD", &id, &pod.path.display().to_string(), conf);
            assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
            (id, pod)
        })
        .collect()
}

#[test]
fn default_del_waits_for_the_kernel_and_leaves_no_process_where_nothing_reaps() {
    require_root("no_reaper_default");
    let w = World::new("noreapd");
    let conf = w.conf("1.0.0", "10.49.0.0/24", json!({}));
    let pods = added_pods(&w, &conf, 5);
    let sandbox = NoReaper::new();
    for (id, pod) in &pods {
        let o = sandbox.call(&w, "DEL", id, pod, &[], &conf);
        assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
        // Nothing of the DEL outlives it: no child finishing the delete, no zombie.
        assert_eq!(sandbox.children(), [], "DEL {id} left a process behind");
        assert_eq!(pod.links(), ["lo"], "the pod interface is gone when DEL returns");
    }
    assert!(w.veths().is_empty() && w.leases().is_empty(), "{:?} {:?}", w.veths(), w.leases());
}

#[test]
fn a_burst_of_detached_dels_leaves_at_most_a_handful_of_zombies_where_nothing_reaps() {
    require_root("no_reaper_burst");
    let w = World::new("noreapb");
    let conf = w.conf("1.0.0", "10.50.0.0/24", json!({}));
    const PODS: usize = 24;
    const WORKERS: usize = 4;
    // The plugin detaches while fewer than 4 recorded children are alive and none is a zombie;
    // DELs running at once may each pass that check before any has recorded its child.
    const BOUND: usize = 4 - 1 + WORKERS;
    let pods = added_pods(&w, &conf, PODS);
    let sandbox = NoReaper::new();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((id, pod)) = pods.get(k) else { break };
                let o = sandbox.call(&w, "DEL", id, pod, &[("CNI_BRIDGE_DEL_DETACH", "1")], &conf);
                assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
            });
        }
    });
    // Every detached child ends once the kernel has finished its delete.
    let start = std::time::Instant::now();
    while sandbox.children().iter().any(|(_, state)| *state != 'Z') {
        assert!(start.elapsed().as_secs() < 10, "children still running: {:?}", sandbox.children());
        std::thread::yield_now();
    }
    let zombies = sandbox.children();
    assert!(zombies.len() <= BOUND, "{} zombies after {PODS} DELs: {zombies:?}", zombies.len());
    assert!(w.veths().is_empty() && w.leases().is_empty(), "{:?} {:?}", w.veths(), w.leases());
}
