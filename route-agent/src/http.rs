//! `/healthz`, `/readyz` and Prometheus `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::error::AgentError;
use crate::Metrics;

fn respond(metrics: &Metrics, path: &str, max_snapshot_age: Option<Duration>) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" => match metrics.not_ready(max_snapshot_age) {
            None => {
                let warnings = metrics.warnings.lock().map(|w| w.clone()).unwrap_or_default();
                (
                    StatusCode::OK,
                    warnings.iter().fold("ready\n".to_string(), |b, w| b + "warning: " + w + "\n"),
                )
            }
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => (StatusCode::OK, metrics.render()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Serves until the process ends. `/readyz` fails once the source has failed for longer than
/// `max_snapshot_age`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    max_snapshot_age: Option<Duration>,
) -> Result<(), AgentError> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(AgentError::io(format!("listening on {addr}")))?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(&metrics, req.uri().path(), max_snapshot_age);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
