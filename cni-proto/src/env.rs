//! The CNI_* environment: which verb, which container, which namespace, which interface.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::Error;

/// A CNI verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Add the container to the network.
    Add,
    /// Remove the container from the network.
    Del,
    /// Check the container's networking is as expected.
    Check,
    /// Remove stale resources (1.1.0).
    Gc,
    /// Report whether ADD can succeed (1.1.0).
    Status,
    /// Report the supported versions.
    Version,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(text: &str) -> Option<Command> {
        Some(match text {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    /// The variables the spec requires for this verb, besides CNI_COMMAND.
    fn required(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            // DEL must work without a namespace (it may be gone, or never sent).
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Gc => &["CNI_PATH"],
            Command::Status | Command::Version => &[],
        }
    }
}

/// The one CNI_ARGS key the spec itself defines: with `1` or `true`, keys the plugin does not
/// know are ignored rather than refused.
pub const IGNORE_UNKNOWN: &str = "IgnoreUnknown";

/// Parsed CNI_ARGS (`K=V;K=V`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(pub BTreeMap<String, String>);

impl CniArgs {
    /// Parses CNI_ARGS; a key outside `known` (the plugin's own keys, see
    /// [`crate::Plugin::cni_args`]) and [`IGNORE_UNKNOWN`] is an error unless `IgnoreUnknown`
    /// is `1` or `true`.
    pub fn parse(text: &str, known: &[&str]) -> Result<CniArgs, Error> {
        let invalid = |reason: String| Error::InvalidEnv { var: "CNI_ARGS", reason };
        let mut map = BTreeMap::new();
        for pair in text.split(';').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("invalid pair {pair:?}: want KEY=VALUE")))?;
            if key.is_empty() {
                return Err(invalid(format!("invalid pair {pair:?}: empty key")));
            }
            map.insert(key.to_string(), value.to_string());
        }
        let ignore = map
            .get(IGNORE_UNKNOWN)
            .map(|value| value == "1" || value.eq_ignore_ascii_case("true"))
            .unwrap_or(false);
        if !ignore {
            let unknown: Vec<&str> = map
                .keys()
                .map(String::as_str)
                .filter(|key| *key != IGNORE_UNKNOWN && !known.contains(key))
                .collect();
            if !unknown.is_empty() {
                return Err(invalid(format!(
                    "unknown args {unknown:?} (set IgnoreUnknown=1 to ignore them)"
                )));
            }
        }
        Ok(CniArgs(map))
    }

    /// The value of a key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// Everything the environment says about one call.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The verb (CNI_COMMAND); it decides which other variables are required.
    pub command: Command,
    /// CNI_CONTAINERID (empty for GC, STATUS, VERSION).
    pub container_id: String,
    /// CNI_NETNS; `None` when unset or empty (allowed for DEL).
    pub netns: Option<PathBuf>,
    /// CNI_IFNAME (empty for GC, STATUS, VERSION).
    pub ifname: String,
    /// CNI_ARGS parsed; only keys the plugin accepts (or any, with IgnoreUnknown).
    pub args: CniArgs,
    /// The raw CNI_ARGS string, passed on unchanged to delegates.
    pub args_raw: String,
    /// CNI_PATH split at `:`: where delegated (IPAM) plugins are looked up, in order.
    pub path: Vec<PathBuf>,
}

/// Whether `id` matches the spec's container id pattern `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub fn valid_container_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'))
}

/// Why an interface name is not valid (the kernel's rules), or `None` when it is.
pub fn invalid_ifname(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("interface name is empty")
    } else if name.len() > 15 {
        Some("interface name is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("interface name cannot be . or ..")
    } else if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        Some("interface name contains / or : or whitespace")
    } else {
        None
    }
}

impl Invocation {
    /// Reads and validates the environment for `command`; `get` returns a variable's value,
    /// `known_args` are the CNI_ARGS keys the plugin accepts.
    pub fn from_env(
        command: Command,
        get: &dyn Fn(&str) -> Option<String>,
        known_args: &[&str],
    ) -> Result<Invocation, Error> {
        let val = |k: &str| get(k).filter(|v| !v.is_empty());
        let missing: Vec<&'static str> =
            command.required().iter().copied().filter(|k| val(k).is_none()).collect();
        if !missing.is_empty() {
            return Err(Error::MissingEnv(missing));
        }
        let container_id = val("CNI_CONTAINERID").unwrap_or_default();
        let ifname = val("CNI_IFNAME").unwrap_or_default();
        let uses_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        if uses_attachment {
            if !valid_container_id(&container_id) {
                return Err(Error::InvalidEnv {
                    var: "CNI_CONTAINERID",
                    reason: format!("{container_id:?} does not match ^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$"),
                });
            }
            if let Some(reason) = invalid_ifname(&ifname) {
                return Err(Error::InvalidEnv { var: "CNI_IFNAME", reason: format!("{reason}: {ifname:?}") });
            }
        }
        let args_raw = if uses_attachment { val("CNI_ARGS").unwrap_or_default() } else { String::new() };
        let args = CniArgs::parse(&args_raw, known_args)?;
        let path = val("CNI_PATH")
            .map(|p| p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
            .unwrap_or_default();
        let netns = if uses_attachment { val("CNI_NETNS").map(PathBuf::from) } else { None };
        Ok(Invocation { command, container_id, netns, ifname, args, args_raw, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn inv(cmd: Command, vars: &[(&str, &str)]) -> Result<Invocation, Error> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Invocation::from_env(cmd, &|k| m.get(k).cloned(), &KNOWN)
    }

    /// Keys a plugin might accept, for these tests.
    const KNOWN: [&str; 4] = ["IP", "MAC", "K8S_POD_NAME", "K8S_POD_UID"];

    const FULL: [(&str, &str); 5] = [
        ("CNI_CONTAINERID", "Abc-1.2_x"),
        ("CNI_NETNS", "/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web;FOO=bar"),
    ];

    #[test]
    fn full_add_environment_parses() {
        let i = inv(Command::Add, &FULL).unwrap();
        assert_eq!(i.container_id, "Abc-1.2_x");
        assert_eq!(i.netns.unwrap().to_str(), Some("/run/netns/pod"));
        assert_eq!(i.path.len(), 2);
        assert_eq!(i.args.get("K8S_POD_NAME"), Some("web"));
    }

    #[test]
    fn missing_variables_are_named_per_verb() {
        let e = inv(Command::Add, &[("CNI_IFNAME", "eth0")]).unwrap_err();
        assert_eq!(e, Error::MissingEnv(vec!["CNI_CONTAINERID", "CNI_NETNS"]));
        // DEL does not need a namespace; an empty one is fine.
        let e = inv(Command::Del, &[("CNI_CONTAINERID", "c"), ("CNI_NETNS", "")]).unwrap_err();
        assert_eq!(e, Error::MissingEnv(vec!["CNI_IFNAME"]));
        let d = inv(Command::Del, &[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "")]);
        assert!(d.unwrap().netns.is_none());
        assert_eq!(inv(Command::Gc, &[]).unwrap_err(), Error::MissingEnv(vec!["CNI_PATH"]));
        assert!(inv(Command::Status, &[]).is_ok());
        assert!(inv(Command::Version, &[("CNI_NETNS", "dummy")]).is_ok());
    }

    #[test]
    fn container_id_follows_the_spec_pattern() {
        for ok in ["a", "ABC", "0abc", "a.b-c_d"] {
            assert!(valid_container_id(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", ".a", "a/b", "a b", "a:b"] {
            assert!(!valid_container_id(bad), "{bad}");
        }
        let mut vars = FULL.to_vec();
        vars[0] = ("CNI_CONTAINERID", "../etc");
        assert_eq!(inv(Command::Add, &vars).unwrap_err().code(), 4);
    }

    #[test]
    fn interface_names_follow_kernel_rules() {
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "a\tb", "sixteen-chars-xx"] {
            assert!(invalid_ifname(bad).is_some(), "{bad:?}");
        }
        assert!(invalid_ifname("fifteen-chars-x").is_none());
        let mut vars = FULL.to_vec();
        vars[2] = ("CNI_IFNAME", "eth0:1");
        let e = inv(Command::Add, &vars).unwrap_err();
        assert!(e.to_string().contains("CNI_IFNAME"));
    }

    #[test]
    fn cni_args_rules() {
        assert!(CniArgs::parse("", &KNOWN).unwrap().0.is_empty());
        let a = CniArgs::parse("IP=10.0.0.5;MAC=02:00:00:00:00:01", &KNOWN).unwrap();
        assert_eq!(a.get("MAC"), Some("02:00:00:00:00:01"));
        assert!(CniArgs::parse("FOO=1", &KNOWN).unwrap_err().to_string().contains("FOO"));
        assert!(CniArgs::parse("FOO=1;IgnoreUnknown=true", &KNOWN).is_ok());
        assert!(CniArgs::parse("FOO=1;IgnoreUnknown=0", &KNOWN).is_err());
        assert!(CniArgs::parse("novalue", &KNOWN).is_err());
        assert!(CniArgs::parse("=x", &KNOWN).is_err());
        let k8s = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
                   K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1";
        assert!(CniArgs::parse("IgnoreUnknown=0", &[]).is_ok(), "IgnoreUnknown is always known");
        assert!(CniArgs::parse("IP=10.0.0.5", &[]).is_err(), "a plugin knowing no keys refuses IP");
        assert_eq!(CniArgs::parse(k8s, &KNOWN).unwrap().get("K8S_POD_UID"), Some("u-1"));
    }
}
