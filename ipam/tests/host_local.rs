//! Runs the built `cni-host-local` as a runtime does (env + stdin), against a temp dataDir.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

const OURS: &str = env!("CARGO_BIN_EXE_cni-host-local");
const REFERENCE: &str = "/usr/lib/cni/host-local";

struct Out {
    code: i32,
    json: Value,
    stdout: String,
}

fn run_bin(bin: &str, cmd: &str, id: &str, ifname: &str, extra: &[(&str, &str)], conf: &Value) -> Out {
    let mut c = Command::new(bin);
    c.env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", "/run/netns/none")
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("spawn plugin");
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    Out { code: o.status.code().unwrap_or(-1), json, stdout }
}

fn run(cmd: &str, id: &str, conf: &Value) -> Out {
    run_bin(OURS, cmd, id, "eth0", &[], conf)
}

/// Debian's reference host-local (the oracle); fails the calling test when it is missing.
fn reference() -> &'static str {
    if !Path::new(REFERENCE).exists() {
        panic!("{REFERENCE} (Debian's containernetworking-plugins) is missing: scripts/test installs it");
    }
    REFERENCE
}

struct Net {
    _tmp: tempfile::TempDir,
    data: PathBuf,
}

impl Net {
    fn new() -> Net {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        Net { _tmp: t, data }
    }
    fn dir(&self) -> PathBuf {
        self.data.join("net1")
    }
    fn conf(&self, version: &str, ipam: Value) -> Value {
        let mut ipam = ipam;
        ipam["type"] = json!("cni-host-local");
        ipam["dataDir"] = json!(self.data.to_str().unwrap());
        json!({"cniVersion": version, "name": "net1", "type": "cni-bridge", "ipam": ipam})
    }
    fn simple(&self, version: &str) -> Value {
        self.conf(version, json!({"subnet": "10.1.2.0/24"}))
    }
    /// Lease files (names that are addresses), sorted.
    fn leases(&self) -> BTreeSet<String> {
        match fs::read_dir(self.dir()) {
            Err(_) => BTreeSet::new(),
            Ok(rd) => rd
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect(),
        }
    }
    fn lease(&self, ip: &str) -> Vec<u8> {
        fs::read(self.dir().join(ip)).unwrap()
    }
}

const VERSIONS: [&str; 7] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[test]
fn add_prints_each_version_shape_and_writes_reference_files() {
    for v in VERSIONS {
        let n = Net::new();
        let o =
            run("ADD", "c1", &n.conf(v, json!({"subnet": "10.1.2.0/24", "routes": [{"dst": "0.0.0.0/0"}]})));
        assert_eq!(o.code, 0, "{v}: {}", o.stdout);
        let j = &o.json;
        assert_eq!(j["cniVersion"], v);
        if v == "0.1.0" || v == "0.2.0" {
            assert_eq!(j["ip4"]["ip"], "10.1.2.2/24", "{v}");
            assert_eq!(j["ip4"]["gateway"], "10.1.2.1");
            assert_eq!(j["ip4"]["routes"][0]["dst"], "0.0.0.0/0");
        } else {
            assert!(j.get("interfaces").is_none(), "IPAM results are abbreviated");
            assert_eq!(j["ips"][0]["address"], "10.1.2.2/24");
            assert_eq!(j["ips"][0]["gateway"], "10.1.2.1");
            assert!(j["ips"][0].get("interface").is_none());
            assert_eq!(j["ips"][0].get("version").is_some(), v.starts_with("0."), "{v}");
            assert_eq!(j["routes"][0]["dst"], "0.0.0.0/0");
        }
        assert_eq!(n.lease("10.1.2.2"), b"c1\r\neth0");
        assert_eq!(fs::read(n.dir().join("last_reserved_ip.0")).unwrap(), b"10.1.2.2");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(n.dir().join("10.1.2.2")).unwrap().mode() & 0o777, 0o600);
    }
}

#[test]
fn dual_stack_routes_and_dns() {
    let n = Net::new();
    let resolv = n._tmp.path().join("resolv.conf");
    fs::write(
        &resolv,
        "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n",
    )
    .unwrap();
    let conf = n.conf(
        "1.1.0",
        json!({
            "ranges": [[{"subnet": "10.1.2.0/24", "rangeStart": "10.1.2.10", "rangeEnd": "10.1.2.20", "gateway": "10.1.2.254"}],
                       [{"subnet": "2001:db8:1::/64"}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "priority": 100}],
            "resolvConf": resolv.to_str().unwrap()
        }),
    );
    let o = run("ADD", "c1", &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert_eq!(o.json["ips"][0]["address"], "10.1.2.10/24");
    assert_eq!(o.json["ips"][0]["gateway"], "10.1.2.254");
    assert_eq!(o.json["ips"][1]["address"], "2001:db8:1::2/64");
    assert_eq!(o.json["routes"][1]["priority"], 100);
    assert_eq!(o.json["dns"]["nameservers"][0], "10.96.0.10");
    assert_eq!(o.json["dns"]["search"].as_array().unwrap().len(), 2);
    assert_eq!(n.leases(), BTreeSet::from(["10.1.2.10".into(), "2001:db8:1::2".into()]));
    assert_eq!(fs::read(n.dir().join("last_reserved_ip.1")).unwrap(), b"2001:db8:1::2");
}

#[test]
fn del_releases_and_is_idempotent() {
    let n = Net::new();
    let conf = n.simple("1.0.0");
    assert_eq!(run("ADD", "c1", &conf).code, 0);
    assert_eq!(run("ADD", "c2", &conf).code, 0);
    assert_eq!(run("DEL", "c1", &conf).code, 0);
    assert_eq!(n.leases(), BTreeSet::from(["10.1.2.3".into()]));
    assert_eq!(run("DEL", "c1", &conf).code, 0, "repeated DEL");
    assert_eq!(run("DEL", "never-added", &conf).code, 0, "unknown container");
    let o = run_bin(OURS, "DEL", "c1", "eth0", &[("CNI_NETNS", "")], &conf);
    assert_eq!(o.code, 0, "empty netns");
    // DEL of a network never used writes nothing.
    let fresh = Net::new();
    assert_eq!(run("DEL", "c1", &fresh.simple("1.0.0")).code, 0);
    assert!(!fresh.data.exists());
}

#[test]
fn second_add_for_same_attachment_is_an_error() {
    let n = Net::new();
    let conf = n.simple("1.0.0");
    assert_eq!(run("ADD", "c1", &conf).code, 0);
    let o = run("ADD", "c1", &conf);
    assert_eq!((o.code, o.json["code"].as_u64()), (1, Some(102)), "{}", o.stdout);
    assert!(o.json["msg"].as_str().unwrap().contains("duplicate allocation"));
    assert_eq!(n.leases().len(), 1);
    assert_eq!(run_bin(OURS, "ADD", "c1", "net1", &[], &conf).code, 0, "another interface");
}

#[test]
fn exhausted_range_names_it_and_writes_nothing() {
    let n = Net::new();
    let conf = n.conf(
        "1.0.0",
        json!({"ranges": [[{"subnet": "10.9.0.0/24"}],
                          [{"subnet": "10.1.2.0/29", "rangeStart": "10.1.2.2", "rangeEnd": "10.1.2.3"}]]}),
    );
    assert_eq!(run("ADD", "a", &conf).code, 0);
    assert_eq!(run("ADD", "b", &conf).code, 0);
    let before: Vec<(String, Vec<u8>)> = snapshot(&n.dir());
    let o = run("ADD", "c", &conf);
    assert_eq!(o.json["code"], 100, "{}", o.stdout);
    assert!(o.json["msg"].as_str().unwrap().contains("10.1.2.2-10.1.2.3"), "{}", o.stdout);
    assert_eq!(
        snapshot(&n.dir()),
        before,
        "an exhausted range writes nothing, not even set 0's lease or cursor"
    );
}

/// Every file under `dir` (recursively) with its content.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn bad_input_gets_the_right_code_and_writes_nothing() {
    let n = Net::new();
    let bad: Vec<(Value, u64, &str)> = vec![
        (json!({"cniVersion": "1.0.0", "name": "net1"}), 7, "ipam"),
        (n.conf("1.0.0", json!({"subnet": "10.1.2.5/24"})), 7, "host bits"),
        (n.conf("1.0.0", json!({"subnet": "10.1.2.0/31"})), 7, "too small"),
        (n.conf("1.0.0", json!({"subnet": "nope"})), 7, "subnet"),
        (n.conf("1.0.0", json!({})), 7, "no IP ranges"),
        (
            n.conf("1.0.0", json!({"ranges": [[{"subnet": "10.1.0.0/16"}], [{"subnet": "10.1.2.0/24"}]]})),
            7,
            "overlaps",
        ),
        (
            n.conf("1.0.0", json!({"ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/64"}]]})),
            7,
            "mixed",
        ),
        (n.conf("1.0.0", json!({"subnet": "10.1.2.0/24", "rangeStart": "10.1.3.1"})), 7, "not in network"),
        (n.conf("1.0.0", json!({"subnet": "10.1.2.0/24", "routes": [{"dst": "x"}]})), 7, "route"),
        (
            n.conf("0.2.0", json!({"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.2.0.0/24"}]]})),
            1,
            "per family",
        ),
        (n.conf("9.9.9", json!({"subnet": "10.1.2.0/24"})), 1, "incompatible"),
    ];
    for (conf, code, needle) in bad {
        let o = run("ADD", "c1", &conf);
        assert_eq!(o.code, 1);
        assert_eq!(o.json["code"].as_u64(), Some(code), "{conf}: {}", o.stdout);
        let all = format!("{} {}", o.json["msg"], o.json["details"]);
        assert!(all.contains(needle), "{needle:?} not in {all}");
    }
    let o = Command::new(OURS)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c")
        .env("CNI_NETNS", "/x")
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert_eq!(serde_json::from_str::<Value>(&s).unwrap()["code"], 6, "empty stdin is not a config");
    let o = run_bin(OURS, "ADD", "c1", "eth0", &[("CNI_ARGS", "IP=banana")], &n.simple("1.0.0"));
    assert_eq!(o.json["code"], 4, "{}", o.stdout);
    let o = run_bin(OURS, "ADD", "c1", "eth0", &[("CNI_ARGS", "WHO=me")], &n.simple("1.0.0"));
    assert_eq!(o.json["code"], 4, "{}", o.stdout);
    let o = run_bin(OURS, "ADD", "c1", "", &[], &n.simple("1.0.0"));
    assert_eq!(o.json["code"], 4);
    assert!(!n.data.exists(), "bad input created {}", n.data.display());
}

#[test]
fn requested_addresses_from_every_source() {
    let n = Net::new();
    let conf = n.simple("1.0.0");
    let o = run_bin(
        OURS,
        "ADD",
        "a",
        "eth0",
        &[("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.1.2.50")],
        &conf,
    );
    assert_eq!(o.json["ips"][0]["address"], "10.1.2.50/24", "{}", o.stdout);
    let mut c = conf.clone();
    c["args"] = json!({"cni": {"ips": ["10.1.2.60/24"]}});
    assert_eq!(run("ADD", "b", &c).json["ips"][0]["address"], "10.1.2.60/24");
    let mut c = conf.clone();
    c["runtimeConfig"] = json!({"ips": ["10.1.2.70"]});
    assert_eq!(run("ADD", "c", &c).json["ips"][0]["address"], "10.1.2.70/24");
    // Taken, gateway, outside every range.
    for (ip, id) in [("10.1.2.70", "d"), ("10.1.2.1", "e"), ("10.7.7.7", "f")] {
        let mut c = conf.clone();
        c["runtimeConfig"] = json!({"ips": [ip]});
        let o = run("ADD", id, &c);
        assert_eq!(o.json["code"], 101, "{ip}: {}", o.stdout);
    }
    assert_eq!(n.leases().len(), 3);
    // runtimeConfig.ipRanges is prepended to the configured ranges.
    let mut c = conf.clone();
    c["runtimeConfig"] = json!({"ipRanges": [[{"subnet": "10.50.0.0/24"}]]});
    let o = run("ADD", "g", &c);
    assert_eq!(o.json["ips"][0]["address"], "10.50.0.2/24", "{}", o.stdout);
    assert_eq!(o.json["ips"][1]["address"], "10.1.2.2/24");
}

#[test]
fn check_passes_then_fails_when_the_lease_is_gone_or_differs() {
    let n = Net::new();
    let conf = n.simple("1.1.0");
    let added = run("ADD", "c1", &conf);
    let mut c = conf.clone();
    c["prevResult"] = added.json.clone();
    assert_eq!(run("CHECK", "c1", &c).code, 0);
    let mut wrong = c.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("10.1.2.99/24");
    let o = run("CHECK", "c1", &wrong);
    assert_eq!(o.json["code"], 103, "{}", o.stdout);
    assert_eq!(run("CHECK", "c1", &conf).code, 0, "no prevResult: reservation alone");
    assert_eq!(run("DEL", "c1", &c).code, 0);
    let o = run("CHECK", "c1", &c);
    assert_eq!(o.json["code"], 103, "{}", o.stdout);
    assert_eq!(run("CHECK", "c1", &n.simple("0.3.1")).json["code"], 1);
}

#[test]
fn gc_releases_only_what_is_not_valid_and_nothing_without_a_list() {
    let n = Net::new();
    let conf = n.simple("1.1.0");
    for id in ["a", "b", "c"] {
        assert_eq!(run("ADD", id, &conf).code, 0);
    }
    assert_eq!(run("GC", "", &conf).code, 0);
    assert_eq!(n.leases().len(), 3, "no valid-attachments key: release nothing");
    let mut c = conf.clone();
    c["cni.dev/valid-attachments"] =
        json!([{"containerID": "b", "ifname": "eth0"}, {"containerID": "c", "ifname": "eth9"}]);
    let o = run("GC", "", &c);
    assert_eq!((o.code, o.stdout.as_str()), (0, ""));
    assert_eq!(n.leases(), BTreeSet::from(["10.1.2.3".into()]));
    let mut c = conf.clone();
    c["cni.dev/attachments"] = json!([]);
    assert_eq!(run("GC", "", &c).code, 0);
    assert!(n.leases().is_empty(), "an empty list is meaningful");
    assert_eq!(run("GC", "", &n.simple("1.0.0")).json["code"], 1);
}

#[test]
fn status_fails_only_for_what_an_operator_must_fix() {
    let n = Net::new();
    let full = n.conf("1.1.0", json!({"subnet": "10.1.2.0/30"}));
    assert_eq!(run("STATUS", "", &full).code, 0, "never used");
    assert_eq!(run("ADD", "a", &full).code, 0);
    assert_eq!(run("ADD", "b", &full).json["code"], 100);
    assert_eq!(run("STATUS", "", &full).code, 0, "a full range is not a reason to be NotReady");
    let o = run("STATUS", "", &n.conf("1.1.0", json!({"subnet": "10.1.2.5/24"})));
    assert_eq!(o.json["code"], 50, "{}", o.stdout);
    let file = n._tmp.path().join("plainfile");
    fs::write(&file, "").unwrap();
    let mut c = n.simple("1.1.0");
    c["ipam"]["dataDir"] = json!(file.join("sub").to_str().unwrap());
    let o = run("STATUS", "", &c);
    assert_eq!(o.json["code"], 50, "{}", o.stdout);
    assert_eq!(run("STATUS", "", &n.simple("1.0.0")).json["code"], 1);
}

#[test]
fn leases_from_an_earlier_boot_are_reclaimed() {
    let n = Net::new();
    let conf = n.simple("1.0.0");
    assert_eq!(run("ADD", "old", &conf).code, 0);
    let idx = n.dir().join(".cni-index/leases");
    // An intact index (its checksum holds) written under another boot id.
    let mut parsed = cni_host_local::store::parse_index(&fs::read_to_string(&idx).unwrap()).unwrap();
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(parsed.boot, boot.trim());
    parsed.boot = "00000000-0000-0000-0000-000000000000".into();
    fs::write(&idx, cni_host_local::store::render_index(&parsed)).unwrap();
    assert_eq!(run("ADD", "new", &conf).code, 0);
    assert_eq!(n.leases(), BTreeSet::from(["10.1.2.3".into()]), "the earlier boot's lease is gone");
    assert_eq!(n.lease("10.1.2.3"), b"new\r\neth0");
}

#[test]
fn parallel_adds_get_distinct_addresses_and_parallel_dels_leave_nothing() {
    let n = Net::new();
    let conf = n.conf("1.0.0", json!({"subnet": "10.1.0.0/16"}));
    let run_all = |cmd: &'static str| {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..100)
                .map(|i| {
                    let conf = &conf;
                    s.spawn(move || run(cmd, &format!("c{i}"), conf))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<Out>>()
        })
    };
    let adds = run_all("ADD");
    let ips: BTreeSet<String> = adds
        .iter()
        .map(|o| {
            assert_eq!(o.code, 0, "{}", o.stdout);
            o.json["ips"][0]["address"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ips.len(), 100);
    assert_eq!(n.leases().len(), 100);
    assert!(run_all("DEL").iter().all(|o| o.code == 0));
    assert!(n.leases().is_empty());
}

#[test]
fn interop_with_the_reference_host_local() {
    let refbin = reference();
    let n = Net::new();
    let conf = n.simple("1.0.0"); // Debian's reference speaks up to 1.0.0
                                  // Reference ADD → our DEL releases it, and our ADD does not take its address.
    let r = run_bin(refbin, "ADD", "ref1", "eth0", &[], &conf);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(n.lease("10.1.2.2"), b"ref1\r\neth0");
    let o = run("ADD", "ours1", &conf);
    assert_eq!(
        o.json["ips"][0]["address"], "10.1.2.3/24",
        "round robin continues from the reference's cursor"
    );
    let mut c = conf.clone();
    c["prevResult"] = r.json.clone();
    assert_eq!(run("CHECK", "ref1", &c).code, 0, "our CHECK finds the reference's lease");
    assert_eq!(run("DEL", "ref1", &conf).code, 0);
    assert!(!n.dir().join("10.1.2.2").exists());
    // Our ADD → reference CHECK and DEL find it.
    let mut c = conf.clone();
    c["prevResult"] = o.json.clone();
    assert_eq!(run_bin(refbin, "CHECK", "ours1", "eth0", &[], &c).code, 0);
    assert_eq!(run_bin(refbin, "DEL", "ours1", "eth0", &[], &conf).code, 0);
    assert!(n.leases().is_empty());
    // After the reference changed the directory, our index still finds what it wrote.
    assert_eq!(run_bin(refbin, "ADD", "ref2", "eth0", &[], &conf).code, 0);
    assert_eq!(run("ADD", "ref2", &conf).json["code"], 102, "duplicate seen through the index");
    assert_eq!(run("DEL", "ref2", &conf).code, 0);
    assert!(n.leases().is_empty());
    // A legacy (id only) lease from a pre-0.8 reference is released by DEL of any ifname.
    fs::write(n.dir().join("10.1.2.77"), "legacy").unwrap();
    assert_eq!(run_bin(OURS, "DEL", "legacy", "net3", &[], &conf).code, 0);
    assert!(n.leases().is_empty());
}
