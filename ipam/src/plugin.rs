//! The verbs of `cni-host-local`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use cni_proto::{CniResult, Error as CniError, Plugin, Request};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{access, AccessFlags};

use crate::allocator::allocate;
use crate::config::IpamConfig;
use crate::dns::read_resolv_conf;
use crate::error::IpamError;
use crate::store::Store;

/// The host-local IPAM plugin.
pub struct HostLocal;

/// The CNI_ARGS keys host-local accepts. `IP` asks for an address and is its own; `MAC` is the
/// bridge plugin's, accepted because a main plugin hands its CNI_ARGS unchanged to its IPAM
/// plugin; the `K8S_POD_*` keys are what Kubernetes runtimes (containerd, CRI-O) pass every
/// plugin, so a kubelet-driven call needs no `IgnoreUnknown`.
pub const CNI_ARGS: &[&str] =
    &["IP", "MAC", "K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"];

impl HostLocal {
    fn add(&self, req: &Request) -> Result<CniResult, IpamError> {
        let cfg = IpamConfig::from_request(req)?;
        let dns = match &cfg.resolv_conf {
            Some(p) => {
                read_resolv_conf(p).map_err(|e| IpamError::store(format!("reading {}", p.display()), e))?
            }
            None => Default::default(),
        };
        let (id, ifname) = (req.inv.container_id.as_str(), req.inv.ifname.as_str());
        let mut store = Store::open(&cfg.data_dir, &cfg.name)?;
        let cursors: Vec<Option<String>> =
            (0..cfg.ranges.len()).map(|i| store.last_reserved_raw(i)).collect::<Result<_, _>>()?;
        let mut requested = cfg.requested.clone();
        let mut ips = Vec::new();
        let mut failure = None;
        for (idx, set) in cfg.ranges.iter().enumerate() {
            let want =
                requested.iter().position(|ip| set.range_for(*ip).is_some()).map(|i| requested.remove(i));
            match allocate(&mut store, set, idx, id, ifname, want) {
                Ok(c) => ips.push(c),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() && !requested.is_empty() {
            let list: Vec<String> = requested.iter().map(IpAddr::to_string).collect();
            failure = Some(IpamError::RequestedUnavailable(format!(
                "failed to allocate all requested IPs: {}",
                list.join(" ")
            )));
        }
        if failure.is_none() {
            // An index that cannot be written (a full disk) fails the ADD like any other step.
            failure = store.commit().err();
        }
        if let Some(e) = failure {
            // Leave the directory as it was: no lease, the cursors unmoved, the index as it was
            // (or, when the disk is full, marked so that the next call rebuilds it).
            for assigned in &ips {
                let _ = store.release(assigned.address.ip());
            }
            for (set, cursor) in cursors.iter().enumerate() {
                let _ = store.set_last_reserved(set, cursor.as_deref());
            }
            store.abandon();
            return Err(e);
        }
        Ok(CniResult { interfaces: vec![], ips, routes: cfg.routes, dns })
    }

    fn del(&self, req: &Request) -> Result<(), IpamError> {
        let cfg = IpamConfig::from_request(req)?;
        if !Store::exists(&cfg.data_dir, &cfg.name) {
            return Ok(());
        }
        let mut store = Store::open(&cfg.data_dir, &cfg.name)?;
        let mut errs = Vec::new();
        for ip in store.lookup(&req.inv.container_id, &req.inv.ifname) {
            if let Err(e) = store.release(ip) {
                errs.push(e);
            }
        }
        store.commit()?;
        errs.into_iter().next().map_or(Ok(()), Err)
    }

    fn check(&self, req: &Request) -> Result<(), IpamError> {
        let cfg = IpamConfig::from_request(req)?;
        let (id, ifname) = (&req.inv.container_id, &req.inv.ifname);
        let not_found = || {
            IpamError::Check(format!("host-local: failed to find address added by container {id} ({ifname})"))
        };
        if !Store::exists(&cfg.data_dir, &cfg.name) {
            return Err(not_found());
        }
        let mut store = Store::open(&cfg.data_dir, &cfg.name)?;
        // Read what the lease files say, not only the index: another writer may have changed
        // one within a tick of the directory's clock.
        let held: BTreeSet<IpAddr> =
            store.lookup(id, ifname).into_iter().filter(|ip| store.confirm(*ip)).collect();
        store.commit()?;
        if held.is_empty() {
            return Err(not_found());
        }
        let prev = req.conf.prev_result().map_err(|e| IpamError::Check(format!("prevResult: {e}")))?;
        let Some(prev) = prev else { return Ok(()) };
        let ours = |ip: &IpAddr| cfg.ranges.iter().any(|s| s.range_for(*ip).is_some());
        let listed: BTreeSet<IpAddr> = prev.ips.iter().map(|c| c.address.ip()).filter(ours).collect();
        if let Some(ip) = listed.difference(&held).next() {
            return Err(IpamError::Check(format!(
                "prevResult address {ip} is not reserved for {id} ({ifname})"
            )));
        }
        if let Some(ip) = held.iter().filter(|ip| ours(ip)).find(|ip| !listed.contains(ip)) {
            return Err(IpamError::Check(format!(
                "{ip} is reserved for {id} ({ifname}) but missing from prevResult"
            )));
        }
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), IpamError> {
        let cfg = IpamConfig::from_request(req)?;
        // No list at all means the runtime did not say what is valid: release nothing.
        let Some(valid) = req.conf.gc_valid_attachments() else {
            return Ok(());
        };
        if !Store::exists(&cfg.data_dir, &cfg.name) {
            return Ok(());
        }
        let mut store = Store::open(&cfg.data_dir, &cfg.name)?;
        store.rescan()?;
        let keep = |id: &str, ifname: &str| {
            valid.iter().any(|a| a.container_id == id && (ifname.is_empty() || a.ifname == ifname))
        };
        let stale: Vec<IpAddr> =
            store.leases().iter().filter(|(_, l)| !keep(&l.id, &l.ifname)).map(|(ip, _)| *ip).collect();
        let mut errs = Vec::new();
        for ip in stale {
            if let Err(e) = store.release(ip) {
                errs.push(e.to_string());
            }
        }
        if let Err(e) = store.commit() {
            errs.push(e.to_string());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(IpamError::Gc(errs))
        }
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        // No lock and no write: only what an operator must fix makes ADD impossible.
        // A full range is not such a thing (a failing STATUS makes the node NotReady).
        let cfg = IpamConfig::from_request(req).map_err(|e| CniError::NotAvailable(e.to_string()))?;
        let dir = cfg.data_dir.join(&cfg.name);
        let mut probe: &Path = &dir;
        while !probe.exists() {
            probe = probe.parent().unwrap_or(Path::new("/"));
        }
        let unavailable =
            |why: String| CniError::NotAvailable(format!("data directory {}: {why}", dir.display()));
        if !probe.is_dir() {
            return Err(unavailable(format!("{} is not a directory", probe.display())));
        }
        let vfs = statvfs(probe).map_err(|e| unavailable(e.desc().to_string()))?;
        if vfs.flags().contains(FsFlags::ST_RDONLY) {
            return Err(unavailable(format!("{} is on a read-only filesystem", probe.display())));
        }
        access(probe, AccessFlags::W_OK | AccessFlags::X_OK)
            .map_err(|e| unavailable(format!("{} is not writable ({})", probe.display(), e.desc())))
    }
}

impl Plugin for HostLocal {
    fn about(&self) -> String {
        format!(
            "cni-host-local {}: host-local IPAM, on-disk compatible with the reference",
            env!("CARGO_PKG_VERSION")
        )
    }
    fn cni_args(&self) -> &'static [&'static str] {
        CNI_ARGS
    }
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        HostLocal::add(self, req).map_err(Into::into)
    }
    fn del(&self, req: &Request) -> Result<(), CniError> {
        HostLocal::del(self, req).map_err(Into::into)
    }
    fn check(&self, req: &Request) -> Result<(), CniError> {
        HostLocal::check(self, req).map_err(Into::into)
    }
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        HostLocal::gc(self, req).map_err(Into::into)
    }
    fn status(&self, req: &Request) -> Result<(), CniError> {
        HostLocal::status(self, req)
    }
}

#[cfg(test)]
mod tests {
    use cni_proto::{Command, Invocation};

    use super::*;

    fn add_with_args(args: &str) -> Result<Invocation, CniError> {
        let env = |key: &str| {
            let value = match key {
                "CNI_CONTAINERID" => "c1",
                "CNI_NETNS" => "/run/netns/pod",
                "CNI_IFNAME" => "eth0",
                "CNI_ARGS" => args,
                _ => return None,
            };
            Some(value.to_string())
        };
        Invocation::from_env(Command::Add, &env, HostLocal.cni_args())
    }

    #[test]
    fn kubelet_and_bridge_cni_args_need_no_ignore_unknown_and_a_typo_is_refused() {
        let kubelet = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc;\
                       K8S_POD_UID=u-1;MAC=02:00:00:00:00:01;IP=10.1.2.50";
        assert_eq!(add_with_args(kubelet).unwrap().args.get("IP"), Some("10.1.2.50"));
        let typo = add_with_args("IPP=10.1.2.50").unwrap_err();
        assert_eq!((typo.code(), typo.to_string().contains("IPP")), (4, true), "{typo}");
        assert!(add_with_args("IPP=10.1.2.50;IgnoreUnknown=1").is_ok());
    }
}
