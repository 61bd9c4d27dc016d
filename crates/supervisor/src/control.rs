//! The control socket: how `supervisor reload-model` (and, later, the rest of the job API)
//! reaches a running supervisor. One JSON object per line each way, on a Unix socket whose
//! path follows from the config file, so a command given the same `-c CONFIG` finds it.
//!
//! A socket left behind by a killed supervisor is detected (nobody answers on it) and
//! replaced; one that answers means that config already runs, and a second start is refused.
//!
//! ```no_run
//! # async fn f(config: &forkless_supervisor::config::Config) -> anyhow::Result<()> {
//! use forkless_supervisor::control::{request, Request, Response};
//! let answer = request(config, &Request::ReloadModel { path: None }).await?;
//! assert!(matches!(answer, Response::Reloaded { .. } | Response::Failed { .. }));
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::{Command, Reply, RestartTarget, StatusReport};

/// Largest request line accepted.
const MAX_LINE: usize = 64 * 1024;

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

/// Where the control socket of `config` lives: `[supervisor] runtime_dir` (or
/// `$XDG_RUNTIME_DIR`, or the temp dir) / `forkless-<hash of the config's absolute path>.sock`.
pub fn socket_path(config: &Config) -> PathBuf {
    let parent = config.supervisor.runtime_dir.clone().unwrap_or_else(crate::runtime_dir::default_parent);
    let absolute = std::fs::canonicalize(&config.source).unwrap_or_else(|_| config.source.clone());
    let hash = xxhash_rust::xxh3::xxh3_64(absolute.as_os_str().as_encoded_bytes());
    parent.join(format!("forkless-{hash:016x}.sock"))
}

/// The bound control socket; removed when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path`, replacing a stale socket, refusing if a live supervisor answers there.
    pub async fn bind(path: &Path, config: &Path) -> anyhow::Result<Self> {
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                bail!(
                    "a supervisor for {} is already running (control socket {} answers): stop it first",
                    config.display(),
                    path.display()
                );
            }
            tracing::warn!("removing the stale control socket {} of a supervisor that died", path.display());
            std::fs::remove_file(path).with_context(|| format!("cannot remove stale {}", path.display()))?;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("cannot create the control socket {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlSocket { listener, path: path.to_path_buf() })
    }

    /// Answers requests until `stop`.
    pub async fn serve(self, commands: mpsc::UnboundedSender<Command>, stop: CancellationToken) {
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("control accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            tokio::spawn(answer(stream, commands.clone()));
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(stream: UnixStream, commands: mpsc::UnboundedSender<Command>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64));
    let response = match reader.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(request, &commands).await,
            Err(e) => Response::Failed { error: format!("bad request: {e}") },
        },
        Err(e) => Response::Failed { error: format!("cannot read request: {e}") },
    };
    let mut text = serde_json::to_string(&response).expect("responses serialise");
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

/// Every request becomes a command for the one service task, which replies on a ticket.
async fn handle(request: Request, commands: &mpsc::UnboundedSender<Command>) -> Response {
    let gone = || Response::Failed { error: "the supervisor is stopping".into() };
    match request {
        Request::Status => {
            let (reply, answer) = oneshot::channel();
            if commands.send(Command::Status(reply)).is_err() {
                return gone();
            }
            match answer.await {
                Ok(status) => Response::Status { status: Box::new(status) },
                Err(_) => gone(),
            }
        }
        Request::Scale { workers } => ask(commands, |reply| Command::Scale { workers, reply }).await,
        Request::Restart { target } => ask(commands, |reply| Command::Restart { target, reply }).await,
        Request::Reload => ask(commands, |reply| Command::Reload { reply: Some(reply) }).await,
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

/// Sends one request to the supervisor running `config` and returns its answer.
pub async fn request(config: &Config, request: &Request) -> anyhow::Result<Response> {
    let path = socket_path(config);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!("no supervisor is running for {} (control socket {})", config.source.display(), path.display())
    })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line).with_context(|| format!("unreadable answer from the supervisor: {line:?}"))
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
