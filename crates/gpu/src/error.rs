//! Errors of the GPU layer. Every message ends with what to do about it.
//!
//! ```
//! use forkless_gpu::{CuResult, GpuError};
//! let err = GpuError::Driver { op: "cuMemCreate", result: CuResult(2) };
//! assert!(err.to_string().contains("CUDA_ERROR_OUT_OF_MEMORY"));
//! assert!(err.to_string().contains("free GPU memory"));
//! ```

use std::fmt;

/// A `CUresult` code returned by the CUDA driver (0 is success, never stored here).
///
/// Its [`Display`](fmt::Display) gives the symbolic name (`CUDA_ERROR_…`) and the number,
/// without calling into the driver, so it works even when the driver is gone or broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CuResult(pub u32);

impl CuResult {
    /// `CUDA_ERROR_INVALID_VALUE`.
    pub const INVALID_VALUE: CuResult = CuResult(1);
    /// `CUDA_ERROR_OUT_OF_MEMORY`.
    pub const OUT_OF_MEMORY: CuResult = CuResult(2);
    /// `CUDA_ERROR_NO_DEVICE`.
    pub const NO_DEVICE: CuResult = CuResult(100);

    /// The driver's symbolic name of this code, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "CUDA_SUCCESS",
            1 => "CUDA_ERROR_INVALID_VALUE",
            2 => "CUDA_ERROR_OUT_OF_MEMORY",
            3 => "CUDA_ERROR_NOT_INITIALIZED",
            4 => "CUDA_ERROR_DEINITIALIZED",
            34 => "CUDA_ERROR_STUB_LIBRARY",
            35 => "CUDA_ERROR_INSUFFICIENT_DRIVER",
            46 => "CUDA_ERROR_DEVICE_UNAVAILABLE",
            100 => "CUDA_ERROR_NO_DEVICE",
            101 => "CUDA_ERROR_INVALID_DEVICE",
            102 => "CUDA_ERROR_DEVICE_NOT_LICENSED",
            201 => "CUDA_ERROR_INVALID_CONTEXT",
            304 => "CUDA_ERROR_OPERATING_SYSTEM",
            400 => "CUDA_ERROR_INVALID_HANDLE",
            500 => "CUDA_ERROR_NOT_FOUND",
            700 => "CUDA_ERROR_ILLEGAL_ADDRESS",
            719 => "CUDA_ERROR_LAUNCH_FAILED",
            800 => "CUDA_ERROR_NOT_PERMITTED",
            801 => "CUDA_ERROR_NOT_SUPPORTED",
            802 => "CUDA_ERROR_SYSTEM_NOT_READY",
            803 => "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
            804 => "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
            999 => "CUDA_ERROR_UNKNOWN",
            _ => "CUDA_ERROR_(unlisted)",
        }
    }

    /// What to do about this code, as a short imperative sentence.
    pub fn hint(self) -> &'static str {
        match self.0 {
            2 => "free GPU memory (nvidia-smi shows who holds it) or make the arena smaller",
            3 | 4 => "the driver was not initialised or is shutting down; restart the process",
            34 => "a stub libcuda.so was loaded: put the real driver library first in LD_LIBRARY_PATH",
            35 | 803 | 804 => "the NVIDIA driver is older than CUDA 13 needs: update it to 580 or newer",
            46 => "the GPU is in exclusive-process mode and taken: stop the other process or change the compute mode",
            100 => "no GPU is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --backend host",
            101 => "that GPU ordinal does not exist: check nvidia-smi and CUDA_VISIBLE_DEVICES",
            400 => "the handle is not (or no longer) valid: re-import it from a live fd",
            700 | 719 => "the context hit a sticky fault and is unusable: restart this process",
            800 => "the driver refused the operation on this memory (read-only mapping or missing access)",
            801 => "this GPU or driver does not support the operation: use --backend host",
            802 => "the GPU is not ready (fabric manager or persistence daemon): check nvidia-smi",
            _ => "check `nvidia-smi` and the driver log (dmesg); if it persists, use --backend host",
        }
    }

    /// Whether the driver call succeeded.
    pub fn is_success(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for CuResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl From<cudarc::driver::sys::CUresult> for CuResult {
    fn from(value: cudarc::driver::sys::CUresult) -> Self {
        CuResult(value as u32)
    }
}

impl From<cudarc::driver::DriverError> for CuResult {
    fn from(value: cudarc::driver::DriverError) -> Self {
        CuResult::from(value.0)
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// `libcuda.so.1` (or another name cudarc tries) could not be loaded.
    #[error("no CUDA driver found (libcuda.so.1): install the NVIDIA driver, or use --backend host")]
    DriverMissing,
    /// The driver library loaded but lacks a function this crate calls.
    #[error(
        "the CUDA driver library has no `{symbol}`: update the NVIDIA driver to 580+ (CUDA 13), or use --backend host"
    )]
    DriverTooOld { symbol: &'static str },
    /// An optional CUDA library (NVRTC, cuBLAS) is not installed.
    #[error("{library} not found: install the CUDA 13 runtime libraries (or add their folder to LD_LIBRARY_PATH), or use --backend host")]
    LibraryMissing { library: &'static str },
    /// `cuInit` or a device query found no usable GPU.
    #[error("CUDA driver present but no usable GPU ({result}): {}", result.hint())]
    NoDevice { result: CuResult },
    /// The requested ordinal is out of range.
    #[error(
        "GPU {ordinal} does not exist ({count} visible): pick an ordinal below {count}, check CUDA_VISIBLE_DEVICES"
    )]
    BadOrdinal { ordinal: usize, count: usize },
    /// The device lacks virtual memory management or POSIX fd handles.
    #[error("GPU {ordinal} ({name}) does not support {feature}: shared GPU arenas need it; use --backend host")]
    Unsupported { ordinal: usize, name: String, feature: &'static str },
    /// A driver call failed.
    #[error("{op} failed: {result}: {}", result.hint())]
    Driver { op: &'static str, result: CuResult },
    /// A copy would reach outside the arena.
    #[error("{len} bytes at offset {offset} would end past the arena's {size} bytes: keep offset + len <= size")]
    OutOfBounds { offset: u64, len: usize, size: u64 },
    /// An imported arena's size is not a multiple of the allocation granularity.
    #[error("arena size {size} is not a multiple of the GPU's {granularity}-byte granularity: send the exporter's rounded size (VmmArena::size)")]
    Misaligned { size: u64, granularity: u64 },
    /// A typed view would start at an address not aligned for its element type.
    #[error("a view at byte offset {offset} is not aligned to {align} bytes: place tensors at aligned offsets")]
    ViewMisaligned { offset: u64, align: u64 },
    /// Reading the weights file for an upload failed.
    #[error("cannot read {len} bytes at offset {offset} of the weights file: {source}: check the file is complete and readable")]
    Read { offset: u64, len: usize, source: std::io::Error },
    /// cuBLAS reported an error.
    #[error("{op} failed: {status}: check the shapes passed to Blas, and that libcublas.so.13 matches the driver")]
    Cublas { op: &'static str, status: String },
    /// An arena of zero bytes was requested.
    #[error("an arena of 0 bytes was requested: ask for at least 1 byte")]
    Empty,
    /// A write was asked of a read-only mapping.
    #[error("this arena is mapped read-only: import it with Access::ReadWrite to write")]
    ReadOnly,
    /// The fd the driver returned could not be adjusted.
    #[error("cannot set close-on-exec on the exported fd: {0}; check the process's fd limits")]
    Fd(#[source] std::io::Error),
}

impl GpuError {
    /// The driver's `CUresult`, where this error came from a driver call.
    pub fn cu_result(&self) -> Option<CuResult> {
        match self {
            GpuError::Driver { result, .. } | GpuError::NoDevice { result } => Some(*result),
            _ => None,
        }
    }
}

/// Turns a raw `CUresult` into `Ok(())` or [`GpuError::Driver`] naming the call.
pub(crate) fn check(op: &'static str, result: cudarc::driver::sys::CUresult) -> Result<(), GpuError> {
    let result = CuResult::from(result);
    if result.is_success() {
        Ok(())
    } else {
        Err(GpuError::Driver { op, result })
    }
}

/// Maps a cudarc [`DriverError`](cudarc::driver::DriverError) to [`GpuError::Driver`].
pub(crate) fn driver_err(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::Driver { op, result: e.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hints() {
        assert_eq!(CuResult(2).name(), "CUDA_ERROR_OUT_OF_MEMORY");
        assert_eq!(CuResult(800).name(), "CUDA_ERROR_NOT_PERMITTED");
        assert_eq!(CuResult(12345).name(), "CUDA_ERROR_(unlisted)");
        assert_eq!(CuResult(12345).to_string(), "CUDA_ERROR_(unlisted) (12345)");
        assert!(CuResult(35).hint().contains("580"));
    }

    #[test]
    fn every_error_says_what_to_do() {
        let errors = [
            GpuError::DriverMissing,
            GpuError::DriverTooOld { symbol: "cuMemCreate" },
            GpuError::LibraryMissing { library: "libnvrtc.so.13" },
            GpuError::NoDevice { result: CuResult::NO_DEVICE },
            GpuError::BadOrdinal { ordinal: 3, count: 1 },
            GpuError::Unsupported { ordinal: 0, name: "X".into(), feature: "virtual memory management" },
            GpuError::Driver { op: "cuMemMap", result: CuResult(1) },
            GpuError::OutOfBounds { offset: 8, len: 9, size: 16 },
            GpuError::Misaligned { size: 3, granularity: 2 << 20 },
            GpuError::ViewMisaligned { offset: 2, align: 4 },
            GpuError::Read { offset: 0, len: 8, source: std::io::Error::other("x") },
            GpuError::Cublas { op: "cublasSgemm", status: "X".into() },
            GpuError::Empty,
            GpuError::ReadOnly,
            GpuError::Fd(std::io::Error::other("x")),
        ];
        for e in errors {
            let text = e.to_string();
            let (_, advice) = text.rsplit_once(": ").unwrap_or_else(|| panic!("no advice in {text:?}"));
            assert!(advice.len() > 10, "short advice in {text:?}");
        }
        assert_eq!(
            GpuError::DriverMissing.to_string(),
            "no CUDA driver found (libcuda.so.1): install the NVIDIA driver, or use --backend host"
        );
    }

    #[test]
    fn cu_result_is_exposed() {
        let e = GpuError::Driver { op: "cuMemcpyHtoD", result: CuResult(1) };
        assert_eq!(e.cu_result(), Some(CuResult::INVALID_VALUE));
        assert_eq!(GpuError::Empty.cu_result(), None);
    }
}
