//! Kubernetes objects from manifests: a YAML or JSON file, or a directory of them (as
//! `kubectl apply -f DIR` takes), several documents per file and `kind: List` allowed. Pods,
//! Namespaces and NetworkPolicies are kept; other kinds are ignored. The `file` policy source
//! re-reads the path on every change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Pod as ApiPod};
use k8s_openapi::api::networking::v1::NetworkPolicy as ApiPolicy;
use nix::sys::inotify::AddWatchFlags;
use serde::Deserialize;
use tokio::sync::watch;

use super::compile::Cluster;
use super::model::{Defect, Namespace, Pod, Policy};
use crate::error::AgentError;
use crate::sources::path_watch::PathWatch;
use crate::Metrics;

/// Adds the objects of one manifest text to `cluster`; what is malformed goes to `defects`
/// (a document that is not YAML makes the whole text an error: a half-written file is not a
/// cluster with fewer policies).
pub fn parse_into(
    text: &str,
    origin: &str,
    cluster: &mut Cluster,
    defects: &mut Vec<Defect>,
) -> Result<(), String> {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| format!("{origin}: {e}"))?;
        add_value(value, origin, cluster, defects);
    }
    Ok(())
}

fn add_value(value: serde_yaml::Value, origin: &str, cluster: &mut Cluster, defects: &mut Vec<Defect>) {
    if value.is_null() {
        return;
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
    let mut bad = |message: String| defects.push(Defect { object: origin.to_string(), message });
    match kind.as_str() {
        "List" | "PodList" | "NamespaceList" | "NetworkPolicyList" => {
            let items = value.get("items").and_then(|i| i.as_sequence()).cloned().unwrap_or_default();
            for item in items {
                let mut item = item;
                // Typed lists may leave `kind` off their items.
                if item.get("kind").is_none() {
                    if let (Some(map), Some(k)) = (item.as_mapping_mut(), kind.strip_suffix("List")) {
                        if !k.is_empty() {
                            map.insert("kind".into(), k.into());
                        }
                    }
                }
                add_value(item, origin, cluster, defects);
            }
        }
        "Pod" => match serde_yaml::from_value::<ApiPod>(value) {
            Ok(p) => {
                if let Some(pod) = Pod::from_api(&p) {
                    cluster.pods.insert(pod.key(), Arc::new(pod));
                }
            }
            Err(e) => bad(format!("Pod: {e}")),
        },
        "Namespace" => match serde_yaml::from_value::<ApiNamespace>(value) {
            Ok(n) => {
                if let Some(ns) = Namespace::from_api(&n) {
                    cluster.namespaces.insert(ns.name.clone(), Arc::new(ns));
                }
            }
            Err(e) => bad(format!("Namespace: {e}")),
        },
        "NetworkPolicy" => match serde_yaml::from_value::<ApiPolicy>(value) {
            Ok(p) => {
                let (policy, found) = Policy::from_api(&p);
                defects.extend(found);
                if let Some(policy) = policy {
                    cluster.policies.insert(policy.key(), Arc::new(policy));
                }
            }
            // Unparseable as a NetworkPolicy at all (a CIDR is a number, say): nothing of it
            // can be enforced, and nothing it would deny is known; counted and skipped.
            Err(e) => bad(format!("NetworkPolicy: {e}")),
        },
        _ => {}
    }
}

/// One manifest file as last read: what identifies its content on disk, and its objects.
#[derive(Debug)]
struct Parsed {
    stamp: (u64, u64, i64, i64, u64),
    objects: Cluster,
    defects: Vec<Defect>,
}

/// Manifests under a path, each file parsed again only when it changed on disk: on a big
/// cluster kept as one file per namespace, a change costs one small file's parse.
#[derive(Debug, Default)]
pub struct Manifests {
    files: BTreeMap<PathBuf, Parsed>,
}

impl Manifests {
    /// Reads `path` (a file, or every `.yaml`, `.yml` and `.json` file of a directory, in
    /// name order; later files win on the same object).
    pub fn load(&mut self, path: &Path) -> Result<(Cluster, Vec<Defect>), AgentError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(AgentError::io(format!("reading {}", path.display())))?;
        let files: Vec<PathBuf> = if meta.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(AgentError::io(format!("listing {}", path.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
                        && !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
                })
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_path_buf()]
        };
        let mut fresh = BTreeMap::new();
        for file in files {
            let m =
                std::fs::metadata(&file).map_err(AgentError::io(format!("reading {}", file.display())))?;
            let stamp = (m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime() as u64);
            let parsed = match self.files.remove(&file) {
                Some(p) if p.stamp == stamp => p,
                _ => {
                    let text = std::fs::read_to_string(&file)
                        .map_err(AgentError::io(format!("reading {}", file.display())))?;
                    let mut objects = Cluster::default();
                    let mut defects = Vec::new();
                    parse_into(&text, &file.display().to_string(), &mut objects, &mut defects)
                        .map_err(|e| AgentError::source("parse", e))?;
                    Parsed { stamp, objects, defects }
                }
            };
            fresh.insert(file, parsed);
        }
        self.files = fresh;
        let mut cluster = Cluster::default();
        let mut defects = Vec::new();
        for p in self.files.values() {
            cluster.pods.extend(p.objects.pods.iter().map(|(k, v)| (k.clone(), v.clone())));
            cluster.namespaces.extend(p.objects.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())));
            cluster.policies.extend(p.objects.policies.iter().map(|(k, v)| (k.clone(), v.clone())));
            defects.extend(p.defects.iter().cloned());
        }
        // Namespaces named only by pods or policies still carry their name label. Pods come
        // sorted by namespace, so each name is looked up about once.
        let mut missing: Vec<&String> = Vec::new();
        let named = cluster
            .pods
            .values()
            .map(|p| &p.namespace)
            .chain(cluster.policies.values().map(|p| &p.namespace));
        for ns in named {
            if missing.last() != Some(&ns) && !cluster.namespaces.contains_key(ns) {
                missing.push(ns);
            }
        }
        let missing: Vec<String> = missing.into_iter().cloned().collect();
        for ns in missing {
            cluster
                .namespaces
                .entry(ns.clone())
                .or_insert_with(|| Arc::new(Namespace::new(&ns, BTreeMap::new())));
        }
        Ok((cluster, defects))
    }
}

/// Reads `path` once (see [`Manifests::load`]).
pub fn load(path: &Path) -> Result<(Cluster, Vec<Defect>), AgentError> {
    Manifests::default().load(path)
}

/// The `file` policy source: publishes what `path` holds now and after every change, until
/// the channel closes. An unreadable or half-written manifest keeps the last good view.
pub async fn run(
    path: PathBuf,
    tx: watch::Sender<Option<Arc<Cluster>>>,
    metrics: Arc<Metrics>,
) -> Result<(), AgentError> {
    let watch = PathWatch::new(
        &path,
        AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE,
    )?;
    let path = watch.path.clone();
    let mut seen = BTreeMap::new();
    let mut manifests = Manifests::default();
    let mut reload = || match (std::time::Instant::now(), manifests.load(&path)) {
        (loading, Ok((cluster, defects))) => {
            let load_us = loading.elapsed().as_micros() as u64;
            let started = std::time::Instant::now();
            super::report(&defects, &mut seen, &metrics);
            let cluster = Arc::new(cluster);
            tx.send_if_modified(|cur| {
                if cur.as_deref() == Some(&*cluster) {
                    false
                } else {
                    *cur = Some(cluster);
                    true
                }
            });
            tracing::debug!(
                load_us,
                compare_us = started.elapsed().as_micros() as u64,
                "policy manifests read"
            );
        }
        (_, Err(e)) => tracing::warn!(%e, "policy manifests not usable; keeping the last good view"),
    };
    reload();
    loop {
        watch.changed().await?;
        reload();
        if tx.is_closed() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_documents_lists_and_skips_what_is_malformed() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {pod: a}}
  spec: {nodeName: n1, containers: [{name: c, ports: [{name: serve-80-tcp, containerPort: 80}]}]}
  status: {podIPs: [{ip: 10.244.1.5}, {ip: 'fd00::5'}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: deny, namespace: x}
  spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: not-a-cidr}}]}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
";
        let mut cluster = Cluster::default();
        let mut defects = Vec::new();
        parse_into(text, "t.yaml", &mut cluster, &mut defects).unwrap();
        assert_eq!(cluster.namespaces["x"].labels["team"], "a");
        assert_eq!(cluster.namespaces["x"].labels["kubernetes.io/metadata.name"], "x");
        let pod = &cluster.pods["x/a"];
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.ports[0].name, "serve-80-tcp");
        assert_eq!(
            cluster.policies["x/deny"].ingress,
            Some(vec![]),
            "the bad rule is left out, the policy still isolates"
        );
        assert_eq!(defects.len(), 1, "{defects:?}");
        assert!(parse_into("a: [", "bad.yaml", &mut cluster, &mut defects).is_err());
    }
}
