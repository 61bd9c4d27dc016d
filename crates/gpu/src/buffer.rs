//! [`DeviceBuffer`]: scratch memory from plain `cuMemAlloc`, usable wherever cudarc takes a
//! `CudaSlice`.
//!
//! cudarc allocates from the stream-ordered pool (`cuMemAllocAsync`), which reserves device
//! memory in 32 MiB chunks on an H100: a worker needing 8 MiB of scratch would pay 32. A
//! process that runs beside N siblings on one GPU should pay only what it uses, so long-lived
//! buffers come from `cuMemAlloc` (2 MiB granules) instead.
//!
//! ```no_run
//! # fn f(gpu: &forkless_gpu::Gpu) -> Result<(), forkless_gpu::GpuError> {
//! let stream = gpu.context().new_stream().unwrap();
//! let mut x = forkless_gpu::DeviceBuffer::<f32>::zeroed(&stream, 1024)?;
//! stream.memcpy_htod(&[1.0f32; 16], &mut x.slice_mut(0..16)).unwrap();
//! # Ok(()) }
//! ```

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};

use crate::error::{check, GpuError};

/// `len` elements of `T` in device memory from `cuMemAlloc`, zeroed, freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    /// A cudarc view of the allocation; never dropped as such (its drop would free it through
    /// the pool), but leaked back to a pointer in our drop.
    slice: ManuallyDrop<CudaSlice<T>>,
}

impl<T: DeviceRepr> DeviceBuffer<T> {
    /// Allocates and zeroes `len` elements (at least one) on `stream`'s context.
    pub fn zeroed(stream: &Arc<CudaStream>, len: usize) -> Result<DeviceBuffer<T>, GpuError> {
        let len = len.max(1);
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or(GpuError::OutOfBounds {
            offset: 0,
            len,
            size: usize::MAX as u64,
        })?;
        stream.context().bind_to_thread().map_err(|e| GpuError::Driver { op: "cuCtxSetCurrent", result: e.into() })?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: a context is current (bound above); valid out-pointer; bytes > 0.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) })?;
        // SAFETY: `ptr` is a fresh allocation of `bytes` bytes on this context.
        if let Err(e) = check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(ptr, 0, bytes) }) {
            // SAFETY: allocated above, used by nothing.
            let _ = unsafe { sys::cuMemFree_v2(ptr) };
            return Err(e);
        }
        // SAFETY: `ptr` is a valid allocation of `len * size_of::<T>()` bytes on the stream's
        // context, zeroed (a valid bit pattern for the plain-data `T`s cudarc moves); the
        // slice is never dropped as a `CudaSlice`: `Drop` below leaks it and frees `ptr` itself.
        let slice = unsafe { stream.upgrade_device_ptr::<T>(ptr, len) };
        Ok(DeviceBuffer { slice: ManuallyDrop::new(slice) })
    }
}

impl<T> Deref for DeviceBuffer<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for DeviceBuffer<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: taken exactly once, here; the field is never used again.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        let ctx = slice.stream().context().clone();
        let stream = slice.stream().clone();
        // `leak` waits for the work recorded on the slice and hands back the pointer.
        let ptr = slice.leak();
        let _ = ctx.bind_to_thread();
        let _ = stream.synchronize();
        // SAFETY: `ptr` came from cuMemAlloc in `zeroed`, its last user has finished (stream
        // synchronised), and nothing refers to it any more.
        let _ = unsafe { sys::cuMemFree_v2(ptr) };
    }
}
