//! cuBLAS on weights this crate mapped: `Y = X Wᵀ` for a batch of inputs, where `W` is a
//! row-major `[out, in]` matrix read in place through a [`DeviceView`] (imported memory is
//! never a cudarc `CudaSlice`), and `X`, `Y` are the caller's own cudarc buffers.
//!
//! ```no_run
//! # fn f(gpu: &forkless_gpu::Gpu, w: forkless_gpu::DeviceView<'_, f32>) -> Result<(), forkless_gpu::GpuError> {
//! let stream = gpu.context().default_stream();
//! let blas = forkless_gpu::Blas::new(stream.clone())?;
//! let (outputs, inputs, batch) = (4, 3, 2);
//! let x = stream.clone_htod(&[1f32; 6]).unwrap();
//! let mut y = stream.alloc_zeros::<f32>(batch * outputs).unwrap();
//! blas.linear(w, outputs, inputs, &x, &mut y, batch)?;
//! # Ok(()) }
//! ```

use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::device::cublas_available;
use crate::error::GpuError;
use crate::view::DeviceView;

/// A cuBLAS handle bound to one stream.
#[derive(Debug)]
pub struct Blas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    /// The workspace given to cuBLAS instead of its own default one, if any.
    _workspace: Option<crate::DeviceBuffer<u8>>,
}

impl Blas {
    /// Creates a cuBLAS handle on `stream`; an error (not cudarc's panic) where
    /// `libcublas.so.13` is missing.
    pub fn new(stream: Arc<CudaStream>) -> Result<Blas, GpuError> {
        cublas_available()?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| GpuError::Cublas { op: "cublasCreate", status: format!("{e:?}") })?;
        Ok(Blas { blas, stream, _workspace: None })
    }

    /// Like [`Blas::new`], with a workspace of `bytes` (`cublasSetWorkspace`) instead of the
    /// one cuBLAS allocates per handle (32 MiB on Hopper): memory every worker pays. Kernels
    /// that would need more workspace than given are not chosen.
    pub fn with_workspace(stream: Arc<CudaStream>, bytes: usize) -> Result<Blas, GpuError> {
        let mut blas = Blas::new(stream)?;
        let workspace = crate::DeviceBuffer::<u8>::zeroed(&blas.stream, bytes)?;
        {
            let (ptr, _done) = workspace.device_ptr(&blas.stream);
            // SAFETY: the handle is live; `ptr` is `bytes` of device memory of this context,
            // owned by `Blas` next to the handle and dropped after it (field order), so cuBLAS
            // never uses a freed workspace.
            unsafe { sys::cublasSetWorkspace_v2(*blas.blas.handle(), ptr as *mut std::ffi::c_void, bytes) }
                .result()
                .map_err(|e| GpuError::Cublas { op: "cublasSetWorkspace", status: format!("{e:?}") })?;
        }
        blas._workspace = Some(workspace);
        Ok(blas)
    }

    /// The stream every call is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `y[b][o] = Σ_i w[o][i] · x[b][i]` for `b < batch`: `w` is `[outputs, inputs]`
    /// row-major, `x` holds at least `batch × inputs` and `y` at least `batch × outputs`
    /// floats, both row-major. One pass over `w` serves the whole batch. Asynchronous.
    pub fn linear(
        &self,
        w: DeviceView<'_, f32>,
        outputs: usize,
        inputs: usize,
        x: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
        batch: usize,
    ) -> Result<(), GpuError> {
        self.linear_as(Layout::BatchMajor, w, outputs, inputs, x, y, batch)
    }

    /// Like [`Blas::linear`], with the operands' roles swapped: `y` comes out outputs-major
    /// (`y[o][b]`, row-major `[outputs, batch]`). cuBLAS picks its kernels by shape, and a
    /// batch as the *rows* of the product gets other kernels than a batch as its columns.
    pub fn linear_outputs_major(
        &self,
        w: DeviceView<'_, f32>,
        outputs: usize,
        inputs: usize,
        x: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
        batch: usize,
    ) -> Result<(), GpuError> {
        self.linear_as(Layout::OutputsMajor, w, outputs, inputs, x, y, batch)
    }

    /// Both layouts are one `sgemm(T, N)` with every leading dimension the product's `k` or
    /// `m` (column-major view): w (row-major `[out, in]`) is `[in, out]` with ld `in`, x
    /// (row-major `[batch, in]`) is `[in, batch]` with ld `in`. Batch-major: C = op_T(w)·x is
    /// `[out, batch]` with ld `out`, i.e. y row-major `[batch, out]`. Outputs-major: C =
    /// op_T(x)·w is `[batch, out]` with ld `batch`, i.e. y row-major `[out, batch]`.
    #[allow(clippy::too_many_arguments)] // the public signature plus the layout
    fn linear_as(
        &self,
        layout: Layout,
        w: DeviceView<'_, f32>,
        outputs: usize,
        inputs: usize,
        x: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
        batch: usize,
    ) -> Result<(), GpuError> {
        let shape = |status: String| GpuError::Cublas { op: "cublasSgemm", status };
        linear_shape_fits(w.len(), outputs, inputs, x.len(), y.len(), batch).map_err(shape)?;
        let int = |v: usize| c_int::try_from(v).map_err(|_| shape(format!("{v} does not fit cuBLAS's int")));
        let (outputs, batch_i, k) = (int(outputs)?, int(batch)?, int(inputs)?);
        if batch == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1f32, 0f32);
        let (x_ptr, _x_done) = x.device_ptr(&self.stream);
        let (y_ptr, _y_done) = y.device_ptr_mut(&self.stream);
        let (w_ptr, x_ptr) = (w.ptr() as *const f32, x_ptr as *const f32);
        let (m, n, a, b) = match layout {
            Layout::BatchMajor => (outputs, batch_i, w_ptr, x_ptr),
            Layout::OutputsMajor => (batch_i, outputs, x_ptr, w_ptr),
        };
        // SAFETY: the handle is live and bound to `self.stream`; all three pointers are device
        // memory of this context with at least the extents checked above (w borrowed for the
        // call, x and y kept alive by their borrows, with cudarc's events recorded on drop of
        // the guards after the call is queued); the dimensions match those extents in either
        // layout (see above).
        unsafe {
            cudarc::cublas::result::sgemm(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha,
                a,
                k,
                b,
                k,
                &beta,
                y_ptr as *mut f32,
                m,
            )
        }
        .map_err(|e| GpuError::Cublas { op: "cublasSgemm", status: format!("{e:?}") })
    }
}

/// Which way round [`Blas::linear_as`] puts the batch.
#[derive(Debug, Clone, Copy)]
enum Layout {
    BatchMajor,
    OutputsMajor,
}

/// Whether `w` (`w_len` elements), `x` and `y` hold a linear layer of `outputs x inputs` over
/// `batch` rows; else what does not fit. Shared by cuBLAS and the `linear_small` kernel.
pub(crate) fn linear_shape_fits(
    w_len: usize,
    outputs: usize,
    inputs: usize,
    x_len: usize,
    y_len: usize,
    batch: usize,
) -> Result<(), String> {
    if outputs.checked_mul(inputs) != Some(w_len) {
        return Err(format!("weight has {w_len} elements, not {outputs} x {inputs}"));
    }
    if batch.checked_mul(inputs).is_none_or(|n| n > x_len) || batch.checked_mul(outputs).is_none_or(|n| n > y_len) {
        return Err(format!("batch {batch}: x has {x_len} and y {y_len} elements, too few"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::linear_shape_fits;

    #[test]
    fn shapes_that_do_not_hold_the_layer_are_named() {
        assert_eq!(linear_shape_fits(12, 4, 3, 6, 8, 2), Ok(()));
        assert_eq!(linear_shape_fits(12, 4, 3, 0, 0, 0), Ok(()), "an empty batch needs no room");
        assert!(linear_shape_fits(11, 4, 3, 6, 8, 2).unwrap_err().contains("weight has 11 elements, not 4 x 3"));
        assert!(linear_shape_fits(12, 4, 3, 5, 8, 2).unwrap_err().contains("x has 5"));
        assert!(linear_shape_fits(12, 4, 3, 6, 7, 2).unwrap_err().contains("y 7"));
        assert!(linear_shape_fits(0, 0, usize::MAX, 0, 0, 2).is_err(), "overflow is a misfit, not a panic");
    }
}
