//! The metrics endpoint: Prometheus text at `/metrics`, and `/livez` / `/readyz` for probes
//! (Kubernetes, load balancers), on `[supervisor] metrics_listen`.
//!
//! The exporter lives here, in the binary: the library only records through `metrics`.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use forkless_supervisor::service::Health;
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
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(Endpoint { prometheus, health });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics endpoint failed: {e}");
        }
    });
    Ok(())
}

async fn metrics(State(endpoint): State<Endpoint>) -> String {
    endpoint.prometheus.render()
}

async fn livez(State(endpoint): State<Endpoint>) -> (StatusCode, &'static str) {
    match endpoint.health.borrow().live {
        true => (StatusCode::OK, "live\n"),
        false => (StatusCode::SERVICE_UNAVAILABLE, "not running\n"),
    }
}

async fn readyz(State(endpoint): State<Endpoint>) -> (StatusCode, &'static str) {
    match endpoint.health.borrow().ready {
        true => (StatusCode::OK, "ready\n"),
        false => (StatusCode::SERVICE_UNAVAILABLE, "no worker is ready\n"),
    }
}
