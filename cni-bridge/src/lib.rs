//! `cni-bridge`: the CNI bridge plugin.

pub mod add;
pub mod check;
pub mod config;
pub mod del;
pub mod error;
pub mod firewall;
pub mod gc;
pub mod ipam;
pub mod lock;
pub mod mac;
pub mod netlink;
pub mod netns;
pub mod reaping;
pub mod run;
pub mod status;

use cni_proto::{CniResult, Error as CniError, Plugin, Request};

use crate::config::BridgeConf;
use crate::error::BridgeError;

/// The bridge plugin.
pub struct Bridge;

fn with_conf<T>(
    req: &Request,
    verb: impl FnOnce(&BridgeConf) -> Result<T, BridgeError>,
) -> Result<T, CniError> {
    let conf = BridgeConf::from_request(req)?;
    verb(&conf).map_err(Into::into)
}

impl Plugin for Bridge {
    fn about(&self) -> String {
        format!(
            "cni-bridge {}: bridge, veth, hairpin, gateway and masquerade for pods",
            env!("CARGO_PKG_VERSION")
        )
    }
    fn cni_args(&self) -> &'static [&'static str] {
        // The bridge reads `MAC`; it hands CNI_ARGS unchanged to its IPAM plugin, so it takes
        // exactly the keys host-local takes (which include `MAC`).
        cni_host_local::plugin::CNI_ARGS
    }
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        with_conf(req, |c| add::add(req, c))
    }
    fn del(&self, req: &Request) -> Result<(), CniError> {
        with_conf(req, |c| del::del(req, c))
    }
    fn check(&self, req: &Request) -> Result<(), CniError> {
        with_conf(req, |c| check::check(req, c))
    }
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        with_conf(req, |c| gc::gc(req, c))
    }
    fn status(&self, req: &Request) -> Result<(), CniError> {
        with_conf(req, |c| status::status(req, c))
    }
}
