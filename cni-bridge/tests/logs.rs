//! Plugin logs from the config alone (the environment is scrubbed, as for podman's cleanup
//! DEL): `logFile` gets every call of both plugins with container id, verb and step timings;
//! stdout stays the result only.

mod common;

use cni_conformance::{require_root, Pause};
use common::*;
use serde_json::json;

#[test]
fn log_file_from_the_config_alone_records_both_plugins_calls_and_steps() {
    require_root("log_file_from_the_config_alone_records_both_plugins_calls_and_steps");
    let w = World::new("logs");
    let log = w.tmp.join("cni.log");
    let conf =
        w.conf("1.1.0", "10.64.0.0/24", json!({"logFile": log.display().to_string(), "logLevel": "debug"}));
    let pod = Pause::new();
    let ns = pod.path.display().to_string();
    let add = w.call("ADD", "log-c1", &ns, &conf);
    assert_eq!(add.code, 0, "{} {}", add.stdout, add.stderr);
    assert!(add.json["ips"].is_array(), "stdout is the result only: {}", add.stdout);
    let del = w.call("DEL", "log-c1", &ns, &conf);
    assert_eq!(del.code, 0, "{}", del.stderr);
    assert_eq!(del.stdout, "");

    let text = std::fs::read_to_string(&log).expect("logFile written");
    let lines: Vec<&str> = text.lines().collect();
    let has = |words: &[&str]| lines.iter().any(|l| words.iter().all(|w| l.contains(w)));
    for verb in ["verb=Add", "verb=Del"] {
        let call = ["plugin=cni-bridge", verb, "container=log-c1", "network=testnet", "ifname=eth0"];
        assert!(has(&[&call[..], &["start"]].concat()), "{verb} start:\n{text}");
        assert!(has(&[&call[..], &["done", "ms="]].concat()), "{verb} end:\n{text}");
    }
    assert!(
        has(&["plugin=cni-bridge", "verb=Add", "step veth created", "ms="]),
        "step timings at debug:\n{text}"
    );

    // cni-host-local run as its own plugin (as the reference bridge delegates to it) logs too.
    let env = [
        ("CNI_CONTAINERID", "log-c9"),
        ("CNI_NETNS", ns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/nonexistent"),
    ];
    let o = cni_conformance::invoke(&w.node, &w.plugins.dir.join("cni-host-local"), "ADD", &env, &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("plugin=cni-host-local")
            && l.contains("container=log-c9")
            && l.contains("done")),
        "{text}"
    );
}

#[test]
fn a_failed_call_is_logged_on_stderr_by_default_and_in_the_file() {
    require_root("a_failed_call_is_logged_on_stderr_by_default_and_in_the_file");
    let w = World::new("logs-fail");
    let log = w.tmp.join("cni.log");
    let pod = Pause::new();
    let ns = pod.path.display().to_string();
    // The gateway is outside the subnet: host-local refuses, and so the bridge's ADD fails.
    let mut conf = w.conf("1.1.0", "10.65.0.0/24", json!({"logFile": log.display().to_string()}));
    conf["ipam"]["gateway"] = json!("10.99.0.1");
    let add = w.call("ADD", "log-c2", &ns, &conf);
    assert_ne!(add.code, 0);
    assert!(add.json["code"].is_u64(), "stdout is the error JSON only: {}", add.stdout);
    assert!(
        add.stderr.contains("failed") && add.stderr.contains("container=log-c2"),
        "stderr: {}",
        add.stderr
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("verb=Add") && l.contains("start")),
        "info in the file by default:\n{text}"
    );
    assert!(!text.contains("step "), "no debug steps at the default info level:\n{text}");

    // A bad level or an unwritable file never fails a call.
    let conf = w.conf(
        "1.1.0",
        "10.65.0.0/24",
        json!({"logFile": w.tmp.join("no/such/dir/x.log").display().to_string(), "logLevel": "loud"}),
    );
    let add = w.call("ADD", "log-c3", &ns, &conf);
    assert_eq!(add.code, 0, "{}", add.stdout);
    assert!(
        add.stderr.contains("logLevel") && add.stderr.contains("logFile"),
        "both reported: {}",
        add.stderr
    );
}
