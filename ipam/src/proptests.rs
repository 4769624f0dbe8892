//! Property tests (bounded, a few seconds in all): the lease and index parsers and the ipam
//! config never panic on any input, round-trip what they write, and every config that parses
//! gives an ADD that allocates inside its ranges and a DEL that leaves no lease.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cni_proto::testing::proptest_config;
use cni_proto::{Command, Invocation, NetConf, Plugin, Request};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::config::IpamConfig;
use crate::range::Range;
use crate::store::{parse_index, render_index, IndexFile, Lease};
use crate::HostLocal;

/// Addresses and subnets, mostly near each other so that ranges often validate.
fn ip_like() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..=3, any::<u8>()).prop_map(|(c, d)| format!("10.1.{c}.{d}")),
        (0u8..=3, 22u8..=33).prop_map(|(c, p)| format!("10.1.{c}.0/{p}")),
        (any::<[u8; 4]>(), 0u8..=33).prop_map(|(a, p)| format!("{}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])),
        (any::<u16>(), 0u8..=129).prop_map(|(x, p)| format!("fd00::{x:x}/{p}")),
        any::<u16>().prop_map(|x| format!("fd00::{x:x}")),
        Just("::/0".to_string()),
        Just("::".to_string()),
        Just("0.0.0.0/0".to_string()),
        Just("::ffff:10.1.2.3".to_string()),
        ".{0,8}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ip_like().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map(".{0,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mostly strings that look like addresses, sometimes any JSON.
fn field() -> impl Strategy<Value = Value> {
    prop_oneof![8 => ip_like().prop_map(Value::from), 1 => json_value()]
}

fn range_obj() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
        prop::sample::select(vec!["subnet", "rangeStart", "rangeEnd", "gateway"]),
        field(),
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

fn range_sets() -> impl Strategy<Value = Value> {
    prop::collection::vec(prop::collection::vec(range_obj(), 0..3).prop_map(Value::from), 0..3)
        .prop_map(Value::from)
}

fn ipam_section() -> impl Strategy<Value = Value> {
    (
        range_obj(),
        prop::option::of(range_sets()),
        prop::option::of(prop::collection::vec(
            prop::collection::btree_map(prop::sample::select(vec!["dst", "gw", "mtu"]), field(), 0..3),
            0..3,
        )),
        prop::option::of(json_value()),
    )
        .prop_map(|(legacy, ranges, routes, junk)| {
            let mut m: Map<String, Value> = legacy.as_object().cloned().unwrap_or_default();
            m.insert("type".into(), json!("cni-host-local"));
            if let Some(r) = ranges {
                m.insert("ranges".into(), r);
            }
            if let Some(r) = routes {
                let list: Vec<Value> = r
                    .into_iter()
                    .map(|o| Value::Object(o.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
                    .collect();
                m.insert("routes".into(), list.into());
            }
            if let Some(j) = junk {
                m.insert("resolvConf".into(), j);
            }
            Value::Object(m)
        })
}

fn request(conf: &Value, args: &str, cmd: Command) -> Option<Request> {
    let env: BTreeMap<&str, String> = [
        ("CNI_CONTAINERID", "c1".to_string()),
        ("CNI_NETNS", "/run/netns/x".into()),
        ("CNI_IFNAME", "eth0".into()),
        ("CNI_PATH", "/x".into()),
        ("CNI_ARGS", args.to_string()),
    ]
    .into_iter()
    .collect();
    let inv = Invocation::from_env(cmd, &|k| env.get(k).cloned(), crate::plugin::CNI_ARGS).ok()?;
    let stdin = conf.to_string().into_bytes();
    let parsed = NetConf::from_slice(&stdin).ok()?;
    let version = parsed.version().ok()?;
    Some(Request { inv, conf: parsed, version, raw: conf.clone(), stdin })
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn lease_files_never_panic(content in prop::collection::vec(any::<u8>(), 0..40)) {
        if let Some(l) = Lease::parse(&content) {
            prop_assert!(!l.id.is_empty());
        }
    }

    #[test]
    fn lease_files_round_trip(id in "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,70}", ifname in "[a-zA-Z0-9_.-]{1,15}") {
        let parsed = Lease::parse(Lease::render(&id, &ifname).as_bytes());
        prop_assert_eq!(parsed, Some(Lease { id, ifname }));
    }

    #[test]
    fn index_parser_never_panics(text in ".{0,300}") {
        let _ = parse_index(&text);
    }

    #[test]
    fn index_round_trips_any_lease_and_rejects_any_single_change(
        boot in ".{0,40}",
        stamp in ".{0,40}",
        leases in prop::collection::btree_map(any::<IpAddr>(), (".{0,20}", ".{0,20}"), 0..6),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let leases = leases.into_iter().map(|(ip, (id, ifname))| (ip, Lease { id, ifname })).collect();
        let idx = IndexFile { boot, stamp, leases };
        let text = render_index(&idx);
        let back = parse_index(&text);
        prop_assert_eq!(back.as_ref(), Some(&idx));
        let mut bytes = text.clone().into_bytes();
        let i = at.index(bytes.len());
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        if let Ok(changed) = String::from_utf8(bytes) {
            prop_assert!(parse_index(&changed).is_none(), "trusted {:?}", changed);
        }
        let cut = &text[..at.index(text.len())];
        prop_assert!(parse_index(cut).is_none());
    }

    #[test]
    fn ranges_that_validate_are_consistent(
        subnet in ip_like(), start in prop::option::of(ip_like()),
        end in prop::option::of(ip_like()), gw in prop::option::of(ip_like()),
    ) {
        if let Ok(r) = Range::new(&subnet, start.as_deref(), end.as_deref(), gw.as_deref()) {
            prop_assert!(r.subnet.contains(r.start) && r.subnet.contains(r.end) && r.subnet.contains(r.gateway));
            prop_assert!(r.contains(r.start) && r.contains(r.end));
        }
    }

    /// Any config: parsing never panics; when it parses, ADD allocates inside the configured
    /// ranges (or fails with a CNI error) and DEL leaves no lease.
    #[test]
    fn any_ipam_config_parses_or_is_refused_and_add_del_leave_nothing(
        ipam in ipam_section(),
        version in prop::sample::select(vec!["0.2.0", "0.4.0", "1.0.0", "1.1.0", "", "2.0"]),
        ip_arg in prop::option::of(ip_like()),
        runtime in prop::option::of(json_value()),
    ) {
        let t = tempfile::tempdir().unwrap();
        let mut ipam = ipam;
        ipam["dataDir"] = json!(t.path().to_str().unwrap());
        let mut conf = json!({"cniVersion": version, "name": "net", "type": "x", "ipam": ipam});
        if let Some(rt) = runtime {
            conf["runtimeConfig"] = json!({"ips": rt.clone(), "ipRanges": rt});
        }
        let args = ip_arg.map(|ip| format!("IP={ip}")).unwrap_or_default();
        let Some(req) = request(&conf, &args, Command::Add) else { return Ok(()) };
        let Ok(cfg) = IpamConfig::from_request(&req) else { return Ok(()) };
        if let Ok(res) = Plugin::add(&HostLocal, &req) {
            for ip in &res.ips {
                prop_assert!(cfg.ranges.iter().any(|s| s.range_for(ip.address.ip()).is_some()), "{ip:?}");
            }
            let del = request(&conf, &args, Command::Del).unwrap();
            prop_assert!(Plugin::del(&HostLocal, &del).is_ok());
        }
        let dir = t.path().join("net");
        let left: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        prop_assert!(!left.iter().any(|n| n.parse::<IpAddr>().is_ok()), "leases left: {left:?}");
    }
}

/// Found while writing the config property above (it generates `::/0` and `::`, but rarely
/// together): a range covering the whole IPv6 space has 2^128 addresses, one more than a u128,
/// and ADD panicked on the overflow.
#[test]
fn the_whole_ipv6_space_as_one_range_does_not_overflow() {
    let t = tempfile::tempdir().unwrap();
    let conf = json!({"cniVersion": "1.0.0", "name": "net", "type": "x",
        "ipam": {"subnet": "::/0", "rangeStart": "::", "dataDir": t.path().to_str().unwrap()}});
    let req = request(&conf, "", Command::Add).unwrap();
    let res = Plugin::add(&HostLocal, &req).unwrap();
    assert_eq!(res.ips[0].address.to_string(), "::2/0");
    std::fs::write(t.path().join("net/last_reserved_ip.0"), "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
        .unwrap();
    let req = request(&conf, "", Command::Add).map(|mut r| {
        r.inv.container_id = "c2".into();
        r
    });
    let res = Plugin::add(&HostLocal, &req.unwrap()).unwrap();
    assert_eq!(res.ips[0].address.to_string(), "::3/0", "wraps from the last address");
}
