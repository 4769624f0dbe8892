//! A stand-in for the Kubernetes API server (no kube-apiserver can be installed here): for
//! each resource path it serves a list (which the test can change, or hold back), and watch
//! streams whose events the test sends one by one. It listens where the test's listener was
//! bound: 127.0.0.1 of the test process, or inside a test network namespace. A list asked with
//! `limit` is paged as the API server pages it (`metadata.continue`). `route-agent-bench kube`
//! serves its cluster-size Node lists with it too, so it uses nothing of the test crates.

#![allow(dead_code)] // each test crate uses its part

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::StreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::watch;

pub const LIMIT: Duration = Duration::from_secs(20);

pub const PODS: &str = "/api/v1/pods";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
pub const NODES: &str = "/api/v1/nodes";

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A list as served: everything but its items, and each item already serialized, so that a
/// page of a 20,000-item list is a copy of bytes, not a serialization.
struct Listed {
    head: serde_json::Map<String, Value>,
    items: Vec<Bytes>,
}

impl Listed {
    fn new(list: &Value) -> Listed {
        let mut head = list.as_object().cloned().unwrap_or_default();
        let items = match head.remove("items") {
            Some(Value::Array(items)) => items.iter().map(bytes).collect(),
            _ => Vec::new(),
        };
        Listed { head, items }
    }

    /// The page from item `from`, at most `limit` items (all without one), with
    /// `metadata.continue` naming the next page's first item while there is one.
    fn page(&self, from: usize, limit: Option<usize>) -> Bytes {
        let from = from.min(self.items.len());
        let to = limit.map_or(self.items.len(), |l| from.saturating_add(l.max(1)).min(self.items.len()));
        let mut head = self.head.clone();
        if to < self.items.len() {
            let meta = head.entry("metadata").or_insert_with(|| json!({}));
            meta["continue"] = json!(to.to_string());
        }
        let mut out = serde_json::to_vec(&head).expect("JSON");
        out.pop(); // the closing brace: the items go in before it
        if !head.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"\"items\":[");
        for (i, item) in self.items[from..to].iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(item);
        }
        out.extend_from_slice(b"]}");
        Bytes::from(out)
    }
}

/// `limit` and `continue` of a list query.
fn paging(query: &str) -> (usize, Option<usize>) {
    let param = |name: &str| {
        query.split('&').find_map(|p| p.strip_prefix(name)?.strip_prefix('=')?.parse::<usize>().ok())
    };
    (param("continue").unwrap_or(0), param("limit"))
}

/// One resource the stand-in serves.
struct Served {
    /// What the next list returns.
    list: Mutex<Listed>,
    /// While true, list requests wait.
    held: watch::Sender<bool>,
    /// One sender per watch request, for the events of that stream.
    watch_tx: mpsc::UnboundedSender<mpsc::UnboundedSender<Bytes>>,
}

pub struct StandIn {
    pub port: u16,
    /// (path, query) of every request, in order.
    pub queries: Arc<Mutex<Vec<(String, String)>>>,
    served: Arc<BTreeMap<String, Served>>,
    watches: BTreeMap<String, mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>>,
}

fn bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("JSON"))
}

fn not_found() -> Response<Body> {
    Response::builder().status(404).body(Full::new(Bytes::new()).boxed_unsync()).expect("response")
}

impl StandIn {
    /// Serves `lists` (path, list object) on `listener`.
    pub fn start(listener: std::net::TcpListener, lists: &[(&str, Value)]) -> StandIn {
        listener.set_nonblocking(true).expect("nonblocking listener");
        let port = listener.local_addr().expect("bound").port();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let mut served = BTreeMap::new();
        let mut watches = BTreeMap::new();
        for (path, list) in lists {
            let (watch_tx, rx) = mpsc::unbounded();
            let (held, _) = watch::channel(false);
            served.insert(path.to_string(), Served { list: Mutex::new(Listed::new(list)), held, watch_tx });
            watches.insert(path.to_string(), rx);
        }
        let served = Arc::new(served);
        let queries = Arc::new(Mutex::new(Vec::new()));
        let (q, s) = (queries.clone(), served.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else { return };
                let (q, s) = (q.clone(), s.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (q, s) = (q.clone(), s.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let query = req.uri().query().unwrap_or_default().to_string();
                        q.lock().unwrap().push((path.clone(), query.clone()));
                        let Some(r) = s.get(&path) else { return Ok::<_, Infallible>(not_found()) };
                        let body: Body = if query.split('&').any(|p| p == "watch=true") {
                            // No content length: hyper sends the events as they come, chunked.
                            let (tx, rx) = mpsc::unbounded::<Bytes>();
                            let _ = r.watch_tx.unbounded_send(tx);
                            StreamBody::new(rx.map(|b| Ok(Frame::data(b)))).boxed_unsync()
                        } else {
                            let mut held = r.held.subscribe();
                            let _ = held.wait_for(|h| !h).await;
                            let (from, limit) = paging(&query);
                            Full::new(r.list.lock().unwrap().page(from, limit)).boxed_unsync()
                        };
                        Ok(Response::builder()
                            .header("content-type", "application/json")
                            .body(body)
                            .expect("response"))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), svc)
                        .await;
                });
            }
        });
        StandIn { port, queries, served, watches }
    }

    /// On 127.0.0.1 of the test process.
    pub fn on_loopback(lists: &[(&str, Value)]) -> StandIn {
        StandIn::start(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"), lists)
    }

    /// What the next list of `path` returns.
    pub fn set_list(&self, path: &str, list: Value) {
        *self.served[path].list.lock().unwrap() = Listed::new(&list);
    }

    /// The items of the next list of `path`, serialized already (the rest of the list stays).
    pub fn set_items(&self, path: &str, items: Vec<Bytes>) {
        self.served[path].list.lock().unwrap().items = items;
    }

    /// Lists of `path` wait until [`StandIn::release`].
    pub fn hold(&self, path: &str) {
        self.served[path].held.send_replace(true);
    }

    pub fn release(&self, path: &str) {
        self.served[path].held.send_replace(false);
    }

    /// The next watch request on `path` (bounded wait), and its query.
    pub async fn next_watch(&mut self, path: &str) -> (Watch, String) {
        let rx = self.watches.get_mut(path).expect("a served path");
        let tx = tokio::time::timeout(LIMIT, rx.next())
            .await
            .unwrap_or_else(|_| panic!("no watch of {path} in time"))
            .expect("stand-in alive");
        let q = self.queries.lock().unwrap();
        let query =
            q.iter().rev().find(|(p, q)| p == path && q.contains("watch=true")).map(|(_, q)| q.clone());
        (Watch(tx), query.unwrap_or_default())
    }

    /// Queries of the requests on `path`.
    pub fn queries_of(&self, path: &str) -> Vec<String> {
        self.queries.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, q)| q.clone()).collect()
    }
}

/// One watch stream of the stand-in.
pub struct Watch(mpsc::UnboundedSender<Bytes>);

impl Watch {
    pub fn send(&self, kind: &str, object: Value) {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
        line.push(b'\n');
        self.0.unbounded_send(Bytes::from(line)).expect("the watch is open");
    }

    /// 410 Gone: the client must list again.
    pub fn gone(&self) {
        self.send(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "too old resource version", "reason": "Expired", "code": 410}),
        );
    }
}

/// A list object.
pub fn list(kind: &str, rv: u32, items: Vec<Value>) -> Value {
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items})
}

/// A running pod as the API server has it, bulky fields included.
pub fn pod(ns: &str, name: &str, rv: u32, node: &str, labels: Value, ips: &[&str]) -> Value {
    let mut status = json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2025-01-01T00:00:05Z"}],
        "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0,
                               "image": "registry.example/web:1", "imageID": "sha256:aa",
                               "state": {"running": {"startedAt": "2025-01-01T00:00:04Z"}}}],
        "hostIP": "10.200.0.11",
        "startTime": "2025-01-01T00:00:01Z"
    });
    if let Some(first) = ips.first() {
        status["podIP"] = json!(first);
        status["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
    }
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": ns, "resourceVersion": rv.to_string(),
            "uid": format!("uid-{ns}-{name}"), "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}"},
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                               "time": "2025-01-01T00:00:05Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:status": {}}}]
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "registry.example/web:1",
                            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                            "resources": {"requests": {"cpu": "10m"}}}],
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "serviceAccountName": "default"
        },
        "status": status
    })
}

pub fn namespace(name: &str, rv: u32, labels: Value) -> Value {
    json!({
        "kind": "Namespace", "apiVersion": "v1",
        "metadata": {"name": name, "resourceVersion": rv.to_string(), "labels": labels,
                     "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

pub fn policy(ns: &str, name: &str, rv: u32, spec: Value) -> Value {
    json!({
        "kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string(),
                     "generation": 1, "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": spec
    })
}

pub fn node(name: &str, rv: u32, cidr: &str, ip: &str) -> Value {
    json!({
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name, "resourceVersion": rv.to_string()},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    })
}

/// Removed on drop, so a failed assertion leaves nothing behind either.
pub struct TempDir(pub std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A kubeconfig pointing at the stand-in, in a directory removed on drop.
pub fn kubeconfig(tag: &str, port: u16) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir(std::env::temp_dir().join(format!("kube-api-{tag}-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: anonymous\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: anonymous\n\
             current-context: stand-in\n"
        ),
    )
    .unwrap();
    (dir, path)
}
