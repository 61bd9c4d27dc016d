//! The `cuda-vmm` backend of the owner: one `cuMemCreate` arena per generation on the
//! configured GPU, filled from the safetensors file, checksummed on the GPU, exported as a
//! POSIX fd for the supervisor's escrow.
//!
//! The owner holds a CUDA context only while it loads or verifies: once the fd is sent, the
//! escrow keeps the memory alive, and the owner drops its mapping and its context, so between
//! loads it costs no GPU memory at all.
//!
//! ```no_run
//! let settings = forkless_owner::cuda::CudaSettings { device: 0, stack_limit: Some(256), kernel_cache: None };
//! let loaded = forkless_owner::cuda::load("model.safetensors".as_ref(), &settings).unwrap();
//! println!("{} bytes on GPU {}", loaded.manifest.total_bytes(), settings.device);
//! ```

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Instant;

use forkless_bus::manifest::MemoryKind;
use forkless_bus::Manifest;
use forkless_gpu::{Access, ImportedArena, Kernels};

use crate::model_file::{LoadError, ModelFile};
/// The GPU pieces the owner shares with the workers' private copies (`sharing = "none"`).
pub use forkless_weights::cuda::{fill_arena, CudaError, CudaSettings, FillError, FilledArena};

/// A generation loaded onto the GPU: its manifest (generation 0 until published) and the
/// exported fd of its one arena.
#[derive(Debug)]
pub struct Loaded {
    pub manifest: Manifest,
    pub fd: OwnedFd,
}

/// Opens the GPU with the configured stack limit, and the kernels (from the cache if there).
fn open(settings: &CudaSettings) -> Result<(forkless_gpu::Gpu, Kernels), CudaError> {
    let device = settings.device;
    let gpu = forkless_gpu::Gpu::open(device as usize).map_err(|source| CudaError::Gpu { device, source })?;
    if let Some(bytes) = settings.stack_limit {
        gpu.set_stack_limit(bytes).map_err(|source| CudaError::Gpu { device, source })?;
    }
    let kernels = Kernels::load(&gpu, settings.kernel_cache.as_deref())
        .map_err(|source| CudaError::Kernels { device, source })?;
    Ok((gpu, kernels))
}

fn ms(since: Instant) -> String {
    format!("{:.1}", since.elapsed().as_secs_f64() * 1e3)
}

/// Loads `path` into a new VMM arena on the configured GPU and exports it.
pub fn load(path: &Path, settings: &CudaSettings) -> Result<Loaded, LoadError> {
    let started = Instant::now();
    let file = ModelFile::open(path)?;
    let gpu_error = |source: CudaError| LoadError::Gpu { path: path.into(), source: Box::new(source) };
    let device = settings.device;
    let on_gpu = |source| gpu_error(CudaError::Gpu { device, source });
    let (gpu, kernels) = open(settings).map_err(gpu_error)?;
    let context_ms = ms(started);
    let FilledArena { desc: mut arena_desc, tensors, arena, upload } =
        fill_arena(&file, &gpu).map_err(|e| match e {
            FillError::Read(source) => LoadError::Read { path: path.into(), source },
            FillError::Gpu(source) => on_gpu(source),
        })?;
    let copy_s = upload.total.as_secs_f64();
    let checksum_started = Instant::now();
    let words = arena.view::<u64>(0, arena.size() as usize / 8).map_err(on_gpu)?;
    let stream = gpu.context().default_stream();
    let checksum =
        kernels.arena_checksum(&stream, words).map_err(|source| gpu_error(CudaError::Kernels { device, source }))?;
    let fd = arena.export_fd().map_err(on_gpu)?;
    arena_desc.checksum = checksum;
    let bytes: u64 = tensors.iter().map(|t| t.len).sum();
    tracing::info!(
        device,
        context_ms,
        kernels = %kernels.loaded_from(),
        copy_ms = format!("{:.1}", copy_s * 1e3),
        copy_gb_per_s = format!("{:.1}", bytes as f64 / copy_s / 1e9),
        lanes = upload.lanes,
        pinning_ms = format!("{:.1}", upload.setup.as_secs_f64() * 1e3),
        checksum_ms = ms(checksum_started),
        "loaded {} onto GPU {device}",
        path.display()
    );
    Ok(Loaded { manifest: Manifest::new(path.display().to_string(), vec![arena_desc], tensors), fd })
}

/// Why an escrowed GPU generation was not adopted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("arena {arena} lives on GPU {found}, but this owner is configured for GPU {configured}")]
    Device { arena: u32, found: u32, configured: u32 },
    #[error("arena {arena} is host memory, but this owner runs the cuda backend")]
    Kind { arena: u32 },
    #[error("arena {arena} checksum is {actual:#x}, but {recorded:#x} was recorded at load")]
    Checksum { arena: u32, recorded: u64, actual: u64 },
}

/// Imports each escrowed arena read-only and recomputes its checksum on the GPU.
pub fn verify_escrowed(manifest: &Manifest, fds: Vec<OwnedFd>, settings: &CudaSettings) -> Result<(), VerifyError> {
    let device = settings.device;
    let (gpu, kernels) = open(settings)?;
    let stream = gpu.context().default_stream();
    for (desc, fd) in manifest.arenas.iter().zip(fds) {
        match desc.kind {
            MemoryKind::CudaVmm { device: found } if found != device => {
                return Err(VerifyError::Device { arena: desc.id, found, configured: device })
            }
            MemoryKind::Host => return Err(VerifyError::Kind { arena: desc.id }),
            MemoryKind::CudaVmm { .. } => {}
        }
        let gpu_err = |source| CudaError::Gpu { device, source };
        let arena = ImportedArena::import(&gpu, fd, desc.size, Access::ReadOnly).map_err(gpu_err)?;
        let words = arena.view::<u64>(0, desc.size as usize / 8).map_err(gpu_err)?;
        let actual = kernels.arena_checksum(&stream, words).map_err(|source| CudaError::Kernels { device, source })?;
        if actual != desc.checksum {
            return Err(VerifyError::Checksum { arena: desc.id, recorded: desc.checksum, actual });
        }
    }
    Ok(())
}
