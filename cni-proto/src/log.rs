//! Plugin logs: `tracing` events for each call, to stderr and, when the network config has
//! `logFile`, appended to that file, each line carrying the container id, verb, network and
//! interface, and the time since the call started at each step.
//!
//! The config fields alone turn it on (`"logFile": "/var/log/cni.log", "logLevel": "debug"`):
//! a runtime's DEL may come from a process with a scrubbed environment (podman's cleanup), so
//! an environment variable can only add to it (`CNI_LOG_LEVEL` raises stderr's level). The
//! delegated IPAM plugin gets the same config and logs to the same file. Logging never fails
//! a call: an unopenable file or an unknown level is reported on stderr and ignored.
//!
//! Levels: `error`, `warn` (default on stderr: failed calls), `info` (default in the file:
//! each call's start and end), `debug` (each step with its time), `trace`, `off`. The
//! subscriber is scoped to the call (`set_default`), so nothing global is installed.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::sync::Mutex;
use std::time::Instant;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

use serde_json::Value;

use crate::env::Invocation;

thread_local! {
    static STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

fn level(s: &str) -> Option<LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" | "warning" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

/// Milliseconds since the call started, to the microsecond.
fn elapsed_ms() -> f64 {
    let ms = STARTED.with(|s| s.get().map(|t| t.elapsed().as_secs_f64() * 1e3).unwrap_or(0.0));
    (ms * 1e3).round() / 1e3
}

/// Records that the current call reached `name` (at debug level, with the time since start).
pub fn step(name: &str) {
    tracing::debug!(ms = elapsed_ms(), "step {name}");
}

/// One call's logging; ends (with its outcome) on [`Call::finish`].
pub struct Call {
    // Field order is drop order: leave the span before the subscriber goes.
    span: Option<tracing::span::EnteredSpan>,
    _guard: Option<tracing::subscriber::DefaultGuard>,
}

impl Call {
    /// Sets up the subscriber from `logFile`/`logLevel` of the config `raw` (and `CNI_LOG_LEVEL`
    /// from `get_env`) and enters the call's span. Takes the request's parts, not the request,
    /// so that logging sits below the dispatcher (skel.rs) that calls it.
    pub fn start(
        inv: &Invocation,
        network: &str,
        raw: &Value,
        get_env: &dyn Fn(&str) -> Option<String>,
    ) -> Call {
        STARTED.with(|s| s.set(Some(Instant::now())));
        let mut problems = Vec::new();
        let mut parse = |what: &str, v: Option<String>| {
            let v = v?;
            let l = level(&v);
            if l.is_none() {
                problems.push(format!("unknown {what} {v:?} (error, warn, info, debug, trace, off)"));
            }
            l
        };
        let conf_level = parse("logLevel", raw.get("logLevel").and_then(|v| v.as_str()).map(str::to_string));
        let env_level = parse("CNI_LOG_LEVEL", get_env("CNI_LOG_LEVEL"));
        let stderr_level = env_level.or(conf_level).unwrap_or(LevelFilter::WARN);
        let file = raw.get("logFile").and_then(|v| v.as_str()).filter(|p| !p.is_empty()).and_then(|p| {
            match OpenOptions::new().create(true).append(true).open(p) {
                Ok(f) => Some(f),
                Err(e) => {
                    problems.push(format!("logFile {p}: {e}"));
                    None
                }
            }
        });
        let stderr = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_filter(stderr_level);
        let file_layer = file.map(|f| {
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_target(false)
                .with_writer(Mutex::new(f))
                .with_filter(conf_level.unwrap_or(LevelFilter::INFO))
        });
        let guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(stderr).with(file_layer));
        // At error level, so that every layer, whatever its level, prefixes its lines with it.
        let span = tracing::error_span!(
            "cni",
            plugin = %std::env::args().next().unwrap_or_default().rsplit('/').next().unwrap_or(""),
            verb = ?inv.command,
            container = %inv.container_id,
            network = %network,
            ifname = %inv.ifname,
        )
        .entered();
        for p in problems {
            tracing::warn!("{p}");
        }
        tracing::info!("start");
        Call { span: Some(span), _guard: Some(guard) }
    }

    /// Logs the outcome: `info` on success, `warn` with the error on failure.
    pub fn finish(mut self, exit_code: i32, stdout: &str) {
        let ms = elapsed_ms();
        if exit_code == 0 {
            tracing::info!(ms, "done");
        } else {
            tracing::warn!(ms, "failed: {stdout}");
        }
        self.span.take();
        STARTED.with(|s| s.set(None));
    }
}
