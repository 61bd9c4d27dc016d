//! Test support: each test gets its own temp dir, a small deterministic model, a config, and
//! a real `supervisor` process whose JSON log lines it can wait on.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../examples/linear/seeded.rs"]
pub mod seeded;

/// Failure guard for waits: generous, since tests assert behaviour, not speed.
pub const PATIENCE: Duration = Duration::from_secs(60);
/// Model shape used by the tests: W [OUT, IN].
pub const IN: usize = 256;
pub const OUT: usize = 1024;
pub const WEIGHT_SEED: u64 = 42;

pub fn supervisor_exe() -> PathBuf {
    workspace_bin("supervisor")
}

pub fn worker_exe() -> PathBuf {
    workspace_bin("linear-worker")
}

pub fn chaos_exe() -> PathBuf {
    workspace_bin("chaos")
}

pub fn mlp_exe() -> PathBuf {
    workspace_bin("mlp-worker")
}

/// A binary of this workspace, from the folder cargo built this test into (`target/<profile>`,
/// the parent of `deps/`): the root package's tests start the examples' workers, which
/// `cargo test --workspace` builds (the examples package has an integration test of its own).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let deps = exe.parent().expect("a folder");
    let dir = if deps.ends_with("deps") { deps.parent().expect("target/<profile>") } else { deps };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace's binaries first (`cargo test --workspace` and \
         `cargo build --workspace` do; for one package: `cargo build --workspace --bins` before \
         `cargo test -p …`; for benchmarks: `cargo build --release` before `cargo bench`)",
        path.display()
    );
    path
}

/// A temp dir holding a model and a config.
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> Self {
        TestDir { dir: tempfile::Builder::new().prefix("fl-test-").tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn model_path(&self) -> PathBuf {
        self.path().join("weights.safetensors")
    }

    /// Writes the standard test model with the real `linear-worker make-weights`.
    pub fn write_model(&self) -> PathBuf {
        self.write_model_at(&self.model_path(), WEIGHT_SEED)
    }

    /// Writes a test-shaped model made with `weight_seed` at `path`.
    pub fn write_model_at(&self, path: &Path, weight_seed: u64) -> PathBuf {
        let path = path.to_path_buf();
        let status = Command::new(worker_exe())
            .args(["make-weights", "--in", &IN.to_string(), "--out", &OUT.to_string()])
            .args(["--seed", &weight_seed.to_string()])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        path
    }

    /// Writes `config.toml` for `workers` workers on an ephemeral port; `extra` is appended
    /// to the `[model]` table.
    pub fn write_config(&self, workers: u32, model_extra: &str) -> PathBuf {
        self.write_config_listening(workers, model_extra, &["127.0.0.1:0"])
    }

    /// Like [`TestDir::write_config`], with the given `listen` addresses.
    pub fn write_config_listening(&self, workers: u32, model_extra: &str, listen: &[&str]) -> PathBuf {
        self.write_config_with(&ConfigExtra { workers, model: model_extra, listen, ..ConfigExtra::default() })
    }

    /// Writes `config.toml` with extra lines in each table.
    pub fn write_config_with(&self, extra: &ConfigExtra) -> PathBuf {
        let command = match &extra.command {
            Some(command) => format!("{command:?}"),
            None => format!("[{:?}]", worker_exe().display().to_string()),
        };
        let config = format!(
            "[model]\npath = \"weights.safetensors\"\n{}\n\
             [workers]\ncommand = {command}\ncount = {}\nlisten = {:?}\n{}\n\
             [supervisor]\n{}\n{}\n\
             [restart]\nbackoff_initial_ms = 50\n{}\n",
            extra.model,
            extra.workers,
            extra.listen,
            extra.workers_table,
            if extra.supervisor.contains("graceful_timeout_s") { "" } else { "graceful_timeout_s = 5" },
            extra.supervisor,
            extra.restart
        );
        let path = self.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        path
    }
}

/// Writes the standard test model plus a zero-filled `ballast` tensor of `ballast_bytes` (a
/// sparse region of the file, so writing it costs nothing, while loading it takes a while):
/// for tests that need the owner's load to take time. The demo ignores the extra tensor.
pub fn write_model_with_ballast(path: &Path, ballast_bytes: u64) {
    let (w, b) = seeded::make_weights(IN, OUT, WEIGHT_SEED);
    let (w_len, b_len) = ((w.len() * 4) as u64, (b.len() * 4) as u64);
    let mut header = serde_json::json!({
        "weight": {"dtype": "F32", "shape": [OUT, IN], "data_offsets": [0, w_len]},
        "bias": {"dtype": "F32", "shape": [OUT], "data_offsets": [w_len, w_len + b_len]},
        "ballast": {"dtype": "U8", "shape": [ballast_bytes], "data_offsets": [w_len + b_len, w_len + b_len + ballast_bytes]},
    })
    .to_string();
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    file.write_all(header.as_bytes()).unwrap();
    for v in w.iter().chain(&b) {
        file.write_all(&v.to_le_bytes()).unwrap();
    }
    file.set_len(8 + header.len() as u64 + w_len + b_len + ballast_bytes).unwrap();
}

/// Extra config for [`TestDir::write_config_with`].
pub struct ConfigExtra<'a> {
    pub workers: u32,
    pub listen: &'a [&'a str],
    /// Worker program and arguments (default: the demo worker).
    pub command: Option<Vec<String>>,
    pub model: &'a str,
    pub workers_table: &'a str,
    pub supervisor: &'a str,
    pub restart: &'a str,
}

impl Default for ConfigExtra<'_> {
    fn default() -> Self {
        ConfigExtra {
            workers: 1,
            listen: &["127.0.0.1:0"],
            command: None,
            model: "",
            workers_table: "",
            supervisor: "",
            restart: "",
        }
    }
}

/// A running `supervisor run` with its log lines streamed to the test.
pub struct Supervisor {
    pub child: Child,
    lines: Receiver<Value>,
    /// Every line seen so far (for failure messages).
    pub log: Arc<Mutex<Vec<String>>>,
    pub addr: Option<String>,
    pub bus: Option<PathBuf>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    pub fn start(config: &Path) -> Supervisor {
        Self::start_with_env(config, &[])
    }

    /// Starts with extra environment variables.
    pub fn start_with_env(config: &Path, env: &[(&str, &std::ffi::OsStr)]) -> Supervisor {
        Self::start_with(config, &[], env)
    }

    /// Starts with extra `supervisor run` arguments (e.g. `--backend host`) and environment.
    pub fn start_with(config: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Supervisor {
        Self::start_program(&supervisor_exe(), config, args, env)
    }

    /// Starts the `supervisor` executable `exe` (e.g. another build, for A/B benchmarks).
    pub fn start_program(exe: &Path, config: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Supervisor {
        let mut command = Command::new(exe);
        command.args(["run", "--log-format", "json"]).args(args).arg(config).envs(env.iter().copied());
        Self::start_command(command)
    }

    /// Starts `command`, which must end up exec'ing `supervisor run --log-format json …` (a
    /// wrapper may set things up first, e.g. open descriptors the supervisor inherits).
    pub fn start_command(mut command: Command) -> Supervisor {
        let mut child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_writer = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log_writer.lock().unwrap().push(line.clone());
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                let _ = tx.send(value);
            }
        });
        Supervisor { child, lines, log, addr: None, bus: None, reader: Some(reader) }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for a log line whose message contains `needle` and which satisfies `pred`.
    pub fn wait_for(&mut self, needle: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let message = line.get("message").and_then(Value::as_str).unwrap_or_default();
                    if message.contains(needle) && pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no log line {needle:?} in time; log:\n{}", self.log_text())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("supervisor exited before logging {needle:?}; log:\n{}", self.log_text())
                }
            }
        }
    }

    /// Waits until the supervisor listens and all `n` workers are ready.
    pub fn wait_ready(&mut self) -> String {
        let listening = self.wait_for("listening on", |_| true);
        self.addr = listening["addrs"].as_str().map(str::to_string);
        self.bus = listening["bus"].as_str().map(PathBuf::from);
        self.wait_for("workers ready", |_| true);
        let addrs = self.addr.clone().unwrap();
        addrs.split(',').next().unwrap().to_string()
    }

    pub fn signal(&self, signal: i32) {
        send_signal(self.pid(), signal);
    }

    /// Waits for the supervisor to exit (failure guard: PATIENCE).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // All of stderr has been read once the reader sees EOF.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(Instant::now() < deadline, "supervisor did not exit; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pids of the supervisor's children with the given `FORKLESS_ROLE`.
    pub fn children(&self, role: &str) -> Vec<u32> {
        children_of(self.pid())
            .into_iter()
            .filter(|&pid| env_of(pid, "FORKLESS_ROLE").as_deref() == Some(role))
            .collect()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            send_signal(self.pid(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

pub fn send_signal(pid: u32, signal: i32) {
    let target = rustix::process::Pid::from_raw(pid as i32).expect("a pid the test started");
    let signal = rustix::process::Signal::from_named_raw(signal).expect("a named signal");
    rustix::process::kill_process(target, signal).unwrap_or_else(|e| panic!("kill({pid}, {signal:?}) failed: {e}"));
}

/// Direct children of `pid`, from `/proc/PID/task/*/children`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect();
    pids.sort_unstable();
    pids
}

/// One variable of a process's initial environment.
pub fn env_of(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|&b| b == 0).find_map(|entry| {
        let entry = std::str::from_utf8(entry).ok()?;
        entry.strip_prefix(name)?.strip_prefix('=').map(str::to_string)
    })
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls `cond` until true (failure guard: PATIENCE).
pub fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal HTTP/1.1 client: one request per connection. Returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    // One write, no Nagle: a request in several small segments can wait for a delayed ACK (40 ms).
    stream.set_nodelay(true).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// `POST /infer {"seed": seed}` → the JSON answer (panics on non-200).
pub fn infer_seed(addr: &str, seed: u64) -> Value {
    let (status, body) = http(addr, "POST", "/infer", &format!("{{\"seed\": {seed}}}"));
    assert_eq!(status, 200, "body: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The answer the service must give for `seed`, computed here from the generator alone.
pub fn expected_answer(seed: u64) -> (f64, Vec<f32>) {
    expected_answer_with(WEIGHT_SEED, seed)
}

/// The answer for `seed` from the model made with `weight_seed`.
pub fn expected_answer_with(weight_seed: u64, seed: u64) -> (f64, Vec<f32>) {
    let (w, b) = seeded::make_weights(IN, OUT, weight_seed);
    let y = seeded::linear_forward(&w, &b, &seeded::input_from_seed(seed, IN));
    (y.iter().map(|&v| v as f64).sum(), y[..8].to_vec())
}

/// One mapping from `/proc/PID/smaps`.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub perms: String,
    pub inode: u64,
    pub path: String,
    pub size_kb: u64,
    pub rss_kb: u64,
    pub pss_kb: u64,
}

pub fn smaps(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let is_header = fields.first().is_some_and(|f| f.contains('-') && !f.ends_with(':'));
        if is_header && fields.len() >= 5 {
            maps.push(Mapping {
                perms: fields[1].into(),
                inode: fields[4].parse().unwrap_or(0),
                path: fields.get(5..).map(|p| p.join(" ")).unwrap_or_default(),
                size_kb: 0,
                rss_kb: 0,
                pss_kb: 0,
            });
            continue;
        }
        let (Some(last), [key, value, ..]) = (maps.last_mut(), fields.as_slice()) else {
            continue;
        };
        let value: u64 = value.parse().unwrap_or(0);
        match *key {
            "Size:" => last.size_kb = value,
            "Rss:" => last.rss_kb = value,
            "Pss:" => last.pss_kb = value,
            _ => {}
        }
    }
    maps
}

/// Continuous `{"seed": n}` requests from a background thread, one connection each.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<LoadReport>,
}

/// What a [`Load`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    /// Non-200 answers and connection errors, with what happened.
    pub failures: Vec<String>,
    /// Distinct (y_sum, generation) pairs among the answers.
    pub answers: std::collections::BTreeSet<(String, u64)>,
}

impl Load {
    pub fn start(addr: &str, seed: u64) -> Load {
        Self::start_with(addr, seed, false)
    }

    /// Like [`Load::start`], but a request whose connection was closed before any answer came
    /// back (a worker that was draining at that moment) is sent again once, as HTTP clients
    /// do with idempotent requests. For tests that restart workers on purpose.
    pub fn start_retrying(addr: &str, seed: u64) -> Load {
        Self::start_with(addr, seed, true)
    }

    fn start_with(addr: &str, seed: u64, retry: bool) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (addr, flag) = (addr.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut report = LoadReport::default();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = match try_infer(&addr, seed) {
                    Err(e) if retry && (e.starts_with("write:") || e.starts_with("read:")) => try_infer(&addr, seed),
                    other => other,
                };
                match answer {
                    Ok(answer) => {
                        report.ok += 1;
                        let generation = answer["generation"].as_u64().unwrap_or(0);
                        report.answers.insert((answer["y_sum"].to_string(), generation));
                    }
                    Err(e) => report.failures.push(e),
                }
            }
            report
        });
        Load { stop, thread }
    }

    /// Stops the load and returns what it saw.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn try_infer(addr: &str, seed: u64) -> Result<Value, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(PATIENCE)).map_err(|e| e.to_string())?;
    let body = format!("{{\"seed\": {seed}}}");
    write!(
        stream,
        "POST /infer HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("read: {e}"))?;
    if response.is_empty() {
        // Closed before any answer: a worker that began draining after it accepted us.
        return Err("read: the connection closed before any answer".into());
    }
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| format!("no response: {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{head}: {body}"));
    }
    serde_json::from_str(body).map_err(|e| format!("bad JSON {body:?}: {e}"))
}

/// The memfd arenas `pid` holds open, by link target (e.g. "/memfd:forkless-arena (deleted)").
pub fn arena_fds(pid: u32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|target| target.display().to_string())
        .filter(|target| target.starts_with("/memfd:forkless-arena"))
        .collect()
}

/// Number of open descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Runs `supervisor ARGS...` to completion (a control command), returning (success, stdout, stderr).
pub fn supervisor_command(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let output = Command::new(supervisor_exe()).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

/// `supervisor SUBCOMMAND -c CONFIG ARGS...`, to completion: (success, stdout, stderr).
pub fn control(config: &Path, subcommand: &str, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<&std::ffi::OsStr> = vec![subcommand.as_ref(), "-c".as_ref(), config.as_os_str()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    supervisor_command(&all)
}

/// Proportional set size of `pid` in bytes (a page shared by k processes counts 1/k), from
/// `/proc/PID/smaps_rollup`; 0 if the process is gone.
pub fn pss_bytes_of(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    kb * 1024
}

/// Waits for the supervisor to exit by itself; panics at once if the log shows it got as far
/// as `too_far` first (so a reproduction against the old code fails fast, not at PATIENCE).
pub fn exits_before(sup: &mut Supervisor, too_far: &str) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if sup.child.try_wait().unwrap().is_some() {
            return sup.wait_exit();
        }
        let log = sup.log_text();
        assert!(!log.contains(too_far), "the supervisor got as far as {too_far:?}:\n{log}");
        assert!(Instant::now() < deadline, "the supervisor did not exit:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a control command with a failure guard, so a hanging CLI fails the test instead of
/// hanging it: (exit status, stdout, stderr).
pub fn control_guarded(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(supervisor_exe())
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`supervisor {}` hung", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}
