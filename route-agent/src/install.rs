//! `cni-route-agent install-cni` and `cni-route-agent uninstall`: putting the plugins on a
//! node and taking everything this project leaves there away again.
//!
//! Install writes each plugin to a temp file in the target directory, syncs it, and renames it
//! over the old one. A runtime exec'ing the plugin meanwhile runs either the old or the new
//! file, never a half-written one; and since the old inode is never opened for writing, a
//! plugin running during an upgrade cannot make install fail with "text file busy" (ETXTBSY).
//! The temp file is closed before the rename: a runtime exec'ing the new name while install
//! still held it open for writing would get ETXTBSY itself.
//! A record of what was installed (names and content hashes) lets uninstall remove exactly
//! those files, and only if nobody replaced them since.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::Parser;

/// The plugins the image carries.
pub const PLUGINS: [&str; 2] = ["cni-bridge", "cni-host-local"];
/// The record of an install, in the bin directory.
pub const RECORD: &str = ".cni-route-agent.installed";
/// nft tables the plugins and the agent create (family, name).
pub const NFT_TABLES: [(&str, &str); 4] = [
    ("inet", "cni_bridge"),
    ("bridge", "cni_bridge"),
    ("inet", "cni_route_agent"),
    ("inet", crate::policy::TABLE),
];
/// Prefix of the per-attachment iptables chains of `ipMasqBackend: "iptables"`.
pub const IPT_CHAIN_PREFIX: &str = "CNIB-";
/// The index cni-host-local keeps beside the leases of each network.
pub const INDEX_DIR: &str = ".cni-index";

/// Copies the plugins into the host's CNI bin directory (temp file + rename).
#[derive(Parser, Debug)]
#[command(name = "cni-route-agent install-cni")]
pub struct InstallCli {
    /// The host's CNI plugin directory (in a pod: the hostPath mount of /opt/cni/bin).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// Where the plugins to install are (default: the directory of this executable).
    #[arg(long)]
    pub from: Option<PathBuf>,
}

/// Removes what install put in place and what the plugins and the agent leave on a node.
#[derive(Parser, Debug)]
#[command(name = "cni-route-agent uninstall")]
pub struct UninstallCli {
    /// The CNI plugin directory install wrote to.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The conflist the agent writes; removed.
    #[arg(long, default_value = "/etc/cni/net.d/10-cni-route-agent.conflist")]
    pub conf_file: PathBuf,
    /// host-local's data directory: each network's `.cni-index` is removed (the leases stay:
    /// they are the reference plugin's format and may be shared with it).
    #[arg(long, default_value = "/var/lib/cni/networks")]
    pub data_dir: PathBuf,
    /// The agent's route protocol: its routes and nexthops are flushed.
    #[arg(long, default_value_t = 168)]
    pub route_protocol: u8,
}

/// Runs `install-cni` or `uninstall` when argv[1] names one; `None` for the daemon.
pub fn dispatch(args: impl IntoIterator<Item = OsString>) -> Option<ExitCode> {
    let args: Vec<OsString> = args.into_iter().collect();
    let verb = args.get(1)?.to_str()?.to_string();
    let rest = || args[1..].iter().cloned();
    let report = |r: Result<Vec<String>, String>| match r {
        Ok(lines) => {
            for l in lines {
                eprintln!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{verb}: {e}");
            ExitCode::from(1)
        }
    };
    match verb.as_str() {
        "install-cni" => Some(report(InstallCli::try_parse_from(rest()).map_err(clap_exit).and_then(|c| {
            let from = match c.from {
                Some(f) => f,
                None => own_dir()?,
            };
            install(&from, &c.bin_dir)
        }))),
        "uninstall" => {
            Some(report(UninstallCli::try_parse_from(rest()).map_err(clap_exit).and_then(|c| uninstall(&c))))
        }
        _ => None,
    }
}

/// `--help` and `--version` print and exit 0; a usage error exits 2, as clap does.
fn clap_exit(e: clap::Error) -> String {
    e.exit()
}

fn own_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    exe.parent().map(Path::to_path_buf).ok_or_else(|| format!("{} has no directory", exe.display()))
}

/// FNV-1a 64 of a file's bytes: enough to tell "still the file we installed" (not security).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, bytes);
    std::hash::Hasher::finish(&h)
}

/// Writes `bytes` to `dir/name` through a temp file in `dir` and a rename.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), String> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let done = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        // Closed before the rename: an inode open for writing cannot be exec'd (ETXTBSY), and
        // from the rename on it is the plugin a runtime execs.
        drop(f);
        fs::rename(&tmp, dir.join(name))?;
        // The rename itself is durable only once the directory is synced.
        File::open(dir)?.sync_all()
    })();
    done.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("writing {}: {e}", dir.join(name).display())
    })
}

/// Installs the plugins from `from` into `bin_dir`; returns what it did, one line each.
pub fn install(from: &Path, bin_dir: &Path) -> Result<Vec<String>, String> {
    fs::create_dir_all(bin_dir).map_err(|e| format!("creating {}: {e}", bin_dir.display()))?;
    let mut record = String::new();
    let mut done = Vec::new();
    for name in PLUGINS {
        let src = from.join(name);
        let bytes = fs::read(&src).map_err(|e| format!("reading {}: {e}", src.display()))?;
        write_atomic(bin_dir, name, &bytes, 0o755)?;
        record.push_str(&format!("{name} {:016x}\n", fnv1a(&bytes)));
        done.push(format!("installed {}", bin_dir.join(name).display()));
    }
    write_atomic(bin_dir, RECORD, record.as_bytes(), 0o644)?;
    Ok(done)
}

/// Each plugin the install record in `bin_dir` names, and whether its file is still the one
/// install-cni wrote (`Err` says why not); `None` without a record (plugins put there by
/// other means). Read-only: for the doctor.
pub fn verify(bin_dir: &Path) -> Option<Vec<(&'static str, Result<(), String>)>> {
    let text = fs::read_to_string(bin_dir.join(RECORD)).ok()?;
    let checked = read_record(&text)
        .into_iter()
        .map(|(name, hash)| {
            let state = match fs::read(bin_dir.join(name)) {
                Ok(bytes) if fnv1a(&bytes) == hash => Ok(()),
                Ok(_) => Err("changed since install-cni wrote it".to_string()),
                Err(e) => Err(e.to_string()),
            };
            (name, state)
        })
        .collect();
    Some(checked)
}

/// The (name, hash) pairs of an install record; unknown names are ignored, so a record can
/// never make uninstall remove a file outside the plugin list.
fn read_record(text: &str) -> Vec<(&'static str, u64)> {
    text.lines()
        .filter_map(|l| {
            let (name, hash) = l.split_once(' ')?;
            let name = PLUGINS.into_iter().find(|p| *p == name)?;
            Some((name, u64::from_str_radix(hash.trim(), 16).ok()?))
        })
        .collect()
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

fn run(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut c = Command::new(bin);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = c.spawn().map_err(|e| format!("{bin}: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|e| format!("{bin}: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{bin}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{bin} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `iptables-restore` script that removes every CNIB- chain and the jumps to it, from an
/// `iptables-save -t nat` dump; `None` when there is nothing to remove.
pub fn iptables_cleanup(saved: &str) -> Option<String> {
    let chains: Vec<&str> = saved
        .lines()
        .filter_map(|l| l.strip_prefix(':')?.split_whitespace().next())
        .filter(|c| c.starts_with(IPT_CHAIN_PREFIX))
        .collect();
    if chains.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    // Jumps first: a chain still referenced cannot be deleted.
    for l in saved.lines() {
        let Some(rule) = l.strip_prefix("-A ") else { continue };
        let chain = rule.split_whitespace().next().unwrap_or("");
        let target = rule.split_whitespace().skip_while(|w| *w != "-j").nth(1).unwrap_or("");
        if !chain.starts_with(IPT_CHAIN_PREFIX) && target.starts_with(IPT_CHAIN_PREFIX) {
            s.push_str(&format!("-D {rule}\n"));
        }
    }
    for c in &chains {
        s.push_str(&format!("-F {c}\n"));
    }
    for c in &chains {
        s.push_str(&format!("-X {c}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Removes the installed plugins (if unchanged), the conflist, the nft tables, the CNIB-
/// chains, the lease indexes and the agent's routes. Returns what it did; an error only when
/// something that exists could not be removed.
pub fn uninstall(c: &UninstallCli) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let record_path = c.bin_dir.join(RECORD);
    match fs::read_to_string(&record_path) {
        Ok(text) => {
            for (name, hash) in read_record(&text) {
                let path = c.bin_dir.join(name);
                match fs::read(&path) {
                    Ok(bytes) if fnv1a(&bytes) == hash => match fs::remove_file(&path) {
                        Ok(()) => done.push(format!("removed {}", path.display())),
                        Err(e) => failed.push(format!("removing {}: {e}", path.display())),
                    },
                    Ok(_) => done.push(format!("kept {}: replaced since install", path.display())),
                    Err(_) => {}
                }
            }
            if let Err(e) = fs::remove_file(&record_path) {
                failed.push(format!("removing {}: {e}", record_path.display()));
            }
        }
        Err(_) => done.push(format!("no {} : no plugin was installed there", record_path.display())),
    }
    if fs::remove_file(&c.conf_file).is_ok() {
        done.push(format!("removed {}", c.conf_file.display()));
    }
    if let Ok(entries) = fs::read_dir(&c.data_dir) {
        for e in entries.flatten() {
            let index = e.path().join(INDEX_DIR);
            if index.is_dir() {
                match fs::remove_dir_all(&index) {
                    Ok(()) => done.push(format!("removed {}", index.display())),
                    Err(err) => failed.push(format!("removing {}: {err}", index.display())),
                }
            }
        }
    }
    if on_path("nft") {
        let tables = run("nft", &["list", "tables"], None).unwrap_or_default();
        for (family, name) in NFT_TABLES {
            if tables.lines().any(|l| l.trim() == format!("table {family} {name}")) {
                match run("nft", &["delete", "table", family, name], None) {
                    Ok(_) => done.push(format!("deleted nft table {family} {name}")),
                    Err(e) => failed.push(e),
                }
            }
        }
    } else {
        done.push("nft not found: no nft table to remove".into());
    }
    for (save, restore) in [("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")] {
        if !on_path(save) {
            continue;
        }
        let Ok(saved) = run(save, &["-t", "nat"], None) else { continue };
        if let Some(script) = iptables_cleanup(&saved) {
            match run(restore, &["--noflush", "-w"], Some(&script)) {
                Ok(_) => done.push(format!("removed the {IPT_CHAIN_PREFIX}* chains ({save})")),
                Err(e) => failed.push(e),
            }
        }
    }
    handback(&c.data_dir, &mut done, &mut failed);
    if on_path("ip") {
        let proto = c.route_protocol.to_string();
        for family in ["-4", "-6"] {
            // Routes first: a nexthop in use by a route cannot be deleted.
            let _ = run("ip", &[family, "route", "flush", "proto", &proto], None);
        }
        let _ = run("ip", &["nexthop", "flush", "protocol", &proto], None);
        done.push(format!("flushed routes and nexthops of protocol {proto}"));
    }
    if failed.is_empty() {
        Ok(done)
    } else {
        Err(failed.join("; "))
    }
}

/// See [`crate::handback`]: the reference's chains for the leases it may DEL, per family.
fn handback(data_dir: &Path, done: &mut Vec<String>, failed: &mut Vec<String>) {
    let leases = crate::handback::leases(data_dir);
    for (v4, save, restore) in
        [(true, "iptables-save", "iptables-restore"), (false, "ip6tables-save", "ip6tables-restore")]
    {
        let pods =
            leases.iter().filter(|(_, _, ip)| ip.is_ipv4() == v4).map(|(n, id, _)| (n.as_str(), id.as_str()));
        if !on_path(save) {
            continue;
        }
        let Ok(saved) = run(save, &["-t", "nat"], None) else { continue };
        if let Some(script) = crate::handback::script(&saved, pods) {
            match run(restore, &["--noflush", "-w"], Some(&script)) {
                Ok(_) => {
                    done.push(format!("declared the reference bridge's chains of the leased pods ({save})"))
                }
                Err(e) => failed.push(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_cleanup_removes_jumps_then_chains_and_nothing_else() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:CNIB-00aa - [0:0]\n:KEEP - [0:0]\n\
                     -A POSTROUTING -s 10.1.0.2/32 -m comment --comment \"cni-bridge n/c/eth0\" -j CNIB-00aa\n\
                     -A POSTROUTING -j KEEP\n-A CNIB-00aa -d 10.1.0.0/24 -j ACCEPT\nCOMMIT\n";
        let s = iptables_cleanup(saved).expect("a script");
        assert_eq!(
            s,
            "*nat\n-D POSTROUTING -s 10.1.0.2/32 -m comment --comment \"cni-bridge n/c/eth0\" -j CNIB-00aa\n\
             -F CNIB-00aa\n-X CNIB-00aa\nCOMMIT\n"
        );
        assert_eq!(iptables_cleanup("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"), None);
    }

    #[test]
    fn a_record_names_only_plugins() {
        let r = read_record("cni-bridge 00000000000000ff\n../../etc/passwd 1\ncni-host-local zz\n");
        assert_eq!(r, vec![("cni-bridge", 0xff)]);
    }
}
