//! `/healthz`, `/readyz` and Prometheus `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::error::AgentError;
use crate::Metrics;

fn respond(m: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" if m.etcd.unreachable() => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no etcd endpoint reachable; last: {}\n",
                m.etcd.last_error().unwrap_or_default()
            ),
        ),
        "/readyz" if m.ready.load(Ordering::Relaxed) => (StatusCode::OK, "ready\n".to_string()),
        "/readyz" => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: no conflist or no route sync yet\n".to_string())
        }
        "/metrics" => (StatusCode::OK, m.render()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let l =
        tokio::net::TcpListener::bind(addr).await.map_err(AgentError::io(format!("listening on {addr}")))?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics");
    loop {
        let Ok((stream, _)) = l.accept().await else { continue };
        let m = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = respond(&m, req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
