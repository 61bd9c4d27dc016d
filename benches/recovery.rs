//! Host-path recovery benchmark: how fast forkless repairs what dies, and what a hot swap
//! costs, with the demo-sized model (W[8192, 2048] fp32, 64 MiB) and 4 workers.
//!
//! Run: `cargo bench --bench recovery` (rounds: FORKLESS_BENCH_ROUNDS, default 20).
//! - owner SIGKILL → the restarted owner has re-adopted the escrow (supervisor's `recovered_ms`:
//!   from the exit it saw to the verified adoption; includes exec and a full checksum);
//! - worker SIGKILL → its replacement is ready and serving (measured here, from the kill to the
//!   supervisor's "worker N ready" line; includes exec, attach and the warm-up pass);
//! - hot swap → `supervisor reload-model` returns (new generation live), and → the old
//!   generation is freed (last worker released it), with total Pss before, during and after.

#[path = "../tests/util.rs"]
mod util;

use std::ffi::OsStr;
use std::time::Instant;

use util::*;

const MIB: f64 = 1024.0 * 1024.0;

fn total_pss(sup: &Supervisor) -> f64 {
    let pids = children_of(sup.pid()).into_iter().chain([sup.pid()]);
    pids.map(pss_bytes_of).sum::<u64>() as f64 / MIB
}

/// System-wide shared memory (`Shmem` in /proc/meminfo), in MiB. Memfd pages count here
/// whether or not any process maps them, unlike Pss: an arena held only by an fd (a new
/// generation not yet touched, an old one not yet released) shows here and nowhere else.
fn shmem_mib() -> f64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Shmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// Samples [`shmem_mib`] every millisecond until stopped; returns the peak.
fn shmem_peak_sampler() -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<f64>) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut peak: f64 = 0.0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(shmem_mib());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        peak
    });
    (stop, thread)
}

fn summary(mut samples: Vec<f64>) -> String {
    samples.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!("{:.1} / {:.1} / {:.1} / {:.1}", pick(0.0), pick(0.5), pick(0.9), pick(1.0))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("FORKLESS_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let dir = TestDir::new();
    let make = |path: &std::path::Path, seed: &str| {
        let status = std::process::Command::new(worker_exe())
            .args(["make-weights", "--in", "2048", "--out", "8192", "--seed", seed])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    };
    make(&dir.model_path(), "42");
    let config = dir.write_config(4, "");
    // Forty deliberate kills in a minute are not a crash loop here.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("backoff_initial_ms = 50", "backoff_initial_ms = 50\nmax_restarts = 1000");
    std::fs::write(&config, text).unwrap();
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();

    let mut owner_ms = Vec::new();
    for _ in 0..rounds {
        let owner = sup.children("owner")[0];
        send_signal(owner, libc::SIGKILL);
        let adopted = sup.wait_for("re-adopted", |_| true);
        owner_ms.push(adopted["recovered_ms"].as_f64().unwrap());
        eventually("new owner", || sup.children("owner").first().is_some_and(|&p| p != owner));
        // Let it count as a healthy run, so the next kill is restarted at once (no backoff).
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }

    let mut worker_ms = Vec::new();
    for _ in 0..rounds {
        let victim = sup.children("worker")[0];
        let killed = Instant::now();
        send_signal(victim, libc::SIGKILL);
        sup.wait_for("ready", |l| l["pid"].as_u64().is_some_and(|p| p != victim as u64) && l["attach_us"].is_u64());
        worker_ms.push(killed.elapsed().as_secs_f64() * 1e3);
        infer_seed(&addr, 1);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }

    let new_model = dir.path().join("new.safetensors");
    make(&new_model, "43");
    let before = total_pss(&sup);
    let shmem_before = shmem_mib();
    let (sampling, sampler) = shmem_peak_sampler();
    let swap = Instant::now();
    let (ok, _, stderr) =
        supervisor_command(&[OsStr::new("reload-model"), OsStr::new("-c"), config.as_os_str(), new_model.as_os_str()]);
    assert!(ok, "{stderr}");
    let live_ms = swap.elapsed().as_secs_f64() * 1e3;
    infer_seed(&addr, 1);
    sup.wait_for("no longer used by any worker", |_| true);
    let freed_ms = swap.elapsed().as_secs_f64() * 1e3;
    sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let shmem_peak = sampler.join().unwrap();
    let shmem_after = shmem_mib();
    for _ in 0..8 {
        infer_seed(&addr, 1); // fault the new generation's pages in everywhere
    }
    let after = total_pss(&sup);
    sup.signal(libc::SIGTERM);
    sup.wait_exit();

    println!("forkless host recovery benchmark: model 64 MiB, 4 workers, {rounds} rounds");
    println!("machine: {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    println!();
    println!("| event | min / median / p90 / max (ms) |");
    println!("|---|---|");
    println!("| owner SIGKILL → escrow re-adopted (no disk read) | {} |", summary(owner_ms));
    println!("| worker SIGKILL → replacement ready | {} |", summary(worker_ms));
    println!();
    println!("| hot swap | value |");
    println!("|---|---|");
    println!("| reload-model → new generation live | {live_ms:.1} ms |");
    println!("| reload-model → old generation freed | {freed_ms:.1} ms |");
    println!("| shared memory (Shmem) before / peak during / after | {shmem_before:.1} / {shmem_peak:.1} / {shmem_after:.1} MiB |");
    println!("| total Pss of the service before / after (new pages faulted in) | {before:.1} / {after:.1} MiB |");
}
