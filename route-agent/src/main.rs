use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use cni_route_agent::{run, Options, Source};
use ipnetwork::IpNetwork;

/// Routes between nodes' pod CIDRs (host-gw), the node's CNI config, and masquerade.
#[derive(Parser, Debug)]
#[command(
    name = "cni-route-agent",
    version,
    after_help = "Also: cni-route-agent install-cni --help, cni-route-agent uninstall --help, and\n\
                  cni-route-agent plan [--json] <the flags above>: what a sync would do now\n\
                  (routes, nexthops, tunnel entries, masquerade set), changing nothing;\n\
                  cni-route-agent doctor [--json] [--bin-dir /opt/cni/bin] <the flags above>: checks\n\
                  the source, the node's routes, tunnel, conflist and masquerade against the plan,\n\
                  probes every peer's pod gateway (small, and at the pod MTU with DF), and runs\n\
                  the installed cni-bridge doctor; exit status 1 on any failure"
)]
struct Cli {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where nodes come from: kubernetes, etcd or file.
    #[arg(long, default_value = "kubernetes")]
    source: String,
    /// kubeconfig for the kubernetes source (default: $KUBECONFIG or ~/.kube/config, else in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// etcd client URLs (source etcd), comma-separated.
    #[arg(long, env = "ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: Vec<String>,
    /// etcd key prefix (source etcd).
    #[arg(long, default_value = "/cni-route-agent")]
    etcd_prefix: String,
    /// Prefix length of an IPv4 node subnet carved from --cluster-cidr (source etcd).
    #[arg(long, default_value_t = 24)]
    subnet_len_v4: u8,
    /// Prefix length of an IPv6 node subnet (source etcd).
    #[arg(long, default_value_t = 64)]
    subnet_len_v6: u8,
    /// This node's address, one per family (repeat or comma-separate): published with its
    /// subnet (source etcd); overrides the node's own addresses from the source (all sources).
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<std::net::IpAddr>,
    /// Lease TTL in seconds for this node's subnet (source etcd).
    #[arg(long, default_value_t = 30)]
    lease_ttl: i64,
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
    /// The nodes file (source file): JSON or YAML.
    #[arg(long)]
    nodes_file: Option<PathBuf>,
    /// The cluster's pod CIDRs, not masqueraded (repeat or comma-separate); default: every
    /// node's pod CIDRs.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<IpNetwork>,
    /// More destinations pod traffic reaches with its own source, not masqueraded (repeat or
    /// comma-separate), e.g. a corporate network routed to the pods.
    #[arg(long, value_delimiter = ',')]
    no_masquerade_cidr: Vec<IpNetwork>,
    /// CNI config directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// CNI config file name.
    #[arg(long, default_value = "10-cni-route-agent.conflist")]
    cni_conf_name: String,
    /// CNI network name.
    #[arg(long, default_value = "podnet")]
    network_name: String,
    /// host-local data directory written into the conflist.
    #[arg(long, default_value = "/var/lib/cni/networks")]
    ipam_data_dir: String,
    /// Leave portmap out of the conflist.
    #[arg(long)]
    no_portmap: bool,
    /// Do not masquerade pod traffic leaving the cluster.
    #[arg(long)]
    no_masquerade: bool,
    /// Masquerade with the kernel's default (sequential) source port choice instead of
    /// fully random ports (used where the kernel supports them: fewer conntrack insertion
    /// races, the cause of 5 s DNS timeouts).
    #[arg(long)]
    no_masquerade_fully_random: bool,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:9645")]
    listen: SocketAddr,
    /// Seconds between full resyncs.
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Route protocol number marking the agent's routes (`ip route show proto N`).
    #[arg(long, default_value_t = 168)]
    route_protocol: u8,
    /// MTU for the conflist (default: the MTU of the link holding the node's address).
    #[arg(long)]
    mtu: Option<u32>,
    /// Plain routes with a gateway each, even where the kernel has nexthop objects.
    #[arg(long)]
    no_nexthops: bool,
    /// How pods on other nodes are reached: host-gw (direct routes; nodes on another subnet
    /// are reported, not routed), vxlan (every node through the VXLAN device) or auto (direct
    /// routes where the node is on a connected subnet, VXLAN for the others).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// VXLAN network identifier; the same on every node.
    #[arg(long, default_value_t = 168)]
    vxlan_vni: u32,
    /// UDP port of the VXLAN tunnel (IANA's 4789); the same on every node.
    #[arg(long, default_value_t = 4789)]
    vxlan_port: u16,
    /// Take the VXLAN overhead (50 bytes, 70 over IPv6) off the conflist's MTU even while
    /// every node is on-link, so pods made before a node turns off-link fit the tunnel too.
    #[arg(long)]
    vxlan_mtu_always: bool,
    /// /readyz fails once the node source has failed for longer than this many seconds
    /// (0: never).
    #[arg(long, default_value_t = 300)]
    max_source_failure_seconds: u64,
    /// Enforce NetworkPolicy (default: on with the kubernetes source or --policy-path, off
    /// otherwise); false also removes the policy table an earlier run made.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    network_policy: Option<bool>,
    /// Pods, Namespaces and NetworkPolicies from manifests (a YAML/JSON file or a directory of
    /// them, re-read on change) instead of the API server.
    #[arg(long)]
    policy_path: Option<PathBuf>,
    /// Log format on stderr: text or json.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// `--backend`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BackendArg {
    /// Direct routes only.
    HostGw,
    /// VXLAN to every node.
    Vxlan,
    /// Direct routes to on-link nodes, VXLAN to the others.
    Auto,
}

/// How log lines look.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable; coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        // journald and `kubectl logs` show colour codes as garbage.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// TLS and authentication of the etcd source; the environment variables suit a DaemonSet
/// mounting a Secret.
#[derive(clap::Args, Debug)]
struct EtcdTlsArgs {
    /// CA bundle (PEM) the etcd servers' certificates must chain to (default: system roots).
    #[arg(long, env = "ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd.
    #[arg(long, env = "ETCD_CERTFILE")]
    etcd_certfile: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "ETCD_KEYFILE")]
    etcd_keyfile: Option<PathBuf>,
    /// etcd user (with --etcd-password-file).
    #[arg(long, env = "ETCD_USERNAME")]
    etcd_username: Option<String>,
    /// File holding the etcd user's password; never the password itself on the command line.
    #[arg(long, env = "ETCD_PASSWORD_FILE")]
    etcd_password_file: Option<PathBuf>,
    /// Seconds between checks of these files for a rotation.
    #[arg(long, env = "ETCD_CREDENTIALS_RELOAD_SECONDS", default_value_t = 10)]
    etcd_credentials_reload_seconds: u64,
}

impl From<EtcdTlsArgs> for cni_route_agent::sources::etcd_tls::EtcdTls {
    fn from(a: EtcdTlsArgs) -> Self {
        Self {
            ca_file: a.etcd_cafile,
            cert_file: a.etcd_certfile,
            key_file: a.etcd_keyfile,
            username: a.etcd_username,
            password_file: a.etcd_password_file,
            reload_every: Duration::from_secs(a.etcd_credentials_reload_seconds.max(1)),
        }
    }
}

fn main() -> std::process::ExitCode {
    if let Some(code) = cni_route_agent::install::dispatch(std::env::args_os()) {
        return code;
    }
    // `plan [--json]` takes the daemon's own flags: it plans what that daemon would do.
    // `doctor [--json] [--bin-dir DIR]` too.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let plan = args.get(1).is_some_and(|a| a == "plan");
    let doctor = args.get(1).is_some_and(|a| a == "doctor");
    let mut json = false;
    let mut bin_dir = std::path::PathBuf::from("/opt/cni/bin");
    if plan || doctor {
        args.remove(1);
        let before = args.len();
        args.retain(|a| a != "--json");
        json = args.len() != before;
        if let Some(i) = args.iter().position(|a| a == "--bin-dir").filter(|_| doctor) {
            match args.get(i + 1) {
                Some(dir) => bin_dir = dir.into(),
                None => {
                    eprintln!("doctor: --bin-dir needs a value");
                    return std::process::ExitCode::from(2);
                }
            }
            args.drain(i..i + 2);
        }
    }
    let cli = Cli::parse_from(args);
    init_logs(cli.log_format);
    if cli.node_ip.iter().filter(|a| a.is_ipv4()).count() > 1
        || cli.node_ip.iter().filter(|a| a.is_ipv6()).count() > 1
    {
        eprintln!("--node-ip: at most one address per family");
        return std::process::ExitCode::from(2);
    }
    let source = match cli.source.as_str() {
        "file" => match cli.nodes_file {
            Some(p) => Source::File(p),
            None => {
                eprintln!("--source file needs --nodes-file");
                return std::process::ExitCode::from(2);
            }
        },
        "kubernetes" => {
            Source::Kubernetes(cni_route_agent::sources::kube::KubeOptions { kubeconfig: cli.kubeconfig })
        }
        "etcd" => Source::Etcd(cni_route_agent::sources::etcd::EtcdOptions {
            endpoints: cli.etcd_endpoints,
            prefix: cli.etcd_prefix,
            cluster_cidrs: cli.cluster_cidr.clone(),
            subnet_len_v4: cli.subnet_len_v4,
            subnet_len_v6: cli.subnet_len_v6,
            node_name: cli.node_name.clone(),
            node_addrs: cli.node_ip.clone(),
            lease_ttl: cli.lease_ttl,
            tls: Box::new(cli.etcd_tls.into()),
        }),
        other => {
            eprintln!("unknown --source {other}");
            return std::process::ExitCode::from(2);
        }
    };
    let policy = match (cli.network_policy, &cli.policy_path, &source) {
        (Some(false), _, _) => cni_route_agent::PolicyOptions::Off,
        (_, Some(path), _) => cni_route_agent::PolicyOptions::Manifests(path.clone()),
        (_, None, Source::Kubernetes(kube)) => cni_route_agent::PolicyOptions::Kubernetes(kube.clone()),
        (Some(true), None, _) => {
            eprintln!(
                "--network-policy with --source {}: needs --policy-path (no API server to watch)",
                cli.source
            );
            return std::process::ExitCode::from(2);
        }
        (None, None, _) => cni_route_agent::PolicyOptions::Off,
    };
    let opts = Options {
        node_name: cli.node_name,
        source,
        cluster_cidrs: cli.cluster_cidr,
        no_masquerade_cidrs: cli.no_masquerade_cidr,
        node_ips: cli.node_ip,
        max_snapshot_age: (cli.max_source_failure_seconds > 0)
            .then(|| Duration::from_secs(cli.max_source_failure_seconds)),
        cni_conf_dir: cli.cni_conf_dir,
        cni_conf_name: cli.cni_conf_name,
        network_name: cli.network_name,
        ipam_data_dir: cli.ipam_data_dir,
        portmap: !cli.no_portmap,
        masquerade: !cli.no_masquerade,
        masquerade_fully_random: !cli.no_masquerade_fully_random,
        listen: cli.listen,
        resync: Duration::from_secs(cli.resync_seconds.max(1)),
        route_protocol: cli.route_protocol,
        mtu: cli.mtu,
        nexthops: !cli.no_nexthops,
        backend: match cli.backend {
            BackendArg::HostGw => cni_route_agent::plan::Backend::HostGw,
            BackendArg::Vxlan => cni_route_agent::plan::Backend::Vxlan,
            BackendArg::Auto => cni_route_agent::plan::Backend::Auto,
        },
        vxlan: cni_route_agent::vxlan::VxlanConfig { vni: cli.vxlan_vni, port: cli.vxlan_port },
        vxlan_mtu_always: cli.vxlan_mtu_always,
        policy,
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    if doctor {
        let checks = rt.block_on(cni_route_agent::doctor::run(&opts, &bin_dir));
        if json {
            println!("{}", serde_json::to_string_pretty(&checks).unwrap_or_default());
        } else {
            print!("{}", cni_route_agent::doctor::table(&checks));
        }
        return std::process::ExitCode::from(u8::from(checks.iter().any(|c| c.status == "fail")));
    }
    if plan {
        return match rt.block_on(cni_route_agent::dryrun::compute(&opts)) {
            Ok(p) if json => {
                println!("{p:#}");
                std::process::ExitCode::SUCCESS
            }
            Ok(p) => {
                print!("{}", cni_route_agent::dryrun::table(&p));
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("plan: {e}");
                std::process::ExitCode::from(1)
            }
        };
    }
    match rt.block_on(run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(%e, "fatal");
            std::process::ExitCode::from(1)
        }
    }
}
