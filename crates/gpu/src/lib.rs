//! Everything in forkless that calls the CUDA driver, behind a small safe API.
//!
//! - [`available`] / [`probe`]: is there a driver and a GPU? Never panics: on a machine without
//!   CUDA it returns [`GpuError::DriverMissing`] ("… use --backend host").
//! - [`Gpu`]: a device with its primary context retained; [`Gpu::set_stack_limit`] shrinks
//!   the context (~520 MiB at the default 1 KiB stack, ~270 MiB at 64 B on an H100).
//! - [`VmmArena`]: device memory from `cuMemCreate` that can be exported as a POSIX fd
//!   ([`VmmArena::upload_file`] fills it from a file with parallel pinned copies);
//!   [`ImportedArena`]: such an fd mapped in another process, read-only for workers.
//! - [`Kernels`]: forkless's CUDA kernels (`kernels/*.cu`: the arena checksum, the demo's),
//!   compiled by NVRTC at run time for the GPU at hand, cached on disk, with safe launchers.
//! - [`DeviceView`]: a typed, non-owning window into such memory; [`Blas`]: cuBLAS on views
//!   (`y = W x` for a batch); [`DeviceBuffer`]: scratch memory from `cuMemAlloc` (not cudarc's
//!   32 MiB-per-process pool); [`checksum`]: the arena checksum the owner records and verifies.
//! - [`nvml`]: GPU memory per process (NVML; no CUDA context), for status and metrics.
//!
//! The crate builds and its tests pass without a CUDA toolkit or driver: cudarc is used with
//! dynamic loading and an explicit CUDA version (13.0), and every entry point first checks that
//! the driver library loads and has every function we call ([`driver`]), so a missing or old
//! driver is an error, not cudarc's panic. NVRTC and cuBLAS are optional:
//! [`nvrtc_available`] and [`cublas_available`] say whether they can be used.
//!
//! ```
//! match forkless_gpu::available() {
//!     Ok(info) => assert!(info.device_count > 0),
//!     Err(e) => assert!(e.to_string().contains(": ")), // every error says what to do
//! }
//! ```

// The one place besides `gpu` (bus) / `bus` (gpu) where `unsafe` is allowed (the workspace
// denies it): every block carries a `// SAFETY:` invariant (clippy's
// undocumented_unsafe_blocks, denied workspace-wide).
#![allow(unsafe_code)]

mod blas;
mod buffer;
pub mod checksum;
mod device;
mod error;
pub mod kernels;
pub mod nvml;
mod view;
mod vmm;

pub use blas::Blas;
pub use buffer::DeviceBuffer;
pub use device::{available, cublas_available, driver, nvrtc_available, probe, DeviceInfo, Gpu};
pub use error::{CuResult, GpuError};
pub use kernels::{KernelError, Kernels};
pub use view::DeviceView;
pub use vmm::{round_up, Access, ImportedArena, ReplicaCopy, UploadStats, VmmArena, WriteMethod};

/// The cudarc version this crate is built on, re-exported for NVRTC modules and cuBLAS.
pub use cudarc;
