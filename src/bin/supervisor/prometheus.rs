//! The metrics endpoint: Prometheus text at `/metrics`, and `/livez` / `/readyz` for probes
//! (Kubernetes, load balancers), on `[supervisor] metrics_listen`.
//!
//! The exporter lives here, in the binary: the library only records through `metrics`. Three
//! fixed GET routes need no web framework: plain hyper serves them, so the supervisor does not
//! link one.

use std::net::SocketAddr;

use anyhow::Context as _;
use forkless_supervisor::service::Health;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

#[derive(Clone)]
struct Endpoint {
    prometheus: PrometheusHandle,
    health: watch::Receiver<Health>,
}

/// Installs the recorder and serves the endpoints on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, health: watch::Receiver<Health>) -> anyhow::Result<()> {
    let prometheus = PrometheusBuilder::new().install_recorder().context("cannot install the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ([supervisor] metrics_listen)"))?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(metrics = %addr, "metrics on http://{addr}/metrics, probes on /livez and /readyz");
    let endpoint = Endpoint { prometheus, health };
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let response = endpoint.answer(&request);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok(())
}

impl Endpoint {
    fn answer<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        let health = *self.health.borrow();
        let (status, body) = match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => (StatusCode::OK, self.prometheus.render()),
            (&Method::GET, "/livez") if health.live => (StatusCode::OK, "live\n".into()),
            (&Method::GET, "/livez") => (StatusCode::SERVICE_UNAVAILABLE, "not running\n".into()),
            (&Method::GET, "/readyz") if health.ready => (StatusCode::OK, "ready\n".into()),
            (&Method::GET, "/readyz") => (StatusCode::SERVICE_UNAVAILABLE, "no worker is ready\n".into()),
            (_, "/metrics" | "/livez" | "/readyz") => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
            _ => (StatusCode::NOT_FOUND, String::new()),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    }
}
