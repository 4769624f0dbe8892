//! `cni-route-agent doctor`: is this node's part of the path between nodes sound? The source
//! and this node's place in it, the kernel against the plan (what `plan` would still change is
//! what is wrong: a route missing or stale, a nexthop, a tunnel device), the conflist against
//! the node's pod CIDRs, the masquerade table; then the installed `cni-bridge doctor`'s own
//! checks of the bridge, the plugins and the agent's endpoint, run rather than copied.
//! Read-only, like `plan`.

use std::collections::BTreeSet;
use std::path::Path;

use ipnetwork::IpNetwork;
use serde::Serialize;
use serde_json::Value;

use crate::{dryrun, Options};

/// One check's outcome.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub check: String,
    /// `pass`, `fail` or `skip`.
    pub status: String,
    /// What was found.
    pub detail: String,
    /// How to fix a failure.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

fn check(name: &str, status: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { check: name.into(), status: status.into(), detail: detail.into(), fix: fix.into() }
}

const AGENT_FIX: &str =
    "the agent is not running or its syncs fail: `kubectl -n kube-system logs ds/cni-route-agent` \
on this node, and its /readyz; it repairs this on its next sync";

/// Every check; `bin_dir` holds the installed plugins (`cni-bridge doctor` among them).
pub async fn run(opts: &Options, bin_dir: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let plan = match dryrun::compute(opts).await {
        Ok(p) => p,
        Err(e) => {
            out.push(check(
                "source and kernel",
                "fail",
                e.to_string(),
                "check the source flags (--source, --nodes-file, --kubeconfig) and that it answers",
            ));
            return out;
        }
    };
    let mine: Vec<String> = strings(&plan["pod_cidrs"]);
    if mine.is_empty() {
        out.push(check(
            "this node in the source",
            "fail",
            format!("{} is not listed, or has no pod CIDRs", opts.node_name),
            "give the node its pod CIDRs (kube-controller-manager --allocate-node-cidrs, or the nodes file)",
        ));
    } else {
        out.push(check("this node in the source", "pass", mine.join(", "), ""));
    }
    let pending = |kind: &str, v: &Value, show: &dyn Fn(&Value) -> String| -> Check {
        let items: Vec<String> = v.as_array().into_iter().flatten().map(show).collect();
        match items.is_empty() {
            true => check(kind, "pass", "as planned", ""),
            false => check(kind, "fail", items.join("; "), AGENT_FIX),
        }
    };
    let route = |r: &Value| format!("{} via {}", text(&r["dst"]), text(&r["via"]));
    out.push(pending("routes missing or wrong", &plan["routes"]["add_or_replace"], &route));
    out.push(pending("routes stale", &plan["routes"]["delete"], &route));
    out.push(pending("nexthops missing", &plan["nexthops"]["create"], &|n| {
        format!("via {}", text(&n["via"]))
    }));
    out.push(pending("nexthops stale", &plan["nexthops"]["delete"], &|n| format!("id {n}")));
    for dev in plan["tunnel"]["devices"].as_array().into_iter().flatten() {
        let name = text(&dev["name"]);
        let present = netlink_wire::process::run("ip", &["link", "show", "dev", &name], None).is_ok();
        out.push(match present {
            true => check("tunnel device", "pass", name, ""),
            false => check("tunnel device", "fail", format!("{name} missing"), AGENT_FIX),
        });
    }
    out.push(conflist(opts, &mine));
    if opts.masquerade {
        let present =
            netlink_wire::process::run("nft", &["list", "table", "inet", "cni_route_agent"], None).is_ok();
        out.push(match present {
            true => check("masquerade table", "pass", "inet cni_route_agent", ""),
            false => check("masquerade table", "fail", "table inet cni_route_agent missing", AGENT_FIX),
        });
    }
    out.extend(bridge_doctor(opts, bin_dir));
    out
}

/// The conflist the agent writes: present, and over exactly the node's pod CIDRs.
fn conflist(opts: &Options, mine: &[String]) -> Check {
    let path = opts.cni_conf_dir.join(&opts.cni_conf_name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return check("conflist", "fail", format!("{}: {e}", path.display()), AGENT_FIX),
    };
    let list: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let ranges: BTreeSet<String> = list["plugins"][0]["ipam"]["ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|set| set[0]["subnet"].as_str()?.parse::<IpNetwork>().ok())
        .map(|n| n.to_string())
        .collect();
    let want: BTreeSet<String> = mine.iter().cloned().collect();
    if ranges == want {
        check("conflist", "pass", format!("{} over {}", path.display(), mine.join(", ")), "")
    } else {
        check(
            "conflist",
            "fail",
            format!("{} has ranges {:?}, the node's pod CIDRs are {:?}", path.display(), ranges, want),
            AGENT_FIX,
        )
    }
}

/// `cni-bridge doctor --json` of the installed plugin, against the agent's conflist.
fn bridge_doctor(opts: &Options, bin_dir: &Path) -> Vec<Check> {
    let plugin = bin_dir.join("cni-bridge");
    if !plugin.exists() {
        return vec![check(
            "cni-bridge doctor",
            "fail",
            format!("{} missing", plugin.display()),
            "install the plugins: cni-route-agent install-cni --bin-dir <dir>",
        )];
    }
    let conf = opts.cni_conf_dir.join(&opts.cni_conf_name).display().to_string();
    let (bins, listen) = (bin_dir.display().to_string(), opts.listen.to_string());
    let args = ["doctor", "--json", "--conf", &conf, "--bin-dir", &bins, "--metrics", &listen];
    // Exit status 1 only says some check failed: the checks are on stdout either way.
    let stdout = match std::process::Command::new(&plugin).args(args).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => return vec![check("cni-bridge doctor", "fail", e.to_string(), "")],
    };
    match serde_json::from_str::<Vec<Value>>(&stdout) {
        Ok(checks) => checks
            .iter()
            .map(|c| Check {
                check: format!("bridge: {}", text(&c["check"])),
                status: text(&c["status"]).to_lowercase(),
                detail: text(&c["detail"]),
                fix: c["fix"].as_str().unwrap_or("").to_string(),
            })
            .collect(),
        Err(e) => vec![check("cni-bridge doctor", "fail", format!("unreadable output: {e}"), "")],
    }
}

fn text(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(text).collect()
}

/// The checks for people, with the fix under each failure.
pub fn table(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<width$}  {:<6}  DETAIL\n", "CHECK", "RESULT");
    for c in checks {
        let status = if c.status == "fail" { "FAIL" } else { c.status.as_str() };
        s.push_str(&format!("{:<width$}  {status:<6}  {}\n", c.check, c.detail));
        if !c.fix.is_empty() {
            s.push_str(&format!("{:<width$}  {:<6}  fix: {}\n", "", "", c.fix));
        }
    }
    let failed = checks.iter().filter(|c| c.status == "fail").count();
    s.push_str(&format!("{} checks, {failed} failed\n", checks.len()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_the_fix_under_a_failure_and_counts() {
        let t = table(&[
            check("routes missing or wrong", "fail", "10.244.2.0/24 via 10.200.0.12", "restart it"),
            check("conflist", "pass", "ok", ""),
        ]);
        assert!(t.contains("routes missing or wrong  FAIL    10.244.2.0/24 via 10.200.0.12"), "{t}");
        assert!(t.contains("fix: restart it") && t.ends_with("2 checks, 1 failed\n"), "{t}");
    }
}
