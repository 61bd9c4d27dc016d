//! Host-path benchmark: memory of N workers sharing one copy of the weights versus
//! `sharing = "none"` (every worker loads its own copy: "gunicorn without --preload"), the
//! time a worker takes to attach the arena, and the cold start to all workers ready.
//!
//! Run: `cargo bench --bench host_memory` (model size: FORKLESS_BENCH_IN / FORKLESS_BENCH_OUT,
//! default 2048 x 8192 fp32 = 64 MiB; worker counts: FORKLESS_BENCH_WORKERS, default 1,2,4,8).
//! Memory is the sum of Pss (proportional set size: a page shared by k processes counts 1/k
//! in each) over the supervisor, the owner and every worker, from /proc/PID/smaps_rollup.

#[path = "../tests/util.rs"]
mod util;

use std::time::Instant;

use util::*;

const MIB: f64 = 1024.0 * 1024.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Pss of a process outside the weights arena mapping (its own overhead).
fn overhead_bytes(pid: u32) -> u64 {
    let arena: u64 = smaps(pid).iter().filter(|m| m.path.starts_with("/memfd:forkless-arena")).map(|m| m.pss_kb).sum();
    pss_bytes_of(pid) - arena * 1024
}

struct Row {
    sharing: &'static str,
    workers: u32,
    total: u64,
    supervisor_and_owner: u64,
    worker_overhead_median: u64,
    attach_us: Vec<u64>,
    attach_cpu_us: Vec<u64>,
    cold_start_ms: f64,
}

fn run_case(dir: &TestDir, sharing: &'static str, workers: u32) -> Row {
    let config = dir.write_config(workers, &format!("sharing = \"{sharing}\""));
    let spawned = Instant::now();
    let mut sup = Supervisor::start(&config);
    let listening = sup.wait_for("listening on", |_| true);
    let addr = listening["addrs"].as_str().unwrap().to_string();
    let (mut attach_us, mut attach_cpu_us) = (Vec::new(), Vec::new());
    for _ in 0..workers {
        let ready = sup.wait_for("ready", |l| l["attach_us"].is_u64());
        attach_us.push(ready["attach_us"].as_u64().unwrap());
        attach_cpu_us.push(ready["attach_cpu_us"].as_u64().unwrap());
    }
    sup.wait_for("workers ready", |_| true);
    let cold_start_ms = spawned.elapsed().as_secs_f64() * 1e3;
    infer_seed(&addr, 1);
    let worker_pids = sup.children("worker");
    let others: Vec<u32> = sup.children("owner").into_iter().chain([sup.pid()]).collect();
    let mut overheads: Vec<u64> = worker_pids.iter().map(|&p| overhead_bytes(p)).collect();
    overheads.sort_unstable();
    let total = worker_pids.iter().chain(&others).map(|&p| pss_bytes_of(p)).sum();
    let supervisor_and_owner = others.iter().map(|&p| pss_bytes_of(p)).sum();
    attach_us.sort_unstable();
    attach_cpu_us.sort_unstable();
    sup.signal(libc::SIGTERM);
    sup.wait_exit();
    Row {
        sharing,
        workers,
        total,
        supervisor_and_owner,
        worker_overhead_median: overheads[overheads.len() / 2],
        attach_us,
        attach_cpu_us,
        cold_start_ms,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing; this benchmark has no test cases.
    }
    let inputs: usize = env_or("FORKLESS_BENCH_IN", 2048);
    let outputs: usize = env_or("FORKLESS_BENCH_OUT", 8192);
    let counts: Vec<u32> = std::env::var("FORKLESS_BENCH_WORKERS")
        .unwrap_or_else(|_| "1,2,4,8".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let dir = TestDir::new();
    let status = std::process::Command::new(worker_exe())
        .args(["make-weights", "--in", &inputs.to_string(), "--out", &outputs.to_string()])
        .arg(dir.model_path())
        .status()
        .unwrap();
    assert!(status.success());
    let model = ((inputs * outputs + outputs) * 4) as f64;
    println!("forkless host benchmark: model W[{outputs}, {inputs}] + b fp32 = {:.1} MiB", model / MIB);
    println!("machine: {} cores, {}", cores(), kernel());
    println!();
    println!(
        "| sharing | N | total Pss MiB | vs one model | worker overhead MiB (median) | supervisor+owner MiB | target ok | attach wall us min/med/max | attach CPU us med | cold start ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for sharing in ["shared", "none"] {
        for &n in &counts {
            let row = run_case(&dir, sharing, n);
            // Target: one model + N x worker overhead (+ supervisor and owner) + 2 %.
            let budget =
                (model + (n as f64) * row.worker_overhead_median as f64 + row.supervisor_and_owner as f64) * 1.02;
            let ok = if row.sharing == "shared" {
                if (row.total as f64) <= budget {
                    "yes"
                } else {
                    "NO"
                }
            } else {
                "-"
            };
            let a = &row.attach_us;
            println!(
                "| {} | {} | {:.1} | {:.2}x | {:.1} | {:.1} | {} | {}/{}/{} | {} | {:.0} |",
                row.sharing,
                row.workers,
                row.total as f64 / MIB,
                row.total as f64 / model,
                row.worker_overhead_median as f64 / MIB,
                row.supervisor_and_owner as f64 / MIB,
                ok,
                a[0],
                a[a.len() / 2],
                a[a.len() - 1],
                row.attach_cpu_us[row.attach_cpu_us.len() / 2],
                row.cold_start_ms
            );
        }
    }
    println!();
    println!(
        "attach (shared): hello + welcome + generation frame (queued on the inherited socket) + validation + mmap;"
    );
    println!("wall time includes waiting for a CPU: N workers start at once on this machine's cores.");
    println!("attach (none): the same handshake plus reading the whole weights file into private memory.");
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| format!("Linux {}", s.trim())).unwrap_or_default()
}
