//! The IP spoof check (`ipspoofchk`): a pod sends only from its own addresses and announces
//! (ARP, neighbour advertisements) only its own addresses, so that no pod can pass a
//! NetworkPolicy rule or take another pod's traffic with that pod's address.
//!
//! Every attack is followed by a genuine packet from the same pod, sent from the same thread
//! pinned to one CPU: frames of one sender on one CPU go through the bridge and into the
//! receiver in order, so once the genuine packet has arrived, an attack frame that was not
//! dropped has arrived (and been processed) too. No timed "nothing came" assertion.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cni_conformance::traffic::tcp_exchange;
use cni_conformance::{require_root, Netns};
use common::*;
use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};

fn path(ns: &Netns) -> String {
    ns.path.display().to_string()
}

/// Runs `work` on a thread inside `ns`, pinned to one CPU (see the module comment).
fn pinned<T: Send + 'static>(ns: &Netns, work: impl FnOnce() -> T + Send + 'static) -> T {
    let file = ns.file();
    std::thread::spawn(move || {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        let allowed = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
        let cpu = (0..CpuSet::count()).find(|&c| allowed.is_set(c).unwrap_or(false)).expect("a CPU");
        let mut one = CpuSet::new();
        one.set(cpu).expect("cpu set");
        sched_setaffinity(Pid::from_raw(0), &one).expect("sched_setaffinity");
        work()
    })
    .join()
    .expect("pinned thread")
}

/// A UDP receiver in `ns` on `ip`: the address it listens on, and a handle that yields the
/// payloads that arrived before `control` (an error when `control` never came, bounded).
fn receiver(
    ns: &Netns,
    ip: IpAddr,
    control: &'static str,
) -> (SocketAddr, std::thread::JoinHandle<Result<Vec<String>, String>>) {
    let file = ns.file();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || -> Result<Vec<String>, String> {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
        tx.send(socket.local_addr().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut before = Vec::new();
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            socket.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
            if let Ok(n) = socket.recv(&mut buf) {
                let got = String::from_utf8_lossy(&buf[..n]).into_owned();
                if got == control {
                    return Ok(before);
                }
                before.push(got);
            }
        }
        Err(format!("the genuine packet {control:?} never arrived at {ip} (got {before:?})"))
    });
    match rx.recv() {
        Ok(addr) => (addr, handle),
        Err(_) => panic!("receiver: {:?}", handle.join()),
    }
}

/// Sends `payload` to `to` from `from` (an address of the calling thread's namespace).
fn send_udp(from: IpAddr, to: SocketAddr, payload: &str) -> Result<(), String> {
    let s = UdpSocket::bind(SocketAddr::new(from, 0)).map_err(|e| format!("bind {from}: {e}"))?;
    s.send_to(payload.as_bytes(), to).map(|_| ()).map_err(|e| format!("send {from} -> {to}: {e}"))
}

/// Sends raw Ethernet frames on `ifname` of the calling thread's namespace (AF_PACKET).
fn send_frames(ifname: &str, frames: &[Vec<u8>]) -> Result<(), String> {
    use nix::libc;
    let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("{ifname}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: plain socket(2); the descriptor is owned and closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(format!("AF_PACKET socket: {}", std::io::Error::last_os_error()));
    }
    let mut result = Ok(());
    for frame in frames {
        // SAFETY: an all-zero sockaddr_ll is valid; the fields set are in range.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent != frame.len() as isize {
            result = Err(format!("sending a raw frame: {}", std::io::Error::last_os_error()));
            break;
        }
    }
    // SAFETY: fd is ours and not used after this.
    unsafe { libc::close(fd) };
    result
}

const BROADCAST: [u8; 6] = [0xff; 6];

/// An ARP frame from `mac`: `op` 1 (request) or 2 (reply), sender `spa` at `mac`, target `tpa`.
fn arp(mac: [u8; 6], op: u8, spa: IpAddr, tpa: IpAddr) -> Vec<u8> {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("ARP for {ip}"),
    };
    let mut f = Vec::new();
    f.extend(BROADCAST);
    f.extend(mac);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, op]);
    f.extend(mac);
    f.extend(v4(spa));
    f.extend(if op == 1 { [0; 6] } else { BROADCAST });
    f.extend(v4(tpa));
    f
}

/// A UDP datagram from `src` to `dst` in a priority-tagged frame (`tags` 802.1Q headers of
/// VLAN 0), which a receiver without VLAN devices takes as untagged.
fn tagged_udp(
    mac: [u8; 6],
    to_mac: [u8; 6],
    tags: usize,
    src: IpAddr,
    dst: SocketAddr,
    payload: &str,
) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst_ip)) = (src, dst.ip()) else { panic!("IPv4 only") };
    let udp_len = 8 + payload.len() as u16;
    let mut ip = vec![0x45, 0];
    ip.extend((20 + udp_len).to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst_ip.octets());
    let mut sum: u32 = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut f = to_mac.to_vec();
    f.extend(mac);
    for _ in 0..tags {
        f.extend([0x81, 0, 0, 0]);
    }
    f.extend([0x08, 0]);
    f.extend(ip);
    f.extend(40000u16.to_be_bytes());
    f.extend(dst.port().to_be_bytes());
    f.extend(udp_len.to_be_bytes());
    f.extend([0, 0]); // no UDP checksum (IPv4 allows it)
    f.extend(payload.as_bytes());
    f
}

fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    let [a, b, c, d, e, f] = mac;
    Ipv6Addr::from([0xfe, 0x80, 0, 0, 0, 0, 0, 0, a ^ 2, b, c, 0xff, 0xfe, d, e, f])
}

/// An unsolicited neighbour advertisement (override set) to all nodes, from `mac`'s
/// link-local address, claiming that `target` is at `mac`.
fn unsolicited_na(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let (src, dst) = (link_local(mac), "ff02::1".parse::<Ipv6Addr>().expect("all-nodes"));
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend(target.octets());
    icmp.extend([2, 1]);
    icmp.extend(mac);
    // The ICMPv6 checksum covers the pseudo-header (addresses, length, next header).
    let mut sum: u32 = 0;
    let mut words = src.octets().to_vec();
    words.extend(dst.octets());
    words.extend((icmp.len() as u32).to_be_bytes());
    words.extend([0, 0, 0, 58]);
    words.extend(&icmp);
    for pair in words.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend(mac);
    f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend((icmp.len() as u16).to_be_bytes());
    f.extend([58, 255]);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend(icmp);
    f
}

fn mac_of(out: &cni_conformance::Out) -> [u8; 6] {
    let text = out.json["interfaces"][2]["mac"].as_str().unwrap_or_else(|| panic!("no MAC: {}", out.stdout));
    let bytes: Vec<u8> = text.split(':').map(|h| u8::from_str_radix(h, 16).expect("MAC")).collect();
    bytes.try_into().expect("6 bytes")
}

/// A pod's IPv4 and IPv6 addresses.
fn addrs(out: &cni_conformance::Out) -> (IpAddr, IpAddr) {
    let (a, b) = (ip_of(out, 0), ip_of(out, 1));
    if a.is_ipv4() {
        (a, b)
    } else {
        (b, a)
    }
}

/// The link-layer address `ns` holds for `ip` (in any state), if any.
fn neighbour(ns: &Netns, ip: IpAddr) -> Option<String> {
    let all = ns.ip_json(&["neigh", "show"]);
    all.as_array()?
        .iter()
        .find(|n| n["dst"].as_str() == Some(&ip.to_string()))
        .and_then(|n| n["lladdr"].as_str().map(str::to_lowercase))
}

fn fmt_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn dual_stack(w: &World, extra: Value) -> Value {
    let mut conf = w.conf("1.1.0", "10.48.0.0/24", extra);
    conf["ipam"] = json!({"type": "cni-host-local", "dataDir": w.data_dir(),
        "ranges": [[{"subnet": "10.48.0.0/24"}], [{"subnet": "fd00:48::/64"}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]});
    conf
}

/// Pod A tries to pass as pod B: packets from B's addresses (both families, A having put them
/// on its own interface, as an attacker would), ARP claiming B's IPv4 address and an
/// unsolicited NA claiming B's IPv6 address. Nothing of it reaches pod C or the node, their
/// neighbour tables keep B's MAC, and A's own traffic (ARP, ND, DAD) works.
#[test]
fn ip_spoof_check_keeps_each_pod_to_its_own_addresses() {
    require_root("ip_spoof_check_keeps_each_pod_to_its_own_addresses");
    let w = World::new("ipspoof");
    let (a, b, c) = (Netns::new("a"), Netns::new("b"), Netns::new("c"));
    let conf = dual_stack(&w, json!({"ipspoofchk": true, "macspoofchk": true, "enabledad": true}));
    // B first: `nft` makes the table with B's elements; A's and C's go over netlink. So both
    // ways are checked: A attacks, and B's and C's genuine traffic must pass.
    let add = |id: &str, ns: &Netns| {
        let o = w.call("ADD", id, &path(ns), &conf);
        assert_eq!(o.code, 0, "ADD {id}: {}", o.stdout);
        o
    };
    let out_b = add("cb", &b);
    let outs = [add("ca", &a), out_b, add("cc", &c)];
    let ((a4, a6), (b4, b6), (c4, c6)) = (addrs(&outs[0]), addrs(&outs[1]), addrs(&outs[2]));
    let (mac_a, mac_c) = (mac_of(&outs[0]), mac_of(&outs[2]));
    let (gw4, gw6): (IpAddr, IpAddr) = ("10.48.0.1".parse().unwrap(), "fd00:48::1".parse().unwrap());

    // Genuine traffic in both families, which needs ARP and ND for the pods' own addresses;
    // it also leaves C and the node with B's MAC for B's addresses, and A with C's.
    for (server, ip, client, client_ns, want) in [
        (&b, b4, "A", &a, a4),
        (&b, b6, "A", &a, a6),
        (&c, c4, "B", &b, b4),
        (&c, c6, "B", &b, b6),
        (&c, c4, "A", &a, a4),
        (&c, c6, "A", &a, a6),
    ] {
        assert_eq!(tcp_exchange(server.file(), ip, client_ns.file()), Ok(want), "{client} -> {ip}");
    }
    for (ip, client, client_ns, want) in
        [(gw4, "A", &a, a4), (gw6, "A", &a, a6), (gw4, "B", &b, b4), (gw6, "B", &b, b6)]
    {
        assert_eq!(tcp_exchange(w.node.file(), ip, client_ns.file()), Ok(want), "{client} -> node {ip}");
    }
    let mut failures = Vec::new();

    // (c) ARP: requests to C and to the node's gateway, and a gratuitous reply, all saying
    // that B's IPv4 address is at A's MAC.
    let (to, got) = receiver(&c, c4, "after-arp");
    let frames = vec![arp(mac_a, 1, b4, c4), arp(mac_a, 1, b4, gw4), arp(mac_a, 2, b4, b4)];
    pinned(&a, move || send_frames("eth0", &frames).and_then(|()| send_udp(a4, to, "after-arp")))
        .expect("sending from A");
    assert_eq!(got.join().expect("receiver"), Ok(vec![]));
    // (e) Datagrams from B's IPv4 address in priority-tagged frames, one and two tags: the
    // check must see through the VLAN headers as C's stack does.
    let (to, got) = receiver(&c, c4, "after-tagged");
    let frames =
        vec![tagged_udp(mac_a, mac_c, 1, b4, to, "one tag"), tagged_udp(mac_a, mac_c, 2, b4, to, "two tags")];
    pinned(&a, move || send_frames("eth0", &frames).and_then(|()| send_udp(a4, to, "after-tagged")))
        .expect("sending from A");
    match got.join().expect("receiver") {
        Ok(before) if before.is_empty() => {}
        Ok(before) => failures.push(format!("C got {before:?} from B's {b4} in a VLAN 0 frame, sent by A")),
        Err(e) => failures.push(e),
    }
    // (d) An unsolicited neighbour advertisement for B's IPv6 address.
    let (to, got) = receiver(&c, c6, "after-na");
    let frames = vec![unsolicited_na(
        mac_a,
        match b6 {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => unreachable!("addrs"),
        },
    )];
    pinned(&a, move || send_frames("eth0", &frames).and_then(|()| send_udp(a6, to, "after-na")))
        .expect("sending from A");
    assert_eq!(got.join().expect("receiver"), Ok(vec![]));
    for (who, ns, dev) in [("pod C", &c, "eth0"), ("the node", &w.node, "cni0")] {
        for ip in [b4, b6] {
            let have = neighbour(ns, ip);
            if have.as_deref() == Some(fmt_mac(mac_a).as_str()) {
                failures.push(format!("{who} ({dev}) now sends B's {ip} to A's MAC"));
            }
        }
    }

    // (a), (b) A puts B's addresses on its own interface and sends from them.
    a.ip(&["addr", "add", &format!("{b4}/32"), "dev", "eth0"]);
    a.ip(&["addr", "add", &format!("{b6}/128"), "dev", "eth0", "nodad"]);
    for (spoofed, genuine, dst) in [(b4, a4, c4), (b6, a6, c6)] {
        let (to, got) = receiver(&c, dst, "genuine");
        pinned(&a, move || send_udp(spoofed, to, "spoofed").and_then(|()| send_udp(genuine, to, "genuine")))
            .expect("sending from A");
        match got.join().expect("receiver") {
            Ok(before) if before.is_empty() => {}
            Ok(before) => failures.push(format!("C got {before:?} from B's {spoofed}, sent by A")),
            Err(e) => failures.push(e),
        }
    }

    // DAD still works through the check: A's probe for B's IPv6 address reaches B, and B's
    // answer reaches A, which marks the address failed.
    a.ip(&["addr", "del", &format!("{b6}/128"), "dev", "eth0"]);
    a.ip(&["addr", "add", &format!("{b6}/128"), "dev", "eth0"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let dadfailed = || {
        a.ip_json(&["-6", "addr", "show", "dev", "eth0"])
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .any(|i| i["local"].as_str() == Some(&b6.to_string()) && i["dadfailed"].as_bool() == Some(true))
    };
    while !dadfailed() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !dadfailed() {
        failures.push(format!("A's DAD for B's {b6} did not detect B"));
    }
    // A's own traffic still flows after all that.
    a.ip(&["addr", "del", &format!("{b4}/32"), "dev", "eth0"]);
    a.ip(&["addr", "del", &format!("{b6}/128"), "dev", "eth0"]);
    assert_eq!(tcp_exchange(c.file(), c4, a.file()), Ok(a4));
    assert_eq!(tcp_exchange(c.file(), c6, a.file()), Ok(a6));
    assert!(failures.is_empty(), "spoofing got through:\n{}", failures.join("\n"));

    // CHECK sees every element; without B's IPv4 one (B cut off IPv4) it fails.
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = outs[1].json.clone();
    let k = w.call("CHECK", "cb", &path(&b), &with_prev);
    assert_eq!(k.code, 0, "{}", k.stdout);
    let port = outs[1].json["interfaces"][1]["name"].as_str().expect("host veth").to_string();
    let element = format!("{{ \"{port}\" . {b4} }}");
    let o = w.node.run("nft", &["delete", "element", "bridge", "cni_bridge", "allowed4", &element]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let k = w.call("CHECK", "cb", &path(&b), &with_prev);
    assert!(k.code != 0 && k.stdout.contains("IP spoof check"), "{}", k.stdout);

    for (id, ns) in [("ca", &a), ("cb", &b), ("cc", &c)] {
        assert_eq!(w.call("DEL", id, &path(ns), &conf).code, 0);
    }
    let left = String::from_utf8_lossy(&w.node.run("nft", &["list", "table", "bridge", "cni_bridge"]).stdout)
        .into_owned();
    assert!(!left.contains("testnet/"), "spoof entries left: {left}");
}

/// The rules of `chain` in the node's `bridge cni_bridge`, without their comments.
fn chain_rules(w: &World, chain: &str) -> usize {
    let o = w.node.run("nft", &["-j", "list", "chain", "bridge", "cni_bridge", chain]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v["nftables"].as_array().into_iter().flatten().filter(|i| i.get("rule").is_some()).count()
}

/// The spoof-check elements owned by container `id` (`set` names, one per element).
fn elements_of(w: &World, id: &str) -> Vec<String> {
    let o = w.node.run("nft", &["-j", "list", "table", "bridge", "cni_bridge"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for e in item["set"]["elem"].as_array().into_iter().flatten() {
            if e["elem"]["comment"].as_str() == Some(&format!("testnet/{id}/eth0")) {
                out.push(item["set"]["name"].as_str().unwrap_or("").to_string());
            }
        }
    }
    out.sort();
    out
}

/// Only the first ADD on a node runs `nft`: later ones (and DEL) run with no `nft` on PATH.
/// When the table is gone (a flushed ruleset) or a chain lost its rules, ADD notices over
/// netlink and `nft` makes them again; without `nft` it then fails rather than leave the pod
/// unguarded.
#[test]
fn only_the_first_add_runs_nft_and_lost_rules_are_made_again() {
    require_root("only_the_first_add_runs_nft_and_lost_rules_are_made_again");
    let w = World::new("spoofnl");
    let conf = dual_stack(&w, json!({"ipspoofchk": true, "macspoofchk": true}));
    let no_nft = w.tmp.join("no-nft");
    std::fs::create_dir_all(&no_nft).expect("empty PATH dir");
    let no_nft = [("PATH", no_nft.to_str().expect("utf-8 path"))];
    let pods: Vec<Netns> = (0..5).map(|i| Netns::new(&format!("p{i}"))).collect();
    let all_sets = ["allowed", "allowed4", "allowed6", "guarded", "ipguarded", "ndtarget6"];

    let o = w.call("ADD", "c0", &path(&pods[0]), &conf);
    assert_eq!(o.code, 0, "first ADD (nft makes the table): {}", o.stdout);
    let o = w.call_with("ADD", "c1", &path(&pods[1]), "eth0", &no_nft, &conf);
    assert_eq!(o.code, 0, "second ADD without nft: {}", o.stdout);
    assert_eq!(elements_of(&w, "c1"), all_sets, "every element of the second pod");
    let k = w.call_with("CHECK", "c1", &path(&pods[1]), "eth0", &no_nft, &{
        let mut c = conf.clone();
        c["prevResult"] = o.json.clone();
        c
    });
    assert_eq!(k.code, 0, "{}", k.stdout);

    // The whole ruleset flushed: without nft the ADD fails (and leaves nothing); with it, the
    // table is made again.
    assert!(w.node.run("nft", &["flush", "ruleset"]).status.success());
    let o = w.call_with("ADD", "c2", &path(&pods[2]), "eth0", &no_nft, &conf);
    assert_eq!(o.err_code(), Some(114), "a missing table needs nft: {}", o.stdout);
    assert_eq!(w.leases().len(), 4, "the failed ADD released its leases: {:?}", w.leases());
    let o = w.call("ADD", "c2", &path(&pods[2]), &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert_eq!(elements_of(&w, "c2"), all_sets);
    assert_eq!((chain_rules(&w, "prerouting"), chain_rules(&w, "ipspoof")), (1, 8));

    // One chain flushed, the sets and the other chain intact: the same.
    assert!(w.node.run("nft", &["flush", "chain", "bridge", "cni_bridge", "ipspoof"]).status.success());
    let o = w.call_with("ADD", "c3", &path(&pods[3]), "eth0", &no_nft, &conf);
    assert_eq!(o.err_code(), Some(114), "a flushed chain is noticed: {}", o.stdout);
    let o = w.call("ADD", "c3", &path(&pods[3]), &conf);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert_eq!((chain_rules(&w, "prerouting"), chain_rules(&w, "ipspoof")), (1, 8));
    let o = w.call_with("ADD", "c4", &path(&pods[4]), "eth0", &no_nft, &conf);
    assert_eq!(o.code, 0, "the rules are back: {}", o.stdout);

    for (i, pod) in pods.iter().enumerate() {
        let d = w.call_with("DEL", &format!("c{i}"), &path(pod), "eth0", &no_nft, &conf);
        assert_eq!(d.code, 0, "DEL c{i} without nft: {}", d.stdout);
    }
    let left = String::from_utf8_lossy(&w.node.run("nft", &["list", "table", "bridge", "cni_bridge"]).stdout)
        .into_owned();
    assert!(!left.contains("testnet/"), "spoof entries left: {left}");
    assert!(w.leases().is_empty());
}

/// An element left for a port's key by another attachment (a port name taken again before
/// the old attachment's DEL) is replaced in ADD's netlink batch: kept, the old owner's DEL
/// would take the new pod's guard with it.
#[test]
fn elements_left_for_the_port_by_another_owner_are_replaced() {
    require_root("elements_left_for_the_port_by_another_owner_are_replaced");
    let w = World::new("spoofstale");
    let conf = dual_stack(&w, json!({"ipspoofchk": true, "macspoofchk": true}));
    let pod = Netns::new("st");
    let o = w.call("ADD", "c0", &path(&pod), &conf);
    assert_eq!(o.code, 0, "the first ADD makes the rules: {}", o.stdout);
    for (set, key) in [("ipguarded", "\"vethstale0\""), ("allowed4", "\"vethstale0\" . 10.48.0.77")] {
        let element = format!("{{ {key} comment \"testnet/old/eth0\" }}");
        let o = w.node.run("nft", &["add", "element", "bridge", "cni_bridge", set, &element]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // The library's calls, on a thread inside the node namespace (its netfilter socket is
    // opened there, on first use).
    let file = w.node.file();
    let result = std::thread::spawn(move || -> Result<(), String> {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        let ip: IpAddr = "10.48.0.77".parse().map_err(|e: std::net::AddrParseError| e.to_string())?;
        let mac = [2, 0, 0, 0, 0, 0x77];
        cni_bridge::firewall::spoof::add("vethstale0", Some(&mac), Some(&[ip]), "testnet/new/eth0")
            .map_err(|e| e.to_string())?;
        cni_bridge::firewall::spoof::remove_where(|o| o == "testnet/old/eth0").map_err(|e| e.to_string())
    })
    .join()
    .expect("namespace thread");
    assert_eq!(result, Ok(()));
    assert_eq!(elements_of(&w, "old"), Vec::<String>::new(), "the old owner's elements are gone");
    assert_eq!(
        elements_of(&w, "new"),
        ["allowed", "allowed4", "guarded", "ipguarded"],
        "and the new one's stay"
    );
    assert_eq!(w.call("DEL", "c0", &path(&pod), &conf).code, 0);
}
