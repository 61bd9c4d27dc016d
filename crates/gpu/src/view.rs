//! [`DeviceView`]: a typed, bounds-checked, non-owning window into GPU memory that this crate
//! mapped (an [`ImportedArena`](crate::ImportedArena) or a [`VmmArena`](crate::VmmArena)).
//!
//! cudarc's `CudaSlice` frees its memory on drop, so imported memory must never become one.
//! A view instead borrows the arena: it cannot outlive the mapping, and dropping it does
//! nothing. cuBLAS ([`crate::Blas`]) and the kernels ([`crate::Kernels`]) take views where they
//! read weights.
//!
//! ```no_run
//! # fn f(arena: &forkless_gpu::ImportedArena) -> Result<(), forkless_gpu::GpuError> {
//! let bias = arena.view::<f32>(256, 1000)?; // 1000 f32 at byte offset 256
//! assert_eq!(bias.len(), 1000);
//! # Ok(()) }
//! ```

use std::marker::PhantomData;

use crate::error::GpuError;

/// `len` elements of `T` at device address `ptr`, valid while the arena borrowed as `'a` lives.
#[derive(Debug)]
pub struct DeviceView<'a, T> {
    ptr: u64,
    len: usize,
    _arena: PhantomData<&'a [T]>,
}

impl<T> Clone for DeviceView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DeviceView<'_, T> {}

impl<'a, T> DeviceView<'a, T> {
    /// A view of `len` elements at `offset` bytes into a mapping of `size` bytes at `base`.
    /// Checks bounds and alignment; the caller ties `'a` to the mapping.
    pub(crate) fn new(base: u64, size: u64, offset: u64, len: usize) -> Result<Self, GpuError> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or(GpuError::OutOfBounds { offset, len, size })?;
        let end = offset.checked_add(bytes as u64);
        if end.is_none_or(|end| end > size) {
            return Err(GpuError::OutOfBounds { offset, len: bytes, size });
        }
        let align = std::mem::align_of::<T>() as u64;
        if (base + offset) % align != 0 {
            return Err(GpuError::ViewMisaligned { offset, align });
        }
        Ok(DeviceView { ptr: base + offset, len, _arena: PhantomData })
    }

    /// The device address of element 0 (kernels take it as a `u64` argument).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size in bytes.
    pub fn num_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_alignment_are_checked() {
        let base = 1 << 20;
        let v = DeviceView::<f32>::new(base, 4096, 256, 960).unwrap();
        assert_eq!((v.ptr(), v.len(), v.num_bytes()), (base + 256, 960, 3840));
        assert!(DeviceView::<f32>::new(base, 4096, 256, 961).is_err());
        assert!(DeviceView::<f32>::new(base, 4096, 2, 1).is_err());
        assert!(DeviceView::<u8>::new(base, 4096, u64::MAX, 2).is_err());
        assert!(DeviceView::<f64>::new(base, 4096, 0, usize::MAX).is_err());
    }
}
