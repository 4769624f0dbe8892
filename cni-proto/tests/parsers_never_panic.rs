//! Property tests (bounded: a few hundred cases each, about a second in all) of everything a
//! runtime hands a plugin: CNI_ARGS, the config on stdin, prevResult. No input panics; every
//! input gets either a result or a CNI error with a code; what parses round-trips.

use std::collections::BTreeMap;
use std::io::Cursor;

use cni_proto::testing::proptest_config;
use cni_proto::{dispatch, CniArgs, CniResult, Error, NetConf, Plugin, Request, Version};
use proptest::prelude::*;
use serde_json::{json, Value};

/// The CNI_ARGS keys the [`Echo`] plugin accepts.
const KNOWN_ARGS: [&str; 3] = ["IP", "MAC", "K8S_POD_NAME"];

const CONF_KEYS: [&str; 14] = [
    "cniVersion",
    "name",
    "type",
    "ipam",
    "dns",
    "runtimeConfig",
    "args",
    "prevResult",
    "cni.dev/valid-attachments",
    "cni.dev/attachments",
    "ips",
    "interfaces",
    "routes",
    "containerID",
];

/// Floats of up to ten digits: serde_json (without `float_roundtrip`) may change the 17th digit
/// of a float it reads back, which matters nowhere here (delegates get stdin unchanged) but
/// would make the round trip below fail for a reason that is not ours.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (any::<i32>(), 0..6i32).prop_map(|(m, e)| json!(f64::from(m) / 10f64.powi(e))),
        prop::sample::select(vec![
            "0.1.0",
            "0.3.1",
            "0.4.0",
            "1.0.0",
            "1.1.0",
            "10.1.2.3/24",
            "fd00::1",
            "eth0"
        ])
        .prop_map(Value::from),
        ".{0,10}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![prop::sample::select(CONF_KEYS.to_vec()).prop_map(String::from), ".{0,6}"],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A plugin that answers every verb with success (the dispatcher is what is tested).
struct Echo;

impl Plugin for Echo {
    fn about(&self) -> String {
        "echo".into()
    }
    fn cni_args(&self) -> &'static [&'static str] {
        &KNOWN_ARGS
    }
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        Ok(req.conf.prev_result()?.unwrap_or_default())
    }
    fn del(&self, _: &Request) -> Result<(), Error> {
        Ok(())
    }
    fn check(&self, req: &Request) -> Result<(), Error> {
        req.conf.prev_result().map(|_| ())
    }
    fn gc(&self, _: &Request) -> Result<(), Error> {
        Ok(())
    }
    fn status(&self, _: &Request) -> Result<(), Error> {
        Ok(())
    }
}

fn run(cmd: &str, cni_args: &str, stdin: &[u8]) -> cni_proto::Outcome {
    let env: BTreeMap<&str, String> = [
        ("CNI_COMMAND", cmd.to_string()),
        ("CNI_CONTAINERID", "c1".into()),
        ("CNI_NETNS", "/run/netns/x".into()),
        ("CNI_IFNAME", "eth0".into()),
        ("CNI_PATH", "/x".into()),
        ("CNI_ARGS", cni_args.into()),
    ]
    .into_iter()
    .collect();
    dispatch(&Echo, &|k| env.get(k).cloned(), &mut Cursor::new(stdin.to_vec()))
}

/// Every outcome is a result or an error object with a code, on stdout, with the exit code
/// to match.
fn well_formed(out: &cni_proto::Outcome) -> Result<(), TestCaseError> {
    if out.stdout.is_empty() {
        prop_assert_eq!(out.exit_code, 0);
        return Ok(());
    }
    let v: Value = serde_json::from_str(&out.stdout).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    prop_assert_eq!(v.get("code").is_some(), out.exit_code != 0, "{}", out.stdout);
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn cni_args_never_panic(s in ".{0,60}") {
        if let Ok(a) = CniArgs::parse(&s, &KNOWN_ARGS) {
            prop_assert!(a.0.keys().all(|k| !k.is_empty()));
        }
    }

    #[test]
    fn cni_args_round_trip(
        map in prop::collection::btree_map(prop::sample::select(KNOWN_ARGS.iter().copied().chain([cni_proto::env::IGNORE_UNKNOWN]).collect::<Vec<_>>()), "[^;]{0,12}", 0..6),
    ) {
        let text: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let parsed = CniArgs::parse(&text.join(";"), &KNOWN_ARGS).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want: BTreeMap<String, String> = map.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        prop_assert_eq!(parsed.0, want);
    }

    #[test]
    fn any_stdin_bytes_get_a_cni_answer(
        stdin in prop::collection::vec(any::<u8>(), 0..80),
        cmd in prop::sample::select(vec!["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "BOGUS"]),
    ) {
        well_formed(&run(cmd, "", &stdin))?;
    }

    #[test]
    fn any_json_config_gets_a_cni_answer(
        conf in json_value(),
        version in prop::sample::select(vec!["0.1.0", "0.2.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "", "1.2.0"]),
        cmd in prop::sample::select(vec!["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"]),
        args in ".{0,30}",
    ) {
        let mut conf = conf;
        if let Some(m) = conf.as_object_mut() {
            m.insert("cniVersion".into(), json!(version));
            m.entry("name").or_insert(json!("net"));
        }
        well_formed(&run(cmd, &args, conf.to_string().as_bytes()))?;
        if let Ok(parsed) = NetConf::from_slice(conf.to_string().as_bytes()) {
            let _ = parsed.version();
            let _ = parsed.gc_valid_attachments();
            // What a plugin passes on to its delegate parses back the same.
            let again = NetConf::from_slice(&serde_json::to_vec(&parsed).unwrap()).unwrap();
            prop_assert_eq!(serde_json::to_value(&again).unwrap(), serde_json::to_value(&parsed).unwrap());
        }
    }

    #[test]
    fn any_prev_result_parses_or_is_refused_and_round_trips(
        prev in json_value(),
        version in prop::sample::select(vec!["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
    ) {
        if let Ok(r) = CniResult::from_json(&prev, version) {
            let v = Version::parse(version).unwrap();
            let back = CniResult::from_json(&r.to_json(v), version);
            prop_assert!(back.is_ok(), "{:?} -> {}", r, r.to_json(v));
        }
    }
}
