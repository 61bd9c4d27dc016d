//! The escrow: the supervisor holds the file descriptors of the live generation.
//!
//! A memfd (like a CUDA VMM allocation exported as an fd) lives as long as any fd or mapping of
//! it exists. Because the supervisor — which never maps the weights and never touches CUDA —
//! keeps one fd per arena, the weights outlive the owner that made them, and a worker started
//! while no owner runs still attaches from here.
//!
//! Every deposit is validated before a generation number is assigned and workers can see it:
//! the manifest's invariants, and each fd against its arena's declared memory kind
//! ([`HeldArena::adopt`]: a host arena must be a sealed memfd of the declared size; a CUDA
//! arena must be an open fd that is not a file — a memfd published as device memory is refused).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use forkless_bus::{host::ArenaWriter, manifest::{Dtype, LayoutBuilder, Manifest}};
//! use std::os::fd::OwnedFd;
//! let mut layout = LayoutBuilder::default();
//! layout.push("w", Dtype::F32, vec![2]);
//! let (arena, tensors) = layout.finish();
//! let sealed = ArenaWriter::create("doc", arena.size).unwrap().seal().unwrap();
//! let fd: OwnedFd = sealed.fd().try_clone_to_owned().unwrap();
//! let escrow = forkless_supervisor::escrow::Escrow::default();
//! let manifest = Manifest::new("doc".into(), vec![arena], tensors);
//! assert_eq!(escrow.deposit(manifest, vec![fd]).unwrap(), 1);
//! assert_eq!(escrow.wait_current().await.manifest.generation, 1);
//! # });
//! ```

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use forkless_bus::arena::{AdoptError, HeldArena};
use forkless_bus::manifest::ManifestError;
use forkless_bus::Manifest;
use tokio::sync::watch;

/// Why a published generation was refused.
#[derive(Debug, thiserror::Error)]
pub enum DepositError {
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("arena {arena}: {source}")]
    Arena { arena: u32, source: AdoptError },
    #[error("{fds} fds for {arenas} arenas")]
    FdCount { fds: usize, arenas: usize },
    #[error("generation {generation} is still in use by workers; try again once they have switched")]
    SwapInProgress { generation: u64 },
}

/// One generation held in escrow: its manifest and one fd per arena.
#[derive(Debug)]
pub struct EscrowedGeneration {
    pub manifest: Manifest,
    pub arenas: Vec<HeldArena>,
}

/// The generations in escrow: the current one, observable by every bus connection, and at most
/// one older generation that workers still use (a hot swap in progress).
#[derive(Debug, Clone)]
pub struct Escrow {
    current: watch::Sender<Option<Arc<EscrowedGeneration>>>,
    held: Arc<Mutex<Held>>,
}

#[derive(Debug, Default)]
struct Held {
    /// The previous generation while some worker still uses it.
    retiring: Option<Arc<EscrowedGeneration>>,
    /// How many workers hold each generation.
    holders: HashMap<u64, usize>,
}

impl Default for Escrow {
    fn default() -> Self {
        Escrow { current: watch::Sender::new(None), held: Arc::default() }
    }
}

impl Escrow {
    /// Validates and stores a generation, which becomes current; returns its number. The
    /// previous one stays in escrow while any worker holds it. Refused while an older
    /// generation is still retiring: memory never holds more than two generations.
    pub fn deposit(&self, mut manifest: Manifest, fds: Vec<OwnedFd>) -> Result<u64, DepositError> {
        manifest.validate()?;
        if fds.len() != manifest.arenas.len() {
            return Err(DepositError::FdCount { fds: fds.len(), arenas: manifest.arenas.len() });
        }
        let arenas = manifest
            .arenas
            .iter()
            .zip(fds)
            .map(|(arena, fd)| {
                HeldArena::adopt(arena, fd).map_err(|source| DepositError::Arena { arena: arena.id, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut held = self.held.lock().expect("escrow poisoned");
        if let Some(retiring) = &held.retiring {
            return Err(DepositError::SwapInProgress { generation: retiring.manifest.generation });
        }
        let mut number = 0;
        let mut previous = None;
        self.current.send_modify(|current| {
            number = current.as_ref().map_or(0, |g| g.manifest.generation) + 1;
            manifest.generation = number;
            previous = current.replace(Arc::new(EscrowedGeneration { manifest, arenas }));
        });
        if let Some(previous) = previous {
            if held.holders.get(&previous.manifest.generation).copied().unwrap_or(0) > 0 {
                held.retiring = Some(previous);
            }
        }
        Ok(number)
    }

    /// The current generation, if any was published.
    pub fn current(&self) -> Option<Arc<EscrowedGeneration>> {
        self.current.borrow().clone()
    }

    /// Waits until a generation exists and returns it.
    pub async fn wait_current(&self) -> Arc<EscrowedGeneration> {
        let mut rx = self.current.subscribe();
        let current = rx.wait_for(Option::is_some).await.expect("escrow sender lives in self");
        current.clone().expect("waited for Some")
    }

    /// Notified whenever the current generation changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<EscrowedGeneration>>> {
        self.current.subscribe()
    }

    /// Bytes of all generations in escrow (current and retiring): memory that the arenas'
    /// fds hold whether or not any process maps it.
    pub fn bytes_held(&self) -> u64 {
        let current = self.current().map_or(0, |g| g.manifest.total_bytes());
        let held = self.held.lock().expect("escrow poisoned");
        current + held.retiring.as_ref().map_or(0, |g| g.manifest.total_bytes())
    }

    /// The older generation still in use, if a hot swap is in progress.
    pub fn retiring(&self) -> Option<u64> {
        let held = self.held.lock().expect("escrow poisoned");
        held.retiring.as_ref().map(|g| g.manifest.generation)
    }

    /// A worker now maps `generation`.
    pub fn hold(&self, generation: u64) {
        *self.held.lock().expect("escrow poisoned").holders.entry(generation).or_default() += 1;
    }

    /// A worker no longer maps `generation`. Returns it when that was the last holder of a
    /// retiring generation: its fds are closed now, and its memory is freed.
    pub fn release(&self, generation: u64) -> Option<u64> {
        let mut held = self.held.lock().expect("escrow poisoned");
        let count = held.holders.entry(generation).or_default();
        *count = count.saturating_sub(1);
        if *count > 0 {
            return None;
        }
        held.holders.remove(&generation);
        let retiring = held.retiring.as_ref().map(|g| g.manifest.generation);
        (retiring == Some(generation)).then(|| {
            held.retiring = None;
            generation
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkless_bus::host::ArenaWriter;
    use forkless_bus::manifest::{Dtype, LayoutBuilder, MemoryKind};

    fn publish(escrow: &Escrow) -> Result<u64, DepositError> {
        let sealed = ArenaWriter::create("test", 4096).unwrap().seal().unwrap();
        publish_as(escrow, MemoryKind::Host, sealed.fd().try_clone_to_owned().unwrap())
    }

    fn publish_as(escrow: &Escrow, kind: MemoryKind, fd: OwnedFd) -> Result<u64, DepositError> {
        let mut layout = LayoutBuilder::default();
        layout.push("w", Dtype::F32, vec![2]);
        let (mut arena, tensors) = layout.finish();
        arena.kind = kind;
        escrow.deposit(Manifest::new("t".into(), vec![arena], tensors), vec![fd])
    }

    #[test]
    fn cuda_arenas_are_held_and_memfds_posing_as_them_refused() {
        let escrow = Escrow::default();
        let kind = MemoryKind::CudaVmm { device: 0 };
        let (pipe, _writer) = rustix::pipe::pipe().unwrap(); // stands in for an exported VMM handle
        assert_eq!(publish_as(&escrow, kind, pipe).unwrap(), 1);
        assert_eq!(escrow.current().unwrap().arenas[0].kind(), kind);
        let memfd = ArenaWriter::create("test", 4096).unwrap().seal().unwrap().fd().try_clone_to_owned().unwrap();
        let err = publish_as(&escrow, kind, memfd).unwrap_err();
        assert!(matches!(err, DepositError::Arena { arena: 0, .. }), "{err}");
    }

    #[test]
    fn unheld_generations_are_dropped_at_once() {
        let escrow = Escrow::default();
        assert_eq!(publish(&escrow).unwrap(), 1);
        assert_eq!(publish(&escrow).unwrap(), 2);
        assert_eq!(escrow.retiring(), None);
    }

    #[test]
    fn a_held_generation_retires_until_its_last_holder_lets_go() {
        let escrow = Escrow::default();
        publish(&escrow).unwrap();
        escrow.hold(1);
        escrow.hold(1);
        assert_eq!(publish(&escrow).unwrap(), 2);
        assert_eq!(escrow.retiring(), Some(1));
        assert!(matches!(publish(&escrow), Err(DepositError::SwapInProgress { generation: 1 })));
        assert_eq!(escrow.release(1), None);
        assert_eq!(escrow.release(1), Some(1));
        assert_eq!(escrow.retiring(), None);
        assert_eq!(publish(&escrow).unwrap(), 3);
    }
}
