//! Baseline numbers for the batch lane on the host (no GPU): `cargo bench -p forkless-bus --bench lane`.
//!
//! 1. round trip: one process, one requester, passes that cost nothing: the lane's own latency
//!    (submit → a runner thread takes it → answer → completion thread → waiter);
//! 2. throughput: N worker processes, each running a pass-runner thread (one holds the lease) and
//!    a tokio runtime whose tasks submit and await in a closed loop, C connections in all; with
//!    a pass that costs nothing and with one that sleeps 450 µs (about a batch-32 pass of the
//!    seed's model on an H200);
//! 3. cohorts: one lane whose passes cost the same at every batch size (as reading every weight
//!    does on a GPU), fed by closed-loop clients that take 150 µs to come back with their next
//!    request (an HTTP round trip): do passes fill up, or split the clients into cohorts?
//! 4. takeover: the process holding the lease is SIGKILLed under load; time from the kill to the
//!    next completed pass, seen from outside through the lane's counters.
//!
//! Children are this binary again, selected by `LANE_BENCH_ROLE`. Set `LANE_BENCH_SECS` to
//! change the length of each throughput run (default 1.5), `LANE_BENCH_ONLY=cohorts` to run
//! only the cohorts table.

// Part of the bus crate, where `unsafe` is allowed: the child adopts the lane fd it inherited.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkless_bus::lane::{Batch, Lane, LaneLayout, LaneMonitor, RunnerConfig, SubmitError, ENV_LANE_FD};

const ROLE: &str = "LANE_BENCH_ROLE";
const PAYLOAD: usize = 64;

fn config() -> RunnerConfig {
    let micros = |name: &str, default| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    RunnerConfig {
        max_batch: 32,
        max_wait: Duration::from_micros(micros("LANE_BENCH_WAIT_US", 500)),
        linger: Duration::from_micros(micros("LANE_BENCH_LINGER_US", 0)),
        ..RunnerConfig::default()
    }
}

fn pass(cost: Duration) -> impl FnMut(&mut Batch<'_>) {
    move |batch| {
        if !cost.is_zero() {
            std::thread::sleep(cost);
        }
        for i in 0..batch.len() {
            let (input, output) = batch.input_and_output(i, PAYLOAD).unwrap();
            output.copy_from_slice(input);
        }
    }
}

/// The `p` quantile of sorted nanoseconds, in milliseconds.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1e6
}

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("worker") => worker(),
        Ok("holder") => holder(),
        _ => parent(),
    }
}

fn inherited_lane() -> Lane {
    let fd: i32 = std::env::var(ENV_LANE_FD).unwrap().parse().unwrap();
    // SAFETY: the parent left this fd open (not close-on-exec) for this process; nothing else
    // in this process owns it.
    Lane::map(unsafe { OwnedFd::from_raw_fd(fd) }).unwrap()
}

fn env_f64(name: &str) -> f64 {
    std::env::var(name).unwrap().parse().unwrap()
}

/// A worker: a runner thread plus `LANE_BENCH_CONNS` tokio tasks in a closed loop.
fn worker() {
    let lane = inherited_lane();
    let cost = Duration::from_micros(env_f64("LANE_BENCH_COST_US") as u64);
    let secs = env_f64("LANE_BENCH_SECS");
    let connections = env_f64("LANE_BENCH_CONNS") as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (lane, stop) = (lane.clone(), stop.clone());
        std::thread::spawn(move || lane.run_passes(&stop, &config(), pass(cost)).unwrap())
    };
    let think = Duration::from_micros(std::env::var("LANE_BENCH_THINK_US").map_or(0, |s| s.parse().unwrap()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let (latencies, full) = if think.is_zero() {
        closed_loop_tasks(&lane, connections, deadline)
    } else {
        closed_loop_threads(&lane, connections, deadline, think)
    };
    let elapsed = started.elapsed().as_secs_f64();
    // Keep running passes until the parent has every result: the lease holder must outlive the
    // other workers' last requests.
    println!("ELAPSED {elapsed} FULL {full}");
    println!("LAT {}", latencies.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(" "));
    use std::io::Read;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    stop.store(true, Ordering::Release);
    runner.join().unwrap();
}

/// Submits `input`; a full lane counts in `full` and gives `None` (the caller yields and tries
/// again), any other refusal ends the benchmark.
fn submit_counting_full(lane: &Lane, input: &[u8], full: &mut u64) -> Option<forkless_bus::lane::Ticket> {
    match lane.submit(input) {
        Ok(ticket) => Some(ticket),
        Err(SubmitError::Full { .. }) => {
            *full += 1;
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Nanoseconds since `t0`, as the latency lists store them.
fn elapsed_ns(t0: Instant) -> u32 {
    t0.elapsed().as_nanos().min(u32::MAX as u128) as u32
}

/// `connections` tokio tasks that submit again as soon as an answer arrives.
fn closed_loop_tasks(lane: &Lane, connections: usize, deadline: Instant) -> (Vec<u32>, u64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..connections)
            .map(|c| {
                let lane = lane.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut full = 0u64;
                    let input = [c as u8; PAYLOAD];
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        let Some(ticket) = submit_counting_full(&lane, &input, &mut full) else {
                            tokio::task::yield_now().await;
                            continue;
                        };
                        let reply = ticket.await.unwrap();
                        assert_eq!(&reply[..], &input[..]);
                        latencies.push(elapsed_ns(t0));
                    }
                    (latencies, full)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut full = 0;
        for task in tasks {
            let (l, f) = task.await.unwrap();
            all.extend(l);
            full += f;
        }
        (all, full)
    })
}

/// `connections` threads that, after each answer, spend `think` before submitting again: the
/// time an HTTP answer takes to reach its client and the client's next request to come back.
/// Answers of one pass come back spread over that time, which is what splits a closed loop
/// into cohorts when a pass does not wait for them.
fn closed_loop_threads(lane: &Lane, connections: usize, deadline: Instant, think: Duration) -> (Vec<u32>, u64) {
    let threads: Vec<_> = (0..connections)
        .map(|c| {
            let lane = lane.clone();
            std::thread::spawn(move || {
                let (mut latencies, mut full) = (Vec::new(), 0u64);
                let input = [c as u8; PAYLOAD];
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let Some(ticket) = submit_counting_full(&lane, &input, &mut full) else {
                        std::thread::yield_now();
                        continue;
                    };
                    let reply = ticket.wait(Duration::from_secs(10)).unwrap();
                    assert_eq!(&reply[..], &input[..]);
                    drop(reply);
                    std::thread::sleep(think);
                    latencies.push(elapsed_ns(t0));
                }
                (latencies, full)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).fold((Vec::new(), 0), |(mut all, f), (l, n)| {
        all.extend(l);
        (all, f + n)
    })
}

/// For the takeover run: a runner with a 200 µs pass, submitting in a loop, until killed.
fn holder() {
    let lane = inherited_lane();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (lane, stop) = (lane.clone(), stop.clone());
        std::thread::spawn(move || lane.run_passes(&stop, &config(), pass(Duration::from_micros(200))).unwrap())
    };
    let submitters: Vec<_> = (0..4)
        .map(|_| {
            let lane = lane.clone();
            std::thread::spawn(move || loop {
                if let Ok(ticket) = lane.submit(&[1; PAYLOAD]) {
                    let _ = ticket.wait(Duration::from_secs(10));
                }
            })
        })
        .collect();
    drop(submitters);
    runner.join().unwrap();
}

fn spawn(role: &str, fd: &OwnedFd, env: &[(&str, String)]) -> std::process::Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.env(ROLE, role).env(ENV_LANE_FD, fd.as_raw_fd().to_string());
    for (k, v) in env {
        command.env(k, v);
    }
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap()
}

fn parent() {
    let secs: f64 = std::env::var("LANE_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(1.5);
    println!(
        "# lane benchmark ({} CPUs, {secs} s per throughput run)\n",
        std::thread::available_parallelism().unwrap()
    );
    if std::env::var("LANE_BENCH_ONLY").as_deref() == Ok("cohorts") {
        return cohorts(secs);
    }
    round_trip();
    println!("\n## Throughput: N worker processes, closed loop, payload {PAYLOAD} B, max_batch 32, max_wait 500 µs\n");
    println!(
        "| pass cost | workers | connections | req/s | p50 ms | p99 ms | mean batch | processes/pass | lane full |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for cost_us in [0u64, 450] {
        for workers in [1usize, 2, 4] {
            for connections in [16usize, 64] {
                let load = Load { cost_us, workers, connections, think_us: 0, wait_us: 500, linger_us: 0 };
                let row = throughput(&load, secs);
                println!("| {cost_us} µs | {workers} | {connections} | {row} |");
            }
        }
    }
    cohorts(secs);
    takeover();
}

/// One lane (one device) under closed-loop clients whose answers take a while to come back, as
/// HTTP clients' do: a pass that costs the same at every batch size (reading every weight, as on
/// a GPU), 4 workers, max_batch 32, max_wait 100 µs (the service's defaults), without and with
/// linger.
fn cohorts(secs: f64) {
    println!("\n## Cohorts: 950 µs passes whatever the batch, clients that take 150 µs to come back\n");
    println!("| linger | connections | req/s | p50 ms | p99 ms | mean batch | processes/pass | lane full |");
    println!("|---|---|---|---|---|---|---|---|");
    for linger_us in [0, 300, 1000] {
        for connections in [8usize, 16, 32, 64] {
            let load = Load { cost_us: 950, workers: 4, connections, think_us: 150, wait_us: 100, linger_us };
            let row = throughput(&load, secs);
            println!("| {linger_us} µs | {connections} | {row} |");
        }
    }
}

/// The closed-loop load of one throughput run.
#[derive(Clone, Copy)]
struct Load {
    cost_us: u64,
    workers: usize,
    connections: usize,
    think_us: u64,
    wait_us: u64,
    linger_us: u64,
}

fn round_trip() {
    let created = Lane::create("bench-rt", LaneLayout::new(64, PAYLOAD as u32, PAYLOAD as u32)).unwrap();
    let lane = Lane::map(created.try_clone_fd().unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let config = RunnerConfig { max_wait: Duration::ZERO, ..config() };
    let runner = {
        let (lane, stop) = (lane.clone(), stop.clone());
        std::thread::spawn(move || lane.run_passes(&stop, &config, pass(Duration::ZERO)).unwrap())
    };
    let n = 20_000;
    let mut blocking = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let reply = lane.submit(&[7; PAYLOAD]).unwrap().wait(Duration::from_secs(10)).unwrap();
        drop(reply);
        blocking.push(t0.elapsed().as_nanos() as u32);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut asynchronous = rt.block_on(async {
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            drop(lane.submit(&[7; PAYLOAD]).unwrap().await.unwrap());
            lat.push(t0.elapsed().as_nanos() as u32);
        }
        lat
    });
    stop.store(true, Ordering::Release);
    runner.join().unwrap();
    blocking.sort_unstable();
    asynchronous.sort_unstable();
    println!("## Round trip, one process, one request at a time, pass costs nothing (max_wait 0)\n");
    println!("| waiter | p50 µs | p99 µs |");
    println!("|---|---|---|");
    for (name, lat) in [("blocking `wait`", &blocking), ("tokio `.await`", &asynchronous)] {
        println!("| {name} | {:.1} | {:.1} |", percentile(lat, 0.5) * 1000.0, percentile(lat, 0.99) * 1000.0);
    }
}

/// Runs `load` for `secs` and returns its row: req/s, p50, p99, mean batch, processes per pass,
/// submissions refused because the lane was full.
fn throughput(load: &Load, secs: f64) -> String {
    let Load { cost_us, workers, connections, think_us, wait_us, linger_us } = *load;
    let created = Lane::create("bench", LaneLayout::new(256, PAYLOAD as u32, PAYLOAD as u32)).unwrap();
    let inheritable = rustix::io::dup(created.fd()).unwrap();
    let monitor = LaneMonitor::map(created.fd()).unwrap();
    let per_worker = connections / workers;
    let env = [
        ("LANE_BENCH_COST_US", cost_us.to_string()),
        ("LANE_BENCH_SECS", secs.to_string()),
        ("LANE_BENCH_CONNS", per_worker.to_string()),
        ("LANE_BENCH_THINK_US", think_us.to_string()),
        ("LANE_BENCH_WAIT_US", wait_us.to_string()),
        ("LANE_BENCH_LINGER_US", linger_us.to_string()),
    ];
    let mut children: Vec<_> = (0..workers).map(|_| spawn("worker", &inheritable, &env)).collect();
    let mut latencies: Vec<u32> = Vec::new();
    let (mut rps, mut full) = (0.0, 0u64);
    for child in &mut children {
        use std::io::BufRead;
        let stdout = std::io::BufReader::new(child.stdout.as_mut().unwrap());
        let mut elapsed = 0.0;
        for line in stdout.lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("ELAPSED ") {
                let mut parts = rest.split(' ');
                elapsed = parts.next().unwrap().parse().unwrap();
                full += parts.nth(1).unwrap().parse::<u64>().unwrap();
            } else if let Some(rest) = line.strip_prefix("LAT ") {
                let before = latencies.len();
                latencies.extend(rest.split(' ').filter(|s| !s.is_empty()).map(|s| s.parse::<u32>().unwrap()));
                rps += (latencies.len() - before) as f64 / elapsed;
                break;
            }
        }
    }
    let stats = monitor.stats();
    for mut child in children {
        drop(child.stdin.take());
        child.wait().unwrap();
    }
    latencies.sort_unstable();
    format!(
        "{:.0} | {:.2} | {:.2} | {:.1} | {:.2} | {full}",
        rps,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        stats.mean_batch(),
        stats.mean_processes_per_pass(),
    )
}

fn takeover() {
    let created = Lane::create("bench-takeover", LaneLayout::new(64, PAYLOAD as u32, PAYLOAD as u32)).unwrap();
    let inheritable = rustix::io::dup(created.fd()).unwrap();
    let monitor = LaneMonitor::map(created.fd()).unwrap();
    let mut a = spawn("holder", &inheritable, &[]);
    let mut b = spawn("holder", &inheritable, &[]);
    let mut samples = Vec::new();
    for _ in 0..30 {
        // Wait for steady service, then kill whoever holds the lease.
        let start = monitor.stats().passes;
        while monitor.stats().passes < start + 50 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = monitor.stats();
        let victim = if before.leader_pid == a.id() { &mut a } else { &mut b };
        let t0 = Instant::now();
        victim.kill().unwrap();
        // The next completed pass after the kill: a new epoch, then a pass counted after it
        // (conservative by up to one pass if the new holder is faster than this loop).
        let passes_in_new_term = loop {
            let now = monitor.stats();
            if now.epoch != before.epoch {
                break now.passes;
            }
            std::hint::spin_loop();
        };
        while monitor.stats().passes == passes_in_new_term {
            std::hint::spin_loop();
        }
        samples.push(t0.elapsed().as_nanos() as u32);
        victim.wait().unwrap();
        *victim = spawn("holder", &inheritable, &[]);
    }
    for mut child in [a, b] {
        let _ = child.kill();
        let _ = child.wait();
    }
    samples.sort_unstable();
    println!("\n## Takeover: SIGKILL of the lease holder under load → next completed pass (30 kills)\n");
    println!("| p50 ms | p99 ms | max ms | recoveries |");
    println!("|---|---|---|---|");
    println!(
        "| {:.2} | {:.2} | {:.2} | {} |",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        *samples.last().unwrap() as f64 / 1e6,
        monitor.stats().recoveries
    );
}
