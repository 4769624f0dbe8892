//! The black-box conformance suite: runs any bridge + IPAM plugin pair exactly as a runtime
//! does and reports one line per check, then `N passed, N failed`.

mod check;
mod network;
mod spec;

use serde_json::Value;

pub use check::{ensure, Check, Ctx, Target};

use crate::netns::live_namespaces;

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The check's name.
    pub name: String,
    /// `Err(reason)` when it failed.
    pub result: Result<(), String>,
}

/// The root namespace as `ip` and the firewalls show it, to prove it unchanged.
fn root_snapshot() -> String {
    let run = |p: &str, a: &[&str]| {
        std::process::Command::new(p)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let ipt: String =
        run("iptables-save", &[]).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    [
        run("ip", &["-o", "link", "show"])
            .lines()
            .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" "),
        run("ip", &["-o", "addr", "show"]),
        run("ip", &["route", "show", "table", "all"]),
        run("nft", &["list", "tables"]),
        ipt,
    ]
    .join("\n")
}

/// Every check, in order.
pub fn checks() -> Vec<Check> {
    let mut all = spec::checks();
    all.extend(network::checks());
    all
}

/// Runs the checks whose name contains `filter` (all when empty), printing a line each.
pub fn run(target: &Target, filter: &str, print: &mut dyn FnMut(&str)) -> Vec<Outcome> {
    let state = std::env::temp_dir().join(format!("cni-conformance-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&state);
    let versions = version_list(target);
    let ctx = Ctx { target: target.clone(), versions, state: state.clone() };
    let before = root_snapshot();
    let mut out = Vec::new();
    for (name, check) in checks().into_iter().filter(|(n, _)| n.contains(filter)) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&ctx)))
            .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&p))));
        // Nothing of the check may remain: its namespaces (and with them its links and
        // rules) and its leases.
        let result = result.and_then(|_| {
            let left = live_namespaces();
            ensure(left.is_empty(), || format!("namespaces left behind: {left:?}"))
        });
        print(&match &result {
            Ok(()) => format!("ok - {name}"),
            Err(error) => format!("FAIL - {name}: {error}"),
        });
        out.push(Outcome { name: name.to_string(), result });
    }
    let after = root_snapshot();
    let result = ensure(before == after, || "the root network namespace changed during the run".into());
    print(&match &result {
        Ok(()) => "ok - root network namespace unchanged".to_string(),
        Err(error) => format!("FAIL - root network namespace unchanged: {error}"),
    });
    out.push(Outcome { name: "root network namespace unchanged".into(), result });
    let _ = std::fs::remove_dir_all(&state);
    let failed = out.iter().filter(|o| o.result.is_err()).count();
    print(&format!("{} passed, {failed} failed", out.len() - failed));
    out
}

fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|text| text.to_string()))
        .unwrap_or_default()
}

fn version_list(target: &Target) -> Vec<String> {
    let bin = target.main_plugin();
    let out = std::process::Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output();
    let json: Value =
        out.ok().and_then(|out| serde_json::from_slice(&out.stdout).ok()).unwrap_or(Value::Null);
    json["supportedVersions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|version| version.as_str().map(str::to_string))
        .collect()
}
