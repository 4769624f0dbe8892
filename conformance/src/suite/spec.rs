//! The spec checklist: verbs, result shapes per version, error codes, DEL tolerance, CHECK,
//! GC, STATUS, VERSION, and leaving nothing behind on failure.

use serde_json::{json, Value};

use super::check::{ensure, Check, Ctx};
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

fn version(ctx: &Ctx) -> Result<(), String> {
    let world = ctx.world("ver");
    let out = world.call_env(
        "VERSION",
        &[("CNI_NETNS", "dummy"), ("CNI_PATH", "dummy"), ("CNI_CONTAINERID", ""), ("CNI_IFNAME", "")],
        &json!({"cniVersion": "1.0.0"}),
    );
    ensure(out.code == 0, || format!("exit {}: {}", out.code, out.stdout))?;
    let list: Vec<&str> =
        out.json["supportedVersions"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    ensure(!list.is_empty(), || format!("no supportedVersions: {}", out.stdout))?;
    let bogus: Vec<&&str> = list.iter().filter(|version| !SPEC.contains(version)).collect();
    ensure(bogus.is_empty(), || format!("not spec versions: {bogus:?}"))
}

fn shape(ctx: &Ctx, version: &str) -> Result<(), String> {
    let world = ctx.world("shape");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = world.conf(version, "10.61.0.0/24", json!({}));
    let out = world.call("ADD", "c1", &path, &conf);
    if !ctx.versions.iter().any(|s| s == version) {
        return ensure(out.json["code"] == 1, || {
            format!("unsupported {version}: want code 1, got {}", out.stdout)
        });
    }
    ensure(out.code == 0, || format!("ADD: {} {}", out.stdout, out.stderr))?;
    let result = &out.json;
    ensure(result["cniVersion"] == version, || format!("cniVersion {} in the result", result["cniVersion"]))?;
    if version == "0.1.0" || version == "0.2.0" {
        ensure(result["ip4"]["ip"] == "10.61.0.2/24", || format!("legacy ip4: {}", out.stdout))?;
    } else {
        let ifs = result["interfaces"].as_array().cloned().unwrap_or_default();
        ensure(ifs.len() >= 3, || format!("want [bridge, host veth, pod veth]: {}", out.stdout))?;
        ensure(ifs[2]["name"] == "eth0" && ifs[2]["sandbox"] == path.as_str(), || {
            "pod interface with sandbox".into()
        })?;
        ensure(ifs[0]["name"] == "cni0", || "bridge first".into())?;
        ensure(result["ips"][0]["interface"] == 2, || format!("ips[0].interface: {}", out.stdout))?;
        ensure(result["ips"][0]["address"] == "10.61.0.2/24", || format!("address: {}", out.stdout))?;
        let has_version = result["ips"][0].get("version").is_some();
        ensure(has_version == version.starts_with("0."), || {
            format!("ips[].version presence wrong for {version}")
        })?;
    }
    ensure(pod.ip(&["-br", "addr"]).contains("10.61.0.2/24"), || "address not on the pod interface".into())?;
    ensure(world.leases().len() == 1, || format!("{} leases after ADD", world.leases().len()))?;
    let del = world.call("DEL", "c1", &path, &conf);
    ensure(del.code == 0, || format!("DEL: {}", del.stdout))?;
    ensure(world.leases().is_empty() && world.veths().is_empty(), || "DEL left a lease or veth".into())
}

fn pause_form(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("pause");
    let pod = Pause::new();
    let path = pod.path.display().to_string();
    let conf = world.conf(&version, "10.62.0.0/24", json!({}));
    let out = world.call("ADD", "c1", &path, &conf);
    ensure(out.code == 0, || format!("ADD: {}", out.stdout))?;
    ensure(pod.ip(&["-br", "addr"]).contains("10.62.0.2"), || "address not in the pause namespace".into())?;
    ensure(world.call("DEL", "c1", &path, &conf).code == 0, || "DEL".into())
}

fn second_add(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("dup");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = world.conf(&version, "10.63.0.0/24", json!({}));
    ensure(world.call("ADD", "c1", &path, &conf).code == 0, || "first ADD".into())?;
    let out = world.call("ADD", "c1", &path, &conf);
    ensure(out.code != 0 && out.json["code"].is_u64(), || format!("second ADD: {}", out.stdout))?;
    ensure(world.call("DEL", "c1", &path, &conf).code == 0, || "DEL".into())
}

fn del_repeat(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("delrep");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = world.conf(&version, "10.64.0.0/24", json!({}));
    ensure(world.call("ADD", "c1", &path, &conf).code == 0, || "ADD".into())?;
    for attempt in 0..2 {
        let out = world.call("DEL", "c1", &path, &conf);
        ensure(out.code == 0, || format!("DEL #{attempt}: {}", out.stdout))?;
    }
    let out = world.call("DEL", "never-added", &path, &conf);
    ensure(out.code == 0, || format!("DEL unknown: {}", out.stdout))
}

fn del_empty_netns(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("delempty");
    let pod = Netns::new("pod");
    let conf = world.conf(&version, "10.65.0.0/24", json!({}));
    ensure(world.call("ADD", "c1", &pod.path.display().to_string(), &conf).code == 0, || "ADD".into())?;
    let out = world.call("DEL", "c1", "", &conf);
    ensure(out.code == 0, || format!("DEL: {}", out.stdout))?;
    ensure(world.leases().is_empty(), || "lease leaked".into())
}

fn del_vanished_netns(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("delgone");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = world.conf(&version, "10.66.0.0/24", json!({}));
    ensure(world.call("ADD", "c1", &path, &conf).code == 0, || "ADD".into())?;
    drop(pod);
    let out = world.call("DEL", "c1", &path, &conf);
    ensure(out.code == 0, || format!("DEL: {}", out.stdout))?;
    ensure(world.leases().is_empty(), || "lease leaked".into())
}

fn del_masq_empty_netns(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("delmasq");
    let pod = Netns::new("pod");
    let conf = world.conf(&version, "10.76.0.0/24", json!({"ipMasq": true}));
    let out = world.call("ADD", "c1", &pod.path.display().to_string(), &conf);
    ensure(out.code == 0, || format!("ADD: {}", out.stdout))?;
    let rules = || {
        let iptables = world.node.run("iptables-save", &[]);
        let nft = world.node.run("nft", &["list", "ruleset"]);
        format!("{}{}", String::from_utf8_lossy(&iptables.stdout), String::from_utf8_lossy(&nft.stdout))
    };
    ensure(rules().contains("10.76.0.2"), || "no masquerade rule mentions the pod address after ADD".into())?;
    let del = world.call("DEL", "c1", "", &conf);
    ensure(del.code == 0, || format!("DEL: {}", del.stdout))?;
    let left: Vec<String> = rules().lines().filter(|l| l.contains("10.76.0.2")).map(str::to_string).collect();
    ensure(left.is_empty(), || format!("rules left after DEL: {left:?}"))
}

fn check_tamper(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&["0.4.0", "1.0.0", "1.1.0"]).ok_or("plugin supports no version with CHECK")?;
    let world = ctx.world("check");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let conf = world.conf(&version, "10.67.0.0/24", json!({}));
    let out = world.call("ADD", "c1", &path, &conf);
    ensure(out.code == 0, || format!("ADD: {}", out.stdout))?;
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = out.json.clone();
    let check = world.call("CHECK", "c1", &path, &with_prev);
    ensure(check.code == 0, || format!("CHECK after ADD: {} {}", check.stdout, check.stderr))?;
    pod.ip(&["addr", "flush", "dev", "eth0"]);
    let check = world.call("CHECK", "c1", &path, &with_prev);
    ensure(check.code != 0, || "CHECK passed with the address removed".into())?;
    ensure(world.call("DEL", "c1", &path, &with_prev).code == 0, || "DEL".into())
}

fn check_old(ctx: &Ctx) -> Result<(), String> {
    let version =
        ctx.newest(&["0.1.0", "0.2.0", "0.3.0", "0.3.1"]).ok_or("plugin supports no version below 0.4.0")?;
    let world = ctx.world("checkold");
    let pod = Netns::new("pod");
    let out = world.call(
        "CHECK",
        "c1",
        &pod.path.display().to_string(),
        &world.conf(&version, "10.68.0.0/24", json!({})),
    );
    ensure(out.json["code"] == 1, || format!("want code 1: {}", out.stdout))
}

fn gc(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&["1.1.0"]).ok_or("plugin does not support cniVersion 1.1.0 (GC)")?;
    let world = ctx.world("gc");
    let (pod_a, pod_b) = (Netns::new("a"), Netns::new("b"));
    let conf = world.conf(&version, "10.69.0.0/24", json!({}));
    ensure(world.call("ADD", "a", &pod_a.path.display().to_string(), &conf).code == 0, || "ADD a".into())?;
    ensure(world.call("ADD", "b", &pod_b.path.display().to_string(), &conf).code == 0, || "ADD b".into())?;
    let out = world.call_env("GC", &[], &conf);
    ensure(out.code == 0, || format!("GC without list: {}", out.stdout))?;
    ensure(world.leases().len() == 2, || {
        format!("GC without a list released leases ({} left)", world.leases().len())
    })?;
    let mut with_valid = conf.clone();
    with_valid["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
    let out = world.call_env("GC", &[], &with_valid);
    ensure(out.code == 0, || format!("GC: {}", out.stdout))?;
    ensure(world.leases().len() == 1, || format!("{} leases after GC, want 1", world.leases().len()))?;
    ensure(world.call("DEL", "a", &pod_a.path.display().to_string(), &conf).code == 0, || "DEL".into())?;
    ensure(world.call("DEL", "b", &pod_b.path.display().to_string(), &conf).code == 0, || "DEL".into())
}

fn status(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&["1.1.0"]).ok_or("plugin does not support cniVersion 1.1.0 (STATUS)")?;
    let world = ctx.world("status");
    let out = world.call_env("STATUS", &[], &world.conf(&version, "10.70.0.0/24", json!({})));
    ensure(out.code == 0, || format!("STATUS: {}", out.stdout))
}

fn err_case(ctx: &Ctx, version: &str, raw: Option<&[u8]>, code: u64) -> Result<(), String> {
    let world = ctx.world("err");
    let pod = Netns::new("pod");
    let path = pod.path.display().to_string();
    let out = match raw {
        Some(bytes) => crate::plugin::invoke_raw(
            &world.node,
            &world.main_plugin(),
            "ADD",
            &[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", &world.cni_path),
            ],
            bytes,
            false,
        ),
        None => world.call("ADD", "c1", &path, &world.conf(version, "10.71.0.0/24", json!({}))),
    };
    ensure(out.code != 0 && out.json["code"] == code, || format!("want code {code}: {}", out.stdout))?;
    ensure(world.veths().is_empty() && world.leases().is_empty(), || "error left state behind".into())
}

fn missing_ifname(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("noif");
    let pod = Netns::new("pod");
    let out = world.call_env(
        "ADD",
        &[("CNI_CONTAINERID", "c1"), ("CNI_NETNS", &pod.path.display().to_string())],
        &world.conf(&version, "10.72.0.0/24", json!({})),
    );
    ensure(out.json["code"] == 4, || format!("want code 4: {}", out.stdout))?;
    ensure(out.stdout.contains("CNI_IFNAME"), || format!("message does not name CNI_IFNAME: {}", out.stdout))
}

fn unknown_command(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("cmd");
    let pod = Netns::new("pod");
    let out = world.call(
        "FROBNICATE",
        "c1",
        &pod.path.display().to_string(),
        &world.conf(&version, "10.73.0.0/24", json!({})),
    );
    ensure(out.code != 0 && out.json["code"].is_u64(), || {
        format!("want an error JSON: {} {}", out.stdout, out.stderr)
    })
}

fn full_range(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("full");
    let (p1, p2) = (Netns::new("p1"), Netns::new("p2"));
    let conf = world.conf(&version, "10.74.0.0/30", json!({}));
    ensure(world.call("ADD", "c1", &p1.path.display().to_string(), &conf).code == 0, || "first ADD".into())?;
    let out = world.call("ADD", "c2", &p2.path.display().to_string(), &conf);
    ensure(out.code != 0, || "ADD into a full range succeeded".into())?;
    let veths = world.veths().len();
    let pod_links = p2.links();
    let _ = world.call("DEL", "c1", &p1.path.display().to_string(), &conf);
    ensure(veths == 1, || format!("{veths} veths after the failed ADD, want 1 (the first pod's)"))?;
    ensure(pod_links == ["lo"], || format!("failed pod has links {pod_links:?}"))?;
    ensure(world.leases().is_empty(), || "lease left".into())
}

fn bad_subnet(ctx: &Ctx) -> Result<(), String> {
    let version = ctx.newest(&SPEC).ok_or("no version")?;
    let world = ctx.world("badnet");
    let pod = Netns::new("pod");
    let out = world.call(
        "ADD",
        "c1",
        &pod.path.display().to_string(),
        &world.conf(&version, "10.75.0.5/24", json!({})),
    );
    ensure(out.code != 0, || "ADD with a host-bits subnet succeeded".into())?;
    let links = world.node.links();
    ensure(links == ["lo"], || format!("node has links {links:?} after a config error"))?;
    ensure(pod.links() == ["lo"] && world.leases().is_empty(), || "pod link or lease left".into())
}
