//! The owner: loads a safetensors file once into one sealed arena and publishes it to the
//! supervisor as a generation. It is started by the supervisor by `exec` (as `supervisor owner`),
//! never forked from a process that could hold a CUDA context.
//!
//! Exit status tells the supervisor what to do: [`EXIT_FATAL`] means "restarting me will not
//! help" (a missing or corrupt weights file); anything else is an ordinary crash.
//!
//! ```no_run
//! # async fn f() -> Result<(), forkless_owner::OwnerError> {
//! let (manifest, arena) = forkless_owner::load_host_arena("model.safetensors".as_ref())?;
//! println!("{} tensors in {} bytes", manifest.tensors.len(), arena.size());
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod model_file;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use forkless_bus::host::{ArenaWriter, SealedArena};
use forkless_bus::{BusStream, Manifest, Message, Role};
use model_file::{LoadError, ModelFile};

pub use forkless_bus::child::EXIT_FATAL;

/// Why the owner stopped.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0} is not set: the owner must be started by `supervisor run`")]
    Env(&'static str),
    #[error(transparent)]
    Orphan(#[from] forkless_bus::child::OrphanError),
    #[error(transparent)]
    Connect(#[from] forkless_bus::child::ConnectError),
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
    #[error("bus: {0}")]
    Send(#[from] forkless_bus::channel::SendError),
    #[error("bus: {0}")]
    Recv(#[from] forkless_bus::channel::RecvError),
    #[error("supervisor refused the owner: {0}")]
    Refused(String),
    #[error("supervisor answered {0} where a different message was expected")]
    Unexpected(&'static str),
}

impl OwnerError {
    /// True when restarting the owner would fail the same way.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            OwnerError::Load(_)
                | OwnerError::Env(_)
                | OwnerError::Orphan(_)
                | OwnerError::Refused(_)
        ) || matches!(
            self,
            OwnerError::Send(forkless_bus::channel::SendError::TooLarge { .. })
        )
    }
}

/// Loads `path` into a new sealed host arena; returns its layout (generation 0: the
/// supervisor assigns the number) and the arena.
pub fn load_host_arena(path: &Path) -> Result<(Manifest, SealedArena), OwnerError> {
    let file = ModelFile::open(path)?;
    let (arena_desc, tensors) = file.layout();
    let store = |source| LoadError::Store {
        path: path.into(),
        source,
    };
    let writer = ArenaWriter::create("forkless-arena", arena_desc.size).map_err(store)?;
    file.copy_into(&tensors, |offset, bytes| writer.write_at(offset, bytes))?;
    let arena = writer.seal().map_err(store)?;
    let manifest = Manifest {
        generation: 0,
        source: path.display().to_string(),
        arenas: vec![arena_desc],
        tensors,
    };
    Ok((manifest, arena))
}

fn env(name: &'static str) -> Result<String, OwnerError> {
    std::env::var(name).map_err(|_| OwnerError::Env(name))
}

/// The owner process: tie to the supervisor, load, publish, then stay until the supervisor
/// closes the bus or SIGTERM arrives.
pub async fn run() -> Result<(), OwnerError> {
    forkless_bus::child::die_with_supervisor()?;
    let model = PathBuf::from(env(forkless_bus::ENV_MODEL)?);
    let mut bus = forkless_bus::child::connect_to_supervisor(Role::Owner).await?;
    let started = Instant::now();
    let (manifest, arena) = load_host_arena(&model)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    bus.send(
        &Message::Publish {
            manifest: manifest.clone(),
        },
        &[arena.fd().as_fd()],
    )
    .await?;
    let generation = match bus.recv().await?.0 {
        Message::Published { generation } => generation,
        Message::Refused { reason } => return Err(OwnerError::Refused(reason)),
        other => return Err(OwnerError::Unexpected(other.kind())),
    };
    tracing::info!(
        generation,
        tensors = manifest.tensors.len(),
        bytes = manifest.total_bytes(),
        load_ms = format!("{load_ms:.1}"),
        "published {}",
        model.display()
    );
    wait_for_stop(&mut bus).await
}

async fn wait_for_stop(bus: &mut BusStream) -> Result<(), OwnerError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(OwnerError::Signal)?;
    tokio::select! {
        _ = term.recv() => Ok(()),
        received = bus.recv() => match received {
            Err(forkless_bus::channel::RecvError::Closed) => Ok(()),
            Err(e) => Err(e.into()),
            Ok((msg, _)) => Err(OwnerError::Unexpected(msg.kind())),
        },
    }
}
