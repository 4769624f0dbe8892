//! The agent's errors.

/// What can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A netlink request failed.
    #[error("{context}: {source}")]
    Netlink {
        /// What was being done.
        context: String,
        /// The error.
        source: rtnetlink::Error,
    },
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// A node source failed or gave something unusable.
    #[error("source: {message}")]
    Source {
        /// The kind of failure, the label of `source_errors_total`.
        kind: &'static str,
        /// What happened.
        message: String,
    },
    /// Route or nexthop writes failed.
    #[error("routes: {0}")]
    Route(String),
    /// The command line or configuration is wrong.
    #[error("{0}")]
    Config(String),
    /// nft failed.
    #[error("masquerade: {0}")]
    Masq(String),
    /// The NetworkPolicy table could not be written.
    #[error("network policy: {0}")]
    Policy(String),
    /// A netlink socket overflowed (ENOBUFS): messages were lost; resync at once.
    #[error("netlink socket overrun: {0}")]
    Overrun(String),
}

impl AgentError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }

    /// A source failure of `kind`.
    pub fn source(kind: &'static str, message: impl Into<String>) -> AgentError {
        AgentError::Source { kind, message: message.into() }
    }

    /// Wraps a netlink error with what was being done.
    pub fn netlink(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Netlink { context, source }
    }
}
