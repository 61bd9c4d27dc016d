//! The owner: loads a safetensors file once into one arena (a sealed memfd, or GPU memory with
//! the `cuda` backend, see [`cuda`]) and publishes it to the supervisor as a generation. It is started by the supervisor by `exec` (as `supervisor owner`),
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

pub mod cuda;
pub mod protocol;
/// Reading safetensors files, shared with workers' private copies (`forkless-weights`).
pub use forkless_weights::model_file;

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Instant;

use forkless_bus::child_env::ChildEnv;
use forkless_bus::host::{ArenaMap, ArenaWriter, SealedArena};
use forkless_bus::wire::RequestId;
use forkless_bus::{BusStream, Manifest, Message};
use model_file::{LoadError, ModelFile};
use protocol::{Incoming, OwnerProtocol};

pub use forkless_bus::child::EXIT_FATAL;

/// Why the owner stopped.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Env(#[from] forkless_bus::child_env::ChildEnvError),
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
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
}

impl OwnerError {
    /// The exit status for the supervisor: 78 (fatal), 75 (out of memory for now) or 1.
    pub fn exit_code(&self) -> i32 {
        let out_of_memory = match self {
            OwnerError::Load(LoadError::Gpu { source, .. }) => source.is_out_of_memory(),
            OwnerError::Load(LoadError::Store {
                source: forkless_bus::host::ArenaError::Resize { source, .. },
                ..
            })
            | OwnerError::Load(LoadError::Store { source: forkless_bus::host::ArenaError::Write(source), .. }) => {
                forkless_bus::child::is_out_of_memory(source)
            }
            _ => false,
        };
        forkless_bus::child::exit_status(out_of_memory, self.is_fatal())
    }

    /// True when restarting the owner would fail the same way.
    pub fn is_fatal(&self) -> bool {
        match self {
            // A GPU hiccup or a full GPU: a restart (with backoff) may succeed.
            OwnerError::Load(LoadError::Gpu { .. }) => return false,
            // The kernel held a page of the arena for longer than the seal waits: transient.
            OwnerError::Load(LoadError::Store { source: forkless_bus::host::ArenaError::SealBusy { .. }, .. }) => {
                return false;
            }
            _ => {}
        }
        matches!(self, OwnerError::Load(_) | OwnerError::Env(_) | OwnerError::Orphan(_) | OwnerError::Refused(_))
            || matches!(self, OwnerError::Send(forkless_bus::channel::SendError::TooLarge { .. }))
    }
}

/// Loads `path` into a new sealed host arena; returns its layout (generation 0: the
/// supervisor assigns the number) and the arena.
pub fn load_host_arena(path: &Path) -> Result<(Manifest, SealedArena), OwnerError> {
    let file = ModelFile::open(path)?;
    let (arena_desc, tensors) = file.layout();
    let store = |source| LoadError::Store { path: path.into(), source };
    let mut arena_desc = arena_desc;
    let writer = ArenaWriter::create("forkless-arena", arena_desc.size).map_err(store)?;
    let mut checksum = forkless_bus::host::ArenaChecksum::default();
    file.copy_into(&tensors, |offset, bytes| {
        checksum.update_at(offset, bytes);
        writer.write_at(offset, bytes)
    })?;
    arena_desc.checksum = checksum.finish(arena_desc.size);
    let arena = writer.seal().map_err(store)?;
    let manifest = Manifest::new(path.display().to_string(), vec![arena_desc], tensors);
    Ok((manifest, arena))
}

/// Where the owner puts the weights: `FORKLESS_BACKEND` and, for `cuda`, the device, the
/// context's stack limit and the kernel cache, all set by the supervisor (see [`ChildEnv`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Host,
    Cuda(cuda::CudaSettings),
}

impl Backend {
    /// The backend the supervisor gave this process.
    pub fn of(env: &ChildEnv) -> Backend {
        match env.cuda() {
            None => Backend::Host,
            Some(cuda) => Backend::Cuda(cuda.into()),
        }
    }
}

/// Loads `path` with `backend`: the manifest (generation 0) and one fd per arena.
pub fn load(path: &Path, backend: &Backend) -> Result<(Manifest, Vec<OwnedFd>), OwnerError> {
    match backend {
        Backend::Host => {
            let (manifest, arena) = load_host_arena(path)?;
            let fd = arena.fd().try_clone_to_owned().map_err(|source| LoadError::Read { path: path.into(), source })?;
            Ok((manifest, vec![fd]))
        }
        Backend::Cuda(settings) => {
            let loaded = cuda::load(path, settings)?;
            Ok((loaded.manifest, loaded.fds))
        }
    }
}

/// The owner process: tie to the supervisor, then follow the owner protocol
/// ([`protocol::OwnerProtocol`]) until the supervisor closes the bus or SIGTERM arrives.
pub async fn run() -> Result<(), OwnerError> {
    let env = ChildEnv::from_env()?;
    forkless_bus::child::die_with_supervisor(&env)?;
    let (model, backend) = (env.model.clone(), Backend::of(&env));
    let mut bus = forkless_bus::child::connect_to_supervisor(&env).await?;
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(OwnerError::Signal)?;
    let mut protocol = OwnerProtocol::default();
    loop {
        let (message, fds) = tokio::select! {
            _ = term.recv() => return Ok(()),
            received = bus.recv() => match received {
                Ok(frame) => frame,
                Err(forkless_bus::channel::RecvError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            },
        };
        match protocol.receive(message, fds)? {
            Incoming::Load { request, path, first } => {
                load_and_publish(&mut bus, &mut protocol, request, Path::new(&path), &backend, first).await?
            }
            Incoming::Adopt { request, manifest, fds } => {
                adopt_or_reload(&mut bus, &mut protocol, request, manifest, fds, &model, &backend).await?
            }
            Incoming::Deposited { result: Ok(generation), .. } => {
                tracing::info!(generation, "the supervisor holds the new arena as generation {generation}");
            }
            Incoming::Deposited { result: Err(reason), first: true, .. } => return Err(OwnerError::Refused(reason)),
            Incoming::Deposited { result: Err(reason), first: false, .. } => {
                tracing::warn!("the supervisor declined the new generation: {reason}");
            }
            Incoming::Refused(reason) => return Err(OwnerError::Refused(reason)),
        }
    }
}

/// Adopts the escrowed generation if it checks out; otherwise loads the weights file again
/// and publishes it under the same request.
async fn adopt_or_reload(
    bus: &mut BusStream,
    protocol: &mut OwnerProtocol,
    request: RequestId,
    manifest: Manifest,
    fds: Vec<OwnedFd>,
    model: &Path,
    backend: &Backend,
) -> Result<(), OwnerError> {
    let started = Instant::now();
    let verified = match backend {
        Backend::Host => verify_escrowed(&manifest, fds).map_err(|e| e.to_string()),
        Backend::Cuda(settings) => manifest
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|()| cuda::verify_escrowed(&manifest, fds, settings).map_err(|e| e.to_string())),
    };
    match verified {
        Ok(()) => {
            let generation = manifest.generation;
            bus.send(&Message::Adopted { request, generation }, &[]).await?;
            protocol.settled();
            tracing::info!(
                generation,
                bytes = manifest.total_bytes(),
                verify_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "adopted generation {generation} from escrow (checksums verified; weights file not read)"
            );
            Ok(())
        }
        Err(e) => {
            tracing::warn!("escrowed generation failed its check ({e}): loading {} again", model.display());
            load_and_publish(bus, protocol, request, model, backend, true).await
        }
    }
}

/// Loads a weights file into a new arena and publishes it as `request`. A file that cannot be
/// loaded ends the owner when it was the first assignment (there is nothing to serve); for a
/// hot swap it is reported (`LoadFailed`) and the live generation keeps serving.
async fn load_and_publish(
    bus: &mut BusStream,
    protocol: &mut OwnerProtocol,
    request: RequestId,
    path: &Path,
    backend: &Backend,
    first: bool,
) -> Result<(), OwnerError> {
    let started = Instant::now();
    let (manifest, fds) = match load(path, backend) {
        Ok(loaded) => loaded,
        Err(OwnerError::Load(e)) if !first => {
            tracing::warn!("hot swap failed: {e}");
            bus.send(&Message::LoadFailed { request, reason: e.to_string() }, &[]).await?;
            protocol.settled();
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
    bus.send(&Message::Publish { request, manifest: manifest.clone() }, &borrowed).await?;
    protocol.sent_publish(request);
    tracing::info!(
        tensors = manifest.tensors.len(),
        bytes = manifest.total_bytes(),
        load_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
        "published {}",
        path.display()
    );
    Ok(()) // the fds drop here: the escrow holds the arena now
}

/// Why an escrowed generation was not adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("manifest: {0}")]
    Manifest(#[from] forkless_bus::manifest::ManifestError),
    #[error("arena {arena}: {source}")]
    Map { arena: u32, source: forkless_bus::host::MapError },
    #[error("arena {arena} checksum is {actual:#x}, but {recorded:#x} was recorded at load")]
    Checksum { arena: u32, recorded: u64, actual: u64 },
}

/// Checks an escrowed generation without touching the disk: every manifest invariant (the
/// layout hash included), then each arena's bytes against the checksum recorded at load.
pub fn verify_escrowed(manifest: &Manifest, fds: Vec<OwnedFd>) -> Result<(), AdoptError> {
    manifest.validate()?;
    for (arena, fd) in manifest.arenas.iter().zip(fds) {
        let map = ArenaMap::map(fd, arena.size).map_err(|source| AdoptError::Map { arena: arena.id, source })?;
        let actual = forkless_bus::host::checksum(map.bytes());
        if actual != arena.checksum {
            return Err(AdoptError::Checksum { arena: arena.id, recorded: arena.checksum, actual });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn loaded() -> (tempfile::TempDir, Manifest, SealedArena) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let w: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        model_file::write_f32_safetensors(&path, &[("w", vec![10, 100], &w), ("b", vec![10], &w[..10])]).unwrap();
        let (manifest, arena) = load_host_arena(&path).unwrap();
        (dir, manifest, arena)
    }

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        const BASE: [(&str, &str); 4] = [
            ("FORKLESS_ROLE", "owner"),
            ("FORKLESS_INDEX", "0"),
            ("FORKLESS_SUPERVISOR_PID", "1"),
            ("FORKLESS_MODEL", "/m"),
        ];
        move |name| pairs.iter().chain(&BASE).find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn backend_comes_from_the_supervisors_variables() {
        let backend = |pairs| ChildEnv::from_vars(vars(pairs)).map(|env| Backend::of(&env));
        assert_eq!(backend(&[]).unwrap(), Backend::Host);
        let cuda = backend(&[
            ("FORKLESS_BACKEND", "cuda"),
            ("FORKLESS_CUDA_DEVICE", "1"),
            ("FORKLESS_CUDA_STACK_BYTES", "64"),
            ("FORKLESS_KERNEL_CACHE", "/run/k"),
        ])
        .unwrap();
        let expected = cuda::CudaSettings {
            device: 1,
            ordinal: None,
            stack_limit: Some(64),
            kernel_cache: Some(PathBuf::from("/run/k")),
            replicas: vec![],
        };
        assert_eq!(cuda, Backend::Cuda(expected));
        let defaults = backend(&[("FORKLESS_BACKEND", "cuda")]).unwrap();
        assert_eq!(
            defaults,
            Backend::Cuda(cuda::CudaSettings {
                device: 0,
                ordinal: None,
                stack_limit: None,
                kernel_cache: None,
                replicas: vec![]
            })
        );
    }

    #[test]
    fn bad_backend_variables_are_fatal_and_named() {
        for bad in [
            &[("FORKLESS_BACKEND", "tpu")][..],
            &[("FORKLESS_BACKEND", "cuda"), ("FORKLESS_CUDA_DEVICE", "-1")][..],
            &[("FORKLESS_BACKEND", "cuda"), ("FORKLESS_CUDA_DEVICE", "99999999999")][..],
        ] {
            let pairs: &'static [(&'static str, &'static str)] = bad;
            let err = OwnerError::from(ChildEnv::from_vars(vars(pairs)).unwrap_err());
            assert!(err.is_fatal(), "{err}");
            assert!(err.to_string().contains("FORKLESS_"), "{err}");
        }
    }

    #[test]
    fn a_seal_the_kernel_kept_busy_is_retried_by_a_restart_other_seal_errors_are_fatal() {
        let store = |source| OwnerError::Load(LoadError::Store { path: "m.safetensors".into(), source });
        let busy =
            store(forkless_bus::host::ArenaError::SealBusy { tries: 9, waited: std::time::Duration::from_secs(5) });
        assert!(!busy.is_fatal(), "{busy}");
        assert_eq!(busy.exit_code(), 1);
        let other = store(forkless_bus::host::ArenaError::Seal(std::io::Error::from_raw_os_error(22)));
        assert!(other.is_fatal(), "{other}");
    }

    #[test]
    fn escrowed_generation_verifies() {
        let (_dir, manifest, arena) = loaded();
        assert_ne!(manifest.arenas[0].checksum, 0);
        verify_escrowed(&manifest, vec![arena.read_only_fd().unwrap()]).unwrap();
    }

    #[test]
    fn altered_layout_or_contents_are_refused() {
        let (_dir, manifest, arena) = loaded();
        let mut moved = manifest.clone();
        moved.tensors[0].shape = vec![1, 10];
        moved.tensors[0].len = 40;
        let err = verify_escrowed(&moved, vec![arena.read_only_fd().unwrap()]).unwrap_err();
        assert!(matches!(err, AdoptError::Manifest(forkless_bus::manifest::ManifestError::LayoutHash { .. })), "{err}");

        // A consistent manifest whose recorded checksum does not match the memory.
        let mut wrong = manifest.clone();
        wrong.arenas[0].checksum ^= 1;
        let wrong = Manifest::new(wrong.source, wrong.arenas, wrong.tensors);
        let err = verify_escrowed(&wrong, vec![arena.read_only_fd().unwrap()]).unwrap_err();
        assert!(matches!(err, AdoptError::Checksum { .. }), "{err}");
    }
}
