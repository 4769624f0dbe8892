//! The verb dispatcher: turns environment + stdin into a call on a [`Plugin`] and its
//! outcome into stdout and an exit code. Testable with an injected environment and stdin.

use std::io::Read;

use serde_json::{json, Value};

use crate::config::{valid_network_name, NetConf};
use crate::env::{Command, Invocation};
use crate::error::Error;
use crate::result::CniResult;
use crate::version::Version;

/// One call, validated: environment, config, and the raw stdin for delegation.
#[derive(Debug, Clone)]
pub struct Request {
    /// The CNI_* environment, validated for the verb.
    pub inv: Invocation,
    /// The config's common fields (plugin-specific ones in `conf.rest`).
    pub conf: NetConf,
    /// The config's version, supported and allowed for the verb.
    pub version: Version,
    /// The whole config as JSON, for plugin-specific parsing.
    pub raw: Value,
    /// stdin as received, handed unchanged to delegated plugins.
    pub stdin: Vec<u8>,
}

/// What a CNI plugin implements; the dispatcher has already checked env, config and version.
pub trait Plugin {
    /// One line naming the plugin, for the usage text.
    fn about(&self) -> String;
    /// The CNI_ARGS keys the plugin accepts besides `IgnoreUnknown`: any other key fails the
    /// call (code 4) unless `IgnoreUnknown=1`, so a typo is not silently ignored.
    fn cni_args(&self) -> &'static [&'static str];
    /// ADD: attach and return the result.
    fn add(&self, req: &Request) -> Result<CniResult, Error>;
    /// DEL: detach, best-effort and idempotent.
    fn del(&self, req: &Request) -> Result<(), Error>;
    /// CHECK: verify the attachment.
    fn check(&self, req: &Request) -> Result<(), Error>;
    /// GC: release what valid attachments no longer need.
    fn gc(&self, req: &Request) -> Result<(), Error>;
    /// STATUS: whether ADD can succeed.
    fn status(&self, req: &Request) -> Result<(), Error>;
}

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The result or error JSON (may be empty).
    pub stdout: String,
    /// Text for a human (usage, diagnostics): never part of the protocol.
    pub stderr: String,
    /// The process exit code: 0 on success, 1 when stdout holds an error.
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String) -> Outcome {
        Outcome { stdout, stderr: String::new(), exit_code: 0 }
    }

    fn err(e: &Error, version: &str) -> Outcome {
        Outcome { stdout: e.to_json(version), stderr: String::new(), exit_code: 1 }
    }
}

fn usage(plugin: &dyn Plugin) -> String {
    format!(
        "{}\nCNI protocol versions {}\nThis is a CNI plugin: a container runtime runs it with CNI_COMMAND \
         (ADD, DEL, CHECK, GC, STATUS or VERSION) and the other CNI_* variables set, and the network \
         config on stdin.\n",
        plugin.about(),
        Version::supported_strings().join(", ")
    )
}

/// Runs one call: `get_env` reads a variable, `stdin` is the config.
pub fn dispatch(
    plugin: &dyn Plugin,
    get_env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
) -> Outcome {
    let cmd_str = get_env("CNI_COMMAND").unwrap_or_default();
    if cmd_str.is_empty() {
        let error = Error::MissingEnv(vec!["CNI_COMMAND"]);
        let mut outcome = Outcome::err(&error, Version::CURRENT.to_string().as_str());
        outcome.stderr = usage(plugin);
        return outcome;
    }
    let mut buf = Vec::new();
    let read = stdin.read_to_end(&mut buf);
    let Some(command) = Command::parse(&cmd_str) else {
        let error = Error::InvalidEnv { var: "CNI_COMMAND", reason: format!("unknown command {cmd_str:?}") };
        return Outcome::err(&error, &Version::CURRENT.to_string());
    };
    if command == Command::Version {
        return version_outcome(&buf);
    }
    if let Err(error) = read {
        return Outcome::err(&Error::Io(format!("reading stdin: {error}")), &Version::CURRENT.to_string());
    }
    // The error JSON carries the config's version when it can be read at all.
    let claimed = serde_json::from_slice::<Value>(&buf)
        .ok()
        .and_then(|json| json.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| Version::CURRENT.to_string());
    match prepare(command, get_env, plugin.cni_args(), buf) {
        Err(error) => Outcome::err(&error, &claimed),
        Ok(req) => {
            let call = crate::log::Call::start(&req.inv, &req.conf.name, &req.raw, get_env);
            let vs = req.version.to_string();
            let res = match command {
                Command::Add => plugin.add(&req).map(|r| Some(r.to_json(req.version))),
                Command::Del => plugin.del(&req).map(|_| None),
                Command::Check => plugin.check(&req).map(|_| None),
                Command::Gc => plugin.gc(&req).map(|_| None),
                Command::Status => plugin.status(&req).map(|_| None),
                Command::Version => unreachable!("handled above"),
            };
            let out = match res {
                Ok(Some(json)) => Outcome::ok(json.to_string()),
                Ok(None) => Outcome::ok(String::new()),
                Err(error) => Outcome::err(&error, &vs),
            };
            call.finish(out.exit_code, &out.stdout);
            out
        }
    }
}

fn version_outcome(stdin: &[u8]) -> Outcome {
    // VERSION ignores everything else: echo a supported requested version, else the newest.
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).and_then(Version::parse))
        .filter(|v| v.is_supported())
        .unwrap_or(Version::CURRENT);
    let out = json!({"cniVersion": asked.to_string(), "supportedVersions": Version::supported_strings()});
    Outcome::ok(out.to_string())
}

fn prepare(
    command: Command,
    get_env: &dyn Fn(&str) -> Option<String>,
    known_args: &[&str],
    stdin: Vec<u8>,
) -> Result<Request, Error> {
    let inv = Invocation::from_env(command, get_env, known_args)?;
    let raw: Value = serde_json::from_slice(&stdin)
        .map_err(|e| Error::Decode { what: "network config", details: e.to_string() })?;
    if !raw.is_object() {
        return Err(Error::Decode { what: "network config", details: "not a JSON object".into() });
    }
    let conf = NetConf::from_slice(&stdin)?;
    let version = conf.version()?;
    let needs = match command {
        Command::Check => Some(Version::CHECK),
        Command::Gc | Command::Status => Some(Version::GC_STATUS),
        _ => None,
    };
    if let Some(min) = needs {
        if version < min {
            return Err(Error::IncompatibleVersion {
                details: format!(
                    "config version {version} does not allow {command:?}; it needs {min} or later"
                ),
            });
        }
    }
    if conf.name.is_empty() {
        return Err(Error::InvalidConfig("missing network name".into()));
    }
    if !valid_network_name(&conf.name) {
        return Err(Error::InvalidConfig(format!(
            "network name {:?} does not match ^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$",
            conf.name
        )));
    }
    Ok(Request { inv, conf, version, raw, stdin })
}

/// Runs a plugin as a process: real environment and stdin, prints, and exits.
pub fn run_main(plugin: &dyn Plugin) -> ! {
    let get = |k: &str| std::env::var(k).ok();
    let out = dispatch(plugin, &get, &mut std::io::stdin().lock());
    if !out.stderr.is_empty() {
        eprint!("{}", out.stderr);
    }
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    std::process::exit(out.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::IpConfig;
    use std::collections::HashMap;

    struct Fake;
    impl Plugin for Fake {
        fn about(&self) -> String {
            "fake plugin".into()
        }
        fn cni_args(&self) -> &'static [&'static str] {
            &["MAC"]
        }
        fn add(&self, req: &Request) -> Result<CniResult, Error> {
            if req.conf.rest.get("fail").is_some() {
                return Err(Error::plugin(120, "asked to fail", "because"));
            }
            Ok(CniResult {
                ips: vec![IpConfig {
                    address: "10.0.0.2/24".parse().unwrap(),
                    gateway: None,
                    interface: None,
                }],
                ..Default::default()
            })
        }
        fn del(&self, _: &Request) -> Result<(), Error> {
            Ok(())
        }
        fn check(&self, _: &Request) -> Result<(), Error> {
            Ok(())
        }
        fn gc(&self, _: &Request) -> Result<(), Error> {
            Ok(())
        }
        fn status(&self, _: &Request) -> Result<(), Error> {
            Ok(())
        }
    }

    fn run(cmd: &str, extra: &[(&str, &str)], stdin: &str) -> Outcome {
        let mut env: HashMap<String, String> = [
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        if !cmd.is_empty() {
            env.insert("CNI_COMMAND".into(), cmd.into());
        }
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        dispatch(&Fake, &|k| env.get(k).cloned(), &mut stdin.as_bytes())
    }

    fn json(o: &Outcome) -> Value {
        serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", o.stdout))
    }

    fn conf(v: &str) -> String {
        format!(r#"{{"cniVersion":"{v}","name":"net1","type":"fake"}}"#)
    }

    #[test]
    fn add_prints_the_result_in_the_config_version_for_every_version() {
        for v in Version::supported_strings() {
            let o = run("ADD", &[], &conf(&v));
            assert_eq!(o.exit_code, 0, "{v}: {o:?}");
            let j = json(&o);
            assert_eq!(j["cniVersion"], v.as_str());
            if v.starts_with("0.1") || v.starts_with("0.2") {
                assert_eq!(j["ip4"]["ip"], "10.0.0.2/24");
            } else {
                assert_eq!(j["ips"][0]["address"], "10.0.0.2/24");
            }
        }
    }

    #[test]
    fn missing_command_gives_usage_and_code_4() {
        let o = run("", &[], "");
        assert_eq!(o.exit_code, 1);
        assert_eq!(json(&o)["code"], 4);
        assert!(o.stderr.contains("CNI_COMMAND"));
        assert!(o.stderr.contains("1.1.0"));
    }

    #[test]
    fn unknown_command_is_code_4() {
        let o = run("FROB", &[], &conf("1.0.0"));
        assert_eq!(json(&o)["code"], 4);
        assert!(json(&o)["msg"].as_str().unwrap().contains("FROB"));
    }

    #[test]
    fn version_ignores_everything_else() {
        let o = run("VERSION", &[("CNI_NETNS", "dummy"), ("CNI_PATH", "dummy"), ("CNI_CONTAINERID", "")], "");
        assert_eq!(o.exit_code, 0);
        let j = json(&o);
        assert_eq!(j["cniVersion"], "1.1.0");
        assert_eq!(j["supportedVersions"].as_array().unwrap().len(), 7);
        let o = run("VERSION", &[], r#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(json(&o)["cniVersion"], "0.4.0");
        let o = run("VERSION", &[], r#"{"cniVersion":"7.0.0"}"#);
        assert_eq!(json(&o)["cniVersion"], "1.1.0");
    }

    #[test]
    fn malformed_config_is_code_6_and_unknown_version_code_1() {
        let o = run("ADD", &[], "{nope");
        assert_eq!((o.exit_code, json(&o)["code"].as_u64()), (1, Some(6)));
        let o = run("ADD", &[], "[1,2]");
        assert_eq!(json(&o)["code"], 6);
        let o = run("ADD", &[], &conf("1.3.0"));
        let j = json(&o);
        assert_eq!(j["code"], 1);
        assert!(j["details"].as_str().unwrap().contains("1.3.0"));
    }

    #[test]
    fn verbs_need_their_versions() {
        for v in ["0.1.0", "0.2.0", "0.3.0", "0.3.1"] {
            assert_eq!(json(&run("CHECK", &[], &conf(v)))["code"], 1, "CHECK {v}");
        }
        assert_eq!(run("CHECK", &[], &conf("0.4.0")).exit_code, 0);
        for verb in ["GC", "STATUS"] {
            for v in ["0.3.1", "0.4.0", "1.0.0"] {
                assert_eq!(json(&run(verb, &[], &conf(v)))["code"], 1, "{verb} {v}");
            }
            assert_eq!(run(verb, &[], &conf("1.1.0")).exit_code, 0, "{verb}");
        }
    }

    #[test]
    fn env_errors_are_code_4_and_carry_the_config_version() {
        let o = run("ADD", &[("CNI_IFNAME", "")], &conf("0.4.0"));
        let j = json(&o);
        assert_eq!(j["code"], 4);
        assert_eq!(j["cniVersion"], "0.4.0");
        assert!(j["msg"].as_str().unwrap().contains("CNI_IFNAME"));
        let o = run("ADD", &[("CNI_ARGS", "BOGUS=1")], &conf("1.0.0"));
        assert_eq!(json(&o)["code"], 4);
    }

    #[test]
    fn bad_network_name_is_code_7() {
        let o = run("ADD", &[], r#"{"cniVersion":"1.0.0","name":"../x","type":"fake"}"#);
        assert_eq!(json(&o)["code"], 7);
        let o = run("ADD", &[], r#"{"cniVersion":"1.0.0","type":"fake"}"#);
        assert_eq!(json(&o)["code"], 7);
    }

    #[test]
    fn plugin_errors_keep_their_code_and_details() {
        let o = run("ADD", &[], r#"{"cniVersion":"1.0.0","name":"n","type":"fake","fail":true}"#);
        let j = json(&o);
        assert_eq!(
            (j["code"].as_u64(), j["msg"].as_str(), j["details"].as_str()),
            (Some(120), Some("asked to fail"), Some("because"))
        );
    }

    #[test]
    fn del_without_netns_reaches_the_plugin() {
        let o = run("DEL", &[("CNI_NETNS", "")], &conf("1.0.0"));
        assert_eq!(o, Outcome::ok(String::new()));
    }
}
