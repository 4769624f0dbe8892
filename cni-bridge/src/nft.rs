//! Running `nft`: one process per transaction, scripts on stdin, JSON listings.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::error::BridgeError;

/// Applies `script` atomically (`nft -f -`).
pub fn apply(script: &str) -> Result<(), BridgeError> {
    pipe("nft", &["-f", "-"], script)
}

/// Runs `bin args` with `script` on stdin; its stderr is the error when it fails.
pub fn pipe(bin: &str, args: &[&str], script: &str) -> Result<(), BridgeError> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BridgeError::Masq(format!("running {bin}: {e}")))?;
    let written = child.stdin.take().expect("piped").write_all(script.as_bytes());
    let out = child.wait_with_output().map_err(|e| BridgeError::Masq(e.to_string()))?;
    if !out.status.success() {
        return Err(BridgeError::Masq(format!("{bin}: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    written.map_err(|e| BridgeError::Masq(format!("writing to {bin}: {e}")))
}

/// The JSON objects of table `family name`; empty when the table does not exist.
pub fn list_table(family: &str, name: &str) -> Result<Vec<Value>, BridgeError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", family, name])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BridgeError::Masq(format!("running nft: {e}")))?;
    if !out.status.success() {
        // No table yet: nothing was ever added here.
        return Ok(vec![]);
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| BridgeError::Masq(format!("nft -j output: {e}")))?;
    Ok(v["nftables"].as_array().cloned().unwrap_or_default())
}
