//! forkless's CUDA kernels, compiled at run time by NVRTC for the GPU at hand, with safe launch
//! wrappers:
//!
//! - `arena_checksum` (`kernels/arena.cu`): the checksum of a cuda-vmm arena
//!   ([`crate::checksum`] defines it), read at HBM speed;
//! - `seeded_inputs` (`kernels/linear.cu`): the input rows of `{"seed": n}` requests, generated
//!   on the GPU, bit for bit the same as the host's SplitMix64 (`examples/linear/seeded.rs`);
//! - `bias_add_rowsum`: `y += bias` row by row, each row's sum in f64 (written, not
//!   accumulated: `y_sum` needs no zeroing), and each row's first values gathered;
//! - `linear_small8`/`linear_small16`: `y = W x` for batches of up to 8 / 16 at the HBM limit
//!   (on an H200, cuBLAS's fp32 kernels for such skinny products read the weights at about
//!   half of it: `gpu-probe gemm`).
//!
//! [`Kernels::load`] checks that NVRTC is present first ([`nvrtc_available`]), compiles both
//! files as one program to a CUBIN for the device's exact architecture (`sm_XY`), loads it and
//! looks the functions up. Compiling costs about 0.4 s on an H100 (most of it loading NVRTC),
//! so the CUBIN is cached in a folder (the supervisor passes one to its children), keyed by the
//! source, the architecture and NVRTC's version: a restarted process loads it in milliseconds.
//!
//! The wrappers take the caller's cudarc buffers (anything `DevicePtr`/`DevicePtrMut`) for
//! scratch data, and a [`DeviceView`] where they read weights: imported memory must never be
//! wrapped in a `CudaSlice` (its drop would free it).
//!
//! ```
//! assert!(forkless_gpu::kernels::SOURCE.contains("seeded_inputs"));
//! match forkless_gpu::Kernels::open(0) {
//!     Ok(k) => println!("kernels for {} ({})", k.arch(), k.loaded_from()),
//!     Err(e) => assert!(e.to_string().contains(": ")), // every error says what to do
//! }
//! ```

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use cudarc::driver::{CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{self, CompileOptions, Ptx};

use crate::device::{nvrtc_available, Gpu};
use crate::error::GpuError;
use crate::view::DeviceView;

/// The CUDA source of the demo's kernels.
pub const LINEAR_SOURCE: &str = include_str!("../../../kernels/linear.cu");
/// The CUDA source of the arena kernels.
pub const ARENA_SOURCE: &str = include_str!("../../../kernels/arena.cu");
/// Everything NVRTC compiles: both files, as one program.
pub const SOURCE: &str =
    concat!(include_str!("../../../kernels/arena.cu"), "\n", include_str!("../../../kernels/linear.cu"));
/// Threads per block of `arena_checksum`.
const CHECKSUM_THREADS: u32 = 256;
/// Largest head (first values per row) `bias_add_rowsum` gathers.
pub const MAX_HEAD: usize = 256;

/// Threads per block of `bias_add_rowsum` (the kernel's `ROWSUM_THREADS`).
const ROWSUM_THREADS: u32 = 1024;
/// Threads per block of `linear_small8/16` (`SMALL_THREADS`), and rows of `w` per warp
/// (`SMALL_ROWS`).
const SMALL_THREADS: u32 = 256;
const SMALL_ROWS: u32 = 4;
/// Largest batch [`Kernels::linear_small`] takes; larger ones go to cuBLAS.
pub const SMALL_MAX_BATCH: usize = 16;
/// Threads per block of `seeded_inputs`.
const SEEDED_THREADS: u32 = 256;
/// At most this many blocks for grid-stride kernels (plenty to fill an H100).
const MAX_BLOCKS: u32 = 65_535;

/// What can go wrong compiling or launching the kernels. Every message ends with what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The driver, the GPU or NVRTC is missing, or a driver call failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// NVRTC rejected the source (or failed to produce code).
    #[error("NVRTC could not compile kernels/*.cu for {arch} ({nvrtc}); log: {log}: fix the kernel source, or install an NVRTC 13 that knows {arch}")]
    Compile { arch: String, nvrtc: String, log: String },
    /// Buffer lengths that do not fit the kernel's shape.
    #[error("{kernel}: {detail}: pass buffers whose lengths match the shape")]
    Shape { kernel: &'static str, detail: String },
    /// The stream belongs to another context than the loaded module.
    #[error("{kernel}: the stream is on another CUDA context than the kernels: compile Kernels with the stream's Gpu")]
    WrongContext { kernel: &'static str },
}

/// Where the loaded CUBIN came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadedFrom {
    /// Compiled by NVRTC in this process.
    Compiled,
    /// Read from the kernel cache folder (compiled earlier by another process).
    Cache,
}

impl std::fmt::Display for LoadedFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoadedFrom::Compiled => "a CUBIN compiled by NVRTC",
            LoadedFrom::Cache => "the kernel cache",
        })
    }
}

/// The compiled kernels of `kernels/*.cu`, loaded into one GPU's context.
#[derive(Debug)]
pub struct Kernels {
    gpu: Gpu,
    _module: Arc<CudaModule>,
    arena_checksum: CudaFunction,
    seeded_inputs: CudaFunction,
    bias_add_rowsum: CudaFunction,
    linear_small8: CudaFunction,
    linear_small16: CudaFunction,
    arch: String,
    compile_time: Duration,
    loaded_from: LoadedFrom,
}

/// The NVRTC architecture name for a compute capability, e.g. `(9, 0)` → `sm_90`.
pub fn arch_for(compute_capability: (i32, i32)) -> String {
    format!("sm_{}{}", compute_capability.0, compute_capability.1)
}

/// NVRTC's version (major, minor); an error (not a panic) where NVRTC is missing.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    nvrtc_available()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: NVRTC is present (checked above), so cudarc loads the symbol instead of
    // panicking; both out-pointers are valid.
    let result = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    result.result().map_err(|e| KernelError::Compile {
        arch: "-".into(),
        nvrtc: format!("{e}"),
        log: "nvrtcVersion failed".into(),
    })?;
    Ok((major, minor))
}

/// Compiles [`SOURCE`] to PTX for `arch` (e.g. `sm_90`). Checks for NVRTC first. (The
/// kernels load from a CUBIN; PTX is for inspecting what NVRTC makes of the source.)
pub fn compile_ptx(arch: &str) -> Result<Ptx, KernelError> {
    nvrtc_available()?;
    let opts = CompileOptions {
        name: Some("forkless.cu".into()),
        options: vec![format!("--gpu-architecture={arch}")],
        ..Default::default()
    };
    nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| compile_error(arch, e))
}

fn compile_error(arch: &str, e: nvrtc::CompileError) -> KernelError {
    match e {
        nvrtc::CompileError::CompileError { nvrtc, log, .. } => KernelError::Compile {
            arch: arch.into(),
            nvrtc: format!("{nvrtc}"),
            log: log.to_string_lossy().trim().to_string(),
        },
        other => KernelError::Compile { arch: arch.into(), nvrtc: format!("{other}"), log: String::new() },
    }
}

/// Compiles [`SOURCE`] to a CUBIN for the real architecture `arch` (e.g. `sm_90`).
/// cudarc's safe API only returns PTX, so this goes through NVRTC's C API.
pub fn compile_cubin(arch: &str) -> Result<Vec<u8>, KernelError> {
    use nvrtc::{result, sys};
    nvrtc_available()?;
    let fail = |what: &str, e: result::NvrtcError| KernelError::Compile {
        arch: arch.into(),
        nvrtc: format!("{e}"),
        log: format!("{what} failed"),
    };
    let src = CString::new(SOURCE).map_err(|_| KernelError::Compile {
        arch: arch.into(),
        nvrtc: "-".into(),
        log: "the source contains a NUL byte".into(),
    })?;
    let prog = result::create_program(&src, Some(c"forkless.cu")).map_err(|e| fail("nvrtcCreateProgram", e))?;
    /// Destroys the program on every path out.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: created by `create_program` and destroyed only here, once.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let prog = Program(prog);
    let options = [format!("--gpu-architecture={arch}")];
    // SAFETY: `prog` is a live program (destroyed only by the guard); `src` outlives it.
    if let Err(e) = unsafe { result::compile_program(prog.0, &options) } {
        // SAFETY: same live program; the log is NUL-terminated by NVRTC.
        let log = unsafe { result::get_program_log(prog.0) }
            .map(|raw| {
                // SAFETY: NVRTC NUL-terminates the log it wrote into `raw`.
                unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().trim().to_string()
            })
            .unwrap_or_default();
        return Err(KernelError::Compile { arch: arch.into(), nvrtc: format!("{e}"), log });
    }
    let mut size = 0usize;
    // SAFETY: live, successfully compiled program; valid out-pointer.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| fail("nvrtcGetCUBINSize", e))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the `size` bytes NVRTC just reported.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| fail("nvrtcGetCUBIN", e))?;
    Ok(cubin)
}

/// The cache file for this source, architecture and NVRTC version inside `folder`.
pub fn cache_path(folder: &Path, arch: &str, nvrtc: (i32, i32)) -> PathBuf {
    let key = xxhash_rust::xxh3::xxh3_64(format!("{SOURCE}\0{arch}\0{}.{}", nvrtc.0, nvrtc.1).as_bytes());
    folder.join(format!("forkless-kernels-{arch}-{key:016x}.cubin"))
}

/// Writes `cubin` to `path` atomically (a sibling temp file, then rename), so a reader never
/// sees half a file. Failure only costs the next process a compile, so it is ignored.
fn store_in_cache(path: &Path, cubin: &[u8]) {
    let partial = path.with_extension(format!("partial.{}", std::process::id()));
    if std::fs::write(&partial, cubin).and_then(|()| std::fs::rename(&partial, path)).is_err() {
        let _ = std::fs::remove_file(&partial);
    }
}

impl Kernels {
    /// Opens GPU `ordinal` and compiles the kernels for it (no cache); an error, never a
    /// panic, where the driver, the GPU or NVRTC is missing.
    pub fn open(ordinal: usize) -> Result<Kernels, KernelError> {
        nvrtc_available()?;
        let gpu = Gpu::open(ordinal)?;
        Kernels::compile(&gpu)
    }

    /// Compiles the kernels for `gpu` with NVRTC, without a cache.
    pub fn compile(gpu: &Gpu) -> Result<Kernels, KernelError> {
        Kernels::load(gpu, None)
    }

    /// Loads the kernels for `gpu`'s architecture: from `cache` when it holds a CUBIN of
    /// this exact source, architecture and NVRTC version, else compiled by NVRTC (and stored
    /// there for the next process). NVRTC must be installed either way: its version is part
    /// of the key.
    pub fn load(gpu: &Gpu, cache: Option<&Path>) -> Result<Kernels, KernelError> {
        nvrtc_available()?;
        let arch = arch_for(gpu.info().compute_capability);
        let start = Instant::now();
        let cached = match cache {
            Some(folder) => Some(cache_path(folder, &arch, nvrtc_version()?)),
            None => None,
        };
        let from_cache = cached.as_deref().and_then(|path| std::fs::read(path).ok());
        let ctx = gpu.context();
        let (module, loaded_from) = match from_cache.map(|cubin| ctx.load_module(Ptx::from_binary(cubin))) {
            Some(Ok(module)) => (module, LoadedFrom::Cache),
            // A missing or unloadable cache entry (another driver, a torn file): compile.
            _ => {
                let cubin = compile_cubin(&arch)?;
                if let Some(path) = &cached {
                    store_in_cache(path, &cubin);
                }
                let module = ctx.load_module(Ptx::from_binary(cubin)).map_err(load_err("cuModuleLoadData(cubin)"))?;
                (module, LoadedFrom::Compiled)
            }
        };
        let compile_time = start.elapsed();
        let function = |name: &str| module.load_function(name).map_err(load_err("cuModuleGetFunction"));
        Ok(Kernels {
            gpu: gpu.clone(),
            arena_checksum: function("arena_checksum")?,
            seeded_inputs: function("seeded_inputs")?,
            bias_add_rowsum: function("bias_add_rowsum")?,
            linear_small8: function("linear_small8")?,
            linear_small16: function("linear_small16")?,
            _module: module,
            arch,
            compile_time,
            loaded_from,
        })
    }

    /// The architecture compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// How long loading took (NVRTC, if it ran, plus the driver's module load).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Whether the CUBIN was compiled here or read from the cache.
    pub fn loaded_from(&self) -> LoadedFrom {
        self.loaded_from
    }

    /// The GPU the kernels are loaded on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    fn check_stream(&self, stream: &CudaStream, kernel: &'static str) -> Result<(), KernelError> {
        if Arc::ptr_eq(stream.context(), self.gpu.context()) {
            Ok(())
        } else {
            Err(KernelError::WrongContext { kernel })
        }
    }

    /// The checksum ([`crate::checksum`]) of the bytes behind `arena` (whole 8-byte words),
    /// computed on the GPU; waits for the result.
    pub fn arena_checksum(&self, stream: &Arc<CudaStream>, arena: DeviceView<'_, u64>) -> Result<u64, KernelError> {
        const K: &str = "arena_checksum";
        self.check_stream(stream, K)?;
        let mut sum = stream.alloc_zeros::<u64>(1).map_err(load_err("cuMemAlloc"))?;
        let words = arena.len() as u64;
        let blocks = (arena.len().div_ceil(CHECKSUM_THREADS as usize)).clamp(1, MAX_BLOCKS as usize) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (CHECKSUM_THREADS, 1, 1), shared_mem_bytes: 0 };
        let arena_ptr = arena.ptr();
        {
            let (sum_ptr, _sum_done) = sum.device_ptr_mut(stream);
            let mut launch = stream.launch_builder(&self.arena_checksum);
            launch.arg(&arena_ptr).arg(&words).arg(&sum_ptr);
            // SAFETY: the arguments match `arena_checksum(const u64*, u64, u64*)` in order and
            // type; the kernel reads exactly `words` words from the view (borrowed, so mapped)
            // and adds into the one word of `sum`; the block size is a multiple of 32 (warp
            // shuffles); all memory belongs to this stream's context (checked).
            unsafe { launch.launch(cfg) }.map_err(launch_err("cuLaunchKernel(arena_checksum)"))?;
        }
        let total = stream.clone_dtoh(&sum).map_err(load_err("cuMemcpyDtoH"))?;
        stream.synchronize().map_err(load_err("cuStreamSynchronize"))?;
        Ok(crate::checksum::finish(total[0], arena.num_bytes() as u64))
    }

    /// Fills the first `batch × n` elements of `x` (row-major `[batch, n]`) with the inputs of
    /// `{"seed": seeds[b]}`: `x[b*n + i]` is draw `i` of SplitMix64 seeded with `seeds[b]`, as
    /// on the host. Asynchronous on `stream`.
    pub fn seeded_inputs(
        &self,
        stream: &Arc<CudaStream>,
        x: &mut impl DevicePtrMut<f32>,
        seeds: &impl DevicePtr<u64>,
        batch: usize,
        n: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "seeded_inputs";
        self.check_stream(stream, K)?;
        let total = batch.checked_mul(n).filter(|&t| t <= x.len() && batch <= seeds.len()).ok_or_else(|| {
            KernelError::Shape {
                kernel: K,
                detail: format!(
                    "x has {} elements and seeds {}; batch {batch} x n {n} do not fit",
                    x.len(),
                    seeds.len()
                ),
            }
        })?;
        let (batch_i, n_i) = (to_i32(K, "batch", batch)?, to_i32(K, "n", n)?);
        if total == 0 {
            return Ok(());
        }
        let blocks = total.div_ceil(SEEDED_THREADS as usize).min(MAX_BLOCKS as usize) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (SEEDED_THREADS, 1, 1), shared_mem_bytes: 0 };
        let (x_ptr, _x_done) = x.device_ptr_mut(stream);
        let (seeds_ptr, _seeds_done) = seeds.device_ptr(stream);
        let mut launch = stream.launch_builder(&self.seeded_inputs);
        launch.arg(&x_ptr).arg(&seeds_ptr).arg(&batch_i).arg(&n_i);
        // SAFETY: the arguments match `seeded_inputs(float*, const unsigned long long*, int, int)`
        // in order and type; x holds at least batch*n floats and seeds batch u64 (checked
        // above), so the kernel stays in bounds; both buffers belong to this stream's context.
        unsafe { launch.launch(cfg) }.map_err(launch_err("cuLaunchKernel(seeded_inputs)"))?;
        Ok(())
    }

    /// For each row `b < batch` of `y` (row-major `[batch, bias.len()]`): `y[b][o] += bias[o]`,
    /// `y_sum[b] = Σ_o y[b][o]` in f64, and `y_head[b*head + o] = y[b][o]` for `o < head`
    /// (`head <= MAX_HEAD`). `y_sum` is overwritten (no zeroing needed); the summation order is
    /// fixed, so reruns are bit-identical. Asynchronous on `stream`.
    #[allow(clippy::too_many_arguments)] // one per kernel parameter, each a distinct buffer
    pub fn bias_add_rowsum(
        &self,
        stream: &Arc<CudaStream>,
        y: &mut impl DevicePtrMut<f32>,
        bias: DeviceView<'_, f32>,
        y_sum: &mut impl DevicePtrMut<f64>,
        y_head: &mut impl DevicePtrMut<f32>,
        batch: usize,
        head: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "bias_add_rowsum";
        self.check_stream(stream, K)?;
        let out = bias.len();
        let fits = batch.checked_mul(out).is_some_and(|t| t <= y.len())
            && batch <= y_sum.len()
            && head <= out.min(MAX_HEAD)
            && batch.checked_mul(head).is_some_and(|t| t <= y_head.len());
        if !fits {
            return Err(KernelError::Shape {
                kernel: K,
                detail: format!(
                    "y has {}, y_sum {}, y_head {} elements; batch {batch} x out {out} with head {head} do not fit",
                    y.len(),
                    y_sum.len(),
                    y_head.len()
                ),
            });
        }
        let (batch_i, out_i, head_i) = (to_i32(K, "batch", batch)?, to_i32(K, "out", out)?, to_i32(K, "head", head)?);
        if batch == 0 {
            return Ok(());
        }
        let blocks = batch.min(MAX_BLOCKS as usize) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ROWSUM_THREADS, 1, 1), shared_mem_bytes: 0 };
        let bias_ptr = bias.ptr();
        let (y_ptr, _y_done) = y.device_ptr_mut(stream);
        let (sum_ptr, _sum_done) = y_sum.device_ptr_mut(stream);
        let (head_ptr, _head_done) = y_head.device_ptr_mut(stream);
        let mut launch = stream.launch_builder(&self.bias_add_rowsum);
        launch.arg(&y_ptr).arg(&bias_ptr).arg(&sum_ptr).arg(&head_ptr).arg(&batch_i).arg(&out_i).arg(&head_i);
        // SAFETY: the arguments match `bias_add_rowsum(float*, const float*, double*, float*,
        // int, int, int)` in order and type; the extents were checked above (y batch*out,
        // y_sum batch, y_head batch*head, bias out through its borrowed view); the block has
        // the 256 threads the kernel's shared array is sized for; all memory belongs to this
        // stream's context.
        unsafe { launch.launch(cfg) }.map_err(launch_err("cuLaunchKernel(bias_add_rowsum)"))?;
        Ok(())
    }
}

impl Kernels {
    /// `y[b][o] = Σ_i w[o][i] · x[b][i]` for `b < batch`, like [`crate::Blas::linear`] (same
    /// layouts, fp32), for small batches: `Ok(false)` where this kernel does not apply (batch
    /// above [`SMALL_MAX_BATCH`], `inputs` not a multiple of 4, `w` or `x` not 16-byte
    /// aligned) and the caller should use cuBLAS. Asynchronous on `stream`.
    #[allow(clippy::too_many_arguments)] // one per kernel parameter, like Blas::linear
    pub fn linear_small(
        &self,
        stream: &Arc<CudaStream>,
        w: DeviceView<'_, f32>,
        outputs: usize,
        inputs: usize,
        x: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
        batch: usize,
    ) -> Result<bool, KernelError> {
        const K: &str = "linear_small";
        self.check_stream(stream, K)?;
        crate::blas::linear_shape_fits(w.len(), outputs, inputs, x.len(), y.len(), batch)
            .map_err(|detail| KernelError::Shape { kernel: K, detail })?;
        let (x_ptr, _x_done) = x.device_ptr(stream);
        let aligned = w.ptr() % 16 == 0 && x_ptr % 16 == 0 && inputs % 4 == 0;
        if batch == 0 || outputs == 0 {
            return Ok(true); // nothing to compute
        }
        if batch > SMALL_MAX_BATCH || !aligned {
            return Ok(false);
        }
        let (batch_i, out_i, in_i) = (to_i32(K, "batch", batch)?, to_i32(K, "out", outputs)?, to_i32(K, "in", inputs)?);
        let rows_per_block = (SMALL_THREADS / 32 * SMALL_ROWS) as usize;
        let blocks = u32::try_from(outputs.div_ceil(rows_per_block))
            .map_err(|_| KernelError::Shape { kernel: K, detail: format!("{outputs} outputs need too many blocks") })?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (SMALL_THREADS, 1, 1), shared_mem_bytes: 0 };
        let function = if batch <= 8 { &self.linear_small8 } else { &self.linear_small16 };
        let w_ptr = w.ptr();
        let (y_ptr, _y_done) = y.device_ptr_mut(stream);
        let mut launch = stream.launch_builder(function);
        launch.arg(&w_ptr).arg(&x_ptr).arg(&y_ptr).arg(&batch_i).arg(&out_i).arg(&in_i);
        // SAFETY: the arguments match `linear_small8/16(const float*, const float*, float*, int,
        // int, int)` in order and type; w holds outputs*inputs, x batch*inputs and y
        // batch*outputs floats (checked above), w and x are 16-byte aligned with inputs a
        // multiple of 4 (the kernel's float4 loads), batch <= the kernel's MAXB; the block has
        // the SMALL_THREADS threads and the grid the blocks the kernel's indexing assumes; all
        // memory belongs to this stream's context.
        unsafe { launch.launch(cfg) }.map_err(launch_err("cuLaunchKernel(linear_small)"))?;
        Ok(true)
    }
}

fn to_i32(kernel: &'static str, what: &str, value: usize) -> Result<i32, KernelError> {
    i32::try_from(value)
        .map_err(|_| KernelError::Shape { kernel, detail: format!("{what} = {value} does not fit the kernel's int") })
}

fn load_err(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Gpu(GpuError::Driver { op, result: e.into() })
}

fn launch_err(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError {
    load_err(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_has_every_entry_point() {
        assert!(SOURCE.starts_with(ARENA_SOURCE) && SOURCE.ends_with(LINEAR_SOURCE));
        assert!(ARENA_SOURCE.contains("extern \"C\" __global__ void arena_checksum("));
        assert!(!ARENA_SOURCE.contains("#include"), "NVRTC gets no headers");
        assert!(ARENA_SOURCE.contains("0x9E3779B97F4A7C15ULL"), "same gamma as checksum.rs");
        assert!(LINEAR_SOURCE.contains("extern \"C\" __global__ void seeded_inputs("));
        assert!(LINEAR_SOURCE.contains("bias_add_rowsum(float* __restrict__ y"));
        assert!(LINEAR_SOURCE.contains("LINEAR_SMALL(linear_small8, 8,"));
        assert!(LINEAR_SOURCE.contains("LINEAR_SMALL(linear_small16, 16,"));
        assert!(LINEAR_SOURCE.contains(&format!("#define SMALL_THREADS {SMALL_THREADS}")));
        assert!(LINEAR_SOURCE.contains(&format!("#define SMALL_ROWS {SMALL_ROWS}")));
        assert!(!LINEAR_SOURCE.contains("#include"), "NVRTC gets no headers");
        assert!(LINEAR_SOURCE.contains(&format!("#define ROWSUM_THREADS {ROWSUM_THREADS}")));
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for((9, 0)), "sm_90");
        assert_eq!(arch_for((8, 6)), "sm_86");
    }

    #[test]
    fn without_nvrtc_compiling_is_an_error_not_a_panic() {
        let ptx = std::panic::catch_unwind(|| compile_ptx("sm_90").map(|_| ())).expect("no panic");
        let cubin = std::panic::catch_unwind(|| compile_cubin("sm_90").map(|_| ())).expect("no panic");
        let open = std::panic::catch_unwind(|| Kernels::open(0).map(|_| ())).expect("no panic");
        let version = std::panic::catch_unwind(nvrtc_version).expect("no panic");
        if nvrtc_available().is_err() {
            for err in [ptx.unwrap_err(), cubin.unwrap_err(), open.unwrap_err(), version.unwrap_err()] {
                let text = err.to_string();
                assert!(text.contains("libnvrtc.so.13"), "{text}");
                assert!(text.contains("install"), "{text}");
            }
        } else if crate::available().is_err() {
            let text = open.unwrap_err().to_string();
            assert!(text.contains(": "), "{text}");
        }
    }

    #[test]
    fn cache_entries_are_keyed_by_source_arch_and_nvrtc() {
        let folder = Path::new("/cache");
        let a = cache_path(folder, "sm_90", (13, 0));
        assert!(a.starts_with(folder) && a.to_string_lossy().ends_with(".cubin"), "{a:?}");
        assert_ne!(a, cache_path(folder, "sm_80", (13, 0)));
        assert_ne!(a, cache_path(folder, "sm_90", (13, 1)));
        assert_eq!(a, cache_path(folder, "sm_90", (13, 0)));
    }

    #[test]
    fn cache_writes_are_whole_files() {
        let dir = std::env::temp_dir().join(format!("forkless-kcache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.cubin");
        store_in_cache(&path, b"cubin bytes");
        assert_eq!(std::fs::read(&path).unwrap(), b"cubin bytes");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no partial file left behind");
        store_in_cache(&dir.join("missing-folder/k.cubin"), b"x"); // ignored, no panic
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_error_says_what_to_do() {
        let errors = [
            KernelError::Gpu(GpuError::LibraryMissing { library: "NVRTC (libnvrtc.so.13)" }),
            KernelError::Compile { arch: "sm_90".into(), nvrtc: "X".into(), log: "error: y".into() },
            KernelError::Shape { kernel: "seeded_inputs", detail: "x has 3".into() },
            KernelError::WrongContext { kernel: "bias_add_rowsum" },
        ];
        for e in errors {
            let text = e.to_string();
            let (_, advice) = text.rsplit_once(": ").unwrap_or_else(|| panic!("no advice in {text:?}"));
            assert!(advice.len() > 10, "short advice in {text:?}");
        }
    }
}
