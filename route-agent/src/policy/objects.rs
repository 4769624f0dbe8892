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

impl Parsed {
    /// Reads and parses `file`, whose stamp is `stamp`.
    fn read(file: &Path, stamp: (u64, u64, i64, i64, u64)) -> Result<Parsed, AgentError> {
        let text =
            std::fs::read_to_string(file).map_err(AgentError::io(format!("reading {}", file.display())))?;
        let mut objects = Cluster::default();
        let mut defects = Vec::new();
        parse_into(&text, &file.display().to_string(), &mut objects, &mut defects)
            .map_err(|e| AgentError::source("parse", e))?;
        Ok(Parsed { stamp, objects, defects })
    }
}

/// Manifests under a path, each file parsed again only when it changed on disk: on a big
/// cluster kept as one file per namespace, a change costs one small file's parse.
#[derive(Debug, Default)]
pub struct Manifests {
    files: BTreeMap<PathBuf, Parsed>,
    /// The last view, kept while each of its objects comes from one file and each namespace
    /// its pods and policies name is listed: then a changed file updates it in place instead
    /// of every file's objects being merged again.
    merged: Option<Arc<Cluster>>,
    /// The last full read went through: `files` holds every file (a failed one may have
    /// dropped some, and then only a full read may follow).
    complete: bool,
}

impl Manifests {
    /// Reads `path` (a file, or every `.yaml`, `.yml` and `.json` file of a directory, in
    /// name order; later files win on the same object).
    pub fn load(&mut self, path: &Path) -> Result<(Cluster, Vec<Defect>), AgentError> {
        let (cluster, defects) = self.load_shared(path)?;
        Ok((Arc::unwrap_or_clone(cluster), defects))
    }

    /// The same, sharing the view with the next load.
    pub fn load_shared(&mut self, path: &Path) -> Result<(Arc<Cluster>, Vec<Defect>), AgentError> {
        let read = self.read_all(path);
        if read.is_err() {
            // A file taken out of `files` before the failure took its old objects with it:
            // the kept view may hold objects no file has any more, so the next read merges
            // every file again.
            self.merged = None;
        }
        read
    }

    fn read_all(&mut self, path: &Path) -> Result<(Arc<Cluster>, Vec<Defect>), AgentError> {
        use std::os::unix::fs::MetadataExt;
        self.complete = false;
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
        // What changed: the old objects of files changed or gone, the new files' names.
        let mut before: Vec<Parsed> = Vec::new();
        let mut after: Vec<PathBuf> = Vec::new();
        for file in files {
            let m =
                std::fs::metadata(&file).map_err(AgentError::io(format!("reading {}", file.display())))?;
            let stamp = (m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime() as u64);
            let parsed = match self.files.remove(&file) {
                Some(p) if p.stamp == stamp => p,
                old => {
                    before.extend(old);
                    after.push(file.clone());
                    Parsed::read(&file, stamp)?
                }
            };
            fresh.insert(file, parsed);
        }
        before.extend(std::mem::take(&mut self.files).into_values());
        self.files = fresh;
        self.complete = true;
        Ok(self.merge(before, after))
    }

    /// Like [`Manifests::load_shared`] after a change to the entries `names` of directory
    /// `path` only (what inotify reported): the rest is not looked at again, so a change costs
    /// one file's stat and parse however many files there are. Anything unusual (a first load,
    /// a name that is not a regular file) reads everything.
    pub fn load_names(
        &mut self,
        path: &Path,
        names: &[std::ffi::OsString],
    ) -> Result<(Arc<Cluster>, Vec<Defect>), AgentError> {
        let read = self.read_names(path, names);
        if read.is_err() {
            // The other files of the batch were read but not taken: no later event may name
            // them, so the next read looks at everything.
            self.complete = false;
        }
        read
    }

    fn read_names(
        &mut self,
        path: &Path,
        names: &[std::ffi::OsString],
    ) -> Result<(Arc<Cluster>, Vec<Defect>), AgentError> {
        use std::os::unix::fs::MetadataExt;
        // A mounted ConfigMap swaps its `..data` symlink: the manifests' own names (links
        // through it) see no event, so such a change reads everything.
        let swapped = names.iter().any(|n| n.as_encoded_bytes().starts_with(b".."));
        if !self.complete || swapped || !path.is_dir() {
            return self.load_shared(path);
        }
        let mut files: Vec<PathBuf> = names
            .iter()
            .map(|n| path.join(n))
            .filter(|p| {
                matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
                    && !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        files.sort();
        files.dedup();
        // Everything read and parsed before anything is changed: a half-written file keeps
        // the last good view, and its next event (the rename that completes it) comes again.
        let mut fresh: Vec<(PathBuf, Option<Parsed>)> = Vec::new();
        for file in files {
            let parsed = match std::fs::metadata(&file) {
                Ok(m) if m.is_file() => {
                    let stamp = (m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime() as u64);
                    if self.files.get(&file).is_some_and(|p| p.stamp == stamp) {
                        continue;
                    }
                    Some(Parsed::read(&file, stamp)?)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                _ => return self.load_shared(path),
            };
            fresh.push((file, parsed));
        }
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for (file, parsed) in fresh {
            before.extend(self.files.remove(&file));
            if let Some(p) = parsed {
                self.files.insert(file.clone(), p);
                after.push(file);
            }
        }
        Ok(self.merge(before, after))
    }

    /// The view after files `before` (their old objects) became `after` (names now in
    /// `self.files`): the kept view updated in place when that is exact, else every file's
    /// objects merged again.
    fn merge(&mut self, before: Vec<Parsed>, after: Vec<PathBuf>) -> (Arc<Cluster>, Vec<Defect>) {
        let defects: Vec<Defect> = self.files.values().flat_map(|p| p.defects.iter().cloned()).collect();
        if let Some(merged) = self.merged.take() {
            let new: Vec<&Cluster> =
                after.iter().filter_map(|f| self.files.get(f)).map(|p| &p.objects).collect();
            let old: Vec<&Cluster> = before.iter().map(|p| &p.objects).collect();
            if let Some(cluster) = patch_merged(merged, &old, &new) {
                self.merged = Some(Arc::clone(&cluster));
                return (cluster, defects);
            }
        }
        let mut cluster = Cluster::default();
        let mut count = 0;
        for p in self.files.values() {
            count += p.objects.pods.len() + p.objects.namespaces.len() + p.objects.policies.len();
            cluster.pods.extend(p.objects.pods.iter().map(|(k, v)| (k.clone(), v.clone())));
            cluster.namespaces.extend(p.objects.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())));
            cluster.policies.extend(p.objects.policies.iter().map(|(k, v)| (k.clone(), v.clone())));
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
        let whole = missing.is_empty()
            && count == cluster.pods.len() + cluster.namespaces.len() + cluster.policies.len();
        for ns in missing {
            cluster
                .namespaces
                .entry(ns.clone())
                .or_insert_with(|| Arc::new(Namespace::new(&ns, BTreeMap::new())));
        }
        let cluster = Arc::new(cluster);
        if whole {
            self.merged = Some(Arc::clone(&cluster));
        }
        (cluster, defects)
    }
}

/// `merged` with the objects of `old` files replaced by those of `new` ones; `None` when that
/// is not what merging every file would give (an object two files hold, a namespace named
/// but not listed).
fn patch_merged(mut merged: Arc<Cluster>, old: &[&Cluster], new: &[&Cluster]) -> Option<Arc<Cluster>> {
    let m = Arc::make_mut(&mut merged);
    for o in old {
        for k in o.pods.keys() {
            m.pods.remove(k)?;
        }
        for k in o.namespaces.keys() {
            m.namespaces.remove(k)?;
        }
        for k in o.policies.keys() {
            m.policies.remove(k)?;
        }
    }
    for n in new {
        for (k, v) in &n.pods {
            if m.pods.insert(k.clone(), Arc::clone(v)).is_some() {
                return None;
            }
        }
        for (k, v) in &n.namespaces {
            if m.namespaces.insert(k.clone(), Arc::clone(v)).is_some() {
                return None;
            }
        }
        for (k, v) in &n.policies {
            if m.policies.insert(k.clone(), Arc::clone(v)).is_some() {
                return None;
            }
        }
    }
    let listed = |ns: &String| m.namespaces.contains_key(ns);
    let named = new
        .iter()
        .flat_map(|n| n.pods.values().map(|p| &p.namespace).chain(n.policies.values().map(|p| &p.namespace)));
    if !named.into_iter().all(listed) {
        return None;
    }
    // A namespace that went away may still be named by another file's pods.
    for o in old {
        for ns in o.namespaces.keys() {
            if !m.namespaces.contains_key(ns)
                && (m.pods.values().any(|p| &p.namespace == ns)
                    || m.policies.values().any(|p| &p.namespace == ns))
            {
                return None;
            }
        }
    }
    Some(merged)
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
    // `names`: the directory entries inotify reported, `None` for "look at everything".
    let mut reload = |names: Option<Vec<std::ffi::OsString>>| match (
        std::time::Instant::now(),
        match names {
            Some(names) => manifests.load_names(&path, &names),
            None => manifests.load_shared(&path),
        },
    ) {
        (loading, Ok((cluster, defects))) => {
            let load_us = loading.elapsed().as_micros() as u64;
            let started = std::time::Instant::now();
            super::report(&defects, &mut seen, &metrics);
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
    reload(None);
    loop {
        let names = watch.changed_names().await?;
        reload(names);
        if tx.is_closed() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> String {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n---\n")
    }

    fn pod(ns: &str, name: &str, app: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: n1, containers: [{{name: c}}]}}\nstatus: {{podIPs: [{{ip: 10.0.0.1}}]}}\n---\n"
        )
    }

    /// A view kept across loads and updated from the changed files only is what reading
    /// every file again gives, whatever the change.
    #[test]
    fn a_view_updated_in_place_equals_one_read_whole() {
        let dir = std::env::temp_dir().join(format!("manifests-inplace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: String| {
            // A new inode and a new size: the file counts as changed even within one tick.
            let tmp = dir.join(format!(".{name}"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.join(name)).unwrap();
        };
        write("a.yaml", ns("a") + &pod("a", "p", "x"));
        write("b.yaml", ns("b") + &pod("b", "p", "x"));
        let mut kept = Manifests::default();
        let steps: Vec<Box<dyn Fn()>> = vec![
            Box::new(|| write("a.yaml", ns("a") + &pod("a", "p", "relabelled") + &pod("a", "q", "x"))),
            Box::new(|| write("b.yaml", ns("b"))),
            // The same pod in two files: the later file wins.
            Box::new(|| write("c.yaml", pod("a", "p", "from-c"))),
            Box::new(|| std::fs::remove_file(dir.join("c.yaml")).unwrap()),
            // A namespace no longer listed while its pods still are.
            Box::new(|| write("a.yaml", pod("a", "p", "x"))),
            Box::new(|| write("a.yaml", ns("a") + &pod("a", "p", "x"))),
            Box::new(|| write("d.yaml", pod("nowhere", "p", "x"))),
            Box::new(|| std::fs::remove_file(dir.join("d.yaml")).unwrap()),
        ];
        // One view kept by full reads, one by reads of the names inotify would report.
        let mut named = Manifests::default();
        assert_eq!(kept.load(&dir).unwrap(), load(&dir).unwrap());
        named.load_shared(&dir).unwrap();
        let touched = ["a.yaml", "b.yaml", "c.yaml", "c.yaml", "a.yaml", "a.yaml", "d.yaml", "d.yaml"];
        for (i, step) in steps.iter().enumerate() {
            step();
            let whole = load(&dir).unwrap();
            assert_eq!(kept.load(&dir).unwrap(), whole, "step {i}");
            let names = [std::ffi::OsString::from(touched[i]), ".tmp-name".into()];
            let (view, defects) = named.load_names(&dir, &names).unwrap();
            assert_eq!(((*view).clone(), defects), whole, "step {i}, by name");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A failed read never leaves objects in force that no file holds any more, and never
    /// loses the valid changes that came in the same batch as a broken file.
    #[test]
    fn a_failed_read_leaves_no_stale_object_and_loses_no_change() {
        let dir = std::env::temp_dir().join(format!("manifests-failed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let tmp = dir.join(format!(".{name}"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.join(name)).unwrap();
        };
        // The only file broken, then deleted, while another file appears.
        write("a.yaml", &(ns("a") + &pod("a", "p", "x")));
        let mut m = Manifests::default();
        m.load_shared(&dir).unwrap();
        write("a.yaml", "kind: [unterminated");
        assert!(m.load_shared(&dir).is_err());
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        write("b.yaml", &(ns("b") + &pod("b", "q", "y")));
        assert_eq!(m.load(&dir).unwrap(), load(&dir).unwrap(), "no stale objects after a failed read");
        // A valid change and a broken file in one batch, then the broken one fixed alone.
        write("a.yaml", &(ns("a") + &pod("a", "p", "x")));
        let mut m = Manifests::default();
        m.load_shared(&dir).unwrap();
        write("a.yaml", &(ns("a") + &pod("a", "p", "changed")));
        write("b.yaml", "kind: [unterminated");
        assert!(m.load_names(&dir, &["a.yaml".into(), "b.yaml".into()]).is_err());
        write("b.yaml", &(ns("b") + &pod("b", "q", "y")));
        let (view, defects) = m.load_names(&dir, &["b.yaml".into()]).unwrap();
        assert_eq!(((*view).clone(), defects), load(&dir).unwrap(), "the batch's valid change is kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A mounted ConfigMap changes by swapping its `..data` symlink; the manifests, links
    /// through it, see no event of their own, and the swap alone must bring their new text.
    #[test]
    fn a_configmap_swap_is_read_although_no_manifest_name_changed() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("manifests-configmap-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v1/p.yaml"), ns("a") + &pod("a", "p", "one")).unwrap();
        std::fs::write(dir.join("..v2/p.yaml"), ns("a") + &pod("a", "p", "two")).unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/p.yaml", dir.join("p.yaml")).unwrap();
        let mut m = Manifests::default();
        m.load_shared(&dir).unwrap();
        symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let (view, _) = m.load_names(&dir, &["..data".into()]).unwrap();
        assert_eq!(view.pods["a/p"].labels["app"], "two");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
