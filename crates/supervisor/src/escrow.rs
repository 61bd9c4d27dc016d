//! The escrow: the supervisor holds the file descriptors of the live generation.
//!
//! A memfd (like a CUDA VMM allocation exported as an fd) lives as long as any fd or mapping of
//! it exists. Because the supervisor — which never maps the weights and never touches CUDA —
//! keeps one fd per arena, the weights outlive the owner that made them, and a worker started
//! while no owner runs still attaches from here.
//!
//! Every deposit is validated (manifest invariants; each fd a sealed memfd of the declared
//! size) before a generation number is assigned and workers can see it.
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

use std::os::fd::OwnedFd;
use std::sync::Arc;

use forkless_bus::host::{MapError, SealedArena};
use forkless_bus::manifest::ManifestError;
use forkless_bus::Manifest;
use tokio::sync::watch;

/// Why a published generation was refused.
#[derive(Debug, thiserror::Error)]
pub enum DepositError {
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("arena {arena}: {source}")]
    Arena { arena: u32, source: MapError },
    #[error("{fds} fds for {arenas} arenas")]
    FdCount { fds: usize, arenas: usize },
}

/// One generation held in escrow: its manifest and one fd per arena.
#[derive(Debug)]
pub struct EscrowedGeneration {
    pub manifest: Manifest,
    pub arenas: Vec<SealedArena>,
}

/// The current generation, observable by every bus connection.
#[derive(Debug, Clone)]
pub struct Escrow {
    current: watch::Sender<Option<Arc<EscrowedGeneration>>>,
}

impl Default for Escrow {
    fn default() -> Self {
        Escrow {
            current: watch::Sender::new(None),
        }
    }
}

impl Escrow {
    /// Validates and stores a generation; returns the number assigned to it.
    pub fn deposit(&self, mut manifest: Manifest, fds: Vec<OwnedFd>) -> Result<u64, DepositError> {
        manifest.validate()?;
        if fds.len() != manifest.arenas.len() {
            return Err(DepositError::FdCount {
                fds: fds.len(),
                arenas: manifest.arenas.len(),
            });
        }
        let arenas = manifest
            .arenas
            .iter()
            .zip(fds)
            .map(|(arena, fd)| {
                SealedArena::adopt(fd, arena.size).map_err(|source| DepositError::Arena {
                    arena: arena.id,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut number = 0;
        self.current.send_modify(|current| {
            number = current.as_ref().map_or(0, |g| g.manifest.generation) + 1;
            manifest.generation = number;
            *current = Some(Arc::new(EscrowedGeneration { manifest, arenas }));
        });
        Ok(number)
    }

    /// The current generation, if any was published.
    pub fn current(&self) -> Option<Arc<EscrowedGeneration>> {
        self.current.borrow().clone()
    }

    /// Waits until a generation exists and returns it.
    pub async fn wait_current(&self) -> Arc<EscrowedGeneration> {
        let mut rx = self.current.subscribe();
        let current = rx
            .wait_for(Option::is_some)
            .await
            .expect("escrow sender lives in self");
        current.clone().expect("waited for Some")
    }
}
