//! The control socket: how `supervisor status|scale|restart|reload|reload-model|stop` reach a
//! running supervisor. One JSON object per line each way, on a Unix socket inside the
//! supervisor's private runtime folder (see [`crate::runtime_dir`]), whose path follows from
//! the config file, so a command given the same `-c CONFIG` finds it.
//!
//! Trust goes both ways, and only to the same uid:
//! - the supervisor closes a connection from any other uid at once (`SO_PEERCRED`); the
//!   folder's mode 0700 keeps other users out before that;
//! - the command checks the folder (ours, 0700) and the peer's `SO_PEERCRED` before it
//!   believes an answer, so an impostor listening in the supervisor's place is named, not
//!   obeyed.
//!
//! Bounds: a connection must send its request within [`READ_TIMEOUT`]; at most
//! [`MAX_CONNECTIONS`] are open at once, and when all are taken the oldest idle one is closed
//! to make room (see [`crate::limits::ConnectionSlots`]), so idle connections cannot lock out
//! a real command. Refusals are logged at most once a second.
//!
//! ```no_run
//! # async fn f(config: &forkless_supervisor::config::Config) -> Result<(), Box<dyn std::error::Error>> {
//! use forkless_supervisor::control::{request, Request, Response};
//! let answer = request(config, &Request::ReloadModel { path: None }).await?;
//! assert!(matches!(answer, Response::Reloaded { .. } | Response::Failed { .. }));
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::limits::{Admitted, ConnectionSlots, RateLimitedLog};
use crate::processes::MemoryMeter;
use crate::runtime_dir;
use crate::service::{Command, Reply, RestartTarget, StatusReport};

/// Largest request line accepted.
const MAX_LINE: usize = 64 * 1024;
/// How long a connection may take to send its request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Control connections open at once.
pub const MAX_CONNECTIONS: usize = 64;

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Run this many workers.
    Scale {
        workers: u32,
    },
    /// Replace the owner, every worker (rolling) or one worker; each replacement is ready
    /// before its predecessor stops.
    Restart {
        target: RestartTarget,
    },
    /// Re-read the config file and restart the workers on it (like SIGHUP).
    Reload,
    /// Stop gracefully (like SIGTERM); `now`: kill what remains at once, whatever the grace.
    Stop {
        #[serde(default)]
        now: bool,
    },
    /// Hot swap: load `path` (default: the config's `[model] path`) as a new generation.
    ReloadModel {
        path: Option<String>,
    },
    /// Put a GPU taken out of service back (`on_device_failure = "degrade"`).
    RestoreDevice {
        device: u32,
    },
}

/// What the supervisor answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status { status: Box<StatusReport> },
    Done { message: String },
    Reloaded { generation: u64 },
    Failed { error: String },
}

/// Where the control socket of `config` lives: `control.sock` in its runtime folder
/// ([`runtime_dir::path_for`]).
pub fn socket_path(config: &Config) -> PathBuf {
    runtime_dir::control_socket_in(&runtime_folder(config))
}

fn runtime_folder(config: &Config) -> PathBuf {
    runtime_dir::path_for(&config.source, config.supervisor.runtime_dir.as_deref())
}

/// The bound control socket; removed when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    meter: MemoryMeter,
}

impl ControlSocket {
    /// Binds `path`, inside the runtime folder this supervisor holds locked (so whatever
    /// socket sat there belonged to a supervisor that died). `status` reads memory through
    /// `meter`.
    pub fn bind(path: &Path, meter: MemoryMeter) -> Result<Self, BindError> {
        let failed = |what: &'static str| move |error| BindError { what, path: path.to_path_buf(), error };
        match std::fs::remove_file(path) {
            Ok(()) => tracing::warn!("removed the stale control socket {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed("cannot remove the stale control socket")(e)),
        }
        let listener = UnixListener::bind(path).map_err(failed("cannot create the control socket"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(failed("cannot make the control socket private"))?;
        Ok(ControlSocket { listener, path: path.to_path_buf(), meter })
    }

    /// Answers requests until `stop`.
    pub async fn serve(self, commands: mpsc::UnboundedSender<Command>, stop: CancellationToken) {
        let slots = ConnectionSlots::new(MAX_CONNECTIONS);
        let refusals = std::sync::Arc::new(RateLimitedLog::new(Duration::from_secs(1)));
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning on the error.
                        refusals.warn(|| format!("control accept failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            if let Err(reason) = check_peer_uid(&stream) {
                refusals.warn(|| format!("control connection refused: {reason}"));
                continue;
            }
            let Some(slot) = slots.admit() else {
                refusals.warn(|| format!("control connection refused: {MAX_CONNECTIONS} commands are running"));
                continue;
            };
            tokio::spawn(answer(stream, slot, commands.clone(), self.meter.clone()));
        }
    }
}

/// Only the supervisor's own uid may give it commands.
fn check_peer_uid(stream: &UnixStream) -> Result<(), String> {
    let cred = stream.peer_cred().map_err(|e| format!("cannot read its credentials: {e}"))?;
    let uid = rustix::process::getuid().as_raw();
    if cred.uid() != uid {
        let pid = cred.pid().unwrap_or(0);
        return Err(format!("pid {pid} runs as uid {}, not as the supervisor's uid {uid}", cred.uid()));
    }
    Ok(())
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(stream: UnixStream, slot: Admitted, commands: mpsc::UnboundedSender<Command>, meter: MemoryMeter) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64));
    let read = tokio::select! {
        read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)) => read,
        // Closed to make room for a newer connection: this one had sent nothing.
        () = slot.evicted().cancelled() => return,
    };
    slot.busy();
    let response = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(request, &commands, &meter).await,
            Err(e) => Response::Failed { error: format!("bad request: {e}") },
        },
        Ok(Err(e)) => Response::Failed { error: format!("cannot read request: {e}") },
        Err(_) => Response::Failed { error: format!("no request within {READ_TIMEOUT:?}") },
    };
    let mut text = serde_json::to_string(&response).expect("responses serialise");
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

/// Every request becomes a command for the one service task, which replies on a ticket.
async fn handle(request: Request, commands: &mpsc::UnboundedSender<Command>, meter: &MemoryMeter) -> Response {
    let gone = || Response::Failed { error: "the supervisor is stopping".into() };
    match request {
        Request::Status => {
            let (reply, answer) = oneshot::channel();
            if commands.send(Command::Status(reply)).is_err() {
                return gone();
            }
            match answer.await {
                Ok(mut status) => {
                    fill_memory(meter, &mut status).await;
                    Response::Status { status: Box::new(status) }
                }
                Err(_) => gone(),
            }
        }
        Request::Scale { workers } => ask(commands, |reply| Command::Scale { workers, reply }).await,
        Request::Restart { target } => ask(commands, |reply| Command::Restart { target, reply }).await,
        Request::Reload => ask(commands, |reply| Command::Reload { reply: Some(reply) }).await,
        Request::RestoreDevice { device } => ask(commands, |reply| Command::RestoreDevice { device, reply }).await,
        Request::Stop { now } => {
            tracing::info!(now, "stop requested through the control socket");
            match commands.send(Command::Stop { now }) {
                Ok(()) => Response::Done { message: if now { "stopping now" } else { "stopping" }.into() },
                Err(_) => gone(),
            }
        }
        Request::ReloadModel { path } => {
            let (reply, answer) = oneshot::channel();
            if commands.send(Command::ReloadModel { path, reply }).is_err() {
                return gone();
            }
            match answer.await {
                Ok(Ok(generation)) => Response::Reloaded { generation },
                Ok(Err(error)) => Response::Failed { error },
                Err(_) => gone(),
            }
        }
    }
}

/// Fills in the memory columns of `status` (read off the runtime, see [`MemoryMeter`]), or
/// says why they are unknown.
async fn fill_memory(meter: &MemoryMeter, status: &mut StatusReport) {
    let pids = status.processes.iter().filter_map(|p| p.pid).collect();
    match meter.measure(pids).await {
        Ok(measured) => {
            status.gpu_unattributed_bytes = measured.apply(&mut status.processes);
            for device in &mut status.devices {
                device.gpu_used_bytes = measured.device_used(device.device);
            }
        }
        Err(reason) => status.memory_unknown = Some(reason),
    }
}

/// Sends the service a command carrying a reply channel, and turns the reply into a response.
async fn ask(commands: &mpsc::UnboundedSender<Command>, command: impl FnOnce(Reply) -> Command) -> Response {
    let (reply, answer) = oneshot::channel();
    if commands.send(command(reply)).is_err() {
        return Response::Failed { error: "the supervisor is stopping".into() };
    }
    match answer.await {
        Ok(Ok(message)) => Response::Done { message },
        Ok(Err(error)) => Response::Failed { error },
        Err(_) => Response::Failed { error: "the supervisor is stopping".into() },
    }
}

/// Why the control socket could not be made (`supervisor run`).
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {error}")]
pub struct BindError {
    what: &'static str,
    path: PathBuf,
    error: std::io::Error,
}

/// Why a control request got no answer to believe. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no supervisor is running for {config} (control socket {socket}{detail})")]
    NotRunning { config: PathBuf, socket: PathBuf, detail: String },
    #[error("refusing to talk to the supervisor's control socket: {0}")]
    UntrustedFolder(#[from] crate::RuntimeDirError),
    #[error(
        "the control socket {socket} is served by uid {uid} (pid {pid}), not by this user (uid {own}): refusing to \
         believe its answer; something took the supervisor's place, check {folder}"
    )]
    Impostor { socket: PathBuf, uid: u32, pid: i32, own: u32, folder: PathBuf },
    #[error("control socket {socket}: {error}")]
    Io { socket: PathBuf, error: std::io::Error },
    #[error("the supervisor closed the control connection without answering (too many control connections open?): try again")]
    NoAnswer,
    #[error("unreadable answer from the supervisor: {line:?} ({error})")]
    Unreadable { line: String, error: serde_json::Error },
}

/// Sends one request to the supervisor running `config` and returns its answer, once the
/// runtime folder and the peer at the socket have shown they are this user's.
pub async fn request(config: &Config, request: &Request) -> Result<Response, RequestError> {
    let socket = socket_path(config);
    let io = |error| RequestError::Io { socket: socket.clone(), error };
    let stream = connect(config).await?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).expect("requests serialise");
    text.push('\n');
    write.write_all(text.as_bytes()).await.map_err(io)?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await.map_err(io)?;
    if line.is_empty() {
        return Err(RequestError::NoAnswer);
    }
    serde_json::from_str(&line).map_err(|error| RequestError::Unreadable { line, error })
}

/// Connects to `config`'s control socket, refusing a runtime folder or a peer that is not this
/// user's: whoever else listens there is not the supervisor, whatever it answers.
async fn connect(config: &Config) -> Result<UnixStream, RequestError> {
    let (folder, socket) = (runtime_folder(config), socket_path(config));
    let not_running =
        |detail: String| RequestError::NotRunning { config: config.source.clone(), socket: socket.clone(), detail };
    match std::fs::symlink_metadata(&folder) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_running(String::new())),
        _ => runtime_dir::check_private(&folder)?,
    }
    let stream = UnixStream::connect(&socket).await.map_err(|e| not_running(format!(": {e}")))?;
    let cred = stream.peer_cred().map_err(|error| RequestError::Io { socket: socket.clone(), error })?;
    let own = rustix::process::getuid().as_raw();
    if cred.uid() != own {
        return Err(RequestError::Impostor { socket, uid: cred.uid(), pid: cred.pid().unwrap_or(0), own, folder });
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_are_readable_json() {
        let request = Request::ReloadModel { path: Some("/m.safetensors".into()) };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"command":"reload-model","path":"/m.safetensors"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        let text = serde_json::to_string(&Response::Reloaded { generation: 2 }).unwrap();
        assert_eq!(text, r#"{"result":"reloaded","generation":2}"#);
        let restart = Request::Restart { target: RestartTarget::Worker(3) };
        let text = serde_json::to_string(&restart).unwrap();
        assert_eq!(text, r#"{"command":"restart","target":3}"#);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"restart","target":"workers"}"#).unwrap(),
            Request::Restart { target: RestartTarget::Workers }
        );
    }

    #[test]
    fn the_socket_path_follows_from_the_config_file() {
        let text = "[model]\npath = \"m\"\n[workers]\ncommand = [\"w\"]\nlisten = [\"127.0.0.1:0\"]\n";
        let a = Config::parse(text, Path::new("/srv/a/config.toml")).unwrap();
        let b = Config::parse(text, Path::new("/srv/b/config.toml")).unwrap();
        assert_eq!(socket_path(&a), socket_path(&a));
        assert_ne!(socket_path(&a), socket_path(&b));
    }
}
