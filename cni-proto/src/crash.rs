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

/// The variable naming the step at which a test build fails with an I/O error instead.
pub const FAIL_AT_ENV: &str = "CNI_TEST_FAIL_AT";

/// [`crash_point`]; and in a test build an error here when `CNI_TEST_FAIL_AT` equals `step`,
/// so that the rollback of everything made before each step is tested at every one.
#[inline(always)]
pub fn checkpoint(step: &str) -> std::io::Result<()> {
    crash_point(step);
    #[cfg(feature = "crash-points")]
    if std::env::var_os(FAIL_AT_ENV).is_some_and(|v| v == step) {
        return Err(std::io::Error::other(format!("failure injected at {step}")));
    }
    Ok(())
}

/// The variable naming the step at which a test build stops until released.
pub const PAUSE_AT_ENV: &str = "CNI_TEST_PAUSE_AT";
/// The FIFO a paused test build waits on; `<fifo>.reached` is created when it gets there.
pub const PAUSE_FIFO_ENV: &str = "CNI_TEST_PAUSE_FIFO";

/// In a test build, when `CNI_TEST_PAUSE_AT` equals `step`: creates `<CNI_TEST_PAUSE_FIFO>.reached`
/// and waits until the test writes to the FIFO and closes it. A rendezvous, not a delay: a
/// test holds the plugin between two steps and runs its race exactly there. Nothing in a
/// release build.
#[inline(always)]
pub fn pause_point(step: &str) {
    #[cfg(feature = "crash-points")]
    if std::env::var_os(PAUSE_AT_ENV).is_some_and(|v| v == step) {
        if let Some(fifo) = std::env::var_os(PAUSE_FIFO_ENV) {
            let mut reached = fifo.clone();
            reached.push(".reached");
            let _ = std::fs::write(&reached, step);
            let _ = std::fs::read(&fifo);
        }
    }
    #[cfg(not(feature = "crash-points"))]
    let _ = step;
}

/// Whether a test build was asked to behave as named by `CNI_TEST_<name>=1`; always false in
/// a release build.
#[inline(always)]
pub fn test_switch(name: &str) -> bool {
    #[cfg(feature = "crash-points")]
    return std::env::var_os(format!("CNI_TEST_{name}")).is_some_and(|v| v == "1");
    #[cfg(not(feature = "crash-points"))]
    {
        let _ = name;
        false
    }
}
