//! The supervisor under test: started as a real process (`supervisor run CONFIG
//! --log-format json`), its log lines read as they come (stamped on arrival) to learn its
//! address, its children's pids, and when each victim of a kill was replaced.

use std::collections::{BTreeSet, VecDeque};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use forkless_supervisor::config::Config;
use forkless_supervisor::control::{request, Request, Response};
use forkless_supervisor::service::StatusReport;
use serde_json::Value;

use crate::report::{Kill, Shutdown};

const LOG_TAIL: usize = 60;
const READY_PATIENCE: Duration = Duration::from_secs(180);
/// Longest a graceful stop may take: the config's grace for the workers, then the owner's.
const STOP_PATIENCE: Duration = Duration::from_secs(90);

pub struct SupervisorProcess {
    child: Child,
    lines: Receiver<(Instant, Value)>,
    tail: Arc<Mutex<VecDeque<String>>>,
    pids: BTreeSet<u32>,
    config: Config,
    bus_socket: Option<PathBuf>,
}

impl SupervisorProcess {
    /// Starts `exe run CONFIG`; with `log`, every log line is also appended to that file.
    pub fn start(exe: &Path, config: &Path, log: Option<&Path>) -> anyhow::Result<SupervisorProcess> {
        let mut copy = match log {
            Some(path) => Some(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create the log copy {}", path.display()))?,
            ),
            None => None,
        };
        let mut child = Command::new(exe)
            .args(["run", "--log-format", "json"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} (build it, or pass --supervisor)", exe.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let (sender, lines) = std::sync::mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        let keep = tail.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let at = Instant::now();
                if let Some(file) = copy.as_mut() {
                    use std::io::Write;
                    if writeln!(file, "{line}").is_err() {
                        copy = None; // a full disk must not stop the run; the report still comes
                    }
                }
                {
                    let mut keep = keep.lock().expect("tail");
                    if keep.len() == LOG_TAIL {
                        keep.pop_front();
                    }
                    keep.push_back(line.clone());
                }
                let value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if sender.send((at, value)).is_err() {
                    break;
                }
            }
        });
        Ok(SupervisorProcess {
            child,
            lines,
            tail,
            pids: BTreeSet::new(),
            config: Config::load(config)?,
            bus_socket: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        self.tail.lock().expect("tail").iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Waits for "listening on" and "all N workers ready"; returns the first address.
    pub async fn wait_ready(&mut self) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + READY_PATIENCE;
        let mut addr = None;
        loop {
            match self.lines.try_recv() {
                Ok((_, line)) => {
                    self.note_pid(&line);
                    let message = line["message"].as_str().unwrap_or_default();
                    if message.contains("listening on") {
                        let first = line["addrs"].as_str().unwrap_or_default().split(',').next().unwrap_or_default();
                        addr = Some(first.parse::<SocketAddr>().context("unreadable listen address in the log")?);
                        self.bus_socket = line["bus"].as_str().map(PathBuf::from);
                    }
                    if message.contains("workers ready") {
                        return addr.context("ready before listening?");
                    }
                }
                Err(TryRecvError::Empty) => {
                    if let Some(status) = self.exited() {
                        bail!("the supervisor exited before it was ready ({status}):\n{}", self.log_tail());
                    }
                    if Instant::now() > deadline {
                        bail!("the supervisor was not ready within {READY_PATIENCE:?}:\n{}", self.log_tail());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(TryRecvError::Disconnected) => bail!("the supervisor closed its log:\n{}", self.log_tail()),
            }
        }
    }

    fn note_pid(&mut self, line: &Value) {
        let message = line["message"].as_str().unwrap_or_default();
        if let Some(pid) = message.strip_prefix("started ").and_then(|m| m.split("(pid ").nth(1)) {
            if let Ok(pid) = pid.trim_end_matches(')').parse() {
                self.pids.insert(pid);
            }
        }
    }

    /// Reads the log lines so far and marks the kills whose victim has been replaced: a
    /// worker's slot reported ready with a new pid, or a new owner adopted the escrow (or
    /// published a generation) after the kill.
    pub fn pump_events(&mut self, kills: &Mutex<Vec<Kill>>, started: Instant) {
        while let Ok((at, line)) = self.lines.try_recv() {
            self.note_pid(&line);
            let t = at.saturating_duration_since(started).as_secs_f64();
            let message = line["message"].as_str().unwrap_or_default();
            let mut kills = kills.lock().expect("kills");
            let pending = kills.iter_mut().filter(|k| k.recovered_s.is_none() && k.at_s <= t);
            if message.starts_with("worker ") && message.ends_with(" ready") {
                let (index, pid) = (line["index"].as_u64(), line["pid"].as_u64());
                for kill in pending.filter(|k| k.role == "worker" && Some(u64::from(k.index)) == index) {
                    if pid != Some(u64::from(kill.pid)) {
                        kill.recovered_s = Some(t - kill.at_s);
                    }
                }
            } else if message.contains("re-adopted") || message.contains("is in escrow") {
                for kill in pending.filter(|k| k.role == "owner") {
                    kill.recovered_s = Some(t - kill.at_s);
                }
            }
        }
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pids_seen(&self) -> BTreeSet<u32> {
        let mut pids = self.pids.clone();
        pids.insert(self.pid());
        pids
    }

    /// The paths a stopped supervisor must have removed.
    pub fn leftover_paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![forkless_supervisor::control::socket_path(&self.config)];
        paths.extend(self.bus_socket.as_ref().and_then(|b| b.parent().map(Path::to_path_buf)));
        paths
    }

    /// SIGTERM and wait (up to [`STOP_PATIENCE`], then SIGKILL).
    pub async fn stop(&mut self) -> Shutdown {
        let started = Instant::now();
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        loop {
            if let Some(status) = self.exited() {
                let log_tail = (!status.success()).then(|| self.log_tail());
                return Shutdown {
                    exit_code: status.code(),
                    clean: status.success(),
                    seconds: started.elapsed().as_secs_f64(),
                    log_tail,
                };
            }
            if started.elapsed() > STOP_PATIENCE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Shutdown {
                    exit_code: None,
                    clean: false,
                    seconds: started.elapsed().as_secs_f64(),
                    log_tail: Some(self.log_tail()),
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SupervisorProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The running supervisor's status, through its control socket.
pub async fn status(config: &Config) -> anyhow::Result<StatusReport> {
    let answer = tokio::time::timeout(Duration::from_secs(5), request(config, &Request::Status))
        .await
        .context("the supervisor did not answer a status request within 5 s")??;
    match answer {
        Response::Status { status } => Ok(*status),
        Response::Failed { error } => bail!("status failed: {error}"),
        other => bail!("unexpected answer to status: {other:?}"),
    }
}
