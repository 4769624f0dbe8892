//! DEL, GC and STATUS: best-effort teardown that collects errors and carries on.

use std::collections::BTreeSet;

use cni_proto::{Command, Error as CniError, Request};

use crate::config::BridgeConf;
use crate::error::BridgeError;
use crate::firewall;
use crate::netlink::Nl;
use crate::netns;

fn finish(errs: Vec<CniError>) -> Result<(), BridgeError> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(BridgeError::Many(errs))
    }
}

/// Removes the pod interface (and so the veth pair), the firewall entries and the lease.
/// Succeeds when the namespace, interface or lease is already gone, and when repeated.
///
/// The interface and the rest run at once: deleting a veth waits for the kernel's RCU grace
/// periods (~15 ms here), which covers the netlink rule removal and then the IPAM process.
/// The lease is kept when the rules could not be removed.
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
    let owner = firewall::owner(&req.conf.name, &req.inv.container_id, &req.inv.ifname);
    std::thread::scope(|s| {
        // The rules go before the lease: once released, the address can be leased to another
        // pod, whose entry for it must not be removed as ours.
        let ipam = s.spawn(|| {
            firewall::remove_attachment(conf.masq_backend, &owner).map_err(CniError::from)?;
            crate::mark("rules removed");
            match conf.ipam_type.as_deref() {
                Some(t) => crate::ipam::run(t, Command::Del, req).map(|_| ()),
                None => Ok(()),
            }
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
            Err(_) => errs.push(CniError::plugin(199, "rules and IPAM DEL thread panicked", "")),
            Ok(Ok(())) => {}
        }
        crate::mark("rules and IPAM DEL joined");
        finish(errs)
    })
}

/// Forwards GC to IPAM and removes this network's masquerade entries of attachments that are
/// not valid any more.
pub fn gc(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    // Rules first, as in DEL: a lease GC releases must not be named by a rule any more.
    if let Some(valid) = req.conf.gc_valid_attachments() {
        let keep: BTreeSet<String> =
            valid.iter().map(|a| firewall::owner(&req.conf.name, &a.container_id, &a.ifname)).collect();
        let stale = |o: &str| firewall::of_network(&req.conf.name, o) && !keep.contains(o);
        firewall::remove_stale(conf.masq_backend, &stale)?;
    }
    let mut errs: Vec<CniError> = Vec::new();
    if let Some(t) = conf.ipam_type.as_deref() {
        if let Err(e) = crate::ipam::run(t, Command::Gc, req) {
            errs.push(e);
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
