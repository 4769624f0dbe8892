//! DEL, GC and STATUS: best-effort teardown that collects errors and carries on.

use std::collections::BTreeSet;

use cni_proto::{delegate, Command, Error as CniError, Request};

use crate::config::BridgeConf;
use crate::error::BridgeError;
use crate::masq;
use crate::netlink::Nl;
use crate::netns;
use crate::spoof;

fn finish(errs: Vec<CniError>) -> Result<(), BridgeError> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(BridgeError::Many(errs))
    }
}

/// Removes the pod interface (and so the veth pair), the lease and the masquerade entries.
/// Succeeds when the namespace, interface or lease is already gone, and when repeated.
pub fn del(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    let mut errs: Vec<CniError> = Vec::new();
    if let Some(path) = req.inv.netns.as_deref() {
        match netns::open_pod(path) {
            Ok(ns) => {
                let r: Result<(), BridgeError> = crate::runtime()?.block_on(async {
                    let pod = Nl::in_ns(&ns)?;
                    if let Some(l) = pod.link(&req.inv.ifname).await? {
                        pod.del_link(l.index).await?;
                    }
                    Ok(())
                });
                if let Err(e) = r {
                    errs.push(e.into());
                }
            }
            // The namespace is gone (the pod was torn down first): nothing to remove there.
            Err(_) if !path.exists() => {}
            // Never delete CNI_IFNAME from the namespace the plugin runs in.
            Err(e) => return Err(e),
        }
    }
    if let Some(t) = conf.ipam_type.as_deref() {
        if let Err(e) = delegate::exec(t, Command::Del, &req.inv, &req.stdin) {
            errs.push(e);
        }
    }
    let owner = masq::owner(&req.conf.name, &req.inv.container_id, &req.inv.ifname);
    if conf.ip_masq {
        if let Err(e) = conf.masq_backend.remove_where(|o| o == owner) {
            errs.push(e.into());
        }
    }
    if conf.mac_spoof_check {
        if let Err(e) = spoof::remove_where(|o| o == owner) {
            errs.push(e.into());
        }
    }
    finish(errs)
}

/// Forwards GC to IPAM and removes this network's masquerade entries of attachments that are
/// not valid any more.
pub fn gc(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    let mut errs: Vec<CniError> = Vec::new();
    if let Some(t) = conf.ipam_type.as_deref() {
        if let Err(e) = delegate::exec(t, Command::Gc, &req.inv, &req.stdin) {
            errs.push(e);
        }
    }
    if let Some(valid) = req.conf.gc_valid_attachments() {
        let keep: BTreeSet<String> =
            valid.iter().map(|a| masq::owner(&req.conf.name, &a.container_id, &a.ifname)).collect();
        let prefix = format!("{}/", req.conf.name);
        let stale = |o: &str| o.starts_with(&prefix) && !keep.contains(o);
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

/// Forwards STATUS to IPAM: the bridge itself is made on demand.
pub fn status(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    if let Some(t) = conf.ipam_type.as_deref() {
        delegate::exec(t, Command::Status, &req.inv, &req.stdin)?;
    }
    Ok(())
}
