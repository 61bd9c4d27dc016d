//! Finding the driver and the GPU, and holding a context on it.
//!
//! cudarc loads `libcuda` lazily and **panics** when it or one of its functions is missing.
//! So before the first real driver call, [`driver`] checks (once per process) that the library
//! loads and exports every function this crate uses; everything else goes through it and gets
//! a [`GpuError`] instead of a panic.
//!
//! [`probe`] / [`available`] only initialise the driver (`cuInit`) and query attributes: they
//! create **no context**, so they cost no GPU memory. [`Gpu::open`] retains the device's primary
//! context (about 0.5 GiB with the default stack limit; see [`Gpu::set_stack_limit`]).
//!
//! ```
//! match forkless_gpu::available() {
//!     Ok(info) => println!("GPU 0: {} ({} MiB)", info.name, info.total_mem >> 20),
//!     Err(e) => println!("no GPU path: {e}"), // e.g. on CI: no CUDA driver found ...
//! }
//! ```

use std::ffi::{c_char, c_int, CStr};
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::CudaContext;

use crate::error::{check, driver_err, CuResult, GpuError};

/// Every driver function this crate (and the parts of cudarc it uses) calls. Checked up front
/// so that an old or partial driver gives [`GpuError::DriverTooOld`] rather than a panic.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxGetLimit",
    "cuCtxSetLimit",
    "cuCtxSynchronize",
    "cuMemGetInfo_v2",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemSetAccess",
    "cuMemGetAllocationGranularity",
    "cuMemExportToShareableHandle",
    "cuMemImportFromShareableHandle",
    "cuMemcpyHtoD_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyDtoD_v2",
    "cuDeviceCanAccessPeer",
    "cuMemsetD8_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuStreamCreate",
    "cuStreamSynchronize",
    "cuStreamDestroy_v2",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
];

/// Checks, once per process, that the CUDA driver library loads and has every function we
/// call, then runs `cuInit`. Every public entry point of this crate goes through here first.
pub fn driver() -> Result<(), GpuError> {
    static STATE: OnceLock<Result<(), LoadFailure>> = OnceLock::new();
    STATE.get_or_init(load_driver).map_err(LoadFailure::into_error)
}

/// Why the driver could not be loaded; `Copy`, so the outcome can be cached for the process.
#[derive(Debug, Clone, Copy)]
enum LoadFailure {
    Missing,
    TooOld(&'static str),
    NoDevice(CuResult),
    Init(CuResult),
}

impl LoadFailure {
    fn into_error(self) -> GpuError {
        match self {
            LoadFailure::Missing => GpuError::DriverMissing,
            LoadFailure::TooOld(symbol) => GpuError::DriverTooOld { symbol },
            LoadFailure::NoDevice(result) => GpuError::NoDevice { result },
            LoadFailure::Init(result) => GpuError::Driver { op: "cuInit", result },
        }
    }
}

fn load_driver() -> Result<(), LoadFailure> {
    // SAFETY: `is_culib_present` dlopens the candidate names of the driver library (running
    // their initialisers, which is what loading the NVIDIA driver is meant to do) and closes
    // them again; it touches no state of ours.
    if !unsafe { sys::is_culib_present() } {
        return Err(LoadFailure::Missing);
    }
    // SAFETY: the library is present (checked just above), so `culib` returns it instead of
    // panicking; it stays loaded for the life of the process (a static in cudarc).
    let lib = unsafe { sys::culib() };
    for &symbol in REQUIRED_SYMBOLS {
        // SAFETY: we only ask whether the symbol exists; the pointer is never called or kept.
        let found = unsafe { lib.get::<*const ()>(symbol.as_bytes()) }.is_ok();
        if !found {
            return Err(LoadFailure::TooOld(symbol));
        }
    }
    // SAFETY: every symbol cudarc will load is present (checked above); `cuInit(0)` may be
    // called any number of times from any thread.
    let result = CuResult::from(unsafe { sys::cuInit(0) });
    match result.0 {
        0 => Ok(()),
        34 | 35 | 100 | 803 | 804 | 999 => Err(LoadFailure::NoDevice(result)),
        _ => Err(LoadFailure::Init(result)),
    }
}

/// Checks that NVRTC (`libnvrtc.so.13`) can be loaded, so that compiling kernels will not
/// panic inside cudarc.
pub fn nvrtc_available() -> Result<(), GpuError> {
    // SAFETY: dlopen/dlclose of the candidate names only; no state of ours is touched.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(GpuError::LibraryMissing { library: "NVRTC (libnvrtc.so.13)" })
    }
}

/// Checks that cuBLAS (`libcublas.so.13`) can be loaded, so that creating a handle will not
/// panic inside cudarc.
pub fn cublas_available() -> Result<(), GpuError> {
    // SAFETY: dlopen/dlclose of the candidate names only; no state of ours is touched.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(GpuError::LibraryMissing { library: "cuBLAS (libcublas.so.13)" })
    }
}

/// What a GPU offers, read without creating a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's ordinal among the visible devices.
    pub ordinal: usize,
    /// How many devices are visible.
    pub device_count: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Device memory in bytes.
    pub total_mem: u64,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version as `1000 * major + 10 * minor`, e.g. 13000.
    pub driver_version: i32,
    /// Whether `cuMemCreate`/`cuMemMap` (virtual memory management) work.
    pub vmm: bool,
    /// Whether VMM allocations can be exported as POSIX file descriptors.
    pub posix_fd: bool,
}

impl DeviceInfo {
    /// Fails with [`GpuError::Unsupported`] unless shared VMM arenas work on this device.
    pub fn require_vmm(&self) -> Result<(), GpuError> {
        let missing = if !self.vmm {
            Some("virtual memory management (cuMemCreate)")
        } else if !self.posix_fd {
            Some("POSIX file descriptor handles")
        } else {
            None
        };
        match missing {
            Some(feature) => Err(GpuError::Unsupported { ordinal: self.ordinal, name: self.name.clone(), feature }),
            None => Ok(()),
        }
    }
}

/// Describes GPU 0 without creating a context; `Err` (never a panic) where there is no
/// driver or no GPU.
pub fn available() -> Result<DeviceInfo, GpuError> {
    probe(0)
}

/// Describes GPU `ordinal` without creating a context.
pub fn probe(ordinal: usize) -> Result<DeviceInfo, GpuError> {
    driver()?;
    let mut count: c_int = 0;
    // SAFETY: the driver is loaded and initialised (`driver()`); `count` is a valid out-pointer.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })?;
    let count = usize::try_from(count).unwrap_or(0);
    if count == 0 {
        return Err(GpuError::NoDevice { result: CuResult::NO_DEVICE });
    }
    if ordinal >= count {
        return Err(GpuError::BadOrdinal { ordinal, count });
    }
    let dev = device_handle(ordinal)?;

    let mut name_buf = [0 as c_char; 256];
    // SAFETY: the buffer is 256 bytes and we pass its length; the driver NUL-terminates.
    check("cuDeviceGetName", unsafe { sys::cuDeviceGetName(name_buf.as_mut_ptr(), name_buf.len() as c_int, dev) })?;
    name_buf[255] = 0; // the driver NUL-terminates; a final NUL anyway
                       // SAFETY: the buffer holds a NUL-terminated string (its last byte is 0) and outlives the
                       // borrow, which ends with the copy into `name`.
    let name = unsafe { CStr::from_ptr(name_buf.as_ptr()) }.to_string_lossy().into_owned();

    let mut total: usize = 0;
    // SAFETY: valid out-pointer, valid device handle.
    check("cuDeviceTotalMem", unsafe { sys::cuDeviceTotalMem_v2(&mut total, dev) })?;
    let mut version: c_int = 0;
    // SAFETY: valid out-pointer.
    check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut version) })?;
    let attr = |a| device_attribute(dev, a);
    Ok(DeviceInfo {
        ordinal,
        device_count: count,
        name,
        total_mem: total as u64,
        compute_capability: (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        driver_version: version,
        vmm: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)? != 0,
        posix_fd: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED)? != 0,
    })
}

fn device_handle(ordinal: usize) -> Result<sys::CUdevice, GpuError> {
    let mut dev: sys::CUdevice = 0;
    // SAFETY: driver initialised by the caller; valid out-pointer; the ordinal was range-checked.
    check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, ordinal as c_int) })?;
    Ok(dev)
}

fn device_attribute(dev: sys::CUdevice, attribute: CUdevice_attribute) -> Result<i32, GpuError> {
    let mut value: c_int = 0;
    // SAFETY: valid out-pointer and device handle; attributes are plain integers.
    check("cuDeviceGetAttribute", unsafe { sys::cuDeviceGetAttribute(&mut value, attribute, dev) })?;
    Ok(value)
}

/// A GPU with its primary context retained by this process. Cheap to clone (shared context);
/// the context is released when the last clone and every arena made from it are gone.
///
/// Every method binds the context to the calling thread first, so a `Gpu` may be used from
/// any thread.
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    info: Arc<DeviceInfo>,
    /// The number the service knows this GPU by; see [`Gpu::service_device`].
    service_device: usize,
}

impl Gpu {
    /// Retains the primary context of GPU `ordinal` (creating it if this process has none).
    ///
    /// This is the expensive step of a worker's start: about 0.5 GiB of GPU memory and
    /// 0.2–0.4 s with the default limits.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        Self::open_as(ordinal, ordinal)
    }

    /// Like [`Gpu::open`], for a process whose `CUDA_VISIBLE_DEVICES` shows it fewer GPUs than
    /// the service has: `ordinal` in this process's numbering is the service's device
    /// `service_device`.
    pub fn open_as(ordinal: usize, service_device: usize) -> Result<Gpu, GpuError> {
        let info = probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(driver_err("cuDevicePrimaryCtxRetain"))?;
        Ok(Gpu { ctx, info: Arc::new(info), service_device })
    }

    /// What this GPU offers.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The device ordinal in this process's numbering (what torch and DLPack call it here).
    pub fn ordinal(&self) -> usize {
        self.info.ordinal
    }

    /// The device number in the service's numbering (`[cuda] devices`, manifests, status):
    /// the ordinal, unless the supervisor narrowed this process's view to its own GPU.
    pub fn service_device(&self) -> usize {
        self.service_device
    }

    /// The cudarc context, for NVRTC modules, streams and cuBLAS (check
    /// [`nvrtc_available`] / [`cublas_available`] before using those).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Makes this GPU's context current on the calling thread.
    pub(crate) fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(driver_err("cuCtxSetCurrent"))
    }

    pub(crate) fn cu_device(&self) -> sys::CUdevice {
        self.ctx.cu_device()
    }

    /// Sets the per-thread stack size of kernels (`CU_LIMIT_STACK_SIZE`), in bytes.
    ///
    /// The driver reserves this much for every thread the GPU can hold at once: on an H100,
    /// 1 KiB (the default) costs ~520 MiB per process, 256 B ~320 MiB, 64 B ~270 MiB. A small
    /// limit is safe: the driver raises it for a kernel launch that needs more (and keeps it).
    pub fn set_stack_limit(&self, bytes: usize) -> Result<(), GpuError> {
        self.ctx
            .set_limit(sys::CUlimit::CU_LIMIT_STACK_SIZE, bytes)
            .map_err(driver_err("cuCtxSetLimit(CU_LIMIT_STACK_SIZE)"))
    }

    /// The current per-thread stack size of kernels, in bytes.
    pub fn stack_limit(&self) -> Result<usize, GpuError> {
        self.ctx.get_limit(sys::CUlimit::CU_LIMIT_STACK_SIZE).map_err(driver_err("cuCtxGetLimit(CU_LIMIT_STACK_SIZE)"))
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`), as the driver sees it now.
    pub fn mem_info(&self) -> Result<(u64, u64), GpuError> {
        let (free, total) = self.ctx.mem_get_info().map_err(driver_err("cuMemGetInfo"))?;
        Ok((free as u64, total as u64))
    }

    /// Waits until all work of this context is done.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.ctx.synchronize().map_err(driver_err("cuCtxSynchronize"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_libcuda() -> bool {
        // SAFETY: dlopen/dlclose only.
        unsafe { sys::is_culib_present() }
    }

    #[test]
    fn available_is_an_error_not_a_panic_without_a_driver() {
        let result = std::panic::catch_unwind(available).expect("available() must not panic");
        if !has_libcuda() {
            let err = result.expect_err("no libcuda, yet available() succeeded");
            assert!(matches!(err, GpuError::DriverMissing), "{err}");
            assert!(err.to_string().contains("--backend host"));
            // The cached result is returned again, equally cleanly.
            assert!(matches!(Gpu::open(0), Err(GpuError::DriverMissing)));
        }
    }

    #[test]
    fn optional_libraries_are_checked_not_panicked() {
        let nvrtc = std::panic::catch_unwind(nvrtc_available).expect("no panic");
        let cublas = std::panic::catch_unwind(cublas_available).expect("no panic");
        if let Err(e) = nvrtc {
            assert!(e.to_string().contains("libnvrtc.so.13"));
        }
        if let Err(e) = cublas {
            assert!(e.to_string().contains("libcublas.so.13"));
        }
    }

    #[test]
    fn require_vmm_names_the_missing_feature() {
        let mut info = DeviceInfo {
            ordinal: 0,
            device_count: 1,
            name: "Test GPU".into(),
            total_mem: 1 << 30,
            compute_capability: (9, 0),
            driver_version: 13000,
            vmm: true,
            posix_fd: true,
        };
        info.require_vmm().unwrap();
        info.posix_fd = false;
        let e = info.require_vmm().unwrap_err().to_string();
        assert!(e.contains("POSIX file descriptor"), "{e}");
        info.vmm = false;
        let e = info.require_vmm().unwrap_err().to_string();
        assert!(e.contains("virtual memory management"), "{e}");
    }
}
