//! Hostile clients against a worker served by `forkless_worker::serve`, with short limits in
//! the config: slowloris headers, stalled 2 MB bodies and idle connections are cut within
//! their timeouts, real requests keep being answered fast while the attack is open, and the
//! worker's memory comes back afterwards.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::*;

const HEADER_S: f64 = 30.0;
const BODY_S: f64 = 30.0;
const IDLE_S: f64 = 2.0;

/// The demo's model size (64 MiB), the setting: a worker of ~80 MB RSS that 300 stalled
/// bodies pushed to ~460 MB, where it stayed.
fn hostile_config(dir: &TestDir) -> std::path::PathBuf {
    let status = std::process::Command::new(worker_exe())
        .args(["make-weights", "--in", "2048", "--out", "8192"])
        .arg(dir.model_path())
        .status()
        .unwrap();
    assert!(status.success());
    let http = format!(
        "[workers.http]\nheader_timeout_s = {HEADER_S}\nbody_timeout_s = {BODY_S}\nidle_timeout_s = {IDLE_S}\n\
         max_body_bytes = 2097152\nmax_connections = 2000\n"
    );
    dir.write_config_with(&ConfigExtra { workers: 1, workers_table: &http, ..Default::default() })
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// Milliseconds of one real request on a fresh connection: `GET /healthz`, which goes through
/// the same server, limits and router as `/infer` but not through the model's forward pass
/// (10 ms in a debug build, and what a busy test machine stretches most).
fn timed_request(addr: &str) -> f64 {
    let started = Instant::now();
    let (status, body) = http(addr, "GET", "/healthz", "");
    assert_eq!(status, 200, "{body}");
    started.elapsed().as_secs_f64() * 1e3
}

/// Waits (at most until `until`) until `pid` used under 10 % of a CPU over 300 ms.
fn wait_until_idle(pid: u32, until: Instant) {
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<u64> =
            stat.rsplit_once(") ").unwrap().1.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
        fields[11] + fields[12] // utime + stime, in 10 ms ticks
    };
    while Instant::now() < until {
        let before = ticks();
        std::thread::sleep(Duration::from_millis(300));
        if ticks() - before <= 3 {
            return;
        }
    }
}

/// Real requests one every 10 ms until `until`; their latencies in ms, sorted.
fn paced_requests(addr: &str, until: Instant) -> Vec<f64> {
    let mut latencies = Vec::new();
    while Instant::now() < until {
        latencies.push(timed_request(addr));
        std::thread::sleep(Duration::from_millis(10));
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

/// True once the server has closed `stream` (EOF or reset on read).
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1024];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => continue, // a response (408) before the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Waits until the server closes `stream`; returns how long that took from `since`.
fn time_to_close(stream: &mut TcpStream, since: Instant) -> Duration {
    stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    while !closed_by_server(stream) {
        assert!(since.elapsed() < PATIENCE, "the server never closed the connection");
    }
    since.elapsed()
}

#[test]
fn slowloris_and_stalled_bodies_do_not_starve_real_requests() {
    let dir = TestDir::new();
    let config = hostile_config(&dir);
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let worker = sup.children("worker")[0];
    for _ in 0..20 {
        timed_request(&addr);
    }
    let rss_before = rss_bytes(worker);
    let quiet = paced_requests(&addr, Instant::now() + Duration::from_secs(2));

    // 1,000 slowloris connections (a header line, then nothing) and 300 bodies of 2 MB less
    // one byte, all open at once.
    let attack_started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..1000)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"POST /infer HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    let body = vec![b' '; (2 << 20) - 1];
    let mut stalled: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(format!("POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", 2 << 20).as_bytes())
                .unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.write(&body); // as much as the socket takes; the rest never comes
            s
        })
        .collect();
    let opened = attack_started.elapsed();
    assert!(opened.as_secs_f64() < HEADER_S, "opening the attack took {opened:?}: the test machine is too slow");

    // While all of it is open: real requests are answered in under 100 ms. First the uploads
    // settle (moving 600 MB over loopback keeps the machine busy for a moment, whatever the
    // server does): the worker is waited for until it is idle again.
    wait_until_idle(worker, attack_started + Duration::from_secs_f64(HEADER_S.min(BODY_S) - 8.0));
    let (rss_attack, settled) = (rss_bytes(worker), attack_started.elapsed());
    let latencies = paced_requests(&addr, attack_started + Duration::from_secs_f64(HEADER_S.min(BODY_S) - 1.0));
    assert!(latencies.len() >= 20, "only {} requests answered during the attack", latencies.len());
    // Under 100 ms at the 99th percentile, and nobody near a timeout. On a shared machine so
    // busy that its own p99 without the attack (just measured) passes 50 ms, the bound is twice
    // that: what is tested is that the attack does not slow real requests down.
    let (p99, worst, quiet_p99) = (percentile(&latencies, 0.99), percentile(&latencies, 1.0), percentile(&quiet, 0.99));
    assert!(
        p99 < 100f64.max(2.0 * quiet_p99) && worst < 1000.0,
        "real requests during the attack: p99 {p99:.1} ms, max {worst:.1} ms (without it: p99 {quiet_p99:.1} ms): {latencies:?}"
    );

    // Every attacker is cut within its timeout (plus scheduling slack on a busy machine).
    let slack = 2.0;
    let header_cut = time_to_close(&mut slow[0], attack_started);
    assert!(header_cut.as_secs_f64() < HEADER_S + slack, "slowloris cut after {header_cut:?}");
    for s in slow.iter_mut().chain(stalled.iter_mut()) {
        time_to_close(s, attack_started);
    }
    let body_cut = attack_started.elapsed();
    assert!(body_cut.as_secs_f64() < BODY_S + opened.as_secs_f64() + slack, "stalled bodies cut after {body_cut:?}");
    drop((slow, stalled));

    // A kept-alive connection is closed after the idle timeout.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let answered = Instant::now();
    let idle_cut = time_to_close(&mut idle, answered);
    assert!(
        idle_cut.as_secs_f64() >= IDLE_S - 0.1 && idle_cut.as_secs_f64() < IDLE_S + slack,
        "idle connection closed after {idle_cut:?}"
    );

    // The memory the attack used is given back.
    let back = Instant::now() + PATIENCE;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "worker RSS: {:.1} MiB before, {:.1} MiB with the attack open, {:.1} MiB after; uploads settled after {settled:?}; real requests p50 {:.2} ms, p99 {p99:.2} ms, max {worst:.2} ms (without the attack: p50 {:.2} ms, p99 {quiet_p99:.2} ms)",
        mib(rss_before),
        mib(rss_attack),
        mib(rss_bytes(worker)),
        percentile(&latencies, 0.5),
        percentile(&quiet, 0.5)
    );
    while rss_bytes(worker) as f64 >= rss_before as f64 * 1.10 {
        let now = rss_bytes(worker);
        assert!(Instant::now() < back, "worker RSS {now} bytes after the attack, {rss_before} before: not within 10 %");
        std::thread::sleep(Duration::from_millis(50));
    }
    for line in
        ["request headers were not complete after", "body was not complete after", "keep-alive connection idle for"]
    {
        eventually(&format!("a log line {line:?}"), || sup.log_text().contains(line));
    }
    assert_eq!(infer_seed(&addr, 1)["generation"], 1);
}

#[test]
fn beyond_max_connections_new_clients_get_a_fast_503() {
    let dir = TestDir::new();
    dir.write_model();
    let limits = "[workers.http]\nmax_connections = 8\nheader_timeout_s = 30\n";
    let config = dir.write_config_with(&ConfigExtra { workers: 1, workers_table: limits, ..Default::default() });
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let held: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200)); // let the worker accept them
    let (status, body) = http(&addr, "POST", "/infer", "{\"seed\": 1}");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("max_connections"), "{body}");
    drop(held);
    eventually("a slot frees up", || http(&addr, "POST", "/infer", "{\"seed\": 1}").0 == 200);
    sup.wait_for("answered 503 to a new connection", |_| true);
}

#[test]
fn a_body_over_the_limit_gets_413() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra {
        workers: 1,
        workers_table: "[workers.http]\nmax_body_bytes = 1000\n",
        ..Default::default()
    });
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let (status, _) = http(&addr, "POST", "/infer", &format!("{{\"seed\": 1, \"pad\": \"{}\"}}", "x".repeat(2000)));
    assert_eq!(status, 413);
    assert_eq!(http(&addr, "POST", "/infer", "{\"seed\": 1}").0, 200);
}
