//! The `file` source: a static JSON or YAML list of nodes, re-read when it changes (inotify on
//! its directory, so both in-place writes and atomic renames are seen). For bare metal, the
//! demo and tests.
//!
//! ```yaml
//! nodes:
//!   - name: node-1
//!     podCIDRs: [10.244.1.0/24, fd00:10:244:1::/64]
//!     addresses: [10.200.0.11, fd00:200::11]
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use nix::sys::inotify::AddWatchFlags;
use serde::Deserialize;
use tokio::sync::watch;

use crate::error::AgentError;
use crate::model::{NodeInfo, Snapshot};
use crate::sources::path_watch::PathWatch;
use crate::sources::{failed, publish};
use crate::Metrics;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNode {
    name: String,
    #[serde(default, rename = "podCIDRs")]
    pod_cidrs: Vec<String>,
    #[serde(default, rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawFile {
    Wrapped { nodes: Vec<RawNode> },
    List(Vec<RawNode>),
}

/// Parses the file's text (JSON is YAML, so one parser reads both).
pub fn parse(text: &str) -> Result<Snapshot, AgentError> {
    // An empty file is what a writer truncating in place leaves for a moment: never "no nodes".
    if text.trim().is_empty() {
        return Err(AgentError::source("empty", "nodes file: empty"));
    }
    let raw: RawFile =
        serde_yaml::from_str(text).map_err(|e| AgentError::source("parse", format!("nodes file: {e}")))?;
    let nodes = match raw {
        RawFile::Wrapped { nodes } | RawFile::List(nodes) => nodes,
    };
    let mut snap = Snapshot::new();
    for n in nodes {
        let mut cidrs = n.pod_cidrs;
        if cidrs.is_empty() {
            cidrs.extend(n.pod_cidr);
        }
        let cidrs = cidrs
            .iter()
            .map(|c| {
                let net: IpNetwork = c
                    .parse()
                    .map_err(|e| AgentError::source("parse", format!("node {}: podCIDR {c}: {e}", n.name)))?;
                IpNetwork::new(net.network(), net.prefix())
                    .map_err(|e| AgentError::source("parse", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let addrs = n
            .addresses
            .iter()
            .map(|a| {
                a.parse::<IpAddr>()
                    .map_err(|e| AgentError::source("parse", format!("node {}: address {a}: {e}", n.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if snap.contains_key(&n.name) {
            return Err(AgentError::source("parse", format!("node {} listed twice", n.name)));
        }
        snap.insert(n.name.clone(), NodeInfo::with_addresses(&n.name, cidrs, &addrs));
    }
    Ok(snap)
}

fn load(path: &Path) -> Result<Snapshot, AgentError> {
    let text =
        std::fs::read_to_string(path).map_err(AgentError::io(format!("reading {}", path.display())))?;
    parse(&text)
}

/// Publishes the file's nodes now and after every change; runs until the channel closes.
pub async fn run(
    path: PathBuf,
    tx: watch::Sender<Option<Snapshot>>,
    metrics: Arc<Metrics>,
) -> Result<(), AgentError> {
    let watch = PathWatch::new(
        &path,
        AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE,
    )?;
    let reload = |why: &str| match load(&watch.path) {
        Ok(s) => publish(&tx, s, &metrics),
        // A missing or half-written file keeps the last good snapshot.
        Err(e) => {
            failed(&metrics, &e);
            tracing::warn!(%e, why, "nodes file not usable; keeping the last good one");
        }
    };
    reload("start");
    loop {
        watch.changed().await?;
        reload("changed");
        if tx.is_closed() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_json_lists_and_single_pod_cidr() {
        let y = "nodes:\n  - name: a\n    podCIDRs: [10.244.1.0/24, 'fd00:244:1::/64']\n    addresses: [10.200.0.1, 'fd00::1']\n";
        let s = parse(y).unwrap();
        assert_eq!(s["a"].pod_cidrs.len(), 2);
        assert_eq!(s["a"].ipv4.unwrap().to_string(), "10.200.0.1");
        assert_eq!(s["a"].ipv6.unwrap().to_string(), "fd00::1");
        let j = r#"[{"name": "b", "podCIDR": "10.244.2.5/24", "addresses": ["10.200.0.2"]}]"#;
        let s = parse(j).unwrap();
        assert_eq!(s["b"].pod_cidrs[0].to_string(), "10.244.2.0/24", "normalized to the network");
    }

    #[test]
    fn rejects_bad_entries() {
        assert!(parse("nodes: [{name: a, podCIDRs: [nope]}]").is_err());
        assert!(parse("nodes: [{name: a, addresses: [nope]}]").is_err());
        assert!(parse("nodes: [{name: a}, {name: a}]").is_err());
        assert!(parse("{{{").is_err());
        let empty = parse(" \n").unwrap_err();
        assert!(matches!(empty, AgentError::Source { kind: "empty", .. }), "{empty}");
        assert!(parse("nodes: []").unwrap().is_empty(), "an empty cluster is a valid list");
    }
}
