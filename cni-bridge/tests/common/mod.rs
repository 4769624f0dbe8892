//! Shared set-up for the bridge tests: a plugin dir with our binaries, a node namespace,
//! pods, and the config.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cni_conformance::{invoke, Netns, Out};
use serde_json::{json, Value};

pub const BRIDGE: &str = env!("CARGO_BIN_EXE_cni-bridge");
pub const REFERENCE_DIR: &str = "/usr/lib/cni";

/// A plugin directory holding our two binaries (and, by symlink, Debian's reference ones).
pub fn plugin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cni-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let bridge = Path::new(BRIDGE);
    for (src, name) in [
        (bridge.to_path_buf(), "cni-bridge"),
        (bridge.with_file_name("cni-host-local"), "cni-host-local"),
        // Present after a workspace build: the conformance suite then routes with it.
        (bridge.with_file_name("cni-route-agent"), "cni-route-agent"),
    ] {
        if !src.exists() {
            continue;
        }
        let dst = dir.join(name);
        // A target dir copied from another checkout keeps links to that checkout's binaries.
        if std::fs::read_link(&dst).ok().as_deref() != Some(src.as_path()) {
            let _ = std::fs::remove_file(&dst);
            let _ = std::os::unix::fs::symlink(&src, &dst);
        }
    }
    assert!(dir.join("cni-host-local").exists(), "cni-host-local must be built (cargo build --workspace)");
    dir
}

/// Fails the calling test unless Debian's reference plugins (the oracle) are installed.
pub fn require_reference() {
    if !Path::new(REFERENCE_DIR).join("bridge").exists() {
        panic!("{REFERENCE_DIR}/bridge missing: install containernetworking-plugins (scripts/test does)");
    }
}

/// One test's world: a node namespace and a data dir.
pub struct World {
    pub node: Netns,
    pub tmp: PathBuf,
    pub bin: PathBuf,
    _guard: TmpDir,
}

pub struct TmpDir(PathBuf);
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl World {
    pub fn new(tag: &str) -> World {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("w-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        World { node: Netns::new(tag), bin: plugin_dir(), _guard: TmpDir(tmp.clone()), tmp }
    }

    pub fn data_dir(&self) -> String {
        self.tmp.join("ipam").display().to_string()
    }

    /// A bridge config with host-local over `subnet`, plus `extra` fields.
    pub fn conf(&self, version: &str, subnet: &str, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": "testnet",
            "type": "cni-bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipam": {"type": "cni-host-local", "dataDir": self.data_dir(), "subnet": subnet,
                     "routes": [{"dst": "0.0.0.0/0"}]}
        });
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            c[k] = v;
        }
        c
    }

    pub fn call(&self, cmd: &str, id: &str, netns: &str, conf: &Value) -> Out {
        self.call_with(cmd, id, netns, "eth0", &[], conf)
    }

    pub fn call_with(
        &self,
        cmd: &str,
        id: &str,
        netns: &str,
        ifname: &str,
        extra: &[(&str, &str)],
        conf: &Value,
    ) -> Out {
        let path = format!("{}:{REFERENCE_DIR}", self.bin.display());
        let mut env = vec![
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", path.as_str()),
        ];
        env.extend_from_slice(extra);
        invoke(&self.node, Path::new(&format!("{}/{}", self.bin.display(), "cni-bridge")), cmd, &env, conf)
    }

    /// Lease files in the data dir of network `testnet`.
    pub fn leases(&self) -> Vec<String> {
        let d = Path::new(&self.data_dir()).join("testnet");
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The masquerade map entries in the node namespace (`ip owner` strings).
    pub fn masq_entries(&self) -> Vec<String> {
        let o = self.node.run("nft", &["-j", "list", "table", "inet", "cni_bridge"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let mut out = Vec::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            for pair in item["map"]["elem"].as_array().into_iter().flatten() {
                out.push(format!(
                    "{} {}",
                    pair[0]["elem"]["val"].as_str().unwrap_or(""),
                    pair[0]["elem"]["comment"].as_str().unwrap_or("")
                ));
            }
        }
        out
    }

    /// veth links in the node namespace.
    pub fn veths(&self) -> Vec<String> {
        self.node.links().into_iter().filter(|l| l.starts_with("veth")).collect()
    }
}

pub fn ip_of(out: &Out, i: usize) -> std::net::IpAddr {
    let a = out.json["ips"][i]["address"].as_str().unwrap_or_else(|| panic!("no ips[{i}] in {}", out.stdout));
    a.split('/').next().unwrap().parse().unwrap()
}

impl World {
    /// Installs a delegated IPAM plugin `fake-ipam` that answers ADD with `result` and
    /// appends each command it gets to a log ([`World::fake_ipam_calls`]); returns the
    /// CNI_PATH that finds it.
    pub fn fake_ipam(&self, result: &Value) -> String {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.tmp.join("fake-ipam");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("result.json"), result.to_string()).unwrap();
        let d = dir.display();
        let script = format!(
            "#!/bin/sh\necho \"$CNI_COMMAND\" >> {d}/calls\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then cat {d}/result.json; fi\nexit 0\n"
        );
        let bin = dir.join("fake-ipam");
        std::fs::write(&bin, script).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _ = std::fs::remove_file(dir.join("calls"));
        format!("{d}:{}:{REFERENCE_DIR}", self.bin.display())
    }

    /// The commands the fake IPAM plugin got, in order.
    pub fn fake_ipam_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.tmp.join("fake-ipam").join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The node's nftables ruleset, as `nft list ruleset` prints it.
    pub fn ruleset(&self) -> String {
        String::from_utf8_lossy(&self.node.run("nft", &["list", "ruleset"]).stdout).into_owned()
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
}
