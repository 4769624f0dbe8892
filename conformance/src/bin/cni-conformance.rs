//! `cni-conformance`: runs the black-box suite against any bridge + IPAM plugin pair.

use std::path::PathBuf;
use std::process::ExitCode;

use cni_conformance::is_root;
use cni_conformance::netns::install_signal_cleanup;
use cni_conformance::suite::{run, Target};

fn usage() -> ! {
    eprintln!(
        "usage: cni-conformance --cni-path DIR [--bridge-type T] [--ipam-type T] [--filter TEXT]\n\
         Runs CNI plugins exactly as a runtime does, in network namespaces it makes and removes,\n\
         and prints one line per check and `N passed, N failed`. Defaults: cni-bridge, cni-host-local.\n\
         For Debian's reference plugins: --cni-path /usr/lib/cni --bridge-type bridge --ipam-type host-local"
    );
    std::process::exit(2)
}

fn main() -> ExitCode {
    let mut target =
        Target { dir: PathBuf::new(), bridge: "cni-bridge".into(), ipam: "cni-host-local".into() };
    let mut filter = String::new();
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let mut val = || words.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--cni-path" => target.dir = PathBuf::from(val()),
            "--bridge-type" => target.bridge = val(),
            "--ipam-type" => target.ipam = val(),
            "--filter" => filter = val(),
            _ => usage(),
        }
    }
    if target.dir.as_os_str().is_empty() {
        usage();
    }
    if !is_root() {
        eprintln!("cni-conformance: needs root (it creates network namespaces)");
        return ExitCode::from(1);
    }
    install_signal_cleanup();
    let out = run(&target, &filter, &mut |l| println!("{l}"));
    if out.iter().all(|o| o.result.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
