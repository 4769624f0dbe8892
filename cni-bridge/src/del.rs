//! DEL: best-effort teardown that collects errors and carries on.

use cni_proto::{crash_point, Command, Error as CniError, Request};
use rtnetlink::packet_route::link::InfoKind;

use crate::config::BridgeConf;
use crate::error::BridgeError;
use crate::firewall;
use crate::netlink::Nl;
use crate::netns;

/// The outcome of a best-effort teardown: every error, or success.
pub(crate) fn finish(errs: Vec<CniError>) -> Result<(), BridgeError> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(BridgeError::Many(errs))
    }
}

/// Where the pod's end of the veth can be found.
enum PodNs {
    /// CNI_NETNS is empty.
    NotGiven,
    /// The namespace is open.
    Open(std::fs::File),
    /// CNI_NETNS names no network namespace any more (removed, unmounted, replaced).
    Gone,
}

/// Removes the pod interface (and so the veth pair), the lease and the masquerade entries.
/// Succeeds when the namespace, interface or lease is already gone, and when repeated.
///
/// The three are independent, so they run at once: deleting a veth waits for the kernel's
/// RCU grace periods (~15 ms here), which covers the IPAM process and the nft calls.
pub fn del(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    crate::mark("start");
    let pod_ns = match req.inv.netns.as_deref() {
        None => PodNs::NotGiven,
        // Never delete CNI_IFNAME from the namespace the plugin runs in.
        Some(path) if netns::names_own_namespace(path) => {
            return Err(BridgeError::Netns(format!(
                "{}: is the namespace the plugin runs in",
                path.display()
            )))
        }
        Some(path) => match netns::open_pod(path) {
            Ok(ns) => PodNs::Open(ns),
            // The pod was torn down first, in whatever form: the lease, the rules and the
            // host veth must still go, or kubelet retries forever and the address leaks.
            Err(e) => {
                eprintln!("cni-bridge: DEL: pod namespace gone ({e}); releasing the rest");
                PodNs::Gone
            }
        },
    };
    let owner = firewall::owner(&req.conf.name, &req.inv.container_id, &req.inv.ifname);
    std::thread::scope(|s| {
        // The rules go before the lease: once released, the address can be leased to another
        // pod, whose entry for it must not be removed as ours. The lease is kept when the
        // rules could not be removed (the runtime retries DEL).
        let rules_then_lease = s.spawn(|| {
            firewall::remove_attachment(conf.masq_backend, &owner).map_err(CniError::from)?;
            crash_point("bridge-del-after-rules");
            crate::mark("rules removed");
            match conf.ipam_type.as_deref() {
                Some(plugin) => {
                    let released = crate::ipam::run(plugin, Command::Del, req).map(|_| ());
                    crash_point("bridge-del-after-ipam");
                    released
                }
                None => Ok(()),
            }
        });
        let mut errs: Vec<CniError> = Vec::new();
        if let Err(e) = remove_links(req, conf, &pod_ns) {
            errs.push(e.into());
        }
        crash_point("bridge-del-after-link");
        crate::mark("pod interface deleted");
        match rules_then_lease.join() {
            Ok(Err(e)) => errs.push(e),
            Err(_) => errs.push(CniError::plugin(
                cni_proto::delegate::DELEGATE_FAILED,
                "rules and IPAM DEL thread panicked",
                "",
            )),
            Ok(Ok(())) => {}
        }
        crate::mark("rules and IPAM DEL joined");
        finish(errs)
    })
}

/// Deletes the pod interface in its namespace (the host end goes with it); without the
/// namespace, the host veth prevResult names, if it is still a veth port of our bridge (the
/// namespace may live on, unreachable, holding the pair).
fn remove_links(req: &Request, conf: &BridgeConf, pod_ns: &PodNs) -> Result<(), BridgeError> {
    let host_veth = match pod_ns {
        PodNs::Open(_) => None,
        PodNs::NotGiven | PodNs::Gone => match req.conf.prev_result() {
            Ok(Some(prev)) => prev
                .interfaces
                .iter()
                .find(|i| i.sandbox.is_none() && i.name != conf.bridge && i.name.starts_with("veth"))
                .map(|i| i.name.clone()),
            _ => None,
        },
    };
    if matches!(pod_ns, PodNs::NotGiven | PodNs::Gone) && host_veth.is_none() {
        return Ok(());
    }
    crate::runtime()?.block_on(async {
        if let PodNs::Open(ns) = pod_ns {
            return Nl::in_ns(ns)?.del_link_named(&req.inv.ifname).await;
        }
        let Some(name) = host_veth else { return Ok(()) };
        let host = Nl::here()?;
        let (Some(port), Some(bridge)) = (host.link(&name).await?, host.link(&conf.bridge).await?) else {
            return Ok(());
        };
        if port.kind == Some(InfoKind::Veth) && port.controller == Some(bridge.index) {
            host.del_link(port.index).await?;
        }
        Ok(())
    })
}
