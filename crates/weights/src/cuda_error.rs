//! The GPU side's error, apart from the code that raises it ([`crate::cuda`]), so that
//! [`crate::model_file`]'s `LoadError` can carry it without the two modules depending on
//! each other.

use forkless_gpu::{GpuError, KernelError};

/// What went wrong on the GPU side of a load or an adoption.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("GPU {device}: {source}")]
    Gpu { device: u32, source: GpuError },
    #[error("GPU {device}: {source}")]
    Kernels { device: u32, source: KernelError },
    #[error("GPU {device}: the copy of the arena has checksum {actual:#x}, the original {expected:#x}: the copy is corrupt; check the GPUs (nvidia-smi -q)")]
    Replica { device: u32, expected: u64, actual: u64 },
}

impl CudaError {
    /// True when the GPU ran out of memory (retrying later may work).
    pub fn is_out_of_memory(&self) -> bool {
        let result = match self {
            CudaError::Gpu { source, .. } => source.cu_result(),
            CudaError::Kernels { source: KernelError::Gpu(source), .. } => source.cu_result(),
            CudaError::Kernels { .. } | CudaError::Replica { .. } => None,
        };
        result == Some(forkless_gpu::CuResult(2))
    }
}
