//! The demo's CUDA kernels (`kernels/linear.cu`), compiled at run time by NVRTC for the GPU at
//! hand, with safe launch wrappers.
//!
//! - `seeded_inputs`: the input rows of `{"seed": n}` requests, generated on the GPU, bit for bit
//!   the same as the host's SplitMix64 (`examples/linear/seeded.rs`);
//! - `bias_add_rowsum`: `y += bias` row by row, and each row's sum in f64 (written, not
//!   accumulated: `y_sum` needs no zeroing).
//!
//! [`Kernels::compile`] checks that NVRTC is present first ([`nvrtc_available`]), compiles for
//! the device's architecture (`sm_XY` from its compute capability), loads the module and looks up
//! both functions. Compile once per process and hold the result (about 0.4 s on an H100 with
//! NVRTC 13.0, most of it loading NVRTC and compiling).
//! Where the driver cannot JIT the PTX of a newer NVRTC (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`),
//! the same source is compiled to a CUBIN instead.
//!
//! The wrappers take cudarc-owned buffers ([`CudaSlice`]) that this process allocated; imported
//! memory must never be wrapped in a `CudaSlice` (its drop would free it).
//!
//! ```
//! assert!(forkless_gpu::kernels::LINEAR_SOURCE.contains("seeded_inputs"));
//! match forkless_gpu::Kernels::open(0) {
//!     Ok(k) => println!("kernels for {} ({})", k.arch(), k.loaded_from()),
//!     Err(e) => assert!(e.to_string().contains(": ")), // every error says what to do
//! }
//! ```

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{self, CompileOptions, Ptx};

use crate::device::{nvrtc_available, Gpu};
use crate::error::{CuResult, GpuError};

/// The CUDA source of the demo's kernels.
pub const LINEAR_SOURCE: &str = include_str!("../../../kernels/linear.cu");

/// Threads per block of `bias_add_rowsum` (the kernel's `ROWSUM_THREADS`).
const ROWSUM_THREADS: u32 = 256;
/// Threads per block of `seeded_inputs`.
const SEEDED_THREADS: u32 = 256;
/// At most this many blocks for grid-stride kernels (plenty to fill an H100).
const MAX_BLOCKS: u32 = 65_535;

/// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`: the PTX is newer than the driver's JIT.
const UNSUPPORTED_PTX_VERSION: u32 = 222;

/// What can go wrong compiling or launching the kernels. Every message ends with what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The driver, the GPU or NVRTC is missing, or a driver call failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// NVRTC rejected the source (or failed to produce code).
    #[error("NVRTC could not compile kernels/linear.cu for {arch} ({nvrtc}); log: {log}: fix the kernel source, or install an NVRTC 13 that knows {arch}")]
    Compile { arch: String, nvrtc: String, log: String },
    /// Buffer lengths that do not fit the kernel's shape.
    #[error("{kernel}: {detail}: pass buffers whose lengths match the shape")]
    Shape { kernel: &'static str, detail: String },
    /// The stream belongs to another context than the loaded module.
    #[error("{kernel}: the stream is on another CUDA context than the kernels: compile Kernels with the stream's Gpu")]
    WrongContext { kernel: &'static str },
}

/// How the module was loaded: from NVRTC's PTX (JIT by the driver) or from a CUBIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadedFrom {
    /// PTX from `compile_ptx_with_opts`, JIT-compiled by the driver.
    Ptx,
    /// A CUBIN from NVRTC (the driver could not JIT the PTX of a newer NVRTC).
    Cubin,
}

impl std::fmt::Display for LoadedFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoadedFrom::Ptx => "PTX",
            LoadedFrom::Cubin => "CUBIN",
        })
    }
}

/// The compiled kernels of `kernels/linear.cu`, loaded into one GPU's context.
#[derive(Debug)]
pub struct Kernels {
    gpu: Gpu,
    _module: Arc<CudaModule>,
    seeded_inputs: CudaFunction,
    bias_add_rowsum: CudaFunction,
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

/// Compiles [`LINEAR_SOURCE`] to PTX for `arch` (e.g. `sm_90`). Checks for NVRTC first.
pub fn compile_linear_ptx(arch: &str) -> Result<Ptx, KernelError> {
    nvrtc_available()?;
    let opts = CompileOptions {
        name: Some("linear.cu".into()),
        options: vec![format!("--gpu-architecture={arch}")],
        ..Default::default()
    };
    nvrtc::compile_ptx_with_opts(LINEAR_SOURCE, opts).map_err(|e| compile_error(arch, e))
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

/// Compiles [`LINEAR_SOURCE`] to a CUBIN for the real architecture `arch` (e.g. `sm_90`).
/// cudarc's safe API only returns PTX, so this goes through NVRTC's C API.
pub fn compile_linear_cubin(arch: &str) -> Result<Vec<u8>, KernelError> {
    use nvrtc::{result, sys};
    nvrtc_available()?;
    let fail = |what: &str, e: result::NvrtcError| KernelError::Compile {
        arch: arch.into(),
        nvrtc: format!("{e}"),
        log: format!("{what} failed"),
    };
    let src = CString::new(LINEAR_SOURCE).map_err(|_| KernelError::Compile {
        arch: arch.into(),
        nvrtc: "-".into(),
        log: "the source contains a NUL byte".into(),
    })?;
    let prog = result::create_program(&src, Some(c"linear.cu")).map_err(|e| fail("nvrtcCreateProgram", e))?;
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

impl Kernels {
    /// Opens GPU `ordinal` and compiles the kernels for it; an error, never a panic, where the
    /// driver, the GPU or NVRTC is missing.
    pub fn open(ordinal: usize) -> Result<Kernels, KernelError> {
        nvrtc_available()?;
        let gpu = Gpu::open(ordinal)?;
        Kernels::compile(&gpu)
    }

    /// Compiles [`LINEAR_SOURCE`] for `gpu`'s architecture, loads it and looks up both kernels.
    pub fn compile(gpu: &Gpu) -> Result<Kernels, KernelError> {
        nvrtc_available()?;
        let arch = arch_for(gpu.info().compute_capability);
        let ctx = gpu.context();
        let start = Instant::now();
        let ptx = compile_linear_ptx(&arch)?;
        let (module, loaded_from) = match ctx.load_module(ptx) {
            Ok(m) => (m, LoadedFrom::Ptx),
            Err(e) if CuResult::from(e).0 == UNSUPPORTED_PTX_VERSION => {
                let cubin = compile_linear_cubin(&arch)?;
                let m = ctx.load_module(Ptx::from_binary(cubin)).map_err(load_err("cuModuleLoadData(cubin)"))?;
                (m, LoadedFrom::Cubin)
            }
            Err(e) => return Err(load_err("cuModuleLoadData(ptx)")(e)),
        };
        let compile_time = start.elapsed();
        let seeded_inputs = module.load_function("seeded_inputs").map_err(load_err("cuModuleGetFunction"))?;
        let bias_add_rowsum = module.load_function("bias_add_rowsum").map_err(load_err("cuModuleGetFunction"))?;
        Ok(Kernels {
            gpu: gpu.clone(),
            _module: module,
            seeded_inputs,
            bias_add_rowsum,
            arch,
            compile_time,
            loaded_from,
        })
    }

    /// The architecture compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// How long compiling and loading took (NVRTC plus the driver's module load).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Whether the module came from PTX or (fallback) a CUBIN.
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

    /// Fills `x` (`[seeds.len(), n]` row-major) with the inputs of `{"seed": seeds[b]}`:
    /// `x[b*n + i]` is draw `i` of SplitMix64 seeded with `seeds[b]`, as on the host.
    /// Asynchronous on `stream`.
    pub fn seeded_inputs(
        &self,
        stream: &CudaStream,
        x: &mut CudaSlice<f32>,
        seeds: &CudaSlice<u64>,
        n: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "seeded_inputs";
        self.check_stream(stream, K)?;
        let batch = seeds.len();
        let total = batch.checked_mul(n).filter(|&t| t == x.len()).ok_or_else(|| KernelError::Shape {
            kernel: K,
            detail: format!("x has {} elements, seeds {batch} x n {n} need {}", x.len(), batch.saturating_mul(n)),
        })?;
        let (batch_i, n_i) = (to_i32(K, "batch", batch)?, to_i32(K, "n", n)?);
        if total == 0 {
            return Ok(());
        }
        let blocks = total.div_ceil(SEEDED_THREADS as usize).min(MAX_BLOCKS as usize) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (SEEDED_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&self.seeded_inputs);
        launch.arg(x).arg(seeds).arg(&batch_i).arg(&n_i);
        // SAFETY: the arguments match `seeded_inputs(float*, const unsigned long long*, int, int)`
        // in order and type; x holds exactly batch*n floats and seeds batch u64 (checked above),
        // so the kernel stays in bounds; both buffers belong to this stream's context (checked).
        unsafe { launch.launch(cfg) }.map_err(launch_err("cuLaunchKernel(seeded_inputs)"))?;
        Ok(())
    }

    /// `y[b*out + o] += bias[o]` for `y` of shape `[y_sum.len(), bias.len()]`, then
    /// `y_sum[b] = Σ_o y[b*out + o]` in f64. `y_sum` is overwritten (no zeroing needed); the
    /// summation order is fixed, so reruns are bit-identical. Asynchronous on `stream`.
    pub fn bias_add_rowsum(
        &self,
        stream: &CudaStream,
        y: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        y_sum: &mut CudaSlice<f64>,
    ) -> Result<(), KernelError> {
        const K: &str = "bias_add_rowsum";
        self.check_stream(stream, K)?;
        let (batch, out) = (y_sum.len(), bias.len());
        batch.checked_mul(out).filter(|&t| t == y.len()).ok_or_else(|| KernelError::Shape {
            kernel: K,
            detail: format!(
                "y has {} elements, y_sum {batch} x bias {out} need {}",
                y.len(),
                batch.saturating_mul(out)
            ),
        })?;
        let (batch_i, out_i) = (to_i32(K, "batch", batch)?, to_i32(K, "out", out)?);
        if batch == 0 {
            return Ok(());
        }
        let blocks = batch.min(MAX_BLOCKS as usize) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ROWSUM_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&self.bias_add_rowsum);
        launch.arg(y).arg(bias).arg(y_sum).arg(&batch_i).arg(&out_i);
        // SAFETY: the arguments match `bias_add_rowsum(float*, const float*, double*, int, int)`
        // in order and type; y holds batch*out floats, bias out, y_sum batch (checked above); the
        // block has the 256 threads the kernel's shared array is sized for; all buffers belong to
        // this stream's context (checked).
        unsafe { launch.launch(cfg) }.map_err(launch_err("cuLaunchKernel(bias_add_rowsum)"))?;
        Ok(())
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
    fn source_has_both_entry_points() {
        assert!(LINEAR_SOURCE.contains("extern \"C\" __global__ void seeded_inputs("));
        assert!(LINEAR_SOURCE.contains("extern \"C\" __global__ void bias_add_rowsum("));
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
        let ptx = std::panic::catch_unwind(|| compile_linear_ptx("sm_90").map(|_| ())).expect("no panic");
        let cubin = std::panic::catch_unwind(|| compile_linear_cubin("sm_90").map(|_| ())).expect("no panic");
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
