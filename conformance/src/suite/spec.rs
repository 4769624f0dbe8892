//! The spec checklist: verbs, result shapes per version, error codes, DEL tolerance, CHECK,
//! GC, STATUS, VERSION, and leaving nothing behind on failure.

use serde_json::{json, Value};

use super::{ensure, Check, Ctx};
use crate::netns::{Netns, Pause};

const SPEC: [&str; 7] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

pub(super) fn checks() -> Vec<Check> {
    vec![
        ("VERSION with dummy variables lists only spec versions", version),
        ("ADD result shape, cniVersion 0.1.0 (or code 1 if unsupported)", |c| shape(c, "0.1.0")),
        ("ADD result shape, cniVersion 0.2.0 (or code 1 if unsupported)", |c| shape(c, "0.2.0")),
        ("ADD result shape, cniVersion 0.3.0 (or code 1 if unsupported)", |c| shape(c, "0.3.0")),
        ("ADD result shape, cniVersion 0.3.1 (or code 1 if unsupported)", |c| shape(c, "0.3.1")),
        ("ADD result shape, cniVersion 0.4.0 (or code 1 if unsupported)", |c| shape(c, "0.4.0")),
        ("ADD result shape, cniVersion 1.0.0 (or code 1 if unsupported)", |c| shape(c, "1.0.0")),
        ("ADD result shape, cniVersion 1.1.0 (or code 1 if unsupported)", |c| shape(c, "1.1.0")),
        ("ADD for a pod in /proc/PID/ns/net form (pause process)", pause_form),
        ("second ADD of the same interface fails", second_add),
        ("DEL is repeatable and succeeds for an unknown container", del_repeat),
        ("DEL with an empty CNI_NETNS releases the lease", del_empty_netns),
        ("DEL after the namespace vanished releases the lease", del_vanished_netns),
        ("DEL with an empty CNI_NETNS removes the ipMasq rules", del_masq_empty_netns),
        ("CHECK passes after ADD and fails after tampering", check_tamper),
        ("CHECK below cniVersion 0.4.0 is code 1", check_old),
        ("GC without valid-attachments releases nothing, with it only the invalid", gc),
        ("STATUS succeeds (1.1.0)", status),
        ("unsupported cniVersion is code 1", |c| err_case(c, "9.9.9", None, 1)),
        ("malformed config is code 6", |c| err_case(c, "", Some(b"{\"cniVersion\":"), 6)),
        ("missing CNI_IFNAME is code 4 and names it", missing_ifname),
        ("unknown CNI_COMMAND is an error", unknown_command),
        ("full range: error, and no veth or lease left behind", full_range),
        ("invalid subnet: error, and no link or lease left behind", bad_subnet),
    ]
}

fn version(c: &Ctx) -> Result<(), String> {
    let w = c.world("ver");
    let o = w.call_env(
        "VERSION",
        &[("CNI_NETNS", "dummy"), ("CNI_PATH", "dummy"), ("CNI_CONTAINERID", ""), ("CNI_IFNAME", "")],
        &json!({"cniVersion": "1.0.0"}),
    );
    ensure(o.code == 0, || format!("exit {}: {}", o.code, o.stdout))?;
    let list: Vec<&str> =
        o.json["supportedVersions"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    ensure(!list.is_empty(), || format!("no supportedVersions: {}", o.stdout))?;
    let bogus: Vec<&&str> = list.iter().filter(|v| !SPEC.contains(v)).collect();
    ensure(bogus.is_empty(), || format!("not spec versions: {bogus:?}"))
}

fn shape(c: &Ctx, v: &str) -> Result<(), String> {
    let w = c.world("shape");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = w.conf(v, "10.61.0.0/24", json!({}));
    let o = w.call("ADD", "c1", &path, &conf);
    if !c.versions.iter().any(|s| s == v) {
        return ensure(o.json["code"] == 1, || format!("unsupported {v}: want code 1, got {}", o.stdout));
    }
    ensure(o.code == 0, || format!("ADD: {} {}", o.stdout, o.stderr))?;
    let j = &o.json;
    ensure(j["cniVersion"] == v, || format!("cniVersion {} in the result", j["cniVersion"]))?;
    if v == "0.1.0" || v == "0.2.0" {
        ensure(j["ip4"]["ip"] == "10.61.0.2/24", || format!("legacy ip4: {}", o.stdout))?;
    } else {
        let ifs = j["interfaces"].as_array().cloned().unwrap_or_default();
        ensure(ifs.len() >= 3, || format!("want [bridge, host veth, pod veth]: {}", o.stdout))?;
        ensure(ifs[2]["name"] == "eth0" && ifs[2]["sandbox"] == path.as_str(), || {
            "pod interface with sandbox".into()
        })?;
        ensure(ifs[0]["name"] == "cni0", || "bridge first".into())?;
        ensure(j["ips"][0]["interface"] == 2, || format!("ips[0].interface: {}", o.stdout))?;
        ensure(j["ips"][0]["address"] == "10.61.0.2/24", || format!("address: {}", o.stdout))?;
        let has_version = j["ips"][0].get("version").is_some();
        ensure(has_version == v.starts_with("0."), || format!("ips[].version presence wrong for {v}"))?;
    }
    ensure(pod.ip(&["-br", "addr"]).contains("10.61.0.2/24"), || "address not on the pod interface".into())?;
    ensure(w.leases().len() == 1, || format!("{} leases after ADD", w.leases().len()))?;
    let d = w.call("DEL", "c1", &path, &conf);
    ensure(d.code == 0, || format!("DEL: {}", d.stdout))?;
    ensure(w.leases().is_empty() && w.veths().is_empty(), || "DEL left a lease or veth".into())
}

fn pause_form(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("pause");
    let pod = Pause::new();
    let path = pod.path.display().to_string();
    let conf = w.conf(&v, "10.62.0.0/24", json!({}));
    let o = w.call("ADD", "c1", &path, &conf);
    ensure(o.code == 0, || format!("ADD: {}", o.stdout))?;
    ensure(pod.ip(&["-br", "addr"]).contains("10.62.0.2"), || "address not in the pause namespace".into())?;
    ensure(w.call("DEL", "c1", &path, &conf).code == 0, || "DEL".into())
}

fn second_add(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("dup");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = w.conf(&v, "10.63.0.0/24", json!({}));
    ensure(w.call("ADD", "c1", &path, &conf).code == 0, || "first ADD".into())?;
    let o = w.call("ADD", "c1", &path, &conf);
    ensure(o.code != 0 && o.json["code"].is_u64(), || format!("second ADD: {}", o.stdout))?;
    ensure(w.call("DEL", "c1", &path, &conf).code == 0, || "DEL".into())
}

fn del_repeat(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("delrep");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = w.conf(&v, "10.64.0.0/24", json!({}));
    ensure(w.call("ADD", "c1", &path, &conf).code == 0, || "ADD".into())?;
    for i in 0..2 {
        let o = w.call("DEL", "c1", &path, &conf);
        ensure(o.code == 0, || format!("DEL #{i}: {}", o.stdout))?;
    }
    let o = w.call("DEL", "never-added", &path, &conf);
    ensure(o.code == 0, || format!("DEL unknown: {}", o.stdout))
}

fn del_empty_netns(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("delempty");
    let pod = Netns::new("pod");
    let conf = w.conf(&v, "10.65.0.0/24", json!({}));
    ensure(w.call("ADD", "c1", &pod.path.display().to_string(), &conf).code == 0, || "ADD".into())?;
    let o = w.call("DEL", "c1", "", &conf);
    ensure(o.code == 0, || format!("DEL: {}", o.stdout))?;
    ensure(w.leases().is_empty(), || "lease leaked".into())
}

fn del_vanished_netns(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("delgone");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = w.conf(&v, "10.66.0.0/24", json!({}));
    ensure(w.call("ADD", "c1", &path, &conf).code == 0, || "ADD".into())?;
    drop(pod);
    let o = w.call("DEL", "c1", &path, &conf);
    ensure(o.code == 0, || format!("DEL: {}", o.stdout))?;
    ensure(w.leases().is_empty(), || "lease leaked".into())
}

fn del_masq_empty_netns(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("delmasq");
    let pod = Netns::new("pod");
    let conf = w.conf(&v, "10.76.0.0/24", json!({"ipMasq": true}));
    let o = w.call("ADD", "c1", &pod.path.display().to_string(), &conf);
    ensure(o.code == 0, || format!("ADD: {}", o.stdout))?;
    let rules = || {
        let a = w.node.run("iptables-save", &[]);
        let b = w.node.run("nft", &["list", "ruleset"]);
        format!("{}{}", String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&b.stdout))
    };
    ensure(rules().contains("10.76.0.2"), || "no masquerade rule mentions the pod address after ADD".into())?;
    let d = w.call("DEL", "c1", "", &conf);
    ensure(d.code == 0, || format!("DEL: {}", d.stdout))?;
    let left: Vec<String> = rules().lines().filter(|l| l.contains("10.76.0.2")).map(str::to_string).collect();
    ensure(left.is_empty(), || format!("rules left after DEL: {left:?}"))
}

fn check_tamper(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&["0.4.0", "1.0.0", "1.1.0"]).ok_or("plugin supports no version with CHECK")?;
    let w = c.world("check");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = w.conf(&v, "10.67.0.0/24", json!({}));
    let o = w.call("ADD", "c1", &path, &conf);
    ensure(o.code == 0, || format!("ADD: {}", o.stdout))?;
    let mut k = conf.clone();
    k["prevResult"] = o.json.clone();
    let r = w.call("CHECK", "c1", &path, &k);
    ensure(r.code == 0, || format!("CHECK after ADD: {} {}", r.stdout, r.stderr))?;
    pod.ip(&["addr", "flush", "dev", "eth0"]);
    let r = w.call("CHECK", "c1", &path, &k);
    ensure(r.code != 0, || "CHECK passed with the address removed".into())?;
    ensure(w.call("DEL", "c1", &path, &k).code == 0, || "DEL".into())
}

fn check_old(c: &Ctx) -> Result<(), String> {
    let v =
        c.newest(&["0.1.0", "0.2.0", "0.3.0", "0.3.1"]).ok_or("plugin supports no version below 0.4.0")?;
    let w = c.world("checkold");
    let pod = Netns::new("pod");
    let o = w.call("CHECK", "c1", &pod.path.display().to_string(), &w.conf(&v, "10.68.0.0/24", json!({})));
    ensure(o.json["code"] == 1, || format!("want code 1: {}", o.stdout))
}

fn gc(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&["1.1.0"]).ok_or("plugin does not support cniVersion 1.1.0 (GC)")?;
    let w = c.world("gc");
    let (a, b) = (Netns::new("a"), Netns::new("b"));
    let conf = w.conf(&v, "10.69.0.0/24", json!({}));
    ensure(w.call("ADD", "a", &a.path.display().to_string(), &conf).code == 0, || "ADD a".into())?;
    ensure(w.call("ADD", "b", &b.path.display().to_string(), &conf).code == 0, || "ADD b".into())?;
    let o = w.call_env("GC", &[], &conf);
    ensure(o.code == 0, || format!("GC without list: {}", o.stdout))?;
    ensure(w.leases().len() == 2, || {
        format!("GC without a list released leases ({} left)", w.leases().len())
    })?;
    let mut g = conf.clone();
    g["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
    let o = w.call_env("GC", &[], &g);
    ensure(o.code == 0, || format!("GC: {}", o.stdout))?;
    ensure(w.leases().len() == 1, || format!("{} leases after GC, want 1", w.leases().len()))?;
    ensure(w.call("DEL", "a", &a.path.display().to_string(), &conf).code == 0, || "DEL".into())?;
    ensure(w.call("DEL", "b", &b.path.display().to_string(), &conf).code == 0, || "DEL".into())
}

fn status(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&["1.1.0"]).ok_or("plugin does not support cniVersion 1.1.0 (STATUS)")?;
    let w = c.world("status");
    let o = w.call_env("STATUS", &[], &w.conf(&v, "10.70.0.0/24", json!({})));
    ensure(o.code == 0, || format!("STATUS: {}", o.stdout))
}

fn err_case(c: &Ctx, v: &str, raw: Option<&[u8]>, code: u64) -> Result<(), String> {
    let w = c.world("err");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let o = match raw {
        Some(bytes) => crate::plugin::invoke_raw(
            &w.node,
            &w.main_plugin(),
            "ADD",
            &[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", &w.cni_path),
            ],
            bytes,
            false,
        ),
        None => w.call("ADD", "c1", &path, &w.conf(v, "10.71.0.0/24", json!({}))),
    };
    ensure(o.code != 0 && o.json["code"] == code, || format!("want code {code}: {}", o.stdout))?;
    ensure(w.veths().is_empty() && w.leases().is_empty(), || "error left state behind".into())
}

fn missing_ifname(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("noif");
    let pod = Netns::new("pod");
    let o = w.call_env(
        "ADD",
        &[("CNI_CONTAINERID", "c1"), ("CNI_NETNS", &pod.path.display().to_string())],
        &w.conf(&v, "10.72.0.0/24", json!({})),
    );
    ensure(o.json["code"] == 4, || format!("want code 4: {}", o.stdout))?;
    ensure(o.stdout.contains("CNI_IFNAME"), || format!("message does not name CNI_IFNAME: {}", o.stdout))
}

fn unknown_command(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("cmd");
    let pod = Netns::new("pod");
    let o =
        w.call("FROBNICATE", "c1", &pod.path.display().to_string(), &w.conf(&v, "10.73.0.0/24", json!({})));
    ensure(o.code != 0 && o.json["code"].is_u64(), || {
        format!("want an error JSON: {} {}", o.stdout, o.stderr)
    })
}

fn full_range(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("full");
    let (p1, p2) = (Netns::new("p1"), Netns::new("p2"));
    let conf = w.conf(&v, "10.74.0.0/30", json!({}));
    ensure(w.call("ADD", "c1", &p1.path.display().to_string(), &conf).code == 0, || "first ADD".into())?;
    let o = w.call("ADD", "c2", &p2.path.display().to_string(), &conf);
    ensure(o.code != 0, || "ADD into a full range succeeded".into())?;
    let veths = w.veths().len();
    let pod_links = p2.links();
    let _ = w.call("DEL", "c1", &p1.path.display().to_string(), &conf);
    ensure(veths == 1, || format!("{veths} veths after the failed ADD, want 1 (the first pod's)"))?;
    ensure(pod_links == ["lo"], || format!("failed pod has links {pod_links:?}"))?;
    ensure(w.leases().is_empty(), || "lease left".into())
}

fn bad_subnet(c: &Ctx) -> Result<(), String> {
    let v = c.newest(&SPEC).ok_or("no version")?;
    let w = c.world("badnet");
    let pod = Netns::new("pod");
    let o = w.call("ADD", "c1", &pod.path.display().to_string(), &w.conf(&v, "10.75.0.5/24", json!({})));
    ensure(o.code != 0, || "ADD with a host-bits subnet succeeded".into())?;
    let links = w.node.links();
    ensure(links == ["lo"], || format!("node has links {links:?} after a config error"))?;
    ensure(pod.links() == ["lo"] && w.leases().is_empty(), || "pod link or lease left".into())
}
