//! An arena's file descriptor as the escrow holds it, whatever its [`MemoryKind`].
//!
//! The supervisor never maps weights and never loads CUDA, so what it can check about an fd
//! depends on the kind the manifest declares:
//!
//! - [`MemoryKind::Host`]: the fd must be a sealed memfd of exactly the declared size
//!   ([`SealedArena::adopt`]); readers get a fresh `O_RDONLY` open of it, so the kernel itself
//!   refuses every write (see [`crate::host`]).
//! - [`MemoryKind::CudaVmm`]: the fd comes from `cuMemExportToShareableHandle` and only the
//!   driver can tell what it holds, so here it must merely be open and **not** a regular file:
//!   a memfd (or any file) published as device memory is refused. The size is checked by the
//!   importer's driver (`cuMemImportFromShareableHandle` + `cuMemMap` of the declared size
//!   fails on a smaller allocation). Readers get a close-on-exec duplicate of the escrowed fd:
//!   a POSIX VMM handle has no read-only variant, so read-only is enforced where it is mapped —
//!   the importer (`forkless_worker`) sets `CU_MEM_ACCESS_FLAGS_PROT_READ` on its mapping, and
//!   the driver then refuses every write through it.
//!
//! ```
//! use forkless_bus::arena::HeldArena;
//! use forkless_bus::host::ArenaWriter;
//! use forkless_bus::manifest::{ArenaDesc, MemoryKind};
//! use std::os::fd::OwnedFd;
//!
//! let desc = ArenaDesc { id: 0, kind: MemoryKind::Host, size: 4096, checksum: 0 };
//! let sealed = ArenaWriter::create("doc", desc.size).unwrap().seal().unwrap();
//! let published: OwnedFd = sealed.fd().try_clone_to_owned().unwrap();
//! let held = HeldArena::adopt(&desc, published).unwrap();
//! assert_eq!((held.kind(), held.size()), (MemoryKind::Host, 4096));
//! let for_a_reader = held.reader_fd().unwrap(); // O_RDONLY: writes are refused
//! assert!(std::fs::File::from(for_a_reader).metadata().unwrap().len() == 4096);
//! ```

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::FileType;

use crate::host::{ArenaError, MapError, SealedArena};
use crate::manifest::{ArenaDesc, MemoryKind};

/// Why a published arena fd was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(transparent)]
    Host(#[from] MapError),
    #[error(
        "arena fd declared as CUDA memory on device {device} is a {file_type}, not an exported VMM handle: refusing it (publish host arenas as kind Host)"
    )]
    NotDeviceMemory { device: u32, file_type: &'static str },
    #[error("cannot inspect arena fd declared as CUDA memory on device {device}: {source}")]
    Stat { device: u32, source: std::io::Error },
}

/// Why an fd for a reader could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReaderFdError {
    #[error(transparent)]
    Host(#[from] ArenaError),
    #[error(
        "cannot duplicate the CUDA arena fd of device {device}: {source} (raise the open-files limit, `ulimit -n`)"
    )]
    Dup { device: u32, source: std::io::Error },
}

/// One arena's memory, kept alive by the fd held here.
#[derive(Debug)]
pub enum HeldArena {
    /// A sealed memfd.
    Host(SealedArena),
    /// An exported `cuMemCreate` allocation on `device`.
    CudaVmm { fd: OwnedFd, size: u64, device: u32 },
}

impl HeldArena {
    /// Checks `fd` against what `desc` declares (see the module doc for what each kind checks)
    /// and takes it.
    pub fn adopt(desc: &ArenaDesc, fd: OwnedFd) -> Result<HeldArena, AdoptError> {
        match desc.kind {
            MemoryKind::Host => Ok(HeldArena::Host(SealedArena::adopt(fd, desc.size)?)),
            MemoryKind::CudaVmm { device } => {
                check_not_a_file(&fd, device)?;
                Ok(HeldArena::CudaVmm { fd, size: desc.size, device })
            }
        }
    }

    /// A new fd for a reader: `O_RDONLY` for host memory; for CUDA memory a close-on-exec
    /// duplicate, which the reader must map with `CU_MEM_ACCESS_FLAGS_PROT_READ`.
    pub fn reader_fd(&self) -> Result<OwnedFd, ReaderFdError> {
        match self {
            HeldArena::Host(sealed) => Ok(sealed.read_only_fd()?),
            HeldArena::CudaVmm { fd, device, .. } => {
                // try_clone uses F_DUPFD_CLOEXEC: the copy never leaks into an exec'd child.
                fd.try_clone().map_err(|source| ReaderFdError::Dup { device: *device, source })
            }
        }
    }

    /// The arena's size in bytes, as declared (and, for host memory, checked).
    pub fn size(&self) -> u64 {
        match self {
            HeldArena::Host(sealed) => sealed.size(),
            HeldArena::CudaVmm { size, .. } => *size,
        }
    }

    /// Which memory kind this is.
    pub fn kind(&self) -> MemoryKind {
        match self {
            HeldArena::Host(_) => MemoryKind::Host,
            HeldArena::CudaVmm { device, .. } => MemoryKind::CudaVmm { device: *device },
        }
    }
}

/// An exported VMM handle is never a regular file (or a folder); a memfd is one.
fn check_not_a_file(fd: &OwnedFd, device: u32) -> Result<(), AdoptError> {
    let stat = rustix::fs::fstat(fd.as_fd()).map_err(|e| AdoptError::Stat { device, source: e.into() })?;
    let file_type = match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => "regular file (a memfd or a file on disk)",
        FileType::Directory => "directory",
        _ => return Ok(()),
    };
    Err(AdoptError::NotDeviceMemory { device, file_type })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::ArenaWriter;
    use std::os::fd::AsRawFd;

    fn desc(kind: MemoryKind) -> ArenaDesc {
        ArenaDesc { id: 0, kind, size: 4096, checksum: 0 }
    }

    fn sealed_memfd() -> OwnedFd {
        let sealed = ArenaWriter::create("test", 4096).unwrap().seal().unwrap();
        sealed.fd().try_clone_to_owned().unwrap()
    }

    #[test]
    fn a_sealed_memfd_adopts_as_host() {
        let held = HeldArena::adopt(&desc(MemoryKind::Host), sealed_memfd()).unwrap();
        assert!(matches!(held, HeldArena::Host(_)));
        assert_eq!((held.kind(), held.size()), (MemoryKind::Host, 4096));
        let reader = held.reader_fd().unwrap();
        let mode = rustix::fs::fcntl_getfl(&reader).unwrap();
        assert!(!mode.intersects(rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::RDWR), "{mode:?}");
    }

    #[test]
    fn host_checks_still_apply() {
        let wrong_size = ArenaDesc { size: 8192, ..desc(MemoryKind::Host) };
        let err = HeldArena::adopt(&wrong_size, sealed_memfd()).unwrap_err();
        assert!(matches!(err, AdoptError::Host(MapError::SizeMismatch { .. })), "{err}");
        let (pipe, _) = rustix::pipe::pipe().unwrap();
        let err = HeldArena::adopt(&desc(MemoryKind::Host), pipe).unwrap_err();
        assert!(matches!(err, AdoptError::Host(MapError::NotSealed { .. })), "{err}");
    }

    #[test]
    fn a_non_file_fd_adopts_as_cuda_vmm_and_readers_get_their_own_fd() {
        let kind = MemoryKind::CudaVmm { device: 1 };
        // A pipe stands in for the driver's exported handle: open, and not a file.
        let (pipe, _writer) = rustix::pipe::pipe().unwrap();
        let raw = pipe.as_raw_fd();
        let held = HeldArena::adopt(&desc(kind), pipe).unwrap();
        assert_eq!((held.kind(), held.size()), (kind, 4096));
        let reader = held.reader_fd().unwrap();
        assert_ne!(reader.as_raw_fd(), raw);
        let flags = rustix::io::fcntl_getfd(&reader).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC), "a reader fd must not leak into exec'd children");
        drop(reader);
        assert!(held.reader_fd().is_ok(), "the escrowed fd stays open when a reader's copy closes");
    }

    #[test]
    fn a_memfd_declared_as_cuda_memory_is_refused() {
        let err = HeldArena::adopt(&desc(MemoryKind::CudaVmm { device: 0 }), sealed_memfd()).unwrap_err();
        assert!(matches!(err, AdoptError::NotDeviceMemory { device: 0, .. }), "{err}");
        assert!(err.to_string().contains("regular file"), "{err}");
    }
}
