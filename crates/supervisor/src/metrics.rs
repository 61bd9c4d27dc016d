//! What the supervisor measures, recorded through the `metrics` facade (the binary installs
//! the Prometheus exporter and serves it): restarts by role and reason (counted where they
//! happen), and, refreshed every few seconds, per process: up, RSS, requests served; plus the
//! live generation, the bytes held in escrow and the workers wanted and ready.

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

/// The live generation's batch lane: totals, and passes by batch size and by workers served.
fn record_lane(lane: &crate::escrow::LaneStatus) {
    let device = lane.device.map_or("host".to_string(), |d| d.to_string());
    let gauge = |name: &'static str, value: f64| metrics::gauge!(name, "device" => device.clone()).set(value);
    gauge("forkless_lane_passes", lane.passes as f64);
    gauge("forkless_lane_requests_served", lane.served as f64);
    gauge("forkless_lane_requests_failed", lane.failed as f64);
    gauge("forkless_lane_requests_rejected", lane.rejected as f64);
    gauge("forkless_lane_recoveries", lane.recoveries as f64);
    gauge("forkless_lane_mean_batch", lane.mean_batch);
    gauge("forkless_lane_mean_pass_seconds", lane.mean_pass_us / 1e6);
    gauge("forkless_lane_mean_workers_per_pass", lane.mean_workers_per_pass);
    for (bucket, passes) in &lane.batch_sizes {
        metrics::gauge!("forkless_lane_passes_by_batch_size", "device" => device.clone(), "size" => bucket.clone())
            .set(*passes as f64);
    }
    for (i, passes) in lane.workers_per_pass.iter().enumerate() {
        let workers = if i + 1 == lane.workers_per_pass.len() { format!("{}+", i + 1) } else { (i + 1).to_string() };
        metrics::gauge!("forkless_lane_passes_by_workers", "device" => device.clone(), "workers" => workers)
            .set(*passes as f64);
    }
}

async fn record(ctx: &Context, meter: &MemoryMeter) {
    let mut processes = ctx.bus.processes.snapshot();
    let measured = meter.measure(processes.iter().filter_map(|p| p.pid).collect()).await;
    if let Ok(measured) = &measured {
        for &device in &ctx.bus.devices {
            if let Some(used) = measured.device_used(device) {
                metrics::gauge!("forkless_device_gpu_used_bytes", "device" => device.to_string()).set(used as f64);
            }
        }
    }
    match measured.map(|m| m.apply(&mut processes)) {
        Ok(Some(unattributed)) => metrics::gauge!("forkless_gpu_unattributed_bytes").set(unattributed as f64),
        Ok(None) => {}
        Err(reason) => tracing::debug!("{reason}"),
    }
    for p in &processes {
        let labels = [("role", p.role.clone()), ("index", p.index.to_string())];
        let up = p.state == State::Ready;
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
    if let Some(generation) = escrow.live() {
        metrics::gauge!("forkless_generation").set(generation.number() as f64);
        for lane in generation.lane_status() {
            record_lane(&lane);
        }
    }
    metrics::gauge!("forkless_workers_ready").set(ctx.bus.processes.ready_workers() as f64);
    for (device, bytes) in escrow.bytes_by_device() {
        metrics::gauge!("forkless_device_escrow_bytes", "device" => device.to_string()).set(bytes as f64);
    }
}
