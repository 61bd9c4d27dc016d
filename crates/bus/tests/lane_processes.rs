//! The batch lane across real processes: requesters in several processes submit concurrently
//! while the process running passes is SIGKILLed again and again, and processes that both
//! submit and run passes are killed too. Every answer must be right, and only requests of
//! killed processes may fail. The outcome does not depend on timing: kills land wherever they
//! land, requesters submit until the kills are over, and the test waits (boundedly) for
//! results instead of sleeping for them.
//!
//! Children are this test binary again (`child` below), selected by `LANE_TEST_ROLE`, with the
//! lane memfd inherited at the fd number in `FORKLESS_LANE_FD`.

// Part of the bus crate, where `unsafe` is allowed: the child adopts the lane fd it inherited.
#![allow(unsafe_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkless_bus::lane::{Batch, Lane, LaneLayout, LaneMonitor, RunnerConfig, ENV_LANE_FD};

const ROLE: &str = "LANE_TEST_ROLE";
const THREADS: u32 = 4;
/// Kills per run: half of them aimed at the pass runner, half at processes that also submit.
const KILLS: u32 = 12;
const SLOTS: u32 = 64;

/// What a pass computes: reversed and xored, so an answer of the wrong request shows.
fn model(input: &[u8]) -> Vec<u8> {
    input.iter().rev().map(|b| b ^ 0x5A).collect()
}

fn input_for(thread: u32, n: u32) -> Vec<u8> {
    let pid = std::process::id();
    let mut input = pid.to_le_bytes().to_vec();
    input.extend(thread.to_le_bytes());
    input.extend(n.to_le_bytes());
    input.extend((0..(n % 17)).map(|i| (i as u8) ^ (pid as u8)));
    input
}

fn runner_config() -> RunnerConfig {
    RunnerConfig {
        max_batch: 16,
        max_wait: Duration::from_micros(200),
        // The holder keeps the lease for the whole test, so the pid the lane reports as leader
        // is the process to kill.
        idle_release: Duration::from_secs(60),
        poll: Duration::from_millis(20),
        // Giving up on a request after crashes is tested on its own: here every request of a
        // live requester must be answered whatever the kills.
        max_crashes: 1_000,
        ..RunnerConfig::default()
    }
}

fn pass(batch: &mut Batch<'_>) {
    // Stand-in for a GPU pass: long enough for requests to pile up into batches.
    std::thread::sleep(Duration::from_micros(300));
    for i in 0..batch.len() {
        let answer = model(batch.input(i));
        batch.set_output(i, &answer).unwrap();
    }
}

/// Entry point of the child processes; does nothing when run as a normal test.
#[test]
#[ignore = "helper: run by the other tests in child processes"]
fn child() {
    let Ok(role) = std::env::var(ROLE) else { return };
    let fd: i32 = std::env::var(ENV_LANE_FD).unwrap().parse().unwrap();
    // SAFETY: the parent left this fd open (not close-on-exec) for us; nothing else owns it.
    let lane = Lane::map(unsafe { OwnedFd::from_raw_fd(fd) }).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    {
        // The parent closes our stdin to stop us.
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, Ordering::Release);
        });
    }
    let runner = (role != "requester").then(|| {
        let (lane, stop) = (lane.clone(), stop.clone());
        std::thread::spawn(move || lane.run_passes(&stop, &runner_config(), pass).unwrap())
    });
    if role != "runner" {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (lane, stop) = (lane.clone(), stop.clone());
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0, 0);
                    let mut n = 0;
                    while !stop.load(Ordering::Acquire) {
                        n += 1;
                        let input = input_for(t, n);
                        let answer = lane.submit(&input).and_then_wait(Duration::from_secs(60));
                        match answer {
                            Ok(bytes) if bytes == model(&input) => ok += 1,
                            Ok(_) => {
                                eprintln!("WRONG ANSWER for thread {t} request {n}");
                                failed += 1;
                            }
                            Err(e) => {
                                eprintln!("FAILED thread {t} request {n}: {e}");
                                failed += 1;
                            }
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        let (ok, failed) = threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
        println!("LANE-RESULT ok={ok} failed={failed}");
    }
    if let Some(runner) = runner {
        runner.join().unwrap();
    }
}

trait SubmitThenWait {
    fn and_then_wait(self, timeout: Duration) -> Result<Vec<u8>, String>;
}

impl SubmitThenWait for Result<forkless_bus::lane::Ticket, forkless_bus::lane::SubmitError> {
    fn and_then_wait(self, timeout: Duration) -> Result<Vec<u8>, String> {
        let ticket = self.map_err(|e| e.to_string())?;
        ticket.wait(timeout).map(|reply| reply.to_vec()).map_err(|e| e.to_string())
    }
}

struct Proc {
    role: &'static str,
    child: Child,
}

fn spawn(role: &'static str, fd: &OwnedFd) -> Proc {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(ENV_LANE_FD, fd.as_raw_fd().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc { role, child }
}

/// (answered, failed) from the child's `LANE-RESULT` line; reads its stdout to the end, so the
/// child never writes into a closed pipe.
fn result_line(child: &mut Child) -> Option<(u32, u32)> {
    let stdout = child.stdout.take()?;
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.ok()?;
        if let Some((_, rest)) = line.split_once("LANE-RESULT ") {
            let mut fields = rest.split(' ').map(|f| f.split_once('=').unwrap().1.parse().unwrap());
            result = Some((fields.next()?, fields.next()?));
        }
    }
    result
}

#[test]
fn answers_survive_sigkilled_pass_runners_and_only_killed_requesters_lose_requests() {
    let lane = Lane::create(
        "lane-processes",
        LaneLayout { slots: SLOTS, input_capacity: 64, output_capacity: 64, processes: 32 },
    )
    .unwrap();
    // dup(2) clears close-on-exec: this fd number is what the children inherit.
    let inheritable = rustix::io::dup(lane.fd()).unwrap();
    let monitor = LaneMonitor::map(lane.fd()).unwrap();

    let mut requesters: Vec<Proc> = (0..3).map(|_| spawn("requester", &inheritable)).collect();
    let before = monitor.stats();
    let mut runners: Vec<Proc> =
        vec![spawn("runner", &inheritable), spawn("both", &inheritable), spawn("both", &inheritable)];

    // Kill the pass runner (the lease holder) over and over; every other kill goes to a process
    // that also submits, whether it holds the lease or not.
    let (mut kills, mut leader_kills, mut killed_both) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut passes_at_last_kill = 0;
    while kills < KILLS {
        assert!(Instant::now() < deadline, "the lane stopped serving: {:?}", monitor.stats());
        std::thread::sleep(Duration::from_millis(50));
        let stats = monitor.stats();
        // Between two kills the lane must have served again: it recovered from the last one.
        if stats.passes < passes_at_last_kill + 50 {
            continue;
        }
        passes_at_last_kill = stats.passes;
        let leader = stats.leader_pid;
        let victim = if kills % 2 == 1 && runners.iter().any(|p| p.role == "both") {
            runners.iter().position(|p| p.role == "both")
        } else {
            runners.iter().position(|p| p.child.id() == leader)
        };
        let Some(victim) = victim else { continue };
        let mut proc = runners.swap_remove(victim);
        kills += 1;
        leader_kills += u32::from(proc.child.id() == leader);
        killed_both += u32::from(proc.role == "both");
        proc.child.kill().unwrap();
        proc.child.wait().unwrap();
        runners.push(spawn("runner", &inheritable));
    }

    // Every process that submitted and was not killed: all its requests answered, correctly.
    for proc in requesters.iter_mut().chain(runners.iter_mut().filter(|p| p.role == "both")) {
        drop(proc.child.stdin.take());
        let result = result_line(&mut proc.child);
        assert!(matches!(result, Some((ok, 0)) if ok > 0), "{}: {result:?} (answered, failed)", proc.role);
    }
    for proc in &mut requesters {
        let status = proc.child.wait().unwrap();
        assert!(status.success(), "a requester process failed: {status:?}");
    }
    let stats = monitor.stats();
    assert!(
        leader_kills >= 1 && killed_both >= 1,
        "the test killed too little: {leader_kills} leaders, {killed_both} others"
    );
    assert!(
        stats.recoveries - before.recoveries >= leader_kills as u64,
        "every holder killed was recovered from: {stats:?}"
    );

    // The killed submitters' slots are reclaimed by the holder's periodic sweep.
    let deadline = Instant::now() + Duration::from_secs(30);
    while monitor.stats().slots.free != SLOTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = monitor.stats();
    assert_eq!(stats.slots.free, SLOTS, "slots of killed processes must be reclaimed: {stats:?}");
    for mut proc in runners {
        drop(proc.child.stdin.take());
        let _ = result_line(&mut proc.child);
        assert!(proc.child.wait().unwrap().success());
    }
    eprintln!(
        "lane under kills: {} passes, mean batch {:.1}, {:.2} processes per pass, {} recoveries, {} requeued, {} reclaimed",
        stats.passes,
        stats.mean_batch(),
        stats.mean_processes_per_pass(),
        stats.recoveries,
        stats.requeued,
        stats.reclaimed
    );
}
