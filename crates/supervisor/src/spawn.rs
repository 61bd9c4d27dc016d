//! Starting children: always a fresh `exec`, always from one long-lived thread.
//!
//! `PR_SET_PDEATHSIG`, which every child arms to die with the supervisor, fires when the
//! *thread* that forked it exits. Tokio's blocking pool retires idle threads, and runtime
//! workers are not ours to pin, so every spawn goes through [`Spawner`]: a dedicated thread,
//! fed by a channel, replying on a oneshot, that lives as long as the supervisor.
//!
//! Between fork and exec only std's own steps and `command-fds`' `dup2` (async-signal-safe,
//! no allocation) run: listening sockets land at fixed fds 3.. for `LISTEN_FDS`, the child's
//! bus socket right after them (`FORKLESS_BUS_FD`).
//! Each child gets its own process group, so a stop signal reaches anything it started.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use command_fds::{CommandFdExt, FdMapping};
use forkless_bus::child_env::ChildEnv;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// First fd number of inherited listeners (systemd's `SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: i32 = 3;

/// Everything needed to start one child.
#[derive(Debug)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Sockets placed at fds 3, 4, ... in the child.
    pub listeners: Vec<OwnedFd>,
    /// The child's end of its bus socketpair, placed right after the listeners.
    pub bus: Option<OwnedFd>,
    /// Recorded in the [`PidTable`] right after the fork, before the child can connect.
    pub label: Option<(PidTable, ChildLabel)>,
    /// Told the child's pid right after the fork: its bus connection keys the process table by
    /// it (a worker forked by a launcher says hello with its own pid, not the one we started).
    pub spawned: Option<tokio::sync::watch::Sender<Option<u32>>>,
    /// The owner's and workers' environment contract, applied last (over `env`), with the bus
    /// fd filled in where the socket lands.
    pub child_env: Option<ChildEnv>,
}

impl ChildSpec {
    pub fn new(program: PathBuf) -> Self {
        ChildSpec {
            program,
            args: Vec::new(),
            env: Vec::new(),
            listeners: Vec::new(),
            bus: None,
            label: None,
            spawned: None,
            child_env: None,
        }
    }
}

/// What a child is, as the bus server needs to know it from a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildLabel {
    pub role: forkless_bus::Role,
    pub index: u32,
}

impl ChildLabel {
    /// `owner` or `worker`, as logs and metrics name the role.
    pub fn role_name(self) -> &'static str {
        match self.role {
            forkless_bus::Role::Owner => "owner",
            forkless_bus::Role::Worker => "worker",
        }
    }
}

impl std::fmt::Display for ChildLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.role {
            forkless_bus::Role::Owner => f.write_str("owner"),
            forkless_bus::Role::Worker => write!(f, "worker {}", self.index),
        }
    }
}

/// Live children by pid: the bus hands memory only to pids found here.
#[derive(Debug, Clone, Default)]
pub struct PidTable(Arc<Mutex<HashMap<u32, ChildLabel>>>);

impl PidTable {
    pub fn insert(&self, pid: u32, label: ChildLabel) {
        self.0.lock().expect("pid table poisoned").insert(pid, label);
    }
    pub fn remove(&self, pid: u32) {
        self.0.lock().expect("pid table poisoned").remove(&pid);
    }
    pub fn get(&self, pid: u32) -> Option<ChildLabel> {
        self.0.lock().expect("pid table poisoned").get(&pid).copied()
    }
}

type Request = (ChildSpec, oneshot::Sender<std::io::Result<Child>>);

/// Handle to the spawning thread; the thread ends when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Spawner {
    requests: std::sync::mpsc::Sender<Request>,
}

impl Spawner {
    /// Starts the spawning thread; children's I/O and exit are driven by `runtime`.
    pub fn start(runtime: tokio::runtime::Handle) -> Spawner {
        let (requests, inbox) = std::sync::mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("forkless-spawner".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                for (spec, reply) in inbox {
                    let _ = reply.send(spawn_now(spec));
                }
            })
            .expect("cannot start the spawner thread");
        Spawner { requests }
    }

    /// Starts a child on the spawning thread.
    pub async fn spawn(&self, spec: ChildSpec) -> std::io::Result<Child> {
        let (reply, answer) = oneshot::channel();
        let gone = || std::io::Error::other("spawner thread is gone");
        self.requests.send((spec, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Variables of the supervisor's own environment that no child may inherit: the child
/// environment contract (`FORKLESS_*`: only what the supervisor sets reaches a child) and
/// systemd's socket activation (`LISTEN_*`: the supervisor's listeners are not the child's).
fn inherited_but_not_passed_on() -> impl Iterator<Item = std::ffi::OsString> {
    std::env::vars_os().map(|(name, _)| name).filter(|name| {
        let name = name.as_encoded_bytes();
        name.starts_with(forkless_bus::child_env::PREFIX.as_bytes()) || name.starts_with(b"LISTEN_")
    })
}

fn spawn_now(spec: ChildSpec) -> std::io::Result<Child> {
    let mut command = Command::new(&spec.program);
    for name in inherited_but_not_passed_on() {
        command.env_remove(name);
    }
    command
        .args(&spec.args)
        // GPUs are numbered in PCI bus order, as nvidia-smi and NVML number them, so a device
        // number in the config, in a child and in status name the same GPU.
        .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if !spec.listeners.is_empty() {
        command.env("LISTEN_FDS", spec.listeners.len().to_string());
    }
    let bus_fd = LISTEN_FDS_START + spec.listeners.len() as i32;
    if let Some(mut env) = spec.child_env {
        env.bus_fd = spec.bus.is_some().then_some(bus_fd);
        command.envs(env.to_vars());
    }
    let mappings: Vec<FdMapping> = spec
        .listeners
        .into_iter()
        .chain(spec.bus)
        .zip(LISTEN_FDS_START..)
        .map(|(parent_fd, child_fd)| FdMapping { parent_fd, child_fd })
        .collect();
    if !mappings.is_empty() {
        command.fd_mappings(mappings).map_err(std::io::Error::other)?;
    }
    let child = command.spawn().map_err(|e| {
        const ENOEXEC: i32 = 8;
        // Keep the kind callers decide on (ENOEXEC has none of its own: call it invalid input).
        let kind = if e.raw_os_error() == Some(ENOEXEC) { std::io::ErrorKind::InvalidInput } else { e.kind() };
        std::io::Error::new(kind, format!("cannot start {}: {e}", spec.program.display()))
    })?;
    if let (Some((table, label)), Some(pid)) = (spec.label, child.id()) {
        table.insert(pid, label);
    }
    if let (Some(spawned), Some(pid)) = (spec.spawned, child.id()) {
        spawned.send_replace(Some(pid));
    }
    Ok(child)
}
