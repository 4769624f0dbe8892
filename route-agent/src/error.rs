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
    #[error("source: {0}")]
    Source(String),
    /// The command line or configuration is wrong.
    #[error("{0}")]
    Config(String),
    /// nft failed.
    #[error("masquerade: {0}")]
    Masq(String),
}

impl AgentError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }

    /// Wraps a netlink error with what was being done.
    pub fn netlink(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Netlink { context, source }
    }
}
