//! One test's world: a node namespace standing for the host, a scratch directory holding the
//! IPAM plugin's leases, and the plugins under test, run as binaries in that node. The
//! fixture of both the conformance suite and the bridge plugin's own tests.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::netns::Netns;
use crate::plugin::{invoke, Out};

/// The plugins under test.
#[derive(Debug, Clone)]
pub struct Plugins {
    /// Directory holding them (CNI_PATH).
    pub dir: PathBuf,
    /// Main plugin type (binary name).
    pub bridge: String,
    /// IPAM plugin type.
    pub ipam: String,
}

impl Plugins {
    /// The main plugin's binary.
    pub fn main_plugin(&self) -> PathBuf {
        self.dir.join(&self.bridge)
    }
}

/// The lease files (one per leased address) of `network` in a host-local style `data_dir`,
/// sorted: what a DEL or a failed ADD must leave behind empty.
pub fn lease_files(data_dir: &Path, network: &str) -> Vec<String> {
    let mut leases: Vec<String> = std::fs::read_dir(data_dir.join(network))
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .filter(|name| name.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    leases.sort();
    leases
}

/// A node namespace, a scratch directory and the plugins to run there. Dropping it removes
/// the directory, then the namespace (and with it every link and rule a plugin made).
pub struct World {
    /// The node namespace the plugins run in.
    pub node: Netns,
    /// This world's own directory: the leases live in `ipam/` below it; tests may put files
    /// there (scripts, mount points) that must go with the world.
    pub tmp: PathBuf,
    /// The plugins under test.
    pub plugins: Plugins,
    /// The CNI_PATH the main plugin gets: the plugins' directory, and whatever a test adds
    /// (the bridge tests add Debian's reference plugins, for delegation).
    pub cni_path: String,
    /// The network name of [`World::conf`], which names the lease directory.
    network: String,
}

impl World {
    /// A fresh node namespace (named after `tag`) and a directory below `scratch`, for a
    /// network called `network`.
    pub fn new(tag: &str, plugins: Plugins, network: &str, scratch: &Path) -> World {
        let node = Netns::new(tag);
        let tmp = scratch.join(&node.name);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("creating {}: {e}", tmp.display()));
        let cni_path = plugins.dir.display().to_string();
        World { node, tmp, plugins, cni_path, network: network.to_string() }
    }

    /// Where the IPAM plugin keeps its leases (`dataDir`).
    pub fn data_dir(&self) -> String {
        self.tmp.join("ipam").display().to_string()
    }

    /// A bridge config with the IPAM plugin over `subnet` and a default route, with `extra`
    /// fields merged in at the top level.
    pub fn conf(&self, version: &str, subnet: &str, extra: Value) -> Value {
        let mut conf = json!({
            "cniVersion": version,
            "name": self.network,
            "type": self.plugins.bridge,
            "bridge": "cni0",
            "isGateway": true,
            "ipam": {"type": self.plugins.ipam, "dataDir": self.data_dir(), "subnet": subnet,
                     "routes": [{"dst": "0.0.0.0/0"}]}
        });
        for (key, value) in extra.as_object().cloned().unwrap_or_default() {
            conf[key] = value;
        }
        conf
    }

    /// Calls the main plugin in the node for interface `eth0` of container `id` in `netns`.
    pub fn call(&self, cmd: &str, id: &str, netns: &str, conf: &Value) -> Out {
        self.call_with(cmd, id, netns, "eth0", &[], conf)
    }

    /// [`World::call`] for interface `ifname`, with `extra` variables set last (so they
    /// override the others, CNI_PATH included).
    pub fn call_with(
        &self,
        cmd: &str,
        id: &str,
        netns: &str,
        ifname: &str,
        extra: &[(&str, &str)],
        conf: &Value,
    ) -> Out {
        let mut env = vec![
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", &self.cni_path),
        ];
        env.extend_from_slice(extra);
        invoke(&self.node, &self.main_plugin(), cmd, &env, conf)
    }

    /// Calls the main plugin with exactly these CNI_* variables, plus CNI_PATH unless given:
    /// for the checks of what a plugin does with variables missing.
    pub fn call_env(&self, cmd: &str, env: &[(&str, &str)], conf: &Value) -> Out {
        let mut env = env.to_vec();
        if !env.iter().any(|(key, _)| *key == "CNI_PATH") {
            env.push(("CNI_PATH", &self.cni_path));
        }
        invoke(&self.node, &self.main_plugin(), cmd, &env, conf)
    }

    /// The main plugin's binary.
    pub fn main_plugin(&self) -> PathBuf {
        self.plugins.main_plugin()
    }

    /// The lease files of the network (one per leased address), sorted.
    pub fn leases(&self) -> Vec<String> {
        lease_files(Path::new(&self.data_dir()), &self.network)
    }

    /// veth links in the node namespace.
    pub fn veths(&self) -> Vec<String> {
        self.node.links().into_iter().filter(|l| l.starts_with("veth")).collect()
    }

    /// Waits (bounded) until the node has no veth: the kernel removes a dead namespace's
    /// veth pair asynchronously.
    pub fn wait_no_veths(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.veths().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.veths()
    }

    /// The node's nftables ruleset, as `nft list ruleset` prints it.
    pub fn ruleset(&self) -> String {
        String::from_utf8_lossy(&self.node.run("nft", &["list", "ruleset"]).stdout).into_owned()
    }

    /// Installs a delegated IPAM plugin `fake-ipam` that answers ADD with `result` and
    /// appends each command it gets to a log ([`World::fake_ipam_calls`]); returns the
    /// CNI_PATH that finds it.
    pub fn fake_ipam(&self, result: &Value) -> String {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.tmp.join("fake-ipam");
        std::fs::create_dir_all(&dir).expect("creating the fake IPAM plugin's directory");
        std::fs::write(dir.join("result.json"), result.to_string()).expect("writing its result");
        let shown = dir.display();
        let script = format!(
            "#!/bin/sh\necho \"$CNI_COMMAND\" >> {shown}/calls\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then cat {shown}/result.json; fi\nexit 0\n"
        );
        let bin = dir.join("fake-ipam");
        std::fs::write(&bin, script).expect("writing the fake IPAM plugin");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("making it executable");
        let _ = std::fs::remove_file(dir.join("calls"));
        format!("{shown}:{}", self.cni_path)
    }

    /// The commands the fake IPAM plugin got, in order.
    pub fn fake_ipam_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.tmp.join("fake-ipam").join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}
