//! Weights on a GPU: the `[cuda]` settings every process of a service gets from the supervisor,
//! and [`fill_arena`], which lays a weights file out in one VMM arena and uploads it (the owner's
//! load, and a worker's private copy in the `sharing = "none"` baseline).
//!
//! ```no_run
//! let env = forkless_bus::child_env::ChildEnv::from_env().unwrap();
//! let settings = forkless_weights::cuda::CudaSettings::from(env.cuda().expect("the cuda backend"));
//! let gpu = forkless_gpu::Gpu::open(settings.device as usize).unwrap();
//! let file = forkless_weights::ModelFile::open("model.safetensors".as_ref()).unwrap();
//! let filled = forkless_weights::cuda::fill_arena(&file, &gpu).unwrap();
//! println!("{} bytes on GPU {}", filled.desc.size, settings.device);
//! ```

use std::path::PathBuf;

use forkless_bus::manifest::MemoryKind;
use forkless_gpu::{GpuError, VmmArena};

pub use crate::cuda_error::CudaError;
use crate::model_file::ModelFile;

/// Where and how a process uses the GPU (from the supervisor's `[cuda]` config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaSettings {
    pub device: u32,
    /// The ordinal to open `device` by, where the supervisor narrowed this process's
    /// `CUDA_VISIBLE_DEVICES` to it (`None`: `device` itself).
    pub ordinal: Option<u32>,
    /// Per-thread stack limit of the context, in bytes (`None`: the driver's default).
    pub stack_limit: Option<usize>,
    /// Folder of compiled kernels shared with the workers.
    pub kernel_cache: Option<PathBuf>,
    /// The owner on several GPUs: the other devices it copies `device`'s arena to.
    pub replicas: Vec<u32>,
}

impl From<&forkless_bus::child_env::CudaEnv> for CudaSettings {
    /// The settings the supervisor passed in the child environment ([`forkless_bus::child_env`]).
    fn from(env: &forkless_bus::child_env::CudaEnv) -> Self {
        CudaSettings {
            device: env.device,
            ordinal: env.ordinal(),
            stack_limit: env.stack_limit_bytes.and_then(|b| usize::try_from(b).ok()),
            kernel_cache: env.kernel_cache.clone(),
            replicas: env.replicas.clone(),
        }
    }
}

/// A safetensors file copied into a new VMM arena on one GPU (not yet checksummed or exported).
#[derive(Debug)]
pub struct FilledArena {
    /// The arena's layout, with its real (granularity-rounded) size and kind.
    pub desc: forkless_bus::manifest::ArenaDesc,
    pub tensors: Vec<forkless_bus::TensorEntry>,
    pub arena: VmmArena,
    pub upload: forkless_gpu::UploadStats,
}

/// Why a file could not be copied onto the GPU: reading it, or the GPU.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("cannot read the weights file: {0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Gpu(GpuError),
}

/// Lays `file` out in one arena on `gpu` and uploads every tensor (the owner's load, and a
/// worker's private copy in the `sharing = "none"` baseline).
pub fn fill_arena(file: &ModelFile, gpu: &forkless_gpu::Gpu) -> Result<FilledArena, FillError> {
    let (mut desc, tensors) = file.layout();
    let arena = VmmArena::create(gpu, desc.size).map_err(FillError::Gpu)?;
    let upload = arena.upload_file(file.file(), &file.pieces(&tensors)).map_err(|e| match e {
        GpuError::Read { source, .. } => FillError::Read(source),
        other => FillError::Gpu(other),
    })?;
    desc.size = arena.size();
    desc.kind = MemoryKind::CudaVmm { device: gpu.service_device() as u32 };
    Ok(FilledArena { desc, tensors, arena, upload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_child_environment() {
        let env = forkless_bus::child_env::CudaEnv {
            device: 1,
            stack_limit_bytes: Some(64),
            kernel_cache: Some("/run/k".into()),
            replicas: vec![2, 3],
            narrowed: None,
        };
        let settings = CudaSettings::from(&env);
        let expected = CudaSettings {
            device: 1,
            ordinal: None,
            stack_limit: Some(64),
            kernel_cache: Some("/run/k".into()),
            replicas: vec![2, 3],
        };
        assert_eq!(settings, expected);
        let narrowed = forkless_bus::child_env::CudaEnv { narrowed: Some("GPU-1234".into()), ..env };
        assert_eq!(CudaSettings::from(&narrowed).ordinal, Some(0), "a narrowed worker opens ordinal 0");
        assert_eq!(CudaSettings::from(&narrowed).device, 1, "and still calls it device 1");
    }
}
