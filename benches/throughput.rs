//! Host-path throughput: requests per second and latency of the linear demo under closed-loop
//! keep-alive load (`POST /infer {"seed": n}`), optionally against another build of the same
//! binaries, round by round, so that both see the same machine.
//!
//! Run: `cargo bench --bench throughput`. Settings (environment):
//! - `FORKLESS_BENCH_BASELINE=DIR`: a folder holding another build's `supervisor` and
//!   `linear-worker`; rounds alternate between it and this build, and the table shows the ratio;
//! - `FORKLESS_BENCH_SHAPES` (default `2048x8192,256x1024`: the demo's model, and a small one
//!   where HTTP is most of the cost), `FORKLESS_BENCH_WORKERS` (default 4, as the demo),
//!   `FORKLESS_BENCH_CONNECTIONS` (default 16), `FORKLESS_BENCH_SECS` (default 10, after 2 s of
//!   warm-up), `FORKLESS_BENCH_ROUNDS` (default 3).
//!
//! Besides req/s it reports the workers' CPU time per request (user + system, from
//! `/proc/PID/stat`, over the whole round): on a machine shared with other work, req/s follows
//! the CPU the benchmark happens to get, while CPU per request is what the code costs.

#[path = "../tests/util.rs"]
mod util;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use util::*;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One build under test: the folder holding its `supervisor` and `linear-worker`.
#[derive(Clone)]
struct Build {
    name: &'static str,
    dir: PathBuf,
}

struct Settings {
    workers: u32,
    connections: usize,
    warmup: Duration,
    measure: Duration,
}

/// What one round measured.
struct Round {
    per_s: f64,
    /// Workers' CPU time per answered request, in microseconds.
    cpu_us: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    /// Requests answered in the whole round, warm-up included (for CPU per request).
    answered: u64,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing; this benchmark has no test cases.
    }
    let settings = Settings {
        workers: env_or("FORKLESS_BENCH_WORKERS", 4),
        connections: env_or("FORKLESS_BENCH_CONNECTIONS", 16),
        warmup: Duration::from_secs(2),
        measure: Duration::from_secs(env_or("FORKLESS_BENCH_SECS", 10)),
    };
    let rounds: usize = env_or("FORKLESS_BENCH_ROUNDS", 3);
    let this = Build { name: "this build", dir: supervisor_exe().parent().expect("a folder").to_path_buf() };
    let mut builds = vec![this.clone()];
    if let Ok(dir) = std::env::var("FORKLESS_BENCH_BASELINE") {
        builds.insert(0, Build { name: "baseline", dir: dir.into() });
    }
    let shapes: Vec<(usize, usize)> = std::env::var("FORKLESS_BENCH_SHAPES")
        .unwrap_or_else(|_| "2048x8192,256x1024".into())
        .split(',')
        .filter_map(|s| s.split_once('x').and_then(|(i, o)| Some((i.trim().parse().ok()?, o.trim().parse().ok()?))))
        .collect();
    println!(
        "forkless host throughput: {} workers, {} keep-alive connections, {:?} per round after {:?} warm-up, {rounds} rounds",
        settings.workers, settings.connections, settings.measure, settings.warmup
    );
    println!("machine: {} cores, load average {}", cores(), load_average());
    for build in &builds {
        println!("{}: {}", build.name, build.dir.display());
    }
    println!();
    println!("| model W[out, in] | build | req/s per round | req/s median | worker CPU µs/request (median) | p50 ms | p99 ms | failed |");
    println!("|---|---|---|---|---|---|---|---|");
    for (inputs, outputs) in shapes {
        let dir = TestDir::new();
        make_weights(&this, &dir.model_path(), inputs, outputs);
        let mut results: Vec<Vec<Round>> = builds.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (build, rounds) in builds.iter().zip(&mut results) {
                rounds.push(run_round(&dir, build, &settings));
            }
        }
        let medians: Vec<f64> = results.iter().map(|r| median(r.iter().map(|r| r.per_s).collect())).collect();
        let cpu: Vec<f64> = results.iter().map(|r| median(r.iter().map(|r| r.cpu_us).collect())).collect();
        for (build, rounds) in builds.iter().zip(&results) {
            let per_round: Vec<String> = rounds.iter().map(|r| format!("{:.0}", r.per_s)).collect();
            println!(
                "| [{outputs}, {inputs}] | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
                build.name,
                per_round.join(", "),
                median(rounds.iter().map(|r| r.per_s).collect()),
                median(rounds.iter().map(|r| r.cpu_us).collect()),
                median(rounds.iter().map(|r| r.p50_ms).collect()),
                median(rounds.iter().map(|r| r.p99_ms).collect()),
                rounds.iter().map(|r| r.failed).sum::<u64>(),
            );
        }
        if let ([baseline, this], [cpu_baseline, cpu_this]) = (&medians[..], &cpu[..]) {
            println!(
                "| [{outputs}, {inputs}] | this / baseline | | {:.1} % | {:.1} % (requests per CPU-second: {:.1} %) | | | |",
                this / baseline * 100.0,
                cpu_this / cpu_baseline * 100.0,
                cpu_baseline / cpu_this * 100.0
            );
        }
    }
}

fn make_weights(build: &Build, path: &Path, inputs: usize, outputs: usize) {
    let status = std::process::Command::new(build.dir.join("linear-worker"))
        .args(["make-weights", "--in", &inputs.to_string(), "--out", &outputs.to_string()])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Starts `build` on the model in `dir`, drives the load, stops it.
fn run_round(dir: &TestDir, build: &Build, settings: &Settings) -> Round {
    let worker = build.dir.join("linear-worker").display().to_string();
    let config = dir.write_config_with(&ConfigExtra {
        workers: settings.workers,
        command: Some(vec![worker]),
        ..ConfigExtra::default()
    });
    let mut sup = Supervisor::start_program(&build.dir.join("supervisor"), &config, &[], &[]);
    let addr: std::net::SocketAddr = sup.wait_ready().parse().unwrap();
    let workers = sup.children("worker");
    let cpu_before: u64 = workers.iter().map(|&pid| cpu_ticks(pid)).sum();
    let mut round = drive(addr, settings);
    let cpu = (workers.iter().map(|&pid| cpu_ticks(pid)).sum::<u64>() - cpu_before) as f64 / ticks_per_s();
    round.cpu_us = cpu * 1e6 / round.answered as f64;
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log_text());
    round
}

/// Closed-loop load: each connection sends its next request when the last is answered.
fn drive(addr: std::net::SocketAddr, settings: &Settings) -> Round {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let started = Instant::now();
    let (from, until) = (started + settings.warmup, started + settings.warmup + settings.measure);
    let results = runtime.block_on(async {
        let tasks: Vec<_> =
            (0..settings.connections).map(|c| tokio::spawn(connection_loop(addr, c as u64, from, until))).collect();
        let mut all = (Vec::new(), 0, 0);
        for task in tasks {
            let (latencies, failed, answered) = task.await.unwrap();
            all.0.extend(latencies);
            all.1 += failed;
            all.2 += answered;
        }
        all
    });
    let (mut latencies, failed, answered) = results;
    latencies.sort_unstable_by(f64::total_cmp);
    let pick = |q: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * q) as usize).copied().unwrap_or(0.0);
    Round {
        per_s: latencies.len() as f64 / settings.measure.as_secs_f64(),
        cpu_us: 0.0,
        answered,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        failed,
    }
}

/// One keep-alive connection; returns the latencies (ms) of requests sent in `[from, until)`,
/// the failures among them, and how many requests it got answered in all.
async fn connection_loop(
    addr: std::net::SocketAddr,
    first_seed: u64,
    from: Instant,
    until: Instant,
) -> (Vec<f64>, u64, u64) {
    use forkless_chaos::load::Connection;
    let (mut latencies, mut failed, mut seed, mut answered) = (Vec::new(), 0, first_seed, 0);
    let mut connection: Option<Connection> = None;
    while Instant::now() < until {
        if connection.is_none() {
            connection = Connection::open(addr).await.ok();
        }
        let Some(open) = connection.as_mut() else {
            failed += 1;
            continue;
        };
        let sent = Instant::now();
        let body = format!("{{\"seed\": {}}}", seed % 64);
        seed += 1;
        match open.post("/infer", body.as_bytes()).await {
            Ok(reply) if reply.status == 200 => {
                answered += 1;
                if sent >= from {
                    latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                }
            }
            _ => {
                connection = None;
                if sent >= from {
                    failed += 1;
                }
            }
        }
    }
    (latencies, failed, answered)
}

/// User + system CPU time of `pid` so far, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(") ").map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // After the command: field 3 is the state, so utime (14) and stime (15) are at 11 and 12.
    fields.get(11).zip(fields.get(12)).map_or(0, |(u, s)| u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0))
}

fn ticks_per_s() -> f64 {
    100.0 // USER_HZ: 100 on every Linux architecture forkless runs on
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
