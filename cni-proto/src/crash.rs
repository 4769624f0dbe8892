//! Crash points: a test build stops a plugin at a named step, so that the recovery a runtime
//! performs afterwards (DEL with the same arguments, GC) can be tested at every step.

/// The variable naming the step at which a test build kills itself.
pub const CRASH_AT_ENV: &str = "CNI_TEST_CRASH_AT";

/// Dies by SIGKILL here when this is a test build (feature `crash-points`, enabled only by the
/// plugins' dev-dependencies) and `CNI_TEST_CRASH_AT` equals `step`: no destructor runs and no
/// buffer is flushed, exactly what a runtime's kill leaves. Without the feature, nothing.
#[inline(always)]
pub fn crash_point(step: &str) {
    #[cfg(feature = "crash-points")]
    if std::env::var_os(CRASH_AT_ENV).is_some_and(|v| v == step) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(feature = "crash-points"))]
    let _ = step;
}
