//! What every verb's run shares: its step marks and its one async runtime. A module of its own
//! so that the verbs need not reach back into the crate root for them.

use crate::error::BridgeError;

/// Logs the step (cni_proto::log, `logLevel: debug`). With `CNI_BRIDGE_TIMING=1`, also prints the time since the first mark and the step name to
/// stderr: where an ADD spends its time, on a real node.
pub fn mark(step: &str) {
    cni_proto::log::step(step);
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Option<Instant>> = OnceLock::new();
    if let Some(t0) = START.get_or_init(|| std::env::var_os("CNI_BRIDGE_TIMING").map(|_| Instant::now())) {
        eprintln!("cni-bridge: {:>8.3} ms {step}", t0.elapsed().as_secs_f64() * 1e3);
    }
}

/// The one runtime of this process: a single thread, so `setns` windows are never shared.
pub fn runtime() -> Result<tokio::runtime::Runtime, BridgeError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BridgeError::io("starting the async runtime"))
}
