//! STATUS: the bridge itself is made on demand, so only IPAM can be unavailable.

use cni_proto::{Command, Request};

use crate::config::BridgeConf;
use crate::error::BridgeError;

/// Forwards STATUS to IPAM.
pub fn status(req: &Request, conf: &BridgeConf) -> Result<(), BridgeError> {
    if let Some(plugin) = conf.ipam_type.as_deref() {
        crate::ipam::run(plugin, Command::Status, req)?;
    }
    Ok(())
}
