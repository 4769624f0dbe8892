//! The network configuration a runtime writes to a plugin's stdin.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::result::{CniResult, Dns};
use crate::version::Version;

/// One attachment a runtime still uses (GC's valid list).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    /// The container id (CNI_CONTAINERID of its ADD).
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface inside the container (CNI_IFNAME of its ADD).
    pub ifname: String,
}

/// The fields every plugin config shares; plugin-specific fields stay in `rest`, so a
/// plugin parses them into its own type and chaining passes unknown ones on unchanged.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetConf {
    /// The config's version; missing means 0.1.0.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// The network name.
    #[serde(default)]
    pub name: String,
    /// The plugin type (binary name).
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The IPAM section, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Value>,
    /// DNS settings from the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// Capability arguments from the runtime.
    #[serde(rename = "runtimeConfig", default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<Value>,
    /// Per-call arguments (`args.cni.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// The result of the previous plugin in the chain (ADD) or the cached final result (DEL, CHECK).
    #[serde(rename = "prevResult", default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// GC: attachments still in use (`None` when the key is absent, which differs from empty).
    #[serde(rename = "cni.dev/valid-attachments", default, skip_serializing_if = "Option::is_none")]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// GC: the legacy name of `cni.dev/valid-attachments`.
    #[serde(rename = "cni.dev/attachments", default, skip_serializing_if = "Option::is_none")]
    pub legacy_attachments: Option<Vec<Attachment>>,
    /// Every other field.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// Whether `name` is a valid network name (`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`).
pub fn valid_network_name(name: &str) -> bool {
    crate::env::valid_container_id(name)
}

impl NetConf {
    /// Decodes a config (code 6 on malformed JSON).
    pub fn from_slice(stdin: &[u8]) -> Result<NetConf, Error> {
        serde_json::from_slice(stdin)
            .map_err(|e| Error::Decode { what: "network config", details: e.to_string() })
    }

    /// The config's version string, defaulting to 0.1.0 as the spec's libraries do.
    pub fn version_str(&self) -> &str {
        if self.cni_version.is_empty() {
            "0.1.0"
        } else {
            &self.cni_version
        }
    }

    /// The config's version, if it is a supported one (code 1 otherwise).
    pub fn version(&self) -> Result<Version, Error> {
        match Version::parse(self.version_str()) {
            Some(v) if v.is_supported() => Ok(v),
            _ => Err(Error::IncompatibleVersion {
                details: format!(
                    "config is {:?}, plugin supports {:?}",
                    self.version_str(),
                    Version::supported_strings()
                ),
            }),
        }
    }

    /// The attachments GC must keep: the new key, else the legacy one, else `None`.
    pub fn gc_valid_attachments(&self) -> Option<&[Attachment]> {
        self.valid_attachments.as_deref().or(self.legacy_attachments.as_deref())
    }

    /// The parsed prevResult, if any (its own `cniVersion`, else the config's, gives its shape).
    pub fn prev_result(&self) -> Result<Option<CniResult>, Error> {
        match &self.prev_result {
            None | Some(Value::Null) => Ok(None),
            Some(v) => CniResult::from_json(v, self.version_str()).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_unknown_fields_and_reads_well_known_ones() {
        let c = NetConf::from_slice(
            br#"{"cniVersion":"1.1.0","name":"n","type":"cni-bridge","bridge":"br9",
                "ipam":{"type":"cni-host-local"},"runtimeConfig":{"mac":"02:00:00:00:00:01"},
                "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.rest["bridge"], "br9");
        assert_eq!(c.plugin_type, "cni-bridge");
        assert_eq!(c.gc_valid_attachments().unwrap().len(), 1);
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["bridge"], "br9");
    }

    #[test]
    fn missing_valid_attachments_differs_from_empty() {
        let none = NetConf::from_slice(br#"{"cniVersion":"1.1.0","name":"n"}"#).unwrap();
        assert!(none.gc_valid_attachments().is_none());
        let empty =
            NetConf::from_slice(br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[]}"#)
                .unwrap();
        assert_eq!(empty.gc_valid_attachments(), Some(&[][..]));
        let legacy = NetConf::from_slice(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/attachments":[{"containerID":"a","ifname":"e"}]}"#,
        )
        .unwrap();
        assert_eq!(legacy.gc_valid_attachments().unwrap()[0].container_id, "a");
    }

    #[test]
    fn version_rules() {
        let v = |s: &str| NetConf { cni_version: s.into(), ..Default::default() };
        assert_eq!(v("").version().unwrap(), Version(0, 1, 0));
        assert_eq!(v("0.4.0").version().unwrap(), Version(0, 4, 0));
        for bad in ["1.2.0", "9.9.9", "x"] {
            let e = v(bad).version().unwrap_err();
            assert_eq!(e.code(), 1);
            assert!(e.details().contains(bad));
        }
        assert_eq!(NetConf::from_slice(b"{not json").unwrap_err().code(), 6);
    }

    #[test]
    fn network_names() {
        assert!(valid_network_name("k8s-pod-network.v1"));
        assert!(!valid_network_name("../x"));
        assert!(!valid_network_name(""));
    }
}
