//! The bridge plugin's errors, and their CNI codes in one place.

use cni_proto::{Error as CniError, ErrorCode};
use std::net::IpAddr;

/// Code: a link named like the bridge exists and is not a bridge.
pub const CODE_NOT_A_BRIDGE: u32 = 110;
/// Code: the bridge has a different gateway address and `forceAddress` is off.
pub const CODE_ADDRESS_CONFLICT: u32 = 111;
/// Code: CNI_IFNAME already exists in the pod namespace.
pub const CODE_IFACE_EXISTS: u32 = 112;
/// Code: a netlink request failed.
pub const CODE_NETLINK: u32 = 113;
/// Code: the firewall entries (masquerade, spoof check) could not be added, listed or removed.
pub const CODE_FIREWALL: u32 = 114;
/// Code: CHECK found the attachment differs from what ADD made.
pub const CODE_CHECK_FAILED: u32 = 115;
/// Code: the datapath did not become ready (port, IPv6 addresses), or DAD found a duplicate.
pub const CODE_NOT_READY: u32 = 116;
/// Code: a sysctl could not be written.
pub const CODE_SYSCTL: u32 = 117;
/// Code: the IPAM plugin answered with a result that cannot be applied as it is.
pub const CODE_BAD_IPAM_RESULT: u32 = 118;

/// Which plugin can report a code, as the README's error table says in its "from" column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// Both plugins (the protocol layer's codes).
    Both,
    /// `cni-bridge` only.
    Bridge,
    /// `cni-host-local` only.
    HostLocal,
}

impl Reporter {
    /// The word the README uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Both => "both",
            Reporter::Bridge => "bridge",
            Reporter::HostLocal => "host-local",
        }
    }
}

/// Every CNI code the two plugins can report, and which of them reports it. The README's
/// table is tested against this one (both ways), so a new code cannot go undocumented.
pub const CODE_TABLE: &[(u32, Reporter)] = &[
    (ErrorCode::IncompatibleVersion as u32, Reporter::Both),
    (ErrorCode::UnsupportedField as u32, Reporter::Bridge),
    (ErrorCode::InvalidEnvironment as u32, Reporter::Both),
    (ErrorCode::Io as u32, Reporter::Both),
    (ErrorCode::Decode as u32, Reporter::Both),
    (ErrorCode::InvalidConfig as u32, Reporter::Both),
    (ErrorCode::TryAgainLater as u32, Reporter::Bridge),
    (ErrorCode::NotAvailable as u32, Reporter::HostLocal),
    (cni_host_local::error::CODE_RANGE_EXHAUSTED, Reporter::HostLocal),
    (cni_host_local::error::CODE_REQUESTED_UNAVAILABLE, Reporter::HostLocal),
    (cni_host_local::error::CODE_DUPLICATE, Reporter::HostLocal),
    (cni_host_local::error::CODE_CHECK_FAILED, Reporter::HostLocal),
    (CODE_NOT_A_BRIDGE, Reporter::Bridge),
    (CODE_ADDRESS_CONFLICT, Reporter::Bridge),
    (CODE_IFACE_EXISTS, Reporter::Bridge),
    (CODE_NETLINK, Reporter::Bridge),
    (CODE_FIREWALL, Reporter::Bridge),
    (CODE_CHECK_FAILED, Reporter::Bridge),
    (CODE_NOT_READY, Reporter::Bridge),
    (CODE_SYSCTL, Reporter::Bridge),
    (CODE_BAD_IPAM_RESULT, Reporter::Bridge),
    (cni_proto::delegate::DELEGATE_FAILED, Reporter::Bridge),
];

/// What can go wrong in the bridge plugin.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The config is invalid.
    #[error("{0}")]
    Config(String),
    /// A field this plugin does not implement.
    #[error("unsupported field {field}: {value}")]
    Unsupported {
        /// The config key.
        field: &'static str,
        /// Its value, or why this host cannot honour it.
        value: String,
    },
    /// CNI_NETNS names no usable network namespace (or entering it failed).
    #[error("{0}")]
    Netns(String),
    /// A local resource the plugin needs (its async runtime, a netlink socket, the
    /// namespace of its own thread) could not be had: nothing to do with the request.
    #[error("{context}: {source}")]
    Io {
        /// What was being opened or started.
        context: &'static str,
        /// The system's answer.
        source: std::io::Error,
    },
    /// An existing non-bridge link has the bridge's name.
    #[error("{0} already exists but is not a bridge")]
    NotABridge(String),
    /// The bridge holds a different address.
    #[error("{0}")]
    AddressConflict(String),
    /// The pod already has CNI_IFNAME.
    #[error("interface {0} already exists in the pod namespace")]
    IfaceExists(String),
    /// Every random host-side veth name tried was taken: a retry picks new ones.
    #[error("no free host veth name after {0} random tries")]
    VethNamesTaken(usize),
    /// A link this ADD had just created or found was gone when it looked again: someone
    /// else deleted it meanwhile, so a retry is the remedy.
    #[error("link {0} vanished while ADD was setting it up")]
    LinkVanished(String),
    /// A netlink request failed.
    #[error("{context}: {source}")]
    Netlink {
        /// What was being done.
        context: String,
        /// The kernel's (or the socket's) error.
        source: rtnetlink::Error,
    },
    /// A firewall tool or nftables netlink request failed (masquerade or spoof check); the
    /// message says which and why.
    #[error("{0}")]
    Firewall(String),
    /// CHECK found a difference.
    #[error("{0}")]
    Check(String),
    /// Part of the datapath never became ready: the host veth up and forwarding, an IPv6
    /// address answering its neighbours.
    #[error("{what} within {seconds} s")]
    NotReady {
        /// What was still missing, e.g. "bridge port veth1234abcd did not start forwarding".
        what: String,
        /// How long ADD waited.
        seconds: u64,
    },
    /// Duplicate address detection found an IPv6 address in use on its link: the pod's (with
    /// `enabledad`), or a gateway address someone else put on the bridge with DAD.
    #[error("duplicate address detection failed for {address} on {ifname}: another host uses it")]
    DadFailed {
        /// The address another host answered for.
        address: IpAddr,
        /// The pod interface or the gateway link.
        ifname: String,
    },
    /// A sysctl write failed.
    #[error("{0}")]
    Sysctl(String),
    /// The IPAM plugin's result is inconsistent (say an IPv6 address with an IPv4 gateway):
    /// refused before anything is created, like any other bad input.
    #[error("IPAM plugin {plugin} returned an unusable result: {reason}")]
    BadIpamResult {
        /// The IPAM plugin's type.
        plugin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Several steps of a best-effort teardown failed.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Many(Vec<CniError>),
    /// An error from the protocol layer or a delegated plugin, passed on unchanged.
    #[error(transparent)]
    Cni(#[from] CniError),
}

impl BridgeError {
    /// Wraps a netlink error with what was being done.
    pub fn netlink(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> BridgeError {
        let context = context.into();
        move |source| BridgeError::Netlink { context, source }
    }

    /// Wraps a local I/O failure with what was being opened.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> BridgeError {
        move |source| BridgeError::Io { context, source }
    }
}

impl From<BridgeError> for CniError {
    fn from(e: BridgeError) -> CniError {
        let msg = e.to_string();
        match e {
            BridgeError::Config(m) => CniError::InvalidConfig(m),
            BridgeError::Unsupported { field, value } => {
                CniError::UnsupportedField { field: field.into(), value }
            }
            BridgeError::Netns(reason) => CniError::InvalidEnv { var: "CNI_NETNS", reason },
            BridgeError::Io { .. } => CniError::Io(msg),
            BridgeError::NotABridge(_) => CniError::plugin(CODE_NOT_A_BRIDGE, msg, ""),
            BridgeError::AddressConflict(_) => CniError::plugin(CODE_ADDRESS_CONFLICT, msg, ""),
            BridgeError::IfaceExists(_) => CniError::plugin(CODE_IFACE_EXISTS, msg, ""),
            BridgeError::VethNamesTaken(_) | BridgeError::LinkVanished(_) => CniError::TryAgainLater(msg),
            BridgeError::Netlink { .. } => CniError::plugin(CODE_NETLINK, msg, ""),
            BridgeError::Firewall(_) => CniError::plugin(CODE_FIREWALL, msg, ""),
            BridgeError::Check(_) => CniError::plugin(CODE_CHECK_FAILED, msg, ""),
            BridgeError::NotReady { .. } | BridgeError::DadFailed { .. } => {
                CniError::plugin(CODE_NOT_READY, msg, "")
            }
            BridgeError::Sysctl(_) => CniError::plugin(CODE_SYSCTL, msg, ""),
            BridgeError::BadIpamResult { .. } => CniError::plugin(CODE_BAD_IPAM_RESULT, msg, ""),
            BridgeError::Many(mut v) if v.len() == 1 => v.remove(0),
            BridgeError::Many(v) => {
                let code = v.first().map(CniError::code).unwrap_or(CODE_NETLINK);
                CniError::plugin(code, msg, "")
            }
            BridgeError::Cni(c) => c,
        }
    }
}

/// The outcome of a best-effort teardown: every error, or success.
pub(crate) fn finish(errs: Vec<CniError>) -> Result<(), BridgeError> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(BridgeError::Many(errs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each variant: a new variant must be added here (the match below is exhaustive),
    /// and its code must be in [`CODE_TABLE`].
    fn one_of_each() -> Vec<BridgeError> {
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let samples = vec![
            BridgeError::Config("x".into()),
            BridgeError::Unsupported { field: "vlan", value: "x".into() },
            BridgeError::Netns("x".into()),
            BridgeError::Io { context: "x", source: io() },
            BridgeError::NotABridge("x".into()),
            BridgeError::AddressConflict("x".into()),
            BridgeError::IfaceExists("x".into()),
            BridgeError::VethNamesTaken(10),
            BridgeError::LinkVanished("x".into()),
            BridgeError::Netlink { context: "x".into(), source: rtnetlink::Error::RequestFailed },
            BridgeError::Firewall("x".into()),
            BridgeError::Check("x".into()),
            BridgeError::NotReady { what: "x".into(), seconds: 5 },
            BridgeError::DadFailed { address: [0u16; 8].into(), ifname: "x".into() },
            BridgeError::Sysctl("x".into()),
            BridgeError::BadIpamResult { plugin: "x".into(), reason: "y".into() },
            BridgeError::Many(vec![CniError::Io("x".into()), CniError::Io("y".into())]),
            BridgeError::Cni(CniError::Io("x".into())),
        ];
        for s in &samples {
            match s {
                BridgeError::Config(_)
                | BridgeError::Unsupported { .. }
                | BridgeError::Netns(_)
                | BridgeError::Io { .. }
                | BridgeError::NotABridge(_)
                | BridgeError::AddressConflict(_)
                | BridgeError::IfaceExists(_)
                | BridgeError::VethNamesTaken(_)
                | BridgeError::LinkVanished(_)
                | BridgeError::Netlink { .. }
                | BridgeError::Firewall(_)
                | BridgeError::Check(_)
                | BridgeError::NotReady { .. }
                | BridgeError::DadFailed { .. }
                | BridgeError::Sysctl(_)
                | BridgeError::BadIpamResult { .. }
                | BridgeError::Many(_)
                | BridgeError::Cni(_) => {}
            }
        }
        samples
    }

    #[test]
    fn every_variant_reports_a_code_of_the_table() {
        for e in one_of_each() {
            let shown = format!("{e:?}");
            let code = CniError::from(e).code();
            assert!(CODE_TABLE.iter().any(|(c, _)| *c == code), "{shown}: code {code} not in CODE_TABLE");
        }
    }

    #[test]
    fn runtime_and_socket_failures_are_not_blamed_on_cni_netns() {
        let e = BridgeError::Io { context: "opening a netlink socket", source: std::io::Error::other("x") };
        assert_eq!(CniError::from(e).code(), ErrorCode::Io as u32);
    }
}
