//! The node's CNI config: cni-bridge + cni-host-local over the node's pod CIDRs, MTU of the
//! underlay, written atomically and only when its content changes.

use std::io::Write;
use std::path::Path;

use ipnetwork::IpNetwork;
use serde_json::{json, Value};

use crate::error::AgentError;

/// What the conflist depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The network name (`name`): host-local's leases live in a directory of this name.
    pub name: String,
    /// The node's pod CIDRs.
    pub pod_cidrs: Vec<IpNetwork>,
    /// The MTU the bridge plugin gives bridge and veths (`mtu`); `None` leaves the kernel's
    /// default.
    pub mtu: Option<u32>,
    /// host-local's data directory.
    pub data_dir: String,
    /// Chain Debian's/the reference `portmap`.
    pub portmap: bool,
    /// Turn on the bridge plugin's MAC and IP spoof checks (`macspoofchk`, `ipspoofchk`):
    /// NetworkPolicy is enforced on pod source addresses, which a pod must not borrow.
    pub spoof_checks: bool,
}

/// The conflist JSON.
pub fn render(inputs: &Inputs) -> Value {
    let ranges: Vec<Value> = inputs.pod_cidrs.iter().map(|c| json!([{"subnet": c.to_string()}])).collect();
    let mut routes = Vec::new();
    if inputs.pod_cidrs.iter().any(IpNetwork::is_ipv4) {
        routes.push(json!({"dst": "0.0.0.0/0"}));
    }
    if inputs.pod_cidrs.iter().any(IpNetwork::is_ipv6) {
        routes.push(json!({"dst": "::/0"}));
    }
    let mut bridge = json!({
        "type": "cni-bridge",
        "bridge": "cni0",
        "isGateway": true,
        "isDefaultGateway": true,
        "hairpinMode": true,
        // The agent masquerades for the whole node; pod-to-pod traffic keeps its source.
        "ipMasq": false,
        "ipam": {"type": "cni-host-local", "ranges": ranges, "routes": routes, "dataDir": inputs.data_dir}
    });
    if let Some(m) = inputs.mtu {
        bridge["mtu"] = json!(m);
    }
    if inputs.spoof_checks {
        bridge["macspoofchk"] = json!(true);
        bridge["ipspoofchk"] = json!(true);
    }
    let mut plugins = vec![bridge];
    if inputs.portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    json!({"cniVersion": "1.0.0", "name": inputs.name, "plugins": plugins})
}

/// Writes `content` to `dir/name` via a temp file and rename, unless it is already there.
/// Returns whether it wrote.
pub fn write_if_changed(dir: &Path, name: &str, content: &str) -> Result<bool, AgentError> {
    let path = dir.join(name);
    if std::fs::read_to_string(&path).map(|c| c == content).unwrap_or(false) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
    // Runtimes load only *.conf/*.conflist/*.json: the temp name is never picked up half-written.
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(content.as_bytes())?;
        file.sync_all()
        // Closed here, before the rename: the name a runtime reads never refers to a file
        // still open for writing.
    })();
    let renamed = written.and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = renamed {
        // A temp file left by a failed write would be stale content for the next one.
        let _ = std::fs::remove_file(&tmp);
        return Err(AgentError::io(format!("writing {}", path.display()))(e));
    }
    // The rename is durable only once the directory is synced; the config is written anyway.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_dual_stack_bridge_with_mtu_and_portmap() {
        let c = render(&Inputs {
            name: "podnet".into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap(), "fd00:244:1::/64".parse().unwrap()],
            mtu: Some(1400),
            data_dir: "/var/lib/cni/networks".into(),
            portmap: true,
            spoof_checks: false,
        });
        let b = &c["plugins"][0];
        assert!(b.get("macspoofchk").is_none() && b.get("ipspoofchk").is_none(), "{b}");
        assert_eq!(b["type"], "cni-bridge");
        assert_eq!(b["mtu"], 1400);
        assert_eq!(b["ipMasq"], false);
        assert_eq!(b["ipam"]["ranges"][1][0]["subnet"], "fd00:244:1::/64");
        assert_eq!(b["ipam"]["routes"].as_array().unwrap().len(), 2);
        assert_eq!(c["plugins"][1]["type"], "portmap");
    }

    #[test]
    fn policy_enforcement_turns_on_both_spoof_checks() {
        let c = render(&Inputs {
            name: "podnet".into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            mtu: None,
            data_dir: "/var/lib/cni/networks".into(),
            portmap: false,
            spoof_checks: true,
        });
        assert_eq!(
            (&c["plugins"][0]["macspoofchk"], &c["plugins"][0]["ipspoofchk"]),
            (&json!(true), &json!(true))
        );
    }

    #[test]
    fn writes_only_on_change() {
        let dir = std::env::temp_dir().join(format!("conflist-test-{}", std::process::id()));
        assert!(write_if_changed(&dir, "10-x.conflist", "a").unwrap());
        assert!(!write_if_changed(&dir, "10-x.conflist", "a").unwrap());
        assert!(write_if_changed(&dir, "10-x.conflist", "b").unwrap());
        assert_eq!(std::fs::read_to_string(dir.join("10-x.conflist")).unwrap(), "b");
        assert!(!dir.join(".10-x.conflist.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
