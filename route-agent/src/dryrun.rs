//! `cni-route-agent plan`: what a sync would do now, computed from the same reads and the same
//! pure planners a sync uses ([`crate::plan`], [`crate::nexthop::NexthopPlan`],
//! [`crate::vxlan::VtepPlan`], [`crate::gateways`], the masquerade's inputs), without writing
//! anything: no route, nexthop, device, address, nft table or conflist.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::error::AgentError;
use crate::kernel::Kernel;
use crate::model::Snapshot;
use crate::nexthop::{self, Existing, NexthopPlan};
use crate::plan;
use crate::reconcile::{masq_inputs, me_in};
use crate::vxlan::VtepPlan;
use crate::{gateways, Metrics, Options, Source};

/// How long the kubernetes source may take for its first complete list.
const SOURCE_WAIT: Duration = Duration::from_secs(30);

/// The nodes as the source has them now.
pub async fn snapshot(opts: &Options) -> Result<Snapshot, AgentError> {
    match &opts.source {
        Source::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(AgentError::io(format!("reading {}", path.display())))?;
            crate::sources::file::parse(&text)
        }
        Source::Kubernetes(kube) => {
            let (tx, mut rx) = watch::channel::<Option<Snapshot>>(None);
            let source =
                tokio::spawn(crate::sources::kube::run(kube.clone(), tx, Arc::new(Metrics::default())));
            let first = tokio::time::timeout(SOURCE_WAIT, rx.wait_for(Option::is_some)).await;
            let snap = match first {
                Ok(Ok(snap)) => snap.clone().unwrap_or_default(),
                _ => {
                    source.abort();
                    return Err(AgentError::source("list", "no complete list of Nodes within 30 s"));
                }
            };
            source.abort();
            Ok(snap)
        }
        // Its session claims subnets: a write, which a plan must not make.
        Source::Etcd(_) => Err(AgentError::Config(
            "plan reads the file or kubernetes source; the etcd source claims subnets when it starts".into(),
        )),
    }
}

/// What a sync would do, as JSON (also the source of the table).
pub async fn compute(opts: &Options) -> Result<Value, AgentError> {
    compute_from(opts, &snapshot(opts).await?).await
}

/// [`compute`] from a snapshot already read (the doctor reads it itself, to time it and to
/// know the peers).
pub async fn compute_from(opts: &Options, snap: &Snapshot) -> Result<Value, AgentError> {
    let kernel = Kernel::new(opts.route_protocol, opts.nexthops).await?;
    let connected = kernel.connected().await?;
    let nets: Vec<IpNetwork> = connected.iter().map(|(net, _, _)| *net).collect();
    let existing = if kernel.nexthops {
        Existing::new(&nexthop::dump_async().await.map_err(AgentError::Route)?, kernel.proto())
    } else {
        Existing::default()
    };
    let have = kernel.routes(&existing.gateways()).await?;
    let me = me_in(opts, snap);
    let local: Vec<IpAddr> =
        me.iter().flat_map(|m| [m.ipv4.map(IpAddr::V4), m.ipv6.map(IpAddr::V6)]).flatten().collect();
    let tunnelling = plan::Tunnelling { backend: opts.backend, local: local.clone() };
    let desired = plan::desired_with(snap, &opts.node_name, &nets, &have, &tunnelling);
    let bridge = match &me {
        Some(me) => {
            gateways::dry_run(&kernel, &me.pod_cidrs, Path::new(&opts.ipam_data_dir), &opts.network_name)
                .await?
        }
        None => None,
    };
    let retained = bridge.as_ref().map(|b| b.retained.clone()).unwrap_or_default();
    let masquerade = match (&me, opts.masquerade) {
        (Some(me), true) => {
            let (sources, keep) = masq_inputs(opts, snap, me, &retained);
            json!({"sources": strings(&sources), "exceptions": strings(&keep), "fully_random_requested": opts.masquerade_fully_random})
        }
        _ => Value::Null,
    };
    let mut underlay_mtu = BTreeMap::new();
    for ip in &local {
        if let Some((_, index, _)) = connected.iter().find(|(_, _, a)| a == ip) {
            if let Some(mtu) = kernel.mtu_of_link(*index).await? {
                underlay_mtu.insert(*ip, mtu);
            }
        }
    }
    let vtep = VtepPlan::new(&desired.tunnelled, &local, |ip| underlay_mtu.get(ip).copied());
    let nexthops = if kernel.nexthops {
        let gws: BTreeSet<IpAddr> = desired
            .routes
            .iter()
            .filter(|(cidr, gw)| **gw != plan::tunnel_gateway(cidr))
            .map(|(_, gw)| *gw)
            .collect();
        NexthopPlan::new(&existing, &gws, &connected)
    } else {
        NexthopPlan::default()
    };
    let diff = plan::diff(&desired.routes, &have);
    let route = |(dst, gw): &(IpNetwork, IpAddr)| match vtep.routes.get(dst) {
        Some(dev) => json!({"dst": dst.to_string(), "via": gw.to_string(), "dev": dev, "onlink": true}),
        None => match nexthops.ids.get(gw) {
            Some(id) => json!({"dst": dst.to_string(), "via": gw.to_string(), "nhid": id}),
            None => json!({"dst": dst.to_string(), "via": gw.to_string()}),
        },
    };
    let mac = |m: &[u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    Ok(json!({
        "node": opts.node_name,
        "pod_cidrs": me.as_ref().map(|m| strings(&m.pod_cidrs)).unwrap_or_default(),
        "routes": {
            "add_or_replace": diff.upsert.iter().map(route).collect::<Vec<_>>(),
            "delete": diff.delete.iter().map(|(d, g)| json!({"dst": d.to_string(), "via": g.to_string()})).collect::<Vec<_>>(),
            "unchanged": desired.routes.len() - diff.upsert.len().min(desired.routes.len()),
        },
        "nexthops": {
            "create": nexthops.create.iter().map(|(id, gw, oif)| json!({"id": id, "via": gw.to_string(), "oif": oif})).collect::<Vec<_>>(),
            "delete": nexthops.stale,
        },
        "tunnel": {
            "devices": vtep.devices.iter().map(|d| json!({"name": d.name, "local": d.local.to_string(), "mac": mac(&d.mac), "mtu": d.mtu})).collect::<Vec<_>>(),
            "fdb": vtep.fdb.iter().map(|(dev, m, dst)| json!({"dev": dev, "mac": mac(m), "dst": dst.to_string()})).collect::<Vec<_>>(),
            "neighbours": vtep.neighbours.iter().map(|(dev, ip, m)| json!({"dev": dev, "ip": ip.to_string(), "mac": mac(m)})).collect::<Vec<_>>(),
        },
        "masquerade": masquerade,
        "bridge_gateways": bridge.map(|b| json!({
            "add": strings(&b.add), "remove": strings(&b.remove), "kept_for_leases": strings(&b.retained)
        })),
        "not_routed": {
            "off_link": desired.off_link.iter().map(|(n, ip)| json!({"node": n, "address": ip.to_string()})).collect::<Vec<_>>(),
            "conflicts": desired.conflicts.iter().map(|c| json!({"node": c.claimant, "cidr": c.cidr.to_string(), "owner": c.owner, "owner_cidr": c.owner_cidr.to_string()})).collect::<Vec<_>>(),
            "without_address": desired.without_address.iter().map(|u| json!({"node": u.node, "cidr": u.cidr.to_string(), "kept_via": u.kept.map(|k| k.to_string())})).collect::<Vec<_>>(),
        },
    }))
}

fn strings(nets: &[IpNetwork]) -> Vec<String> {
    nets.iter().map(ToString::to_string).collect()
}

/// The plan for people: one section per kind of change.
pub fn table(p: &Value) -> String {
    let mut out =
        format!("plan for {} (pod CIDRs {})\n", p["node"].as_str().unwrap_or(""), join(&p["pod_cidrs"]));
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let routes = &p["routes"];
    out.push_str(&format!(
        "routes: {} to add or replace, {} to delete, {} unchanged\n",
        list(&routes["add_or_replace"]).len(),
        list(&routes["delete"]).len(),
        routes["unchanged"]
    ));
    for r in list(&routes["add_or_replace"]) {
        let how = match (r["dev"].as_str(), r["nhid"].as_u64()) {
            (Some(dev), _) => format!(" dev {dev} onlink"),
            (None, Some(id)) => format!(" (nexthop {id})"),
            _ => String::new(),
        };
        out.push_str(&format!("  + {} via {}{how}\n", text(&r["dst"]), text(&r["via"])));
    }
    for r in list(&routes["delete"]) {
        out.push_str(&format!("  - {} via {}\n", text(&r["dst"]), text(&r["via"])));
    }
    let nh = &p["nexthops"];
    out.push_str(&format!(
        "nexthops: {} to create, {} to delete\n",
        list(&nh["create"]).len(),
        list(&nh["delete"]).len()
    ));
    for n in list(&nh["create"]) {
        out.push_str(&format!("  + id {} via {} oif {}\n", n["id"], text(&n["via"]), n["oif"]));
    }
    for id in list(&nh["delete"]) {
        out.push_str(&format!("  - id {id}\n"));
    }
    let t = &p["tunnel"];
    out.push_str(&format!(
        "tunnel: {} devices, {} FDB entries, {} neighbours (wanted)\n",
        list(&t["devices"]).len(),
        list(&t["fdb"]).len(),
        list(&t["neighbours"]).len()
    ));
    for f in list(&t["fdb"]) {
        out.push_str(&format!("  fdb {} {} dst {}\n", text(&f["dev"]), text(&f["mac"]), text(&f["dst"])));
    }
    match p["masquerade"].is_null() {
        true => out.push_str("masquerade: off, or this node not in the source\n"),
        false => out.push_str(&format!(
            "masquerade: from {} unless to {}\n",
            join(&p["masquerade"]["sources"]),
            join(&p["masquerade"]["exceptions"])
        )),
    }
    if let Some(b) = p["bridge_gateways"].as_object() {
        out.push_str(&format!(
            "bridge gateways: add {}; remove {}; kept for leases {}\n",
            join(&b["add"]),
            join(&b["remove"]),
            join(&b["kept_for_leases"])
        ));
    }
    let nr = &p["not_routed"];
    for (what, key) in
        [("off link", "off_link"), ("conflicting claim", "conflicts"), ("without address", "without_address")]
    {
        for x in list(&nr[key]) {
            out.push_str(&format!("not routed ({what}): {x}\n"));
        }
    }
    out
}

fn text(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

fn join(v: &Value) -> String {
    let items: Vec<String> = v.as_array().into_iter().flatten().map(text).collect();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_change() {
        let p = json!({
            "node": "node-1", "pod_cidrs": ["10.244.1.0/24"],
            "routes": {"add_or_replace": [{"dst": "10.244.2.0/24", "via": "10.200.0.12", "nhid": 7}],
                       "delete": [{"dst": "10.244.3.0/24", "via": "10.200.0.13"}], "unchanged": 0},
            "nexthops": {"create": [{"id": 7, "via": "10.200.0.12", "oif": 2}], "delete": [9]},
            "tunnel": {"devices": [], "fdb": [], "neighbours": []},
            "masquerade": {"sources": ["10.244.1.0/24"], "exceptions": ["10.244.0.0/16"]},
            "bridge_gateways": null, "not_routed": {"off_link": [], "conflicts": [], "without_address": []}
        });
        let t = table(&p);
        assert!(t.contains("routes: 1 to add or replace, 1 to delete, 0 unchanged"), "{t}");
        assert!(t.contains("  + 10.244.2.0/24 via 10.200.0.12 (nexthop 7)"), "{t}");
        assert!(t.contains("  - 10.244.3.0/24 via 10.200.0.13"), "{t}");
        assert!(t.contains("  + id 7 via 10.200.0.12 oif 2") && t.contains("  - id 9"), "{t}");
        assert!(t.contains("masquerade: from 10.244.1.0/24 unless to 10.244.0.0/16"), "{t}");
    }
}
