//! The bridge plugin's errors, and their CNI codes in one place.

use cni_proto::Error as CniError;

/// Code: a link named like the bridge exists and is not a bridge.
pub const CODE_NOT_A_BRIDGE: u32 = 110;
/// Code: the bridge has a different gateway address and `forceAddress` is off.
pub const CODE_ADDRESS_CONFLICT: u32 = 111;
/// Code: CNI_IFNAME already exists in the pod namespace.
pub const CODE_IFACE_EXISTS: u32 = 112;
/// Code: a netlink request failed.
pub const CODE_NETLINK: u32 = 113;
/// Code: the firewall entries (masquerade, spoof check) could not be added, listed or removed.
pub const CODE_MASQ: u32 = 114;
/// Code: CHECK found the attachment differs from what ADD made.
pub const CODE_CHECK_FAILED: u32 = 115;
/// Code: the host veth did not come up.
pub const CODE_PORT_DOWN: u32 = 116;
/// Code: a sysctl could not be written.
pub const CODE_SYSCTL: u32 = 117;

/// What can go wrong in the bridge plugin.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The config is invalid.
    #[error("{0}")]
    Config(String),
    /// A field this plugin does not implement.
    #[error("unsupported field {field}: {value}")]
    Unsupported {
        /// The key.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// CNI_NETNS is not usable.
    #[error("{0}")]
    Netns(String),
    /// An existing non-bridge link has the bridge's name.
    #[error("{0} already exists but is not a bridge")]
    NotABridge(String),
    /// The bridge holds a different address.
    #[error("{0}")]
    AddressConflict(String),
    /// The pod already has CNI_IFNAME.
    #[error("interface {0} already exists in the pod namespace")]
    IfaceExists(String),
    /// A netlink request failed.
    #[error("{context}: {source}")]
    Netlink {
        /// What was being done.
        context: String,
        /// The error.
        source: rtnetlink::Error,
    },
    /// A firewall tool or nftables netlink request failed; the message says which and why.
    #[error("{0}")]
    Masq(String),
    /// CHECK found a difference.
    #[error("{0}")]
    Check(String),
    /// The host veth did not come up.
    #[error("{0}")]
    PortDown(String),
    /// A sysctl write failed.
    #[error("{0}")]
    Sysctl(String),
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
            BridgeError::NotABridge(_) => CniError::plugin(CODE_NOT_A_BRIDGE, msg, ""),
            BridgeError::AddressConflict(_) => CniError::plugin(CODE_ADDRESS_CONFLICT, msg, ""),
            BridgeError::IfaceExists(_) => CniError::plugin(CODE_IFACE_EXISTS, msg, ""),
            BridgeError::Netlink { .. } => CniError::plugin(CODE_NETLINK, msg, ""),
            BridgeError::Masq(_) => CniError::plugin(CODE_MASQ, msg, ""),
            BridgeError::Check(_) => CniError::plugin(CODE_CHECK_FAILED, msg, ""),
            BridgeError::PortDown(_) => CniError::plugin(CODE_PORT_DOWN, msg, ""),
            BridgeError::Sysctl(_) => CniError::plugin(CODE_SYSCTL, msg, ""),
            BridgeError::Many(mut v) if v.len() == 1 => v.remove(0),
            BridgeError::Many(v) => {
                let code = v.first().map(CniError::code).unwrap_or(CODE_NETLINK);
                CniError::plugin(code, msg, "")
            }
            BridgeError::Cni(c) => c,
        }
    }
}
