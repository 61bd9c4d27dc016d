//! What the supervisor measures, recorded through the `metrics` facade (the binary installs
//! the Prometheus exporter and serves it): restarts by role and reason (counted where they
//! happen), and, refreshed every few seconds, per process: up, RSS, requests served; plus the
//! live generation, the bytes held in escrow and the workers wanted and ready.
//!
//! ```no_run
//! # async fn f(ctx: std::sync::Arc<forkless_supervisor::children::Context>) {
//! let stop = tokio_util::sync::CancellationToken::new();
//! let meter = forkless_supervisor::processes::MemoryMeter::start().unwrap();
//! forkless_supervisor::metrics::record_periodically(ctx, meter, stop).await;
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::children::Context;
use crate::processes::{MemoryMeter, State};

/// How often process gauges are refreshed.
const PERIOD: Duration = Duration::from_secs(2);

/// Refreshes the gauges every [`PERIOD`] until `stop`. Memory is read through `meter`, off
/// the runtime; while it cannot be read, the memory gauges keep their last values.
pub async fn record_periodically(ctx: Arc<Context>, meter: MemoryMeter, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => record(&ctx, &meter).await,
            _ = stop.cancelled() => return,
        }
    }
}

async fn record(ctx: &Context, meter: &MemoryMeter) {
    let mut processes = ctx.bus.processes.snapshot();
    let measured = meter.measure(processes.iter().filter_map(|p| p.pid).collect()).await;
    match measured.map(|m| m.apply(&mut processes)) {
        Ok(Some(unattributed)) => metrics::gauge!("forkless_gpu_unattributed_bytes").set(unattributed as f64),
        Ok(None) => {}
        Err(reason) => tracing::debug!("{reason}"),
    }
    for p in &processes {
        let labels = [("role", p.role.clone()), ("index", p.index.to_string())];
        let up = p.pid.is_some() && p.state == State::Ready;
        metrics::gauge!("forkless_process_up", &labels).set(if up { 1.0 } else { 0.0 });
        if let Some(rss) = p.rss_bytes {
            metrics::gauge!("forkless_process_rss_bytes", &labels).set(rss as f64);
        }
        metrics::gauge!("forkless_process_restarts", &labels).set(f64::from(p.restarts));
        if let Some(gpu) = p.gpu_bytes {
            metrics::gauge!("forkless_process_gpu_bytes", &labels).set(gpu as f64);
        }
        if p.role == "worker" {
            metrics::gauge!("forkless_worker_requests_served", &labels).set(p.requests as f64);
        }
    }
    let escrow = &ctx.bus.escrow;
    metrics::gauge!("forkless_escrow_bytes").set(escrow.bytes_held() as f64);
    if let Some(generation) = escrow.current() {
        metrics::gauge!("forkless_generation").set(generation.manifest.generation as f64);
    }
    metrics::gauge!("forkless_workers_ready").set(ctx.bus.processes.ready_workers() as f64);
}
