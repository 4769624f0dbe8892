//! deploy/: every manifest parses as its Kubernetes type with no field dropped (a typo'd or
//! misplaced field would be), the DaemonSet has what a CNI DaemonSet needs, the RBAC is
//! exactly read access to what the sources watch, and every flag, binary, path and image it
//! names exists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_cni-route-agent");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every YAML document of every manifest `kubectl apply -f deploy/` would apply, as JSON.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let y = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            docs.push((f.display().to_string(), serde_json::to_value(y).unwrap()));
        }
    }
    docs
}

/// Parses `v` as `T` and checks nothing was lost: serializing it back gives `v` again.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str, v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(&back, v, "{file}: a field was not understood by the Kubernetes type (typo or misplaced)");
    t
}

struct Objects {
    daemonsets: Vec<DaemonSet>,
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

fn objects() -> Objects {
    let mut o = Objects { daemonsets: vec![], accounts: vec![], roles: vec![], bindings: vec![] };
    for (file, v) in documents() {
        match v["kind"].as_str().unwrap_or("") {
            "DaemonSet" => o.daemonsets.push(typed(&file, &v)),
            "ServiceAccount" => o.accounts.push(typed(&file, &v)),
            "ClusterRole" => o.roles.push(typed(&file, &v)),
            "ClusterRoleBinding" => o.bindings.push(typed(&file, &v)),
            other => panic!("{file}: unexpected kind {other:?} in deploy/"),
        }
    }
    assert_eq!(o.daemonsets.len(), 1);
    o
}

fn daemonset() -> DaemonSet {
    objects().daemonsets.remove(0)
}

fn containers(ds: &DaemonSet) -> Vec<Container> {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.init_containers.clone().unwrap_or_default().into_iter().chain(pod.containers.clone()).collect()
}

/// The argv a container runs: command then args.
fn argv(c: &Container) -> Vec<String> {
    c.command.clone().unwrap_or_default().into_iter().chain(c.args.clone().unwrap_or_default()).collect()
}

/// Paths the image holds, from the Containerfile's `COPY src... dir/` lines, and whether the
/// image is built without a base.
fn image_files() -> (BTreeSet<String>, bool) {
    let cf = read("Containerfile");
    let mut files = BTreeSet::new();
    for line in cf.lines().filter_map(|l| l.strip_prefix("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (dest, srcs) = words.split_last().unwrap();
        if dest.ends_with('/') && *dest != "/" {
            for s in srcs {
                files.insert(format!("{dest}{}", Path::new(s).file_name().unwrap().to_str().unwrap()));
            }
        }
    }
    let scratch = cf.lines().filter(|l| l.starts_with("FROM ")).all(|l| l.trim() == "FROM scratch");
    (files, scratch)
}

#[test]
fn the_daemonset_is_a_node_critical_host_network_pod_without_privilege() {
    let ds = daemonset();
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerates_all = pod
        .tolerations
        .unwrap_or_default()
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none());
    assert!(tolerates_all, "a toleration {{operator: Exists}} without key or effect: every taint");
    for c in containers(&ds) {
        let sc = c.security_context.clone().unwrap_or_default();
        assert_ne!(sc.privileged, Some(true), "{}: not privileged", c.name);
        let requests = c.resources.as_ref().and_then(|r| r.requests.clone()).unwrap_or_default();
        assert!(requests.contains_key("cpu") && requests.contains_key("memory"), "{}: requests", c.name);
    }
    let agent = &pod.containers[0];
    let caps: BTreeSet<String> = agent
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert_eq!(caps, BTreeSet::from(["NET_ADMIN".to_string(), "NET_RAW".to_string()]));
    let node_name = agent.env.clone().unwrap_or_default().into_iter().find(|e| e.name == "NODE_NAME");
    let field = node_name.and_then(|e| e.value_from).and_then(|v| v.field_ref).map(|f| f.field_path);
    assert_eq!(field.as_deref(), Some("spec.nodeName"), "NODE_NAME from the downward API");
}

#[test]
fn host_paths_are_mounted_where_the_plugins_and_the_agent_use_them() {
    let ds = daemonset();
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let host_path = |vol: &str| -> Option<String> {
        let v = pod.volumes.as_ref()?.iter().find(|v| v.name == vol)?;
        v.host_path.as_ref().map(|h| h.path.clone())
    };
    // (host path, container, where the container must see it)
    let init = &pod.init_containers.as_ref().expect("an init container installs the plugins")[0];
    let init_argv = argv(init);
    let bin_dir = init_argv.iter().skip_while(|a| *a != "--bin-dir").nth(1).cloned().expect("--bin-dir");
    assert_eq!(&init_argv[1], "install-cni");
    let wanted = [
        ("/opt/cni/bin", init, bin_dir.as_str()),
        ("/etc/cni/net.d", &pod.containers[0], "/etc/cni/net.d"),
        ("/var/lib/cni", &pod.containers[0], "/var/lib/cni"),
    ];
    for (host, c, at) in wanted {
        let mounted = c
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .iter()
            .any(|m| m.mount_path == at && host_path(&m.name).as_deref() == Some(host));
        assert!(mounted, "{}: hostPath {host} mounted at {at}", c.name);
    }
    // The agent's own paths are under those mounts.
    let agent_argv = argv(&pod.containers[0]);
    for (flag, under) in [("--cni-conf-dir", "/etc/cni/net.d"), ("--ipam-data-dir", "/var/lib/cni")] {
        let v = agent_argv.iter().find_map(|a| a.strip_prefix(&format!("{flag}="))).expect(flag);
        assert!(v.starts_with(under), "{flag}={v} is under the {under} mount");
    }
}

#[test]
fn probes_reach_the_agent_on_the_nodes_loopback() {
    let ds = daemonset();
    let agent = ds.spec.unwrap().template.spec.unwrap().containers.remove(0);
    let listen = argv(&agent)
        .iter()
        .find_map(|a| a.strip_prefix("--listen=").map(str::to_string))
        .unwrap_or_else(|| "127.0.0.1:9645".into());
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    for (probe, path) in [(&agent.liveness_probe, "/healthz"), (&agent.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.clone()).expect("an httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        // hostNetwork: kubelet would probe the node IP, where a loopback listener is not.
        assert_eq!(get.host.as_deref(), Some(addr.ip().to_string().as_str()), "probe host = listen address");
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(addr.port() as i32)
        );
    }
}

#[test]
fn rbac_is_exactly_read_access_to_what_the_sources_watch_for_the_daemonsets_account() {
    let o = objects();
    let pod = o.daemonsets[0].spec.as_ref().unwrap().template.spec.clone().unwrap();
    let sa_name = pod.service_account_name.expect("serviceAccountName");
    let sa =
        o.accounts.iter().find(|a| a.metadata.name.as_deref() == Some(&sa_name)).expect("the ServiceAccount");
    assert_eq!(sa.metadata.namespace.as_deref(), Some("kube-system"));
    assert_eq!(o.roles.len(), 1);
    // Every (group, resource, verb) the ClusterRole grants.
    let mut granted = BTreeSet::new();
    for rule in o.roles[0].rules.clone().unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for g in rule.api_groups.clone().unwrap_or_default() {
            for r in rule.resources.clone().unwrap_or_default() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    // What the sources watch: Nodes (kube.rs) and the policy source's resources; get, list
    // and watch each (list + watch by the watcher; get is the usual read triple).
    let watched = [("", "nodes")].into_iter().chain(cni_route_agent::sources::kube_policy::RESOURCES);
    let want: BTreeSet<(String, String, String)> = watched
        .flat_map(|(g, r)| ["get", "list", "watch"].map(|v| (g.to_string(), r.to_string(), v.to_string())))
        .collect();
    assert_eq!(granted, want, "the ClusterRole grants exactly read access to what the sources watch");
    let b = &o.bindings[0];
    assert_eq!(
        (b.role_ref.kind.as_str(), b.role_ref.name.as_str()),
        ("ClusterRole", o.roles[0].metadata.name.as_deref().unwrap())
    );
    let subject = &b.subjects.as_ref().unwrap()[0];
    assert_eq!((subject.kind.as_str(), subject.name.as_str()), ("ServiceAccount", sa_name.as_str()));
    assert_eq!(subject.namespace.as_deref(), Some("kube-system"));
    // What the code asks the API server for: Node objects (kube.rs), and the policy source's
    // three views, whose resources its unit tests tie to `RESOURCES`.
    let apis = |file: &str, open: &str| -> BTreeSet<String> {
        let text = read(file);
        text.match_indices(open)
            .map(|(i, _)| text[i..i + text[i..].find('>').unwrap() + 1].to_string())
            .collect()
    };
    // (NodeView is Node's resource decoded into the fields routing needs.)
    assert_eq!(
        apis("route-agent/src/sources/kube.rs", "Api<"),
        BTreeSet::from(["Api<NodeView>".to_string()])
    );
    use kube::Resource as _;
    assert_eq!(cni_route_agent::sources::kube::NodeView::plural(&()), "nodes");
    assert_eq!(
        apis("route-agent/src/sources/kube_policy.rs", "Api::<"),
        ["Api::<PodView>", "Api::<NamespaceView>", "Api::<PolicyView>"].map(String::from).into(),
        "the RBAC covers every resource the policy source reads"
    );
    let policy_src = read("route-agent/src/sources/kube_policy.rs");
    assert!(!policy_src.contains("Api<"), "the policy source names its APIs as Api::<View>");
}

#[test]
fn every_flag_the_manifests_pass_exists_in_help() {
    for c in containers(&daemonset()) {
        let argv = argv(&c);
        let sub: Vec<&str> =
            argv.get(1).filter(|a| !a.starts_with('-')).map(|s| vec![s.as_str()]).unwrap_or_default();
        let out = Command::new(AGENT).args(&sub).arg("--help").output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in argv.iter().filter(|a| a.starts_with("--")) {
            let name = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{name} ")),
                "{}: {name} is not in `cni-route-agent {sub:?} --help`",
                c.name
            );
        }
    }
}

#[test]
fn every_binary_and_image_named_exists_in_the_image() {
    let (files, scratch) = image_files();
    assert!(scratch, "FROM scratch only: no base image to pull");
    let tag = read("scripts/image").lines().find_map(|l| l.split("TAG=").nth(1).map(str::to_string)).unwrap();
    let kind_up = read("scripts/kind-up");
    for c in containers(&daemonset()) {
        assert_eq!(c.image.as_deref(), Some(tag.as_str()), "{}: the image scripts/image builds", c.name);
        assert!(kind_up.contains(&tag), "scripts/kind-up loads {tag}");
        let exe = &argv(&c)[0];
        assert!(files.contains(exe), "{}: {exe} is in the image ({files:?})", c.name);
        // install-cni takes the plugins from the directory of its own executable.
        let dir = Path::new(exe).parent().unwrap().display().to_string();
        for p in cni_route_agent::install::PLUGINS {
            assert!(files.contains(&format!("{dir}/{p}")), "{p} beside {exe} in the image");
        }
    }
}

#[test]
fn kind_configs_disable_the_default_cni_with_pod_subnets_per_family() {
    for (file, family, subnets) in
        [("deploy/kind/cluster.yaml", "ipv4", 1), ("deploy/kind/cluster-dual.yaml", "dual", 2)]
    {
        let v: serde_yaml::Value = serde_yaml::from_str(&read(file)).unwrap();
        let net = &v["networking"];
        assert_eq!(v["kind"].as_str(), Some("Cluster"), "{file}");
        assert_eq!(net["disableDefaultCNI"].as_bool(), Some(true), "{file}");
        assert_eq!(net["ipFamily"].as_str(), Some(family), "{file}");
        let pods: Vec<ipnetwork::IpNetwork> =
            net["podSubnet"].as_str().unwrap().split(',').map(|s| s.trim().parse().unwrap()).collect();
        assert_eq!(pods.len(), subnets, "{file}: podSubnet");
        assert!(
            v["nodes"].as_sequence().unwrap().len() >= 2,
            "{file}: pod-to-pod across nodes needs 2 nodes"
        );
    }
}
