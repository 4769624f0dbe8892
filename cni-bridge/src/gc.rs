//! GC: forwards to IPAM and removes this network's rules of attachments that are not valid
//! any more.

use std::collections::BTreeSet;

use cni_proto::{Command, Error as CniError, Request};

use crate::config::BridgeConf;
use crate::error::{finish, BridgeError};
use crate::firewall;

/// Removes this network's firewall entries of attachments that are not valid any more, then
/// forwards GC to IPAM.
pub fn gc(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    // Rules first, as in DEL: a lease GC releases must not be named by a rule any more.
    if let Some(valid) = req.conf.gc_valid_attachments() {
        let keep: BTreeSet<String> =
            valid.iter().map(|a| firewall::owner(&req.conf.name, &a.container_id, &a.ifname)).collect();
        let stale = |owner: &str| firewall::of_network(&req.conf.name, owner) && !keep.contains(owner);
        firewall::remove_stale(conf.masq_backend, &stale)?;
    }
    let mut errs: Vec<CniError> = Vec::new();
    if let Some(plugin) = conf.ipam_type.as_deref() {
        if let Err(e) = crate::ipam::run(plugin, Command::Gc, req) {
            errs.push(e);
        }
    }
    finish(errs)
}
