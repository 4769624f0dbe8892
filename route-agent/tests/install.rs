//! `cni-route-agent install-cni` / `uninstall`: atomic replacement of the plugins, and an
//! uninstall that removes exactly what install and the plugins left, in a node namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cni_conformance::netns::{Netns, Pause};
use cni_conformance::{invoke, require_root};
use serde_json::json;

mod common;
use common::Tmp;

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");

fn built_plugins() -> PathBuf {
    let dir = Path::new(AGENT).parent().unwrap().to_path_buf();
    for p in ["cni-bridge", "cni-host-local"] {
        assert!(dir.join(p).exists(), "{p} must be built next to the agent (cargo build --workspace)");
    }
    dir
}

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(AGENT).args(args).stdin(Stdio::null()).output().expect("run agent")
}

/// A fake "plugin" directory whose cni-bridge is a real ELF program (`sleep`), so it can be
/// running while install replaces it.
fn fake_plugins(dir: &Path, bridge_from: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(bridge_from, dir.join("cni-bridge")).unwrap();
    std::fs::write(dir.join("cni-host-local"), b"#!/bin/sh\n").unwrap();
}

#[test]
fn install_replaces_a_running_plugin_without_text_file_busy() {
    let t = Tmp::new("busy");
    let (old, new, bin) = (t.0.join("old"), t.0.join("new"), t.0.join("bin"));
    fake_plugins(&old, "/bin/sleep");
    fake_plugins(&new, "/bin/true");
    let o = agent(&["install-cni", "--bin-dir", bin.to_str().unwrap(), "--from", old.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut running = Command::new(bin.join("cni-bridge")).arg("600").spawn().expect("exec installed plugin");

    // What a plain copy over the running file would hit: the scenario is real.
    let in_place = std::fs::OpenOptions::new().write(true).open(bin.join("cni-bridge"));
    assert_eq!(in_place.err().and_then(|e| e.raw_os_error()), Some(nix::libc::ETXTBSY));

    let o = agent(&["install-cni", "--bin-dir", bin.to_str().unwrap(), "--from", new.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let _ = running.kill();
    let _ = running.wait();
    assert!(o.status.success(), "install over a running plugin failed: {stderr}");
    assert_eq!(std::fs::read(bin.join("cni-bridge")).unwrap(), std::fs::read("/bin/true").unwrap());
    let mut names: Vec<String> =
        std::fs::read_dir(&bin).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, [".cni-route-agent.installed", "cni-bridge", "cni-host-local"], "no temp file left");
}

#[test]
fn a_reader_during_repeated_installs_sees_only_whole_files() {
    let t = Tmp::new("whole");
    let (a, b, bin) = (t.0.join("a"), t.0.join("b"), t.0.join("bin"));
    fake_plugins(&a, "/bin/sleep");
    fake_plugins(&b, "/bin/true");
    let (sa, sb) =
        (std::fs::read(a.join("cni-bridge")).unwrap(), std::fs::read(b.join("cni-bridge")).unwrap());
    cni_route_agent::install::install(&a, &bin).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, path, sa, sb) = (stop.clone(), bin.join("cni-bridge"), sa.clone(), sb.clone());
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = std::fs::read(&path).expect("the plugin path always exists");
                assert!(got == sa || got == sb, "read a partial plugin ({} bytes)", got.len());
                reads += 1;
            }
            reads
        })
    };
    for i in 0..40 {
        cni_route_agent::install::install(if i % 2 == 0 { &b } else { &a }, &bin).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().expect("reader saw only whole files") > 0);
}

/// Hostile: runtimes exec the plugin while `install-cni` replaces it again and again. The
/// installs run as separate processes (as the init container does), so no fork of this test
/// process can inherit an install's write descriptor and make the ETXTBSY itself.
#[test]
fn execs_during_many_installs_never_get_text_file_busy() {
    let t = Tmp::new("exec-busy");
    let (a, b, bin) = (t.0.join("a"), t.0.join("b"), t.0.join("bin"));
    fake_plugins(&a, "/bin/true");
    fake_plugins(&b, "/bin/false");
    cni_route_agent::install::install(&a, &bin).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let execers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, path) = (stop.clone(), bin.join("cni-bridge"));
            std::thread::spawn(move || {
                let (mut runs, mut failures) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match Command::new(&path).stdin(Stdio::null()).status() {
                        Ok(_) => runs += 1,
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                (runs, failures)
            })
        })
        .collect();
    for i in 0..60 {
        let from = if i % 2 == 0 { &b } else { &a };
        let o = agent(&["install-cni", "--bin-dir", bin.to_str().unwrap(), "--from", from.to_str().unwrap()]);
        assert!(o.status.success(), "install {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut runs, mut failures) = (0, Vec::new());
    for e in execers {
        let (r, f) = e.join().unwrap();
        runs += r;
        failures.extend(f);
    }
    assert!(runs > 0, "no exec ran during the installs");
    assert!(
        failures.is_empty(),
        "{} of {} execs failed, first: {}",
        failures.len(),
        runs + failures.len() as u32,
        failures[0]
    );
}

#[test]
fn install_fails_cleanly_when_a_plugin_is_missing() {
    let t = Tmp::new("missing");
    let (from, bin) = (t.0.join("from"), t.0.join("bin"));
    std::fs::create_dir_all(&from).unwrap();
    let o = agent(&["install-cni", "--bin-dir", bin.to_str().unwrap(), "--from", from.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cni-bridge"), "names the missing plugin");
    assert!(!bin.join(".cni-route-agent.installed").exists());
}

fn nft_tables(node: &Netns) -> String {
    String::from_utf8_lossy(&node.run("nft", &["list", "tables"]).stdout).into_owned()
}

fn nat_rules(node: &Netns, save: &str) -> String {
    String::from_utf8_lossy(&node.run(save, &["-t", "nat"]).stdout).into_owned()
}

#[test]
fn uninstall_removes_exactly_what_install_and_the_plugins_left() {
    require_root("uninstall_removes_exactly_what_install_and_the_plugins_left");
    let t = Tmp::new("uninstall");
    let (bin, data, conf_dir) = (t.0.join("bin"), t.0.join("data"), t.0.join("net.d"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conf_file = conf_dir.join("10-cni-route-agent.conflist");
    std::fs::write(&conf_file, "{}").unwrap();
    let o = agent(&[
        "install-cni",
        "--bin-dir",
        bin.to_str().unwrap(),
        "--from",
        built_plugins().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(bin.join("portmap"), b"someone else's").unwrap();

    let node = Netns::new("uninst");
    let (pod1, pod2) = (Pause::new(), Pause::new());
    let base = |backend: &str| {
        json!({"cniVersion": "1.1.0", "name": "podnet", "type": "cni-bridge", "bridge": "cni0",
               "isGateway": true, "ipMasq": true, "ipMasqBackend": backend, "macspoofchk": true,
               "ipam": {"type": "cni-host-local", "dataDir": data.display().to_string(),
                        "ranges": [[{"subnet": "10.77.0.0/24"}], [{"subnet": "fd00:77::/64"}]]}})
    };
    let path = bin.display().to_string();
    for (pod, id, backend) in [(&pod1, "c-nft", "nftables"), (&pod2, "c-ipt", "iptables")] {
        let ns = pod.path.display().to_string();
        let env = [
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", ns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", &path),
        ];
        let out = invoke(&node, &bin.join("cni-bridge"), "ADD", &env, &base(backend));
        assert_eq!(out.code, 0, "ADD {id}: {} {}", out.stdout, out.stderr);
    }
    // What others own on the node, which uninstall must leave.
    let keep = node.run("nft", &["add", "table", "inet", "keepme"]);
    assert!(keep.status.success());
    let keep = node.run("iptables", &["-t", "nat", "-N", "KEEP-ME"]);
    assert!(keep.status.success());
    let tables = nft_tables(&node);
    for t in ["table inet cni_bridge", "table bridge cni_bridge"] {
        assert!(tables.contains(t), "{t} made by ADD: {tables}");
    }
    assert!(nat_rules(&node, "iptables-save").contains(":CNIB-"));
    assert!(nat_rules(&node, "ip6tables-save").contains(":CNIB-"));
    assert!(data.join("podnet/.cni-index").is_dir());

    let mut c = Command::new(AGENT);
    c.args(["uninstall", "--bin-dir", bin.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
        .args(["--conf-file", conf_file.to_str().unwrap()])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    node.enter(&mut c);
    let o = c.output().expect("run uninstall");
    assert!(o.status.success(), "uninstall: {}", String::from_utf8_lossy(&o.stderr));

    let mut names: Vec<String> =
        std::fs::read_dir(&bin).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["portmap"], "only the file install did not put there stays");
    assert!(!conf_file.exists());
    let tables = nft_tables(&node);
    // iptables' own `ip nat`/`ip6 nat` (iptables-nft) may be shared with kube-proxy: they stay.
    assert!(!tables.contains("cni_"), "our tables are gone: {tables}");
    assert!(tables.contains("table inet keepme"), "the foreign table stays: {tables}");
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = nat_rules(&node, save);
        assert!(!rules.contains("CNIB-"), "{save}: {rules}");
    }
    assert!(nat_rules(&node, "iptables-save").contains(":KEEP-ME"));
    assert!(!data.join("podnet/.cni-index").exists());
    let leases: Vec<_> = std::fs::read_dir(data.join("podnet"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    assert_eq!(leases.len(), 4, "the leases (reference format, maybe shared) stay: {leases:?}");
}

#[test]
fn uninstall_keeps_a_plugin_replaced_since_install() {
    let t = Tmp::new("replaced");
    let (from, bin) = (t.0.join("from"), t.0.join("bin"));
    fake_plugins(&from, "/bin/true");
    cni_route_agent::install::install(&from, &bin).unwrap();
    std::fs::write(bin.join("cni-host-local"), b"a newer one from elsewhere").unwrap();
    // A PATH without nft/iptables/ip: only files are touched, nothing outside the temp dir.
    let o = Command::new(AGENT)
        .args(["uninstall", "--bin-dir", bin.to_str().unwrap()])
        .args(["--conf-file", t.0.join("none.conflist").to_str().unwrap()])
        .args(["--data-dir", t.0.join("no-data").to_str().unwrap()])
        .env("PATH", t.0.join("empty-path"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(!bin.join("cni-bridge").exists());
    assert_eq!(std::fs::read(bin.join("cni-host-local")).unwrap(), b"a newer one from elsewhere");
    assert!(stderr.contains("kept") && stderr.contains("cni-host-local"), "{stderr}");
}
