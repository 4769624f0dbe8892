//! What a check is and gets, apart from the runner in mod.rs, so that the checks (network.rs,
//! spec.rs) need not import the runner that lists them.

use std::path::PathBuf;

use crate::world::{Plugins, World};

/// What to test: the plugins' directory and their types.
pub type Target = Plugins;

/// A check: its name and body.
pub type Check = (&'static str, fn(&Ctx) -> Result<(), String>);

/// What every check gets: the target and the versions it claims to support.
pub struct Ctx {
    /// The plugins under test.
    pub target: Target,
    /// The versions the plugin's VERSION claims: checks test each, and only those.
    pub versions: Vec<String>,
    pub(super) state: PathBuf,
}

impl Ctx {
    /// The newest version of `wanted` the plugin supports.
    pub fn newest(&self, wanted: &[&str]) -> Option<String> {
        wanted.iter().rev().find(|v| self.versions.iter().any(|s| s == *v)).map(|v| v.to_string())
    }

    /// A fresh node with its own lease directory, for network `conformance`.
    pub fn world(&self, tag: &str) -> World {
        World::new(tag, self.target.clone(), "conformance", &self.state)
    }
}

/// Fails with `msg` unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}
