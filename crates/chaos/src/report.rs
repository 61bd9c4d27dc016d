//! The report: what was sent, what came back, what each kill cost and how fast it healed,
//! what was left behind; as a human summary, JSON (`--json`) and a self-contained HTML page
//! with a timeline (`--html`). [`Report::violations`] lists every broken invariant.
//!
//! ```
//! let leaks = forkless_chaos::report::Leaks::default();
//! assert!(leaks.is_clean());
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::load::Outcome;
use crate::reference::Reference;
use crate::{Counts, KillSignal, Options, AFTER_KILL};

/// One kill and what followed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kill {
    pub role: String,
    pub index: u32,
    pub pid: u32,
    pub signal: KillSignal,
    pub at_s: f64,
    /// Requests outstanding on connections to this process when it was hit.
    pub in_flight: usize,
    /// Seconds until its replacement served (worker) or re-adopted the escrow (owner).
    pub recovered_s: Option<f64>,
    /// Failed requests attributed to this kill (their connection was on this process).
    pub failures: u64,
    /// Requests sent again because their connection to this process closed first.
    pub retried: u64,
    /// For the batch lane's pass runner (`--kill leader`): milliseconds from the kill to the
    /// start of the next pass, run by the worker that took the lease over (the lane's own
    /// CLOCK_MONOTONIC record, read through `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_pass_ms: Option<f64>,
}

/// How the supervisor ended when asked to stop.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shutdown {
    pub exit_code: Option<i32>,
    pub clean: bool,
    pub seconds: f64,
    /// The supervisor's last log lines, when it did not stop cleanly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
}

/// What was left behind after shutdown.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Leaks {
    /// Processes of the run (supervisor, owners, workers) still alive.
    pub processes: Vec<u32>,
    /// Arena memfds still open in them.
    pub memfds: usize,
    /// New `/dev/shm` entries (forkless uses none; a shm-based design would leak here).
    pub dev_shm: Vec<String>,
    /// Runtime folder or control socket not removed.
    pub paths: Vec<String>,
    /// GPU memory in use now minus before the run, if `nvidia-smi` is there.
    pub vram_mib: Option<i64>,
    /// Descriptors the supervisor gained over the run (before the first kill → after the last recovery).
    pub supervisor_fd_growth: i64,
}

impl Leaks {
    pub fn is_clean(&self) -> bool {
        self.processes.is_empty()
            && self.memfds == 0
            && self.dev_shm.is_empty()
            && self.paths.is_empty()
            && self.vram_mib.is_none_or(|d| d <= 0)
            && self.supervisor_fd_growth <= 0
    }
}

/// The state of the machine before the run, to compare with after.
pub struct LeakBaseline {
    dev_shm: BTreeSet<String>,
    vram_mib: Option<i64>,
}

impl LeakBaseline {
    pub fn take() -> LeakBaseline {
        LeakBaseline { dev_shm: dev_shm(), vram_mib: vram_used_mib() }
    }

    pub fn check(&self, pids: &BTreeSet<u32>, paths: &[PathBuf]) -> Leaks {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        Leaks {
            memfds: alive.iter().map(|&p| arena_fds(p)).sum(),
            processes: alive,
            dev_shm: dev_shm().difference(&self.dev_shm).cloned().collect(),
            paths: paths.iter().filter(|p| p.exists()).map(|p| p.display().to_string()).collect(),
            vram_mib: self.vram_mib.zip(vram_used_mib()).map(|(before, after)| after - before),
            supervisor_fd_growth: 0,
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

fn arena_fds(pid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("/memfd:forkless-arena"))
        .count()
}

/// Open descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn dev_shm() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn vram_used_mib() -> Option<i64> {
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    text.lines().map(|l| l.trim().parse::<i64>().ok()).sum()
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: u64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(histogram.value_at_quantile(0.5)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
            samples: histogram.len(),
        }
    }
}

/// One slice of the timeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bucket {
    pub start_s: f64,
    pub ok: u64,
    pub failed: u64,
    pub p99_ms: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub config: String,
    pub duration_s: f64,
    pub connections: usize,
    pub seed: u64,
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub failed_by_cause: Counts,
    /// Failures that no kill explains.
    pub unexplained_failures: u64,
    pub retried: u64,
    pub wrong_answers: u64,
    pub wrong_examples: Vec<String>,
    pub generations_seen: Vec<u64>,
    pub throughput_rps: f64,
    pub latency_ms: Latency,
    /// Latency of requests sent within two seconds after a kill.
    pub latency_after_kills_ms: Latency,
    pub kills: Vec<Kill>,
    pub shutdown: Shutdown,
    pub leaks: Leaks,
    pub timeline: Vec<Bucket>,
    pub violations: Vec<String>,
    /// The service's batch lanes at the end of the run (`[lane]` on): passes, mean batch,
    /// workers per pass.
    #[serde(default)]
    pub lanes: Vec<forkless_supervisor::escrow::LaneStatus>,
}

/// What [`Report::build`] needs.
pub struct Inputs<'a> {
    pub options: &'a Options,
    pub outcomes: Vec<Outcome>,
    pub kills: Vec<Kill>,
    pub reference: &'a Reference,
    pub load_ended: Duration,
    pub shutdown: Shutdown,
    pub leaks: Leaks,
    pub supervisor_fd_growth: i64,
}

const BUCKET: f64 = 0.5;

impl Report {
    pub fn build(inputs: Inputs<'_>) -> Report {
        let Inputs { options, outcomes, mut kills, reference, load_ended, shutdown, mut leaks, supervisor_fd_growth } =
            inputs;
        leaks.supervisor_fd_growth = supervisor_fd_growth;
        let mut all = Histogram::<u64>::new(3).expect("histogram");
        let mut after = Histogram::<u64>::new(3).expect("histogram");
        let (mut ok, mut failed, mut retried, mut wrong, mut unexplained) = (0, 0, 0, 0, 0);
        let mut failed_by_cause = Counts::new();
        let mut wrong_examples = Vec::new();
        let mut generations = BTreeSet::new();
        let buckets = (load_ended.as_secs_f64() / BUCKET).ceil().max(1.0) as usize;
        let mut timeline: Vec<(u64, u64, Vec<u64>)> = vec![(0, 0, Vec::new()); buckets];
        for outcome in &outcomes {
            let at = outcome.at.as_secs_f64();
            let bucket = &mut timeline[((at / BUCKET) as usize).min(buckets - 1)];
            let latency_us = outcome.latency.as_micros() as u64;
            if outcome.retried {
                retried += 1;
                let culprit = outcome.retried_from.and_then(|pid| {
                    kills.iter_mut().rev().find(|k| k.pid == pid && k.at_s <= at + outcome.latency.as_secs_f64())
                });
                if let Some(kill) = culprit {
                    kill.retried += 1;
                }
            }
            match &outcome.result {
                Ok(answer) => {
                    ok += 1;
                    bucket.0 += 1;
                    bucket.2.push(latency_us);
                    let _ = all.record(latency_us.max(1));
                    if kills.iter().any(|k| at >= k.at_s && at < k.at_s + AFTER_KILL.as_secs_f64()) {
                        let _ = after.record(latency_us.max(1));
                    }
                    generations.insert(answer.generation);
                    if let Err(why) = reference.check_answer(answer) {
                        wrong += 1;
                        if wrong_examples.len() < 5 {
                            wrong_examples
                                .push(format!("worker {} generation {}: {why}", answer.worker, answer.generation));
                        }
                    }
                }
                Err(cause) => {
                    failed += 1;
                    bucket.1 += 1;
                    *failed_by_cause.entry(format!("{cause:?}")).or_default() += 1;
                    let culprit = outcome.worker.and_then(|pid| {
                        kills.iter_mut().rev().find(|k| k.pid == pid && k.at_s <= at + outcome.latency.as_secs_f64())
                    });
                    match culprit {
                        Some(kill) => kill.failures += 1,
                        None => unexplained += 1,
                    }
                }
            }
        }
        let timeline = timeline
            .into_iter()
            .enumerate()
            .map(|(i, (ok, failed, mut latencies))| {
                latencies.sort_unstable();
                let p99 = latencies.get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1))).copied();
                Bucket { start_s: i as f64 * BUCKET, ok, failed, p99_ms: p99.unwrap_or(0) as f64 / 1000.0 }
            })
            .collect();
        let mut report = Report {
            config: options.config.display().to_string(),
            duration_s: load_ended.as_secs_f64(),
            connections: options.connections,
            seed: options.seed,
            requests: outcomes.len() as u64,
            ok,
            failed,
            failed_by_cause,
            unexplained_failures: unexplained,
            retried,
            wrong_answers: wrong,
            wrong_examples,
            generations_seen: generations.into_iter().collect(),
            throughput_rps: ok as f64 / load_ended.as_secs_f64().max(1e-9),
            latency_ms: Latency::of(&all),
            latency_after_kills_ms: Latency::of(&after),
            kills,
            shutdown,
            leaks,
            timeline,
            violations: Vec::new(),
            lanes: Vec::new(),
        };
        report.violations = report.find_violations();
        report
    }

    fn find_violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.ok == 0 {
            v.push("no request succeeded".into());
        }
        if self.wrong_answers > 0 {
            v.push(format!("{} wrong answers, e.g. {}", self.wrong_answers, self.wrong_examples.join("; ")));
        }
        if self.unexplained_failures > 0 {
            v.push(format!("{} failures that no kill explains", self.unexplained_failures));
        }
        for k in &self.kills {
            let who = format!("{:?} of {} {} (pid {}) at {:.2}s", k.signal, k.role, k.index, k.pid, k.at_s);
            match (k.role.as_str(), k.signal) {
                ("owner", _) if k.failures > 0 => {
                    v.push(format!("{who}: {} failures (an owner's death must fail none)", k.failures))
                }
                (_, KillSignal::Term) if k.failures > 0 => {
                    v.push(format!("{who}: {} failures (a drained worker must fail none)", k.failures))
                }
                (_, KillSignal::Kill | KillSignal::Stop) if k.failures > k.in_flight as u64 => v.push(format!(
                    "{who}: {} failures but only {} requests were in flight on it",
                    k.failures, k.in_flight
                )),
                _ => {}
            }
            if k.recovered_s.is_none() {
                v.push(format!("{who}: never replaced"));
            }
        }
        if !self.shutdown.clean {
            v.push(format!(
                "the supervisor did not stop cleanly (exit code {:?} after {:.1}s); its last lines:\n{}",
                self.shutdown.exit_code,
                self.shutdown.seconds,
                self.shutdown.log_tail.as_deref().unwrap_or("")
            ));
        }
        if !self.leaks.is_clean() {
            v.push(format!("leaks after shutdown: {:?}", self.leaks));
        }
        v
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The human summary: headline, the kill table (up to `max_kill_rows` rows), verdict.
    pub fn summary(&self) -> String {
        self.summary_with(40)
    }

    fn summary_with(&self, max_kill_rows: usize) -> String {
        let mut s = String::new();
        let l = &self.latency_ms;
        let a = &self.latency_after_kills_ms;
        s += &format!(
            "chaos: {} for {:.0}s, {} connections, seed {}\n",
            self.config, self.duration_s, self.connections, self.seed
        );
        s += &format!(
            "requests {}  ok {}  failed {} {:?}  retried {}  wrong answers {}  generations {:?}\n",
            self.requests,
            self.ok,
            self.failed,
            self.failed_by_cause,
            self.retried,
            self.wrong_answers,
            self.generations_seen
        );
        s += &format!(
            "throughput {:.0} req/s   latency ms p50 {:.2}  p99 {:.2}  max {:.2}\n",
            self.throughput_rps, l.p50, l.p99, l.max
        );
        s += &format!(
            "within {}s after a kill: p50 {:.2}  p99 {:.2}  max {:.2} ({} requests)\n",
            AFTER_KILL.as_secs(),
            a.p50,
            a.p99,
            a.max,
            a.samples
        );
        s += &format!("kills: {}\n", self.kills.len());
        if max_kill_rows > 0 {
            s += "  at_s     signal  role    index  pid      in_flight  failures  retried  recovered_ms\n";
        }
        for k in self.kills.iter().take(max_kill_rows) {
            s += &format!(
                "  {:<8.2} {:<7} {:<7} {:<6} {:<8} {:<10} {:<9} {:<8} {}\n",
                k.at_s,
                format!("{:?}", k.signal),
                k.role,
                k.index,
                k.pid,
                k.in_flight,
                k.failures,
                k.retried,
                k.recovered_s.map_or("never".into(), |r| format!("{:.1}", r * 1000.0))
            );
        }
        if self.kills.len() > max_kill_rows && max_kill_rows > 0 {
            s += &format!("  … {} more (all of them in the JSON report)\n", self.kills.len() - max_kill_rows);
        }
        for lane in &self.lanes {
            s += &format!(
                "lane{}: {} passes, {} served, mean batch {:.1} in {:.0} us, {:.2} workers per pass, {} recoveries\n",
                lane.device.map_or(String::new(), |d| format!(" (GPU {d})")),
                lane.passes,
                lane.served,
                lane.mean_batch,
                lane.mean_pass_us,
                lane.mean_workers_per_pass,
                lane.recoveries
            );
        }
        let mut next_pass: Vec<f64> = self.kills.iter().filter_map(|k| k.next_pass_ms).collect();
        if !next_pass.is_empty() {
            next_pass.sort_by(f64::total_cmp);
            let at = |q: f64| next_pass[((next_pass.len() as f64 * q).ceil() as usize).clamp(1, next_pass.len()) - 1];
            s += &format!(
                "next pass after a pass runner's kill, ms: p50 {:.2}  p99 {:.2}  max {:.2} ({} kills)\n",
                at(0.5),
                at(0.99),
                next_pass[next_pass.len() - 1],
                next_pass.len()
            );
        }
        let recovered: Vec<f64> = self.kills.iter().filter_map(|k| k.recovered_s).collect();
        if !recovered.is_empty() {
            let mut sorted = recovered.clone();
            sorted.sort_by(f64::total_cmp);
            s += &format!(
                "recovery ms: median {:.1}  max {:.1}\n",
                sorted[sorted.len() / 2] * 1000.0,
                sorted[sorted.len() - 1] * 1000.0
            );
        }
        s += &format!(
            "shutdown: exit {:?} in {:.2}s   leaks: {}\n",
            self.shutdown.exit_code,
            self.shutdown.seconds,
            if self.leaks.is_clean() { "none".into() } else { format!("{:?}", self.leaks) }
        );
        match self.violations.is_empty() {
            true => s += "PASS: every invariant held\n",
            false => {
                s += "FAIL:\n";
                for v in &self.violations {
                    s += &format!("  - {v}\n");
                }
            }
        }
        s
    }

    /// A self-contained HTML page: summary, a throughput and latency timeline with the kills
    /// marked, and the kill table.
    pub fn html(&self) -> String {
        let (w, h, pad) = (960.0, 220.0, 40.0);
        let t_max = self.duration_s.max(1.0);
        let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
        let max_rps = self.timeline.iter().map(|b| b.ok as f64 / 0.5).fold(1.0, f64::max);
        let max_ms = self.timeline.iter().map(|b| b.p99_ms).fold(1.0, f64::max);
        let line = |values: Vec<(f64, f64)>, top: f64| -> String {
            values
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t + 0.25), h - pad - (h - 2.0 * pad) * v / top))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let rps = line(self.timeline.iter().map(|b| (b.start_s, b.ok as f64 / 0.5)).collect(), max_rps);
        let p99 = line(self.timeline.iter().map(|b| (b.start_s, b.p99_ms)).collect(), max_ms);
        let fails: String = self
            .timeline
            .iter()
            .filter(|b| b.failed > 0)
            .map(|b| {
                format!(
                    "<circle cx='{:.1}' cy='{:.1}' r='4' fill='#d62728'><title>{} failed at {:.1}s</title></circle>",
                    x(b.start_s + 0.25),
                    h - pad,
                    b.failed,
                    b.start_s
                )
            })
            .collect();
        let marks: String = self
            .kills
            .iter()
            .map(|k| {
                let color = if k.role == "owner" { "#9467bd" } else { "#ff7f0e" };
                format!(
                    "<line x1='{0:.1}' x2='{0:.1}' y1='{1}' y2='{2}' stroke='{color}' stroke-dasharray='4 3'><title>{3:?} {4} {5} (pid {6}) at {7:.2}s, recovered in {8}</title></line>",
                    x(k.at_s), pad - 10.0, h - pad, k.signal, k.role, k.index, k.pid, k.at_s,
                    k.recovered_s.map_or("never".into(), |r| format!("{:.0} ms", r * 1000.0))
                )
            })
            .collect();
        let chart = |title: &str, points: &str, color: &str, top: f64, unit: &str| {
            format!(
                "<h3>{title}</h3><svg width='{w}' height='{h}' viewBox='0 0 {w} {h}'>\
                 <rect x='{pad}' y='{pad}' width='{iw}' height='{ih}' fill='#fafafa' stroke='#ccc'/>\
                 <text x='{pad}' y='{ty}' font-size='11'>{top:.0} {unit}</text><text x='{pad}' y='{by}' font-size='11'>0</text>\
                 <text x='{rx}' y='{by}' font-size='11' text-anchor='end'>{t_max:.0} s</text>\
                 {marks}{fails}<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{points}'/></svg>",
                iw = w - 2.0 * pad,
                ih = h - 2.0 * pad,
                ty = pad - 4.0,
                by = h - pad + 14.0,
                rx = w - pad,
            )
        };
        let rows: String = self
            .kills
            .iter()
            .map(|k| {
                format!(
                    "<tr><td>{:.2}</td><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    k.at_s, k.signal, k.role, k.index, k.pid, k.in_flight, k.failures, k.retried,
                    k.recovered_s.map_or("never".into(), |r| format!("{:.1}", r * 1000.0))
                )
            })
            .collect();
        let verdict = if self.passed() {
            "<p class='pass'>PASS: every invariant held</p>".to_string()
        } else {
            format!(
                "<p class='fail'>FAIL</p><ul>{}</ul>",
                self.violations.iter().map(|v| format!("<li>{}</li>", escape(v))).collect::<String>()
            )
        };
        format!(
            "<!doctype html><html><head><meta charset='utf-8'><title>forkless chaos report</title><style>\
             body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}\
             td,th{{border:1px solid #ddd;padding:3px 8px;text-align:right}}.pass{{color:#2ca02c;font-weight:bold}}\
             .fail{{color:#d62728;font-weight:bold}}.legend span{{margin-right:1.5em}}</style></head><body>\
             <h1>forkless chaos report</h1>{verdict}<pre>{summary}</pre>\
             <p class='legend'><span style='color:#9467bd'>┆ owner killed</span><span style='color:#ff7f0e'>┆ worker killed</span>\
             <span style='color:#d62728'>● failed requests</span></p>\
             {c1}{c2}<h3>Kills</h3><table><tr><th>at s</th><th>signal</th><th>role</th><th>index</th><th>pid</th>\
             <th>in flight</th><th>failures</th><th>retried</th><th>recovered ms</th></tr>{rows}</table></body></html>",
            summary = escape(&self.summary_with(0)),
            c1 = chart("Throughput (answered requests per second, per 0.5 s)", &rps, "#1f77b4", max_rps, "req/s"),
            c2 = chart("Latency p99 (ms, per 0.5 s)", &p99, "#2ca02c", max_ms, "ms"),
        )
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
