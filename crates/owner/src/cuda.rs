//! The `cuda-vmm` backend of the owner: one `cuMemCreate` arena per generation on the
//! configured GPU, filled from the safetensors file, checksummed on the GPU, exported as a
//! POSIX fd for the supervisor's escrow.
//!
//! **Several GPUs** (`[cuda] devices`): the file is read once, through pinned staging buffers,
//! into the first device's arena; every other device gets a **replica** copied device to device
//! ([`forkless_gpu::VmmArena::replicate_from`]: NVLink or PCIe peer-to-peer, else through host
//! memory), checksummed on its own device against the first. The other devices' contexts and
//! arenas are made while the first one loads, so a replica costs its copy (milliseconds over
//! NVLink), not another load. A restarted owner re-adopts every device's copy by checksum.
//!
//! The owner holds CUDA contexts only while it loads or verifies: once the fds are sent, the
//! escrow keeps the memory alive, and the owner drops its mappings and its contexts, so between
//! loads it costs no GPU memory at all.
//!
//! ```no_run
//! let settings = forkless_owner::cuda::CudaSettings { device: 0, ordinal: None, stack_limit: Some(256), kernel_cache: None, replicas: vec![1] };
//! let loaded = forkless_owner::cuda::load("model.safetensors".as_ref(), &settings).unwrap();
//! println!("{} bytes on GPUs {:?}", loaded.manifest.total_bytes(), loaded.manifest.devices());
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

/// A generation loaded onto the GPU(s): its manifest (generation 0 until published) and the
/// exported fds of its arena and replicas, in the manifest's fd order.
#[derive(Debug)]
pub struct Loaded {
    pub manifest: Manifest,
    pub fds: Vec<OwnedFd>,
}

/// Opens GPU `device` with the configured stack limit, and the kernels (from the cache if there).
fn open_device(settings: &CudaSettings, device: u32) -> Result<(forkless_gpu::Gpu, Kernels), CudaError> {
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

fn open(settings: &CudaSettings) -> Result<(forkless_gpu::Gpu, Kernels), CudaError> {
    open_device(settings, settings.device)
}

/// Loads `path` into a new VMM arena on the configured GPU (and its replicas on the other
/// devices, if any) and exports them.
pub fn load(path: &Path, settings: &CudaSettings) -> Result<Loaded, LoadError> {
    if settings.replicas.is_empty() {
        return load_on_one(path, settings);
    }
    let gpu_error = |source: CudaError| LoadError::Gpu { path: path.into(), source: Box::new(source) };
    let size = ModelFile::open(path)?.layout().0.size;
    // The other devices' contexts and arenas are made while the first device loads...
    let (primary, targets) = std::thread::scope(|scope| {
        let targets: Vec<_> = settings
            .replicas
            .iter()
            .map(|&device| scope.spawn(move || ReplicaTarget::open(settings, device, size)))
            .collect();
        let primary = load_arena(path, settings);
        let targets: Vec<_> =
            targets.into_iter().map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect();
        (primary, targets)
    });
    let primary = primary?;
    let targets = targets.into_iter().collect::<Result<Vec<_>, _>>().map_err(gpu_error)?;
    // ...then each copies from it at once, device to device where it can.
    let replicas = std::thread::scope(|scope| {
        let copies: Vec<_> = targets.into_iter().map(|target| scope.spawn(|| target.copy_from(&primary))).collect();
        copies
            .into_iter()
            .map(|c| c.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(gpu_error)?;
    let Primary { desc, tensors, fd, .. } = primary;
    let mut fds = vec![fd];
    let mut descs = Vec::with_capacity(replicas.len());
    for (i, (mut replica, replica_fd)) in replicas.into_iter().enumerate() {
        replica.id = 1 + i as u32;
        descs.push(replica);
        fds.push(replica_fd);
    }
    let manifest = Manifest::new(path.display().to_string(), vec![desc], tensors).with_replicas(descs);
    Ok(Loaded { manifest, fds })
}

/// One device's arena loaded from the file: what replicas are copied from.
struct Primary {
    desc: forkless_bus::manifest::ArenaDesc,
    tensors: Vec<forkless_bus::TensorEntry>,
    arena: forkless_gpu::VmmArena,
    fd: OwnedFd,
}

/// Another device, opened and with an arena of the right size, waiting for the first
/// device's arena to be filled.
struct ReplicaTarget {
    device: u32,
    gpu: forkless_gpu::Gpu,
    kernels: Kernels,
    arena: forkless_gpu::VmmArena,
    opened: Instant,
}

impl ReplicaTarget {
    fn open(settings: &CudaSettings, device: u32, size: u64) -> Result<ReplicaTarget, CudaError> {
        let started = Instant::now();
        let (gpu, kernels) = open_device(settings, device)?;
        let arena = forkless_gpu::VmmArena::create(&gpu, size).map_err(|source| CudaError::Gpu { device, source })?;
        Ok(ReplicaTarget { device, gpu, kernels, arena, opened: started })
    }

    /// Copies the primary arena here, checks the copy's checksum on this device, exports it.
    fn copy_from(self, primary: &Primary) -> Result<(forkless_bus::manifest::ArenaDesc, OwnedFd), CudaError> {
        let device = self.device;
        let gpu_err = |source| CudaError::Gpu { device, source };
        let copied = self.arena.replicate_from(&primary.arena).map_err(gpu_err)?;
        let words = self.arena.view::<u64>(0, self.arena.size() as usize / 8).map_err(gpu_err)?;
        let stream = self.gpu.context().default_stream();
        let checksum =
            self.kernels.arena_checksum(&stream, words).map_err(|source| CudaError::Kernels { device, source })?;
        if checksum != primary.desc.checksum {
            return Err(CudaError::Replica { device, expected: primary.desc.checksum, actual: checksum });
        }
        tracing::info!(
            device,
            peer = copied.peer,
            copy_ms = format!("{:.2}", copied.elapsed.as_secs_f64() * 1e3),
            copy_gb_per_s = format!("{:.1}", self.arena.size() as f64 / copied.elapsed.as_secs_f64() / 1e9),
            since_open_ms = ms(self.opened),
            "replicated the arena onto GPU {device} ({})",
            if copied.peer { "device to device" } else { "through host memory" }
        );
        let fd = self.arena.export_fd().map_err(gpu_err)?;
        let desc = forkless_bus::manifest::ArenaDesc {
            id: 0,
            kind: MemoryKind::CudaVmm { device },
            size: self.arena.size(),
            checksum,
        };
        Ok((desc, fd))
    }
}

/// The one-device load: the arena on the configured GPU, exported.
fn load_on_one(path: &Path, settings: &CudaSettings) -> Result<Loaded, LoadError> {
    let Primary { desc, tensors, fd, .. } = load_arena(path, settings)?;
    Ok(Loaded { manifest: Manifest::new(path.display().to_string(), vec![desc], tensors), fds: vec![fd] })
}

/// Fills an arena on the configured GPU from `path`, checksums it on the GPU and exports it;
/// the arena stays mapped here (replicas are copied from it).
fn load_arena(path: &Path, settings: &CudaSettings) -> Result<Primary, LoadError> {
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
    Ok(Primary { desc: arena_desc, tensors, arena, fd })
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

/// Imports each escrowed arena (every device's copy) read-only and recomputes its checksum on
/// its own GPU; the devices are checked in parallel.
pub fn verify_escrowed(manifest: &Manifest, fds: Vec<OwnedFd>, settings: &CudaSettings) -> Result<(), VerifyError> {
    let configured: Vec<u32> = std::iter::once(settings.device).chain(settings.replicas.iter().copied()).collect();
    let mut checks = Vec::new();
    for (desc, fd) in manifest.all_arenas().zip(fds) {
        match desc.kind {
            MemoryKind::Host => return Err(VerifyError::Kind { arena: desc.id }),
            MemoryKind::CudaVmm { device } if !configured.contains(&device) => {
                return Err(VerifyError::Device { arena: desc.id, found: device, configured: settings.device })
            }
            MemoryKind::CudaVmm { device } => checks.push((desc, fd, device)),
        }
    }
    std::thread::scope(|scope| {
        let running: Vec<_> = checks
            .into_iter()
            .map(|(desc, fd, device)| scope.spawn(move || verify_one(desc, fd, settings, device)))
            .collect();
        running.into_iter().try_for_each(|check| check.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

fn verify_one(
    desc: &forkless_bus::manifest::ArenaDesc,
    fd: OwnedFd,
    settings: &CudaSettings,
    device: u32,
) -> Result<(), VerifyError> {
    let (gpu, kernels) = open_device(settings, device)?;
    let stream = gpu.context().default_stream();
    let gpu_err = |source| CudaError::Gpu { device, source };
    let arena = ImportedArena::import(&gpu, fd, desc.size, Access::ReadOnly).map_err(gpu_err)?;
    let words = arena.view::<u64>(0, desc.size as usize / 8).map_err(gpu_err)?;
    let actual = kernels.arena_checksum(&stream, words).map_err(|source| CudaError::Kernels { device, source })?;
    if actual != desc.checksum {
        return Err(VerifyError::Checksum { arena: desc.id, recorded: desc.checksum, actual });
    }
    Ok(())
}
