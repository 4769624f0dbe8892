//! The black-box conformance suite (crate `cni-conformance`) against our two plugins.
//! Its own test binary: the suite checks that no namespace of a check outlives it, which
//! would be meaningless with other tests making namespaces at the same time.

mod common;

use cni_conformance::require_root;
use cni_conformance::suite::{run, Target};

#[test]
fn conformance_suite_passes_for_our_plugins() {
    require_root("conformance_suite");
    let t = Target { dir: common::plugin_dir(), bridge: "cni-bridge".into(), ipam: "cni-host-local".into() };
    let mut lines = Vec::new();
    let out = run(&t, "", &mut |l| lines.push(l.to_string()));
    let failed: Vec<&String> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(failed.is_empty(), "conformance failures:\n{}", lines.join("\n"));
    assert!(out.len() >= 30, "the suite ran only {} checks", out.len());
}
