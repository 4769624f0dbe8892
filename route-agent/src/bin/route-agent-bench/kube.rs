//! `route-agent-bench kube N`: the kubernetes source at cluster size. N other nodes' Node
//! objects, each as big as a kubelet leaves it (40 images, conditions, managed fields), served
//! in pages of 500 by the tests' API server stand-in (`tests/kube_api`), listening inside the
//! agent's node namespace; then single Nodes ADDED on the watch. Measured on finished work:
//! ready is `/readyz` 200 *and* every route in a dump of the kernel's routes; a change is
//! timed until the kernel's own route lookup answers through the new node.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use serde_json::{json, Value};

use super::host::{
    cpu_ms, http_get, in_ns, ip, metric, node_addr, node_ns, pod_cidr, spawn_agent, status_kb, wait_for,
};

// The tests' API server stand-in: it uses only the package's dependencies, none of the tests.
#[path = "../../../tests/kube_api/mod.rs"]
mod kube_api;
use kube_api::{StandIn, NODES};

/// Nodes ADDED one at a time after ready, each timed to its route in the kernel.
const SAMPLES: u32 = 20;

/// Goals of issue 22 (section 5): (ready, RSS, one change), for up to 5,000 nodes and above.
fn goals(nodes: u32) -> (Duration, u64, Duration) {
    if nodes <= 5000 {
        (Duration::from_secs(1), 64, Duration::from_millis(50))
    } else {
        (Duration::from_secs(3), 128, Duration::from_millis(100))
    }
}

/// A stable pseudo-random hex string, so that no two images' digests are alike.
fn hex(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut s = String::with_capacity(len);
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s.truncate(len);
    s
}

/// Images a node of a busy cluster holds: system images and a spread of application ones.
const IMAGES: [(&str, &str); 40] = [
    ("registry.k8s.io/kube-proxy", "v1.33.1"),
    ("registry.k8s.io/pause", "3.10"),
    ("registry.k8s.io/coredns/coredns", "v1.12.0"),
    ("registry.k8s.io/metrics-server/metrics-server", "v0.7.2"),
    ("registry.k8s.io/ingress-nginx/controller", "v1.12.1"),
    ("registry.k8s.io/sig-storage/csi-node-driver-registrar", "v2.13.0"),
    ("registry.k8s.io/sig-storage/livenessprobe", "v2.15.0"),
    ("registry.k8s.io/provider-aws/aws-ebs-csi-driver", "v1.41.0"),
    ("quay.io/prometheus/node-exporter", "v1.9.1"),
    ("quay.io/prometheus/prometheus", "v3.3.0"),
    ("quay.io/prometheus-operator/prometheus-config-reloader", "v0.82.0"),
    ("docker.io/grafana/grafana", "11.6.0"),
    ("docker.io/grafana/promtail", "3.4.3"),
    ("docker.io/grafana/loki", "3.4.3"),
    ("quay.io/jetstack/cert-manager-controller", "v1.17.2"),
    ("quay.io/jetstack/cert-manager-cainjector", "v1.17.2"),
    ("quay.io/jetstack/cert-manager-webhook", "v1.17.2"),
    ("docker.io/library/nginx", "1.27.5-alpine"),
    ("docker.io/library/redis", "7.4.3-alpine"),
    ("docker.io/library/postgres", "17.4-bookworm"),
    ("docker.io/library/busybox", "1.37.0"),
    ("docker.io/bitnami/kafka", "3.9.0-debian-12-r12"),
    ("docker.io/bitnami/zookeeper", "3.9.3-debian-12-r10"),
    ("docker.io/fluent/fluent-bit", "4.0.1"),
    ("ghcr.io/external-secrets/external-secrets", "v0.16.1"),
    ("ghcr.io/kyverno/kyverno", "v1.14.1"),
    ("ghcr.io/kyverno/kyvernopre", "v1.14.1"),
    ("registry.example.com/payments/api-gateway", "2025.05.14-7f3c2a1"),
    ("registry.example.com/payments/ledger-service", "2025.05.12-1b9e0d4"),
    ("registry.example.com/payments/fraud-scoring", "2025.05.09-c4a7e21"),
    ("registry.example.com/catalog/search-indexer", "2025.05.15-9d2f6b8"),
    ("registry.example.com/catalog/product-api", "2025.05.15-0e8a3c5"),
    ("registry.example.com/catalog/image-resizer", "2025.04.30-5b1d7f2"),
    ("registry.example.com/accounts/session-service", "2025.05.13-a2c9e4f"),
    ("registry.example.com/accounts/profile-api", "2025.05.11-3f7b1a9"),
    ("registry.example.com/platform/feature-flags", "2025.05.02-8e4d2c6"),
    ("registry.example.com/platform/audit-log-shipper", "2025.04.28-6a0f9b3"),
    ("registry.example.com/data/etl-runner", "2025.05.10-d1e5a8c"),
    ("registry.example.com/data/notebook-gateway", "2025.05.07-4c8b0e2"),
    ("registry.example.com/ml/inference-server", "2025.05.14-b7f3d91"),
];

/// Node `number` as a kubelet on a cloud VM leaves it: labels and annotations of kubeadm and
/// the cloud provider, managed fields of its three writers, capacity, conditions, addresses,
/// node info and 40 images. Its routing fields: pod CIDR `pod_cidr(number)`, InternalIP
/// `node_addr(number)`.
fn node_json(number: u32, rv: u64) -> Value {
    let name = format!("node-{number}");
    let cidr = pod_cidr(number);
    let zone = ["eu-west-1a", "eu-west-1b", "eu-west-1c"][number as usize % 3];
    let instance = format!("i-0{}", hex(u64::from(number), 16));
    let beat = "2025-06-01T10:04:12Z";
    let images: Vec<Value> = IMAGES
        .iter()
        .enumerate()
        .map(|(i, (repo, tag))| {
            let seed = (u64::from(number) << 8) + i as u64;
            json!({
                "names": [format!("{repo}@sha256:{}", hex(seed, 64)), format!("{repo}:{tag}")],
                "sizeBytes": 3_000_000 + (seed * 7_919_993) % 900_000_000,
            })
        })
        .collect();
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "lastHeartbeatTime": beat,
               "lastTransitionTime": "2025-01-01T00:00:10Z", "reason": reason, "message": message})
    };
    let fields_condition = |kind: &str| {
        (
            format!("k:{{\"type\":\"{kind}\"}}"),
            json!({".": {}, "f:lastHeartbeatTime": {}, "f:lastTransitionTime": {}, "f:message": {},
                   "f:reason": {}, "f:status": {}, "f:type": {}}),
        )
    };
    let mut conditions = serde_json::Map::new();
    conditions.insert(".".into(), json!({}));
    for kind in ["DiskPressure", "MemoryPressure", "PIDPressure", "Ready"] {
        let (k, v) = fields_condition(kind);
        conditions.insert(k, v);
    }
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": format!("{}-{}-4{}-8{}-{}", hex(u64::from(number) + 1, 8), hex(u64::from(number) + 2, 4),
                           hex(u64::from(number) + 3, 3), hex(u64::from(number) + 4, 3), hex(u64::from(number) + 5, 12)),
            "resourceVersion": rv.to_string(),
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/instance-type": "m6i.2xlarge",
                "beta.kubernetes.io/os": "linux",
                "failure-domain.beta.kubernetes.io/region": "eu-west-1",
                "failure-domain.beta.kubernetes.io/zone": zone,
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "m6i.2xlarge",
                "topology.kubernetes.io/region": "eu-west-1",
                "topology.kubernetes.io/zone": zone,
            },
            "annotations": {
                "csi.volume.kubernetes.io/nodeid": format!("{{\"ebs.csi.aws.com\":\"{instance}\"}}"),
                "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///var/run/containerd/containerd.sock",
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
            "managedFields": [
                {"manager": "kubeadm", "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:03Z",
                 "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:annotations": {"f:kubeadm.alpha.kubernetes.io/cri-socket": {}}}}},
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": "2025-01-01T00:00:05Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:annotations": {"f:node.alpha.kubernetes.io/ttl": {}}},
                              "f:spec": {"f:podCIDR": {}, "f:podCIDRs": {".": {}, format!("v:\"{cidr}\""): {}}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:02Z",
                 "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:csi.volume.kubernetes.io/nodeid": {},
                                                               "f:volumes.kubernetes.io/controller-managed-attach-detach": {}},
                                             "f:labels": {".": {}, "f:beta.kubernetes.io/arch": {},
                                                          "f:beta.kubernetes.io/instance-type": {},
                                                          "f:beta.kubernetes.io/os": {},
                                                          "f:failure-domain.beta.kubernetes.io/region": {},
                                                          "f:failure-domain.beta.kubernetes.io/zone": {},
                                                          "f:kubernetes.io/arch": {}, "f:kubernetes.io/hostname": {},
                                                          "f:kubernetes.io/os": {},
                                                          "f:node.kubernetes.io/instance-type": {},
                                                          "f:topology.kubernetes.io/region": {},
                                                          "f:topology.kubernetes.io/zone": {}}},
                              "f:spec": {"f:providerID": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": beat,
                 "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:allocatable": {"f:ephemeral-storage": {}, "f:memory": {}},
                                           "f:capacity": {"f:ephemeral-storage": {}, "f:memory": {}},
                                           "f:conditions": conditions,
                                           "f:images": {}, "f:nodeInfo": {"f:bootID": {}}}}}
            ]
        },
        "spec": {
            "podCIDR": cidr,
            "podCIDRs": [cidr],
            "providerID": format!("aws:///{zone}/{instance}"),
        },
        "status": {
            "capacity": {"cpu": "8", "ephemeral-storage": "104845292Ki", "hugepages-1Gi": "0",
                         "hugepages-2Mi": "0", "memory": "32386524Ki", "pods": "110"},
            "allocatable": {"cpu": "7910m", "ephemeral-storage": "95551679124", "hugepages-1Gi": "0",
                            "hugepages-2Mi": "0", "memory": "31369692Ki", "pods": "110"},
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": node_addr(number).to_string()},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": hex(u64::from(number) + 11, 32), "systemUUID": format!("ec2{}", hex(u64::from(number) + 12, 29)),
                "bootID": hex(u64::from(number) + 13, 36), "kernelVersion": "6.1.0-35-cloud-amd64",
                "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://1.7.24",
                "kubeletVersion": "v1.33.1", "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": "amd64"
            },
            "images": images,
        }
    })
}

fn bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("JSON"))
}

/// Routes of proto 168 in `ns`, as (destination, gateway).
fn kernel_routes(ns: &str) -> Vec<(String, String)> {
    ip(ns, &["route", "show", "proto", "168"])
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let dst = words.next()?.to_string();
            let via = words.skip_while(|w| *w != "via").nth(1)?.to_string();
            Some((dst, via))
        })
        .collect()
}

/// Whether the kernel's lookup of an address in node `number`'s pod CIDR goes through it.
fn routed(ns: &str, number: u32) -> bool {
    let cidr = pod_cidr(number);
    let probe = cidr.replace(".0/24", ".1");
    let out = Command::new("ip").args(["-n", ns, "route", "get", &probe]).output().expect("ip");
    out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains(&format!("via {} ", node_addr(number)))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

pub(crate) fn main(nodes: u32) {
    let (ready_goal, rss_goal, change_goal) = goals(nodes);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // node-0 is the agent's own; node-1..=node-N each want a route.
    let list_rv = u64::from(nodes) + 1000;
    let items: Vec<Bytes> = (0..=nodes).map(|n| bytes(&node_json(n, u64::from(n) + 100))).collect();
    let json_bytes: usize = items.iter().map(Bytes::len).sum();
    let per_node = json_bytes / items.len();

    let ns = node_ns();
    let dir = std::env::temp_dir().join(&ns.0);
    std::fs::create_dir_all(&dir).expect("dir");
    // The stand-in listens inside the node namespace, where the agent finds it on loopback.
    let listener = in_ns(&ns.0, || std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("into the namespace")
        .expect("bind");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let handle = rt.handle().clone();
    std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
    let mut api = {
        let _in_runtime = handle.enter();
        StandIn::start(listener, &[(NODES, kube_api::list("NodeList", list_rv as u32, vec![]))])
    };
    api.set_items(NODES, items);
    let (_kube_dir, kubeconfig) = kube_api::kubeconfig("bench", api.port);

    let agent = std::env::current_exe().expect("exe").with_file_name("cni-route-agent");
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut cmd = Command::new(&agent);
    cmd.args([
        "--node-name",
        "node-0",
        "--source",
        "kubernetes",
        "--network-policy=false",
        "--no-masquerade",
    ])
    .arg("--kubeconfig")
    .arg(&kubeconfig)
    .arg("--cni-conf-dir")
    .arg(dir.join("cni"))
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(log);
    let start = Instant::now();
    let child = spawn_agent(&ns, cmd);
    let pid = child.0.id();

    // Ready: the agent says so, and a dump of the kernel shows every node's route through it.
    let limit = Duration::from_secs(120);
    wait_for("/readyz 200", limit, || http_get(&ns.0, "/readyz").is_some_and(|(s, _)| s == 200));
    let said_ready = start.elapsed();
    let want: std::collections::BTreeSet<(String, String)> =
        (1..=nodes).map(|n| (pod_cidr(n), node_addr(n).to_string())).collect();
    let mut missing_at_readyz = None;
    wait_for("every route in the kernel", limit, || {
        let have: std::collections::BTreeSet<_> = kernel_routes(&ns.0).into_iter().collect();
        missing_at_readyz.get_or_insert(want.difference(&have).count());
        want.is_subset(&have)
    });
    let to_ready = start.elapsed();
    let rss_ready = status_kb(pid, "VmRSS:");
    let cpu_ready = cpu_ms(pid);
    let first_sync = metric(&ns.0, "sync_duration_seconds").unwrap_or(f64::NAN);

    // One new Node at a time on the watch, timed to its route in the kernel.
    let (watch, _) = handle.block_on(api.next_watch(NODES));
    let mut changes = Vec::new();
    let cpu_before = cpu_ms(pid);
    for i in 1..=SAMPLES {
        std::thread::sleep(Duration::from_millis(300));
        let number = nodes + i;
        let node = node_json(number, list_rv + u64::from(i));
        let sent = Instant::now();
        watch.send("ADDED", node);
        wait_for("the added Node's route", Duration::from_secs(10), || routed(&ns.0, number));
        changes.push(sent.elapsed());
    }
    let cpu_per_change = (cpu_ms(pid) - cpu_before) / f64::from(SAMPLES);
    let change_sync = metric(&ns.0, "sync_duration_seconds").unwrap_or(f64::NAN);
    let in_kernel = kernel_routes(&ns.0).len();
    let sync_errors = metric(&ns.0, "sync_errors_total").unwrap_or(f64::NAN);
    let rss = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");
    drop(child);
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let error_lines: Vec<&str> = log_text.lines().filter(|l| l.to_lowercase().contains("error")).collect();
    let warn_lines = log_text.lines().filter(|l| l.contains(" WARN ")).count();
    let _ = std::fs::remove_dir_all(&dir);

    changes.sort();
    let (p50, max) = (percentile(&changes, 0.5), changes[changes.len() - 1]);
    let pass = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let mib = |kb: u64| kb as f64 / 1024.0;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let pages = (nodes as usize + 1).div_ceil(500);
    println!("cni-route-agent at cluster size: {nodes} nodes (kubernetes source), one node namespace");
    println!(
        "command: target/release/route-agent-bench kube {nodes}   (kernel {}, load average at start {})",
        kernel.trim(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "Node objects: {per_node} bytes of JSON each (40 images, 4 conditions, 4 managed fields), \
         {} nodes in {pages} pages of 500: {:.1} MB listed",
        nodes + 1,
        json_bytes as f64 / 1e6
    );
    println!("| metric | value | target | |");
    println!("|---|---|---|---|");
    println!(
        "| routes in the kernel (proto 168) at the end | {in_kernel} | {} | {} |",
        nodes + SAMPLES,
        pass(in_kernel == (nodes + SAMPLES) as usize)
    );
    println!(
        "| start to ready (/readyz 200 and every route in a kernel dump) | {} | < {} | {} |",
        ms(to_ready),
        ms(ready_goal),
        pass(to_ready < ready_goal)
    );
    println!(
        "| of which: /readyz 200 / routes missing from the dump then | {} / {} | 0 missing | {} |",
        ms(said_ready),
        missing_at_readyz.unwrap_or(0),
        pass(missing_at_readyz == Some(0))
    );
    println!("| first sync (agent's own timing) | {:.0} ms | | |", first_sync * 1e3);
    println!("| agent CPU time (user + system) to ready | {cpu_ready:.0} ms | | |");
    println!(
        "| agent RSS at ready / peak (VmHWM) | {:.1} / {:.1} MiB (now {:.1}) | < {rss_goal} MiB | {} |",
        mib(rss_ready),
        mib(hwm),
        mib(rss),
        pass(hwm < rss_goal * 1024)
    );
    println!(
        "| one Node ADDED on the watch to its route in the kernel, p50 / max (n={SAMPLES}) | {} / {} | < {} | {} |",
        ms(p50),
        ms(max),
        ms(change_goal),
        pass(max < change_goal)
    );
    println!("| of which: the last one's sync (agent's own timing) | {:.0} ms | | |", change_sync * 1e3);
    println!("| agent CPU time per ADDED Node (user + system, mean) | {cpu_per_change:.1} ms | | |");
    println!(
        "| syncs with an error (sync_errors_total) | {sync_errors} | 0 | {} |",
        pass(sync_errors == 0.0)
    );
    println!(
        "| agent log lines saying \"error\" (WARN lines: {warn_lines}) | {} | 0 | {} |",
        error_lines.len(),
        pass(error_lines.is_empty())
    );
    for line in error_lines.iter().take(5) {
        let _ = writeln!(std::io::stdout(), "  log: {line}");
    }
}
