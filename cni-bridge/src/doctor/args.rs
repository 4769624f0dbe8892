//! The doctor's command line.

use std::path::PathBuf;

pub(super) const USAGE: &str =
    "usage: cni-bridge doctor [--conf FILE] [--conf-dir DIR] [--bin-dir DIR[:DIR...]] \
[--netns PATH] [--metrics HOST:PORT] [--json]

Checks the node's pod network as configured by a cni-bridge conflist and prints a table of
checks (pass / fail / skip) with the fix for each failure. Exit status 1 when any check fails.
  --conf FILE        the conflist (default: the first in --conf-dir, as runtimes pick it)
  --conf-dir DIR     default /etc/cni/net.d
  --bin-dir DIRS     the plugin directories, ':'-separated (default /opt/cni/bin)
  --netns PATH       a pod's network namespace (/proc/PID/ns/net or /run/netns/NAME): also
                     check its interface, routes and resolv.conf
  --metrics ADDR     cni-route-agent's /metrics (default 127.0.0.1:9645)
  --json             JSON instead of the table";

/// Where to look.
#[derive(Debug)]
pub(super) struct Opts {
    pub(super) conf: Option<PathBuf>,
    pub(super) conf_dir: PathBuf,
    pub(super) bin_dirs: Vec<PathBuf>,
    pub(super) netns: Option<PathBuf>,
    pub(super) metrics: String,
    pub(super) json: bool,
}

pub(super) fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        conf: None,
        conf_dir: "/etc/cni/net.d".into(),
        bin_dirs: vec!["/opt/cni/bin".into()],
        netns: None,
        metrics: "127.0.0.1:9645".into(),
        json: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--conf" => o.conf = Some(value()?.into()),
            "--conf-dir" => o.conf_dir = value()?.into(),
            "--bin-dir" => o.bin_dirs = value()?.split(':').map(PathBuf::from).collect(),
            "--netns" => o.netns = Some(value()?.into()),
            "--metrics" => o.metrics = value()?,
            "--json" => o.json = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse_args(&["--conf".into()]).is_err());
        assert!(parse_args(&["--bogus".into()]).is_err());
        let o = parse_args(&["--bin-dir".into(), "/a:/b".into(), "--json".into()]).unwrap();
        assert_eq!(o.bin_dirs, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(o.json);
    }
}
