//! CNI errors: the spec's codes, and the one place that maps errors to them.

use serde::Serialize;

/// Well-known CNI error codes (spec section "Error"); 100 and up are plugin-specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// Incompatible CNI version.
    IncompatibleVersion = 1,
    /// Unsupported field in network configuration.
    UnsupportedField = 2,
    /// Container unknown or does not exist.
    UnknownContainer = 3,
    /// Invalid necessary environment variables.
    InvalidEnvironment = 4,
    /// I/O failure.
    Io = 5,
    /// Failed to decode content.
    Decode = 6,
    /// Invalid network config.
    InvalidConfig = 7,
    /// Try again later.
    TryAgainLater = 11,
    /// STATUS: the plugin cannot service ADD.
    NotAvailable = 50,
    /// STATUS: not available, and existing containers may have limited connectivity.
    LimitedConnectivity = 51,
}

/// An error a plugin reports to its runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The config's version is not one this plugin implements, or the verb needs a newer one.
    #[error("incompatible CNI versions")]
    IncompatibleVersion {
        /// What was asked for and what is supported.
        details: String,
    },
    /// A config field this plugin does not support.
    #[error("unsupported field {field}: {value}")]
    UnsupportedField {
        /// The config key, as spelled in the JSON.
        field: String,
        /// Its value, as given.
        value: String,
    },
    /// The container is unknown.
    #[error("unknown container {0}")]
    UnknownContainer(String),
    /// Required environment variables are missing.
    #[error("required env variables [{}] missing", .0.join(","))]
    MissingEnv(Vec<&'static str>),
    /// An environment variable has an invalid value.
    #[error("invalid {var}: {reason}")]
    InvalidEnv {
        /// The variable's name (`CNI_IFNAME`...).
        var: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// Reading stdin or another I/O failed.
    #[error("I/O failure: {0}")]
    Io(String),
    /// The input could not be decoded.
    #[error("failed to decode {what}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's message.
        details: String,
    },
    /// The network config is invalid.
    #[error("invalid network config: {0}")]
    InvalidConfig(String),
    /// A transient failure.
    #[error("{0}")]
    TryAgainLater(String),
    /// STATUS: the plugin cannot service ADD.
    #[error("plugin not available: {0}")]
    NotAvailable(String),
    /// Any other failure, with its code (usually plugin-specific, 100 and up).
    #[error("{msg}")]
    Plugin {
        /// The CNI error code: 100 and up are the plugin's own.
        code: u32,
        /// The error JSON's `msg`: what failed, in one line.
        msg: String,
        /// The error JSON's `details`: the underlying cause (a system error, a tool's output).
        details: String,
    },
}

impl Error {
    /// A plugin-specific error.
    pub fn plugin(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Error::Plugin { code, msg: msg.into(), details: details.into() }
    }

    /// The CNI code of this error.
    pub fn code(&self) -> u32 {
        let code = match self {
            Error::IncompatibleVersion { .. } => ErrorCode::IncompatibleVersion,
            Error::UnsupportedField { .. } => ErrorCode::UnsupportedField,
            Error::UnknownContainer(_) => ErrorCode::UnknownContainer,
            Error::MissingEnv(_) | Error::InvalidEnv { .. } => ErrorCode::InvalidEnvironment,
            Error::Io(_) => ErrorCode::Io,
            Error::Decode { .. } => ErrorCode::Decode,
            Error::InvalidConfig(_) => ErrorCode::InvalidConfig,
            Error::TryAgainLater(_) => ErrorCode::TryAgainLater,
            Error::NotAvailable(_) => ErrorCode::NotAvailable,
            Error::Plugin { code, .. } => return *code,
        };
        code as u32
    }

    /// Details for the error JSON.
    pub fn details(&self) -> String {
        match self {
            Error::IncompatibleVersion { details } | Error::Decode { details, .. } => details.clone(),
            Error::Plugin { details, .. } => details.clone(),
            _ => String::new(),
        }
    }

    /// The error as the spec's JSON object, stamped with `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: String,
            #[serde(skip_serializing_if = "String::is_empty")]
            details: String,
        }
        let wire = Wire { cni_version, code: self.code(), msg: self.to_string(), details: self.details() };
        serde_json::to_string(&wire).expect("error JSON serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec_table() {
        let cases: Vec<(Error, u32)> = vec![
            (Error::IncompatibleVersion { details: String::new() }, 1),
            (Error::UnsupportedField { field: "x".into(), value: "1".into() }, 2),
            (Error::UnknownContainer("c".into()), 3),
            (Error::MissingEnv(vec!["CNI_IFNAME"]), 4),
            (Error::InvalidEnv { var: "CNI_ARGS", reason: "x".into() }, 4),
            (Error::Io("x".into()), 5),
            (Error::Decode { what: "config", details: String::new() }, 6),
            (Error::InvalidConfig("x".into()), 7),
            (Error::TryAgainLater("x".into()), 11),
            (Error::NotAvailable("x".into()), 50),
            (Error::plugin(107, "x", ""), 107),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e:?}");
        }
    }

    #[test]
    fn json_names_missing_variables_and_fields() {
        let j: serde_json::Value =
            serde_json::from_str(&Error::MissingEnv(vec!["CNI_NETNS", "CNI_IFNAME"]).to_json("1.1.0"))
                .unwrap();
        assert_eq!(j["code"], 4);
        assert_eq!(j["cniVersion"], "1.1.0");
        assert!(j["msg"].as_str().unwrap().contains("CNI_NETNS,CNI_IFNAME"));
        assert!(j.get("details").is_none());
        let e = Error::UnsupportedField { field: "vlan".into(), value: "5000".into() };
        assert!(e.to_json("1.0.0").contains("unsupported field vlan: 5000"));
    }
}
