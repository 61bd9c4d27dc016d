//! Weights on a GPU: the `[cuda]` settings every process of a service gets from the supervisor,
//! and [`fill_arena`], which lays a weights file out in one VMM arena and uploads it (the owner's
//! load, and a worker's private copy in the `sharing = "none"` baseline).
//!
//! ```no_run
//! let settings = forkless_weights::cuda::CudaSettings::from_vars(&|name| std::env::var(name).ok()).unwrap();
//! let gpu = forkless_gpu::Gpu::open(settings.device as usize).unwrap();
//! let file = forkless_weights::ModelFile::open("model.safetensors".as_ref()).unwrap();
//! let filled = forkless_weights::cuda::fill_arena(&file, &gpu).unwrap();
//! println!("{} bytes on GPU {}", filled.desc.size, settings.device);
//! ```

use std::path::PathBuf;

use forkless_bus::manifest::MemoryKind;
use forkless_gpu::{GpuError, KernelError, VmmArena};

use crate::model_file::ModelFile;

/// Where and how a process uses the GPU (from the supervisor's `[cuda]` config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaSettings {
    pub device: u32,
    /// Per-thread stack limit of the context, in bytes (`None`: the driver's default).
    pub stack_limit: Option<usize>,
    /// Folder of compiled kernels shared with the workers.
    pub kernel_cache: Option<PathBuf>,
}

/// A `[cuda]` variable the supervisor set is not readable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}={value:?} is not valid: {expected}; it is set by `supervisor run`")]
pub struct SettingsError {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl CudaSettings {
    /// Reads `FORKLESS_CUDA_DEVICE` (default 0), `FORKLESS_CUDA_STACK_BYTES` and
    /// `FORKLESS_KERNEL_CACHE` through `var(name)`.
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<CudaSettings, SettingsError> {
        fn number<T: std::str::FromStr>(
            var: &dyn Fn(&str) -> Option<String>,
            name: &'static str,
        ) -> Result<Option<T>, SettingsError> {
            var(name)
                .map(|value| {
                    value.parse().map_err(|_| SettingsError { name, value, expected: "a small non-negative integer" })
                })
                .transpose()
        }
        Ok(CudaSettings {
            device: number(var, forkless_bus::ENV_CUDA_DEVICE)?.unwrap_or(0),
            stack_limit: number(var, forkless_bus::ENV_CUDA_STACK_BYTES)?,
            kernel_cache: var(forkless_bus::ENV_KERNEL_CACHE).map(PathBuf::from),
        })
    }
}

/// What went wrong on the GPU side of a load or an adoption.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("GPU {device}: {source}")]
    Gpu { device: u32, source: GpuError },
    #[error("GPU {device}: {source}")]
    Kernels { device: u32, source: KernelError },
}

impl CudaError {
    /// True when the GPU ran out of memory (retrying later may work).
    pub fn is_out_of_memory(&self) -> bool {
        let result = match self {
            CudaError::Gpu { source, .. } => source.cu_result(),
            CudaError::Kernels { source: KernelError::Gpu(source), .. } => source.cu_result(),
            CudaError::Kernels { .. } => None,
        };
        result == Some(forkless_gpu::CuResult(2))
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
    desc.kind = MemoryKind::CudaVmm { device: gpu.ordinal() as u32 };
    Ok(FilledArena { desc, tensors, arena, upload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn settings_come_from_the_supervisors_variables() {
        let settings = CudaSettings::from_vars(&vars(&[
            ("FORKLESS_CUDA_DEVICE", "1"),
            ("FORKLESS_CUDA_STACK_BYTES", "64"),
            ("FORKLESS_KERNEL_CACHE", "/run/k"),
        ]))
        .unwrap();
        assert_eq!(settings, CudaSettings { device: 1, stack_limit: Some(64), kernel_cache: Some("/run/k".into()) });
        let err = CudaSettings::from_vars(&vars(&[("FORKLESS_CUDA_DEVICE", "-1")])).unwrap_err();
        assert!(err.to_string().contains("FORKLESS_CUDA_DEVICE=\"-1\""), "{err}");
    }
}
