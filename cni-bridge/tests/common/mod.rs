//! Shared set-up for the bridge tests: a plugin dir with our binaries, a node namespace,
//! pods, and the config.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cni_conformance::{Out, Plugins};
use serde_json::Value;

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

/// One test's world: [`cni_conformance::World`] (a node namespace and a data dir) running our
/// bridge with our host-local, for network `testnet`, and the reference plugins on CNI_PATH.
/// A wrapper rather than a constructor function: the bridge tests find the binaries through
/// `CARGO_BIN_EXE_*`, which only a test crate sees, and keep calling `World::new(tag)`.
pub struct World(cni_conformance::World);

impl std::ops::Deref for World {
    type Target = cni_conformance::World;
    fn deref(&self) -> &cni_conformance::World {
        &self.0
    }
}

impl World {
    pub fn new(tag: &str) -> World {
        let plugins =
            Plugins { dir: plugin_dir(), bridge: "cni-bridge".into(), ipam: "cni-host-local".into() };
        let mut world =
            cni_conformance::World::new(tag, plugins, "testnet", Path::new(env!("CARGO_TARGET_TMPDIR")));
        world.cni_path = format!("{}:{REFERENCE_DIR}", world.plugins.dir.display());
        World(world)
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
}

pub fn ip_of(out: &Out, i: usize) -> std::net::IpAddr {
    let a = out.json["ips"][i]["address"].as_str().unwrap_or_else(|| panic!("no ips[{i}] in {}", out.stdout));
    a.split('/').next().unwrap().parse().unwrap()
}

/// The FIFO a test build's pause point waits on, and the file it creates when it gets there;
/// both removed on drop, also when the test fails.
pub struct Pause {
    pub fifo: std::path::PathBuf,
    pub reached: std::path::PathBuf,
}

impl Pause {
    pub fn new(name: &str) -> Pause {
        let fifo = std::env::temp_dir().join(name);
        let pause = Pause { reached: fifo.with_extension("reached"), fifo };
        let _ = std::fs::remove_file(&pause.fifo);
        let _ = std::fs::remove_file(&pause.reached);
        nix::unistd::mkfifo(&pause.fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        pause
    }
}

impl Pause {
    /// Lets a paused plugin go on, if one waits (never blocks).
    pub fn release(&self) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let open =
            std::fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_NONBLOCK).open(&self.fifo);
        if let Ok(mut writer) = open {
            let _ = writer.write_all(b"go");
        }
    }
}

/// Releases the paused plugin when dropped: also when the test fails while it waits, so that
/// the threads running it end and the failure is reported instead of a hang.
pub struct ReleaseOnDrop<'a>(pub &'a Pause);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.fifo);
        let _ = std::fs::remove_file(&self.reached);
    }
}
