//! What a hostile runtime or a damaged node does to host-local's directory: calls killed at
//! every step of the lease and index writes, torn leases, a damaged index, symbolic links
//! planted in the network directory, a full disk. Each test runs the built binary as a runtime
//! does and asserts what an operator would check: no lease left behind, no address given twice,
//! nothing written outside the network directory, the next ADD works.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

const OURS: &str = env!("CARGO_BIN_EXE_cni-host-local");

struct Out {
    code: i32,
    signal: Option<i32>,
    json: Value,
    stdout: String,
    stderr: String,
}

struct Call<'a> {
    cmd: &'a str,
    id: &'a str,
    env: &'a [(&'a str, &'a str)],
    cwd: Option<&'a Path>,
}

impl<'a> Call<'a> {
    fn new(cmd: &'a str, id: &'a str) -> Call<'a> {
        Call { cmd, id, env: &[], cwd: None }
    }
    fn crash_at(cmd: &'a str, id: &'a str, env: &'a [(&'a str, &'a str)]) -> Call<'a> {
        Call { cmd, id, env, cwd: None }
    }
    fn run(&self, conf: &Value) -> Out {
        let mut c = Command::new(OURS);
        c.env_clear()
            .env("CNI_COMMAND", self.cmd)
            .env("CNI_CONTAINERID", self.id)
            .env("CNI_NETNS", "/run/netns/none")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in self.env {
            c.env(k, v);
        }
        if let Some(d) = self.cwd {
            c.current_dir(d);
        }
        let mut child = c.spawn().expect("spawn plugin");
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        Out {
            code: o.status.code().unwrap_or(-1),
            signal: o.status.signal(),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stdout,
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
        }
    }
}

fn run(cmd: &str, id: &str, conf: &Value) -> Out {
    Call::new(cmd, id).run(conf)
}

struct Net {
    tmp: tempfile::TempDir,
    data: PathBuf,
}

impl Net {
    fn new() -> Net {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        Net { tmp, data }
    }
    fn at(data: PathBuf) -> Net {
        Net { tmp: tempfile::tempdir().unwrap(), data }
    }
    fn dir(&self) -> PathBuf {
        self.data.join("net1")
    }
    fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }
    /// A /29: .1 is the gateway, five addresses (.2-.6) to give out.
    fn conf(&self) -> Value {
        json!({"cniVersion": "1.1.0", "name": "net1", "type": "cni-bridge",
               "ipam": {"type": "cni-host-local", "subnet": "10.1.2.0/29",
                        "dataDir": self.data.to_str().unwrap()}})
    }
    fn with_prev(&self, added: &Out) -> Value {
        let mut c = self.conf();
        c["prevResult"] = added.json.clone();
        c
    }
    fn gc_keeping(&self, ids: &[&str]) -> Value {
        let mut c = self.conf();
        let list: Vec<Value> = ids.iter().map(|id| json!({"containerID": id, "ifname": "eth0"})).collect();
        c["cni.dev/valid-attachments"] = json!(list);
        c
    }
    /// Lease files (names that are addresses) and their holders.
    fn leases(&self) -> BTreeSet<(String, String)> {
        let Ok(rd) = fs::read_dir(self.dir()) else { return BTreeSet::new() };
        rd.filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            name.parse::<std::net::IpAddr>().ok()?;
            let content = fs::read_to_string(e.path()).unwrap_or_default();
            Some((name, content))
        })
        .collect()
    }
    fn index(&self) -> PathBuf {
        self.dir().join(".cni-index/leases")
    }
    fn add(&self, id: &str) -> Out {
        let o = run("ADD", id, &self.conf());
        assert_eq!(o.code, 0, "ADD {id}: {} {}", o.stdout, o.stderr);
        o
    }
    /// ADDs new containers until the pool is full: every one of the five addresses must be
    /// given, each once, and the sixth ADD must find the range exhausted.
    fn assert_pool_whole(&self, live: &[&str]) {
        // A torn (empty) lease file may still be there: the next call under the lock reclaims it.
        let mut got: BTreeSet<String> =
            self.leases().into_iter().filter(|(_, holder)| !holder.is_empty()).map(|(ip, _)| ip).collect();
        assert_eq!(got.len(), live.len(), "leases {:?} for live {live:?}", self.leases());
        for k in live.len()..5 {
            let o = self.add(&format!("fill{k}"));
            let ip = o.json["ips"][0]["address"].as_str().unwrap().to_string();
            assert!(got.insert(ip.clone()), "{ip} given twice");
        }
        let o = run("ADD", "fill-extra", &self.conf());
        assert_eq!(o.json["code"], 100, "{}", o.stdout);
        assert_eq!(self.leases().len(), 5);
    }
}

fn lease_of(o: &Out) -> String {
    o.json["ips"][0]["address"].as_str().unwrap().trim_end_matches("/29").to_string()
}

#[test]
fn an_empty_lease_file_left_by_a_killed_add_is_reclaimed() {
    let n = Net::new();
    let a = n.add("a");
    // What a runtime's SIGKILL between create and write leaves: an empty lease file.
    fs::write(n.dir().join("10.1.2.4"), "").unwrap();
    assert_eq!(run("DEL", "b", &n.conf()).code, 0);
    n.assert_pool_whole(&["a"]);
    assert!(n.leases().contains(&(lease_of(&a), "a\r\neth0".into())));
}

#[test]
fn gc_frees_an_empty_lease_file() {
    let n = Net::new();
    n.add("a");
    fs::write(n.dir().join("10.1.2.5"), "").unwrap();
    fs::write(n.dir().join("10.1.2.6"), [0u8; 12]).unwrap();
    assert_eq!(run("GC", "", &n.gc_keeping(&["a"])).code, 0);
    n.assert_pool_whole(&["a"]);
}

const ADD_STEPS: [&str; 5] = [
    "ipam-index-marked",
    "ipam-lease-created",
    "ipam-lease-written",
    "ipam-cursor-written",
    "ipam-index-written",
];

#[test]
fn add_killed_at_every_step_then_del_leaves_no_lease() {
    for step in ADD_STEPS {
        let n = Net::new();
        n.add("a");
        let o = Call::crash_at("ADD", "b", &[("CNI_TEST_CRASH_AT", step)]).run(&n.conf());
        assert_eq!(o.signal, Some(9), "{step}: not reached: {}", o.stdout);
        assert_eq!(run("DEL", "b", &n.conf()).code, 0, "{step}");
        n.assert_pool_whole(&["a"]);
    }
}

#[test]
fn add_killed_at_every_step_then_gc_leaves_no_lease() {
    for step in ADD_STEPS {
        let n = Net::new();
        n.add("a");
        let o = Call::crash_at("ADD", "b", &[("CNI_TEST_CRASH_AT", step)]).run(&n.conf());
        assert_eq!(o.signal, Some(9), "{step}: not reached: {}", o.stdout);
        assert_eq!(run("GC", "", &n.gc_keeping(&["a"])).code, 0, "{step}");
        n.assert_pool_whole(&["a"]);
    }
}

#[test]
fn add_killed_after_creating_the_lease_then_other_adds_reuse_the_address() {
    let n = Net::new();
    n.add("a");
    let o = Call::crash_at("ADD", "b", &[("CNI_TEST_CRASH_AT", "ipam-lease-created")]).run(&n.conf());
    assert_eq!(o.signal, Some(9));
    // No DEL for b (the runtime lost track of it): the torn lease must not hold its address.
    n.assert_pool_whole(&["a"]);
}

#[test]
fn del_killed_at_every_step_then_del_again_leaves_no_lease() {
    for step in ["ipam-index-marked", "ipam-lease-removed", "ipam-index-written"] {
        let n = Net::new();
        let a = n.add("a");
        let b = n.add("b");
        let o = Call::crash_at("DEL", "b", &[("CNI_TEST_CRASH_AT", step)]).run(&n.conf());
        assert_eq!(o.signal, Some(9), "{step}: not reached: {}", o.stdout);
        assert_eq!(run("CHECK", "a", &n.with_prev(&a)).code, 0, "{step}: CHECK of the live pod");
        let o = run("CHECK", "b", &n.with_prev(&b));
        if o.code == 0 {
            // Killed before its lease went: a repeated DEL finishes the job.
            assert_eq!(step, "ipam-index-marked");
        }
        assert_eq!(run("DEL", "b", &n.conf()).code, 0, "{step}");
        n.assert_pool_whole(&["a"]);
    }
}

#[test]
fn del_and_check_read_the_lease_file_not_only_the_index() {
    let n = Net::new();
    let a = n.add("a");
    // Another writer released a's address and leased it to b in place, within the same tick of
    // the directory's clock (rewriting a file does not change the directory at all).
    fs::write(n.dir().join(lease_of(&a)), "b\r\neth0").unwrap();
    assert_eq!(run("CHECK", "a", &n.with_prev(&a)).json["code"], 103, "CHECK a passed on b's lease");
    assert_eq!(run("DEL", "a", &n.conf()).code, 0);
    assert!(n.leases().contains(&(lease_of(&a), "b\r\neth0".into())), "DEL a removed b's lease");
    // The same result names the address, now b's.
    assert_eq!(run("CHECK", "b", &n.with_prev(&a)).code, 0, "the index did not learn b's lease");
}

/// Workers ADD and DEL concurrently while calls are killed at every step in turn, each kill
/// followed by the runtime's retry of DEL: no address is ever held by two live pods, every
/// live pod passes CHECK, and at the end no lease is left and the whole pool can be given out.
#[test]
fn concurrent_adds_and_dels_killed_at_every_step_lose_no_address() {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    let n = Net::new();
    let mut conf = n.conf();
    conf["ipam"]["subnet"] = json!("10.1.2.0/28"); // 13 addresses for 6 workers
    let del_steps = ["ipam-index-marked", "ipam-lease-removed", "ipam-index-written"];
    let live: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for w in 0..6 {
            let (conf, live) = (&conf, &live);
            s.spawn(move || {
                for i in 0..12 {
                    let id = format!("w{w}i{i}");
                    let add_at = [("CNI_TEST_CRASH_AT", ADD_STEPS[(w + i) % ADD_STEPS.len()])];
                    let del_at = [("CNI_TEST_CRASH_AT", del_steps[(w + i) % del_steps.len()])];
                    let crash = i % 3 == 0;
                    let o = Call::crash_at("ADD", &id, if crash { &add_at } else { &[] }).run(conf);
                    if o.code == 0 {
                        let ip = o.json["ips"][0]["address"].as_str().unwrap().to_string();
                        let twin = live.lock().unwrap().insert(ip.clone(), id.clone());
                        assert_eq!(twin, None, "{ip} given to {id} while live");
                        let mut c = conf.clone();
                        c["prevResult"] = o.json.clone();
                        assert_eq!(Call::new("CHECK", &id).run(&c).code, 0, "CHECK {id}");
                        // Live until its DEL starts; from then on the address may be freed.
                        live.lock().unwrap().remove(&ip);
                    } else {
                        assert!(crash && o.signal == Some(9), "ADD {id}: {} {}", o.stdout, o.stderr);
                    }
                    if i % 2 == 1 {
                        let o = Call::crash_at("DEL", &id, &del_at).run(conf);
                        assert!(o.code == 0 || o.signal == Some(9), "DEL {id}: {}", o.stdout);
                    }
                    let o = Call::new("DEL", &id).run(conf);
                    assert_eq!(o.code, 0, "DEL {id}: {}", o.stdout);
                }
            });
        }
    });
    assert!(n.leases().is_empty(), "leases left: {:?}", n.leases());
    for k in 0..13 {
        assert_eq!(Call::new("ADD", &format!("last{k}")).run(&conf).code, 0, "pool shrank: ADD {k}");
    }
}

/// Three live pods, their index edited by `damage`; afterwards every pod must pass CHECK, new
/// ADDs must never get a live pod's address, DEL must release, and nothing fails with code 5.
fn survives_damaged_index(what: &str, damage: impl Fn(&Net)) {
    let n = Net::new();
    let live: Vec<(String, Out)> = ["a", "b", "c"].iter().map(|id| (id.to_string(), n.add(id))).collect();
    damage(&n);
    for (id, added) in &live {
        let o = run("CHECK", id, &n.with_prev(added));
        assert_eq!(o.code, 0, "{what}: CHECK {id}: {}", o.stdout);
    }
    let taken: BTreeSet<String> = live.iter().map(|(_, o)| lease_of(o)).collect();
    for id in ["d", "e"] {
        let o = run("ADD", id, &n.conf());
        assert_eq!(o.code, 0, "{what}: ADD {id}: {}", o.stdout);
        assert!(!taken.contains(&lease_of(&o)), "{what}: {id} got a live pod's address {}", lease_of(&o));
    }
    assert!(n.index().is_file(), "{what}: the index was not rebuilt");
    for id in ["a", "b", "c", "d", "e"] {
        assert_eq!(run("DEL", id, &n.conf()).code, 0, "{what}: DEL {id}");
    }
    assert!(n.leases().is_empty(), "{what}: leases left: {:?}", n.leases());
}

#[test]
fn an_index_with_one_character_changed_in_the_boot_line_is_rebuilt_not_reclaimed() {
    survives_damaged_index("boot line edited", |n| {
        let text = fs::read_to_string(n.index()).unwrap();
        let at = text.find("\nboot ").unwrap() + 6;
        let mut bytes = text.into_bytes();
        bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
        fs::write(n.index(), bytes).unwrap();
    });
}

#[test]
fn an_index_with_a_lease_line_dropped_and_the_count_fixed_is_rebuilt() {
    survives_damaged_index("lease line dropped", |n| {
        let text = fs::read_to_string(n.index()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut out = String::new();
        let mut dropped = false;
        for l in lines {
            if l.starts_with("lease ") && l.contains(" b ") && !dropped {
                dropped = true;
                continue;
            }
            if let Some(rest) = l.strip_prefix("end ") {
                let mut f = rest.splitn(2, ' ');
                let count: usize = f.next().unwrap().parse().unwrap();
                out.push_str(&format!("end {}", count - 1));
                if let Some(tail) = f.next() {
                    out.push_str(&format!(" {tail}"));
                }
                out.push('\n');
                continue;
            }
            out.push_str(l);
            out.push('\n');
        }
        assert!(dropped, "{text}");
        fs::write(n.index(), out).unwrap();
    });
}

#[test]
fn an_index_directory_replaced_by_a_file_is_rebuilt() {
    survives_damaged_index(".cni-index is a file", |n| {
        fs::remove_dir_all(n.dir().join(".cni-index")).unwrap();
        fs::write(n.dir().join(".cni-index"), "junk").unwrap();
    });
}

#[test]
fn an_index_file_replaced_by_a_directory_is_rebuilt() {
    survives_damaged_index("leases is a directory", |n| {
        fs::remove_file(n.index()).unwrap();
        fs::create_dir(n.index()).unwrap();
        fs::write(n.index().join("x"), "junk").unwrap();
    });
}

#[test]
fn an_index_directory_replaced_by_a_symlink_is_rebuilt_and_not_followed() {
    let n = Net::new();
    fs::create_dir(n.outside()).unwrap();
    survives_damaged_index(".cni-index is a symlink", |m| {
        fs::create_dir_all(n.outside()).unwrap();
        fs::remove_dir_all(m.dir().join(".cni-index")).unwrap();
        std::os::unix::fs::symlink(n.outside(), m.dir().join(".cni-index")).unwrap();
    });
    assert_eq!(fs::read_dir(n.outside()).unwrap().count(), 0, "wrote through the .cni-index link");
}

#[test]
fn an_index_file_replaced_by_a_symlink_is_rebuilt_and_not_followed() {
    let n = Net::new();
    fs::write(n.outside(), "precious").unwrap();
    survives_damaged_index("leases is a symlink", |m| {
        fs::remove_file(m.index()).unwrap();
        std::os::unix::fs::symlink(n.outside(), m.index()).unwrap();
    });
    assert_eq!(fs::read_to_string(n.outside()).unwrap(), "precious", "wrote through the leases link");
}

#[test]
fn a_symlinked_cursor_is_refused_and_not_written() {
    let n = Net::new();
    n.add("a");
    fs::write(n.outside(), "precious").unwrap();
    fs::remove_file(n.dir().join("last_reserved_ip.0")).unwrap();
    std::os::unix::fs::symlink(n.outside(), n.dir().join("last_reserved_ip.0")).unwrap();
    let o = run("ADD", "b", &n.conf());
    assert_eq!(o.json["code"], 5, "{}", o.stdout);
    assert!(o.json["msg"].as_str().unwrap().contains("symbolic link"), "{}", o.stdout);
    assert_eq!(fs::read_to_string(n.outside()).unwrap(), "precious");
    assert_eq!(n.leases().len(), 1, "the refused ADD left a lease: {:?}", n.leases());
}

#[test]
fn a_symlinked_lock_is_refused_and_nothing_is_created_through_it() {
    let n = Net::new();
    n.add("a");
    fs::remove_file(n.dir().join("lock")).unwrap();
    std::os::unix::fs::symlink(n.outside(), n.dir().join("lock")).unwrap();
    for cmd in ["ADD", "DEL"] {
        let o = run(cmd, "b", &n.conf());
        assert_eq!(o.json["code"], 5, "{cmd}: {}", o.stdout);
        assert!(o.json["msg"].as_str().unwrap().contains("symbolic link"), "{}", o.stdout);
        assert!(!n.outside().exists(), "{cmd} created the lock's target");
    }
}

#[test]
fn a_symlinked_lease_is_neither_followed_nor_handed_out() {
    let n = Net::new();
    fs::create_dir_all(n.dir()).unwrap();
    fs::write(n.outside(), "precious").unwrap();
    std::os::unix::fs::symlink(n.outside(), n.dir().join("10.1.2.2")).unwrap();
    let o = n.add("a");
    assert_eq!(lease_of(&o), "10.1.2.3");
    assert_eq!(run("GC", "", &n.gc_keeping(&[])).code, 0);
    assert_eq!(run("DEL", "a", &n.conf()).code, 0);
    assert_eq!(fs::read_to_string(n.outside()).unwrap(), "precious");
}

#[test]
fn a_symlinked_network_directory_is_refused() {
    let n = Net::new();
    fs::create_dir_all(&n.data).unwrap();
    fs::create_dir(n.outside()).unwrap();
    std::os::unix::fs::symlink(n.outside(), n.dir()).unwrap();
    let o = run("ADD", "a", &n.conf());
    assert_eq!(o.json["code"], 5, "{}", o.stdout);
    assert!(o.json["msg"].as_str().unwrap().contains("symbolic link"), "{}", o.stdout);
    assert_eq!(fs::read_dir(n.outside()).unwrap().count(), 0);
}

#[test]
fn a_relative_data_dir_is_a_config_error_and_writes_nothing() {
    let n = Net::new();
    let mut c = n.conf();
    c["ipam"]["dataDir"] = json!("relative/dir");
    let cwd = n.tmp.path();
    let o = Call { cmd: "ADD", id: "a", env: &[], cwd: Some(cwd) }.run(&c);
    assert_eq!(o.json["code"], 7, "{}", o.stdout);
    assert!(o.json["msg"].as_str().unwrap().contains("absolute"), "{}", o.stdout);
    assert!(!cwd.join("relative").exists());
}

#[test]
fn a_gateway_outside_the_subnet_is_a_config_error() {
    let n = Net::new();
    let mut c = n.conf();
    c["ipam"]["gateway"] = json!("10.9.9.1");
    let o = run("ADD", "a", &c);
    assert_eq!(o.json["code"], 7, "{}", o.stdout);
    assert!(o.json["msg"].as_str().unwrap().contains("gateway 10.9.9.1 not in network"), "{}", o.stdout);
    assert!(!n.data.exists());
}

/// Runs `script` as root in a private mount namespace (a tmpfs mounted there vanishes with it
/// and is never seen by the machine).
fn in_private_mount_ns(script: &str) -> std::process::Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-euc", script])
        .output()
        .expect("unshare")
}

#[test]
fn a_full_disk_fails_add_without_leaving_a_lease() {
    if !nix::unistd::geteuid().is_root() {
        panic!("a_full_disk_fails_add_without_leaving_a_lease: needs root (a tmpfs in a private mount namespace)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let n = Net::at(mnt.join("data"));
    let conf = n.conf().to_string();
    // For k free pages: fill a 256 KiB tmpfs, free k pages, run ADD; report the ADD's output
    // and what the network directory holds afterwards.
    let mut failed_writing = BTreeSet::new();
    for free in 0..6 {
        let script = format!(
            r#"mount -t tmpfs -o size=256k tmpfs {mnt}
cd {mnt}
i=0; while [ $i -lt {free} ]; do echo x > spare$i; i=$((i+1)); done
dd if=/dev/zero of=fill bs=4096 2>/dev/null || true
rm -f spare*
echo '{conf}' | CNI_COMMAND=ADD CNI_CONTAINERID=b CNI_NETNS=/x CNI_IFNAME=eth0 CNI_PATH=/x {bin} > {out} || echo "exit $?" >> {out}
cat {out}; echo; echo ==
ls -A data/net1 2>/dev/null || true"#,
            mnt = mnt.display(),
            bin = OURS,
            out = tmp.path().join("out").display(),
        );
        let o = in_private_mount_ns(&script);
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{free} free pages: {text} {}", String::from_utf8_lossy(&o.stderr));
        let (result, listing) = text.split_once("==").unwrap();
        let files: BTreeSet<&str> = listing.split_whitespace().collect();
        eprintln!("{free} free pages: {} {files:?}", result.trim());
        let leased = files.iter().any(|f| f.parse::<std::net::IpAddr>().is_ok());
        if result.contains("exit") {
            let msg = result.split("writing ").nth(1).unwrap_or("").split(':').next().unwrap_or("");
            failed_writing.insert(msg.rsplit("net1/").next().unwrap_or("").to_string());
            assert!(result.contains("\"code\":5"), "{free} free pages: {result}");
            assert!(!leased, "{free} free pages: the failed ADD left a lease: {files:?}");
            assert!(!files.iter().any(|f| f.starts_with("last_reserved")), "{free}: cursor left: {files:?}");
        } else {
            assert!(leased, "{free} free pages: ADD succeeded without a lease: {result} {files:?}");
        }
    }
    // Every write of an ADD met the full disk in one of the runs: lease, cursor, index.
    let want: BTreeSet<String> =
        ["10.1.2.2", "last_reserved_ip.0", ".cni-index/leases"].iter().map(|s| s.to_string()).collect();
    assert_eq!(failed_writing, want);
}
