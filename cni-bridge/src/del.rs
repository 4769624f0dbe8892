//! DEL, GC and STATUS: best-effort teardown that collects errors and carries on.

use std::collections::BTreeSet;

use cni_proto::{Command, Error as CniError, Request};

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
///
/// The three are independent, so they run at once: deleting a veth waits for the kernel's
/// RCU grace periods (~15 ms here), which covers the IPAM process and the nft calls.
pub fn del(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    crate::mark("start");
    let pod_ns = match req.inv.netns.as_deref() {
        None => None,
        Some(path) => match netns::open_pod(path) {
            Ok(ns) => Some(ns),
            // The namespace is gone (the pod was torn down first): nothing to remove there.
            Err(_) if !path.exists() => None,
            // Never delete CNI_IFNAME from the namespace the plugin runs in.
            Err(e) => return Err(e),
        },
    };
    let owner = masq::owner(&req.conf.name, &req.inv.container_id, &req.inv.ifname);
    std::thread::scope(|s| {
        let ipam = s.spawn(|| match conf.ipam_type.as_deref() {
            Some(t) => crate::ipam::run(t, Command::Del, req).map(|_| ()),
            None => Ok(()),
        });
        let rules = s.spawn(|| {
            let mut errs: Vec<CniError> = Vec::new();
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
            errs
        });
        let mut errs: Vec<CniError> = Vec::new();
        if let Some(ns) = &pod_ns {
            let r: Result<(), BridgeError> = crate::runtime()
                .and_then(|rt| rt.block_on(async { Nl::in_ns(ns)?.del_link_named(&req.inv.ifname).await }));
            if let Err(e) = r {
                errs.push(e.into());
            }
            crate::mark("pod interface deleted");
        }
        match ipam.join() {
            Ok(Err(e)) => errs.push(e),
            Err(_) => errs.push(CniError::plugin(199, "IPAM DEL thread panicked", "")),
            Ok(Ok(())) => {}
        }
        crate::mark("IPAM DEL joined");
        errs.extend(rules.join().unwrap_or_default());
        crate::mark("rules joined");
        finish(errs)
    })
}

/// Forwards GC to IPAM and removes this network's masquerade entries of attachments that are
/// not valid any more.
pub fn gc(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    let mut errs: Vec<CniError> = Vec::new();
    if let Some(t) = conf.ipam_type.as_deref() {
        if let Err(e) = crate::ipam::run(t, Command::Gc, req) {
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
        crate::ipam::run(t, Command::Status, req)?;
    }
    Ok(())
}
