//! The IPAM plugin's errors, and their CNI codes in one place.

use cni_proto::Error as CniError;

/// Code: no free address left in a range set.
pub const CODE_RANGE_EXHAUSTED: u32 = 100;
/// Code: a requested address cannot be given.
pub const CODE_REQUESTED_UNAVAILABLE: u32 = 101;
/// Code: the attachment already holds an address in this range set.
pub const CODE_DUPLICATE: u32 = 102;
/// Code: CHECK found no reservation, or one that differs from prevResult.
pub const CODE_CHECK_FAILED: u32 = 103;

/// What can go wrong in host-local.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The `ipam` section (or the runtime's additions) is invalid.
    #[error("{0}")]
    Config(String),
    /// A requested address in CNI_ARGS is not an address.
    #[error("{0}")]
    EnvArgs(String),
    /// More than one address per family with a pre-0.3.0 config.
    #[error("CNI version {0} does not support more than 1 address per family")]
    TooManyForVersion(String),
    /// The range set has no free address.
    #[error("no IP addresses available in range set: {0}")]
    Exhausted(String),
    /// A requested address cannot be given.
    #[error("{0}")]
    RequestedUnavailable(String),
    /// A second ADD for the same attachment.
    #[error("{ip} has been allocated to {id}, duplicate allocation is not allowed")]
    Duplicate {
        /// The address it already holds.
        ip: std::net::IpAddr,
        /// The container.
        id: String,
    },
    /// CHECK failed.
    #[error("{0}")]
    Check(String),
    /// The data directory could not be read or written.
    #[error("{context}: {source}")]
    Store {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// GC could not release some leases.
    #[error("GC failed to release {}: {}", .0.len(), .0.join("; "))]
    Gc(Vec<String>),
}

impl IpamError {
    /// Wraps an I/O error with what was being done.
    pub fn store(context: impl Into<String>, source: std::io::Error) -> Self {
        IpamError::Store { context: context.into(), source }
    }
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> CniError {
        let msg = e.to_string();
        match e {
            IpamError::Config(m) => CniError::InvalidConfig(m),
            IpamError::EnvArgs(m) => CniError::InvalidEnv { var: "CNI_ARGS", reason: m },
            IpamError::TooManyForVersion(_) => CniError::IncompatibleVersion { details: msg },
            IpamError::Exhausted(_) => CniError::plugin(CODE_RANGE_EXHAUSTED, msg, ""),
            IpamError::RequestedUnavailable(_) => CniError::plugin(CODE_REQUESTED_UNAVAILABLE, msg, ""),
            IpamError::Duplicate { .. } => CniError::plugin(CODE_DUPLICATE, msg, ""),
            IpamError::Check(_) => CniError::plugin(CODE_CHECK_FAILED, msg, ""),
            IpamError::Store { .. } | IpamError::Gc(_) => CniError::Io(msg),
        }
    }
}
