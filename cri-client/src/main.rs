//! A kubelet-like CRI client for the real-runtime tests (scripts/real-clients/run).
//!
//! kubelet never execs a CNI plugin: it asks the runtime over the CRI gRPC API, and the
//! runtime's CRI plugin runs libcni with the pod's metadata. This tool makes the same calls
//! kubelet makes for a pod sandbox, over the CRI v1 API (the `k8s-cri` bindings with tonic),
//! so that the tests exercise the path every Kubernetes node uses.
//!
//! Output: a sandbox ID (`run`), JSON (`status`, `cycle`), IDs one a line (`list`).
//! Errors: the gRPC status message on stderr, exit 1.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxState, PodSandboxStatusRequest,
    PortMapping, Protocol, RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
    VersionRequest,
};
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Parser)]
#[command(about = "kubelet-like CRI client: pod sandbox calls over the CRI v1 gRPC API")]
struct Cli {
    /// The runtime's CRI socket (a unix socket path).
    #[arg(long)]
    socket: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct PodArgs {
    /// Pod name (metadata.name; the runtime passes it as K8S_POD_NAME).
    #[arg(long)]
    name: String,
    /// Pod namespace (K8S_POD_NAMESPACE).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Pod UID (K8S_POD_UID); derived from the name when not given.
    #[arg(long)]
    uid: Option<String>,
    /// Port mapping HOST:CONTAINER (TCP), passed on to portmap as runtimeConfig.portMappings.
    #[arg(long = "port")]
    ports: Vec<String>,
    /// cgroup parent of the sandbox (cgroupfs path).
    #[arg(long, default_value = "")]
    cgroup_parent: String,
    /// Directory for the pod's container logs.
    #[arg(long, default_value = "")]
    log_dir: String,
    /// hostNetwork: the runtime's own network namespace, no CNI call (the floor in timings).
    #[arg(long)]
    host_network: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Runtime name and version (the first call kubelet makes).
    Version,
    /// RunPodSandbox; prints the sandbox ID.
    Run(PodArgs),
    /// PodSandboxStatus (verbose): state, IPs, the sandbox's pid and netns, as JSON.
    Status { id: String },
    /// StopPodSandbox.
    Stop { id: String },
    /// RemovePodSandbox.
    Remove { id: String },
    /// ListPodSandbox: every sandbox ID, one a line.
    List,
    /// COUNT times RunPodSandbox + StopPodSandbox + RemovePodSandbox of a fresh pod on each
    /// runtime of --set, round-robin (a load change hits every set alike); prints, per set,
    /// the median of each call and of the whole life in ms, as JSON.
    Cycle {
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Rounds run first and not counted (caches, first snapshot).
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// NAME=SOCKET[,host-network]: a runtime to time (default: main=--socket).
        #[arg(long = "set")]
        sets: Vec<String>,
        #[command(flatten)]
        pod: PodArgs,
    },
}

/// One runtime timed by `cycle`, with each call's durations.
struct TimedSet {
    name: String,
    client: RuntimeServiceClient<Channel>,
    host_network: bool,
    runs: Vec<Duration>,
    stops: Vec<Duration>,
    removes: Vec<Duration>,
    lives: Vec<Duration>,
}

async fn connect(socket: &str) -> Result<RuntimeServiceClient<Channel>, String> {
    let path = socket.to_string();
    // The URI is required by tonic but unused: the connector always dials the unix socket.
    let channel = Endpoint::try_from("http://[::]:0")
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| format!("cannot connect to {socket}: {e}"))?;
    Ok(RuntimeServiceClient::new(channel))
}

fn rpc_error(call: &str, status: tonic::Status) -> String {
    format!("{call}: {}", status.message())
}

fn port_mapping(spec: &str) -> Result<PortMapping, String> {
    let bad = || format!("--port {spec}: want HOST:CONTAINER");
    let (host, container) = spec.split_once(':').ok_or_else(bad)?;
    Ok(PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: container.parse().map_err(|_| bad())?,
        host_port: host.parse().map_err(|_| bad())?,
        host_ip: String::new(),
    })
}

/// The sandbox config kubelet builds for a pod: metadata, hostname, ports, cgroup parent.
fn sandbox_config(pod: &PodArgs) -> Result<PodSandboxConfig, String> {
    let uid = pod.uid.clone().unwrap_or_else(|| format!("uid-{}-{}", pod.namespace, pod.name));
    let labels = HashMap::from([
        ("io.kubernetes.pod.name".to_string(), pod.name.clone()),
        ("io.kubernetes.pod.namespace".to_string(), pod.namespace.clone()),
        ("io.kubernetes.pod.uid".to_string(), uid.clone()),
    ]);
    Ok(PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: pod.name.clone(),
            uid,
            namespace: pod.namespace.clone(),
            attempt: 0,
        }),
        // A hostNetwork pod shares the node's UTS namespace: kubelet leaves the hostname to it.
        hostname: if pod.host_network { String::new() } else { pod.name.clone() },
        log_directory: pod.log_dir.clone(),
        port_mappings: pod.ports.iter().map(|p| port_mapping(p)).collect::<Result<_, _>>()?,
        labels,
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: pod.cgroup_parent.clone(),
            security_context: pod.host_network.then(|| LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

async fn run_sandbox(client: &mut RuntimeServiceClient<Channel>, pod: &PodArgs) -> Result<String, String> {
    let request = RunPodSandboxRequest { config: Some(sandbox_config(pod)?), runtime_handler: String::new() };
    let reply = client.run_pod_sandbox(request).await.map_err(|s| rpc_error("RunPodSandbox", s))?;
    Ok(reply.into_inner().pod_sandbox_id)
}

async fn stop_sandbox(client: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<(), String> {
    client
        .stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.to_string() })
        .await
        .map_err(|s| rpc_error("StopPodSandbox", s))?;
    Ok(())
}

async fn remove_sandbox(client: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<(), String> {
    client
        .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.to_string() })
        .await
        .map_err(|s| rpc_error("RemovePodSandbox", s))?;
    Ok(())
}

/// The pid and network namespace path from containerd's verbose info (JSON under "info").
fn runtime_details(info: &HashMap<String, String>) -> (Value, Value) {
    let Some(parsed) = info.get("info").and_then(|raw| serde_json::from_str::<Value>(raw).ok()) else {
        return (Value::Null, Value::Null);
    };
    let netns = parsed
        .pointer("/runtimeSpec/linux/namespaces")
        .and_then(Value::as_array)
        .and_then(|spaces| {
            spaces.iter().find(|space| space.get("type").and_then(Value::as_str) == Some("network"))
        })
        .and_then(|space| space.get("path").cloned())
        .unwrap_or(Value::Null);
    (parsed.get("pid").cloned().unwrap_or(Value::Null), netns)
}

async fn status(client: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<Value, String> {
    let reply = client
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: id.to_string(), verbose: true })
        .await
        .map_err(|s| rpc_error("PodSandboxStatus", s))?
        .into_inner();
    let sandbox = reply.status.ok_or_else(|| "PodSandboxStatus: no status in the reply".to_string())?;
    let state = PodSandboxState::try_from(sandbox.state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| sandbox.state.to_string());
    let (ip, additional) = sandbox
        .network
        .map(|net| {
            let extra: Vec<String> = net.additional_ips.into_iter().map(|p| p.ip).collect();
            (net.ip, extra)
        })
        .unwrap_or_default();
    let (pid, netns) = runtime_details(&reply.info);
    Ok(json!({
        "id": sandbox.id,
        "state": state,
        "ip": ip,
        "additional_ips": additional,
        "pid": pid,
        "netns": netns,
    }))
}

fn median_ms(times: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    match ms.len() {
        0 => 0.0,
        n if n % 2 == 1 => ms[n / 2],
        n => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
    }
}

/// NAME=SOCKET[,host-network] -> (name, socket, host network).
fn parse_set(spec: &str) -> Result<(&str, &str, bool), String> {
    let bad = || format!("--set {spec}: want NAME=SOCKET[,host-network]");
    let (name, rest) = spec.split_once('=').ok_or_else(bad)?;
    match rest.split_once(',') {
        None => Ok((name, rest, false)),
        Some((socket, "host-network")) => Ok((name, socket, true)),
        Some(_) => Err(bad()),
    }
}

async fn timed_set(spec: &str) -> Result<TimedSet, String> {
    let (name, socket, host_network) = parse_set(spec)?;
    Ok(TimedSet {
        name: name.to_string(),
        client: connect(socket).await?,
        host_network,
        runs: Vec::new(),
        stops: Vec::new(),
        removes: Vec::new(),
        lives: Vec::new(),
    })
}

/// One pod's life on one runtime; returns the three calls' durations.
async fn one_life(set: &mut TimedSet, pod: &PodArgs) -> Result<[Duration; 3], String> {
    let start = Instant::now();
    let id = run_sandbox(&mut set.client, pod).await?;
    let ran = Instant::now();
    stop_sandbox(&mut set.client, &id).await?;
    let stopped = Instant::now();
    remove_sandbox(&mut set.client, &id).await?;
    Ok([ran - start, stopped - ran, stopped.elapsed()])
}

async fn cycle(sets: &mut [TimedSet], count: usize, warmup: usize, pod: &PodArgs) -> Result<Value, String> {
    for round in 0..warmup + count {
        for set in sets.iter_mut() {
            // A fresh pod each time, as a new pod would be: new name and UID.
            let this_pod = PodArgs {
                name: format!("{}-{}-{round}", pod.name, set.name),
                uid: None,
                host_network: set.host_network,
                ..pod.clone()
            };
            let [run, stop, remove] =
                one_life(set, &this_pod).await.map_err(|e| format!("{}: {e}", set.name))?;
            if round >= warmup {
                set.runs.push(run);
                set.stops.push(stop);
                set.removes.push(remove);
                set.lives.push(run + stop + remove);
            }
        }
    }
    let rounded = |times: &[Duration]| (median_ms(times) * 10.0).round() / 10.0;
    let mut report = serde_json::Map::new();
    for set in sets.iter() {
        report.insert(
            set.name.clone(),
            json!({
                "count": count,
                "median_ms": rounded(&set.lives),
                "run_median_ms": rounded(&set.runs),
                "stop_median_ms": rounded(&set.stops),
                "remove_median_ms": rounded(&set.removes),
                "lives_ms": set.lives.iter().map(|t| t.as_millis() as u64).collect::<Vec<_>>(),
            }),
        );
    }
    Ok(Value::Object(report))
}

async fn execute(cli: Cli) -> Result<(), String> {
    let mut client = connect(&cli.socket).await?;
    match cli.command {
        Command::Version => {
            let reply = client
                .version(VersionRequest { version: "v1".into() })
                .await
                .map_err(|s| rpc_error("Version", s))?
                .into_inner();
            println!("{} {} (CRI {})", reply.runtime_name, reply.runtime_version, reply.runtime_api_version);
        }
        Command::Run(pod) => println!("{}", run_sandbox(&mut client, &pod).await?),
        Command::Status { id } => println!("{}", status(&mut client, &id).await?),
        Command::Stop { id } => stop_sandbox(&mut client, &id).await?,
        Command::Remove { id } => remove_sandbox(&mut client, &id).await?,
        Command::List => {
            let reply = client
                .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await
                .map_err(|s| rpc_error("ListPodSandbox", s))?
                .into_inner();
            for sandbox in reply.items {
                println!("{}", sandbox.id);
            }
        }
        Command::Cycle { count, warmup, sets, pod } => {
            let mut timed = Vec::new();
            for spec in &sets {
                timed.push(timed_set(spec).await?);
            }
            if timed.is_empty() {
                timed.push(timed_set(&format!("main={}", cli.socket)).await?);
            }
            println!("{}", cycle(&mut timed, count, warmup, &pod).await?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cri-client: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cri-client: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mapping_parses_host_and_container_port() {
        let mapping = port_mapping("8080:80").unwrap();
        assert_eq!((mapping.host_port, mapping.container_port), (8080, 80));
        assert_eq!(mapping.protocol, Protocol::Tcp as i32);
        assert!(port_mapping("8080").is_err());
        assert!(port_mapping("x:80").is_err());
    }

    #[test]
    fn set_names_a_socket_and_maybe_host_network() {
        assert_eq!(parse_set("ours=/s/c.sock"), Ok(("ours", "/s/c.sock", false)));
        assert_eq!(parse_set("floor=/s/c.sock,host-network"), Ok(("floor", "/s/c.sock", true)));
        assert!(parse_set("/s/c.sock").is_err());
        assert!(parse_set("x=/s/c.sock,bogus").is_err());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        let ms = |v: &[u64]| v.iter().map(|m| Duration::from_millis(*m)).collect::<Vec<_>>();
        assert_eq!(median_ms(&ms(&[30, 10, 20])), 20.0);
        assert_eq!(median_ms(&ms(&[40, 10, 20, 30])), 25.0);
    }

    #[test]
    fn runtime_details_reads_containerd_verbose_info() {
        let info = HashMap::from([(
            "info".to_string(),
            r#"{"pid":42,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/s/netns/cni-1"}]}}}"#
                .to_string(),
        )]);
        assert_eq!(runtime_details(&info), (json!(42), json!("/s/netns/cni-1")));
        assert_eq!(runtime_details(&HashMap::new()), (Value::Null, Value::Null));
    }
}
