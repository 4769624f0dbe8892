//! GC: forwards to IPAM and removes this network's rules of attachments that are not valid
//! any more.

use std::collections::BTreeSet;

use cni_proto::{Command, Error as CniError, Request};

use crate::config::BridgeConf;
use crate::del::finish;
use crate::error::BridgeError;
use crate::masq;
use crate::spoof;

/// Forwards GC to IPAM and removes this network's masquerade entries of attachments that are
/// not valid any more.
pub fn gc(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    let mut errs: Vec<CniError> = Vec::new();
    if let Some(plugin) = conf.ipam_type.as_deref() {
        if let Err(e) = crate::ipam::run(plugin, Command::Gc, req) {
            errs.push(e);
        }
    }
    if let Some(valid) = req.conf.gc_valid_attachments() {
        let keep: BTreeSet<String> =
            valid.iter().map(|a| masq::owner(&req.conf.name, &a.container_id, &a.ifname)).collect();
        let prefix = format!("{}/", req.conf.name);
        let stale = |owner: &str| owner.starts_with(&prefix) && !keep.contains(owner);
        if let Err(e) = conf.masq_backend.remove_where(stale) {
            errs.push(e.into());
        }
        if conf.mac_spoof_check {
            if let Err(e) = spoof::remove_where(stale) {
                errs.push(e.into());
            }
        }
    }
    finish(errs)
}
