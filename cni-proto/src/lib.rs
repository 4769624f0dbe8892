//! The CNI protocol, spec 1.1.0: what every plugin binary of this project shares.
//!
//! Environment ([`env`]), network configuration ([`config`]), versions ([`version`]),
//! results in every version's shape ([`result`]), errors and their codes ([`error`]),
//! the verb dispatcher ([`skel`]) and delegation to other plugins ([`delegate`]).

pub mod config;
pub mod crash;
pub mod delegate;
pub mod env;
pub mod error;
pub mod log;
pub mod result;
pub mod skel;
#[cfg(feature = "testing")]
pub mod testing;
pub mod version;

pub use config::{Attachment, NetConf};
pub use crash::{checkpoint, crash_point, pause_point, test_switch};
pub use env::{CniArgs, Command, Invocation};
pub use error::{Error, ErrorCode};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use skel::{dispatch, run_main, Outcome, Plugin, Request};
pub use version::Version;
