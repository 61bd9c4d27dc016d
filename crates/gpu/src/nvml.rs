//! GPU memory per process, through NVML (`libnvidia-ml.so.1`, loaded at run time). NVML is
//! not CUDA: asking it creates no context, so the supervisor may call it.
//!
//! Memory that only an escrowed fd holds belongs to no process, so NVML lists it nowhere;
//! [`GpuMemory::unattributed`] is the device's used memory minus every process's, which is
//! where the escrow (and the driver's own reservation) shows.
//!
//! **Blocking.** The library is `dlopen`ed (through `LD_LIBRARY_PATH` like any library) on the
//! first [`snapshot`], and every call goes into the driver: a wedged GPU or a driver upgrade in
//! progress can make `nvmlInit_v2` or a query hang indefinitely, and nothing can cancel it. So
//! call this only from a thread that may hang, never from an async runtime's worker (the
//! supervisor's `processes::MemoryMeter` owns one thread for it and waits with a timeout).
//!
//! ```
//! // Without an NVIDIA driver this is simply `None`.
//! if let Some(memory) = forkless_gpu::nvml::snapshot() {
//!     println!("{} processes on the GPU(s)", memory.per_process.len());
//! }
//! ```

use std::collections::HashMap;
use std::sync::OnceLock;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;

/// GPU memory use right now, over every device.
#[derive(Debug, Clone, Default)]
pub struct GpuMemory {
    /// Bytes per pid (compute processes).
    pub per_process: HashMap<u32, u64>,
    /// Bytes in use on the devices in all.
    pub used: u64,
    /// `used` minus what processes account for: escrowed (fd-only) memory and the driver's own.
    pub unattributed: u64,
    /// Bytes in use per device, by NVML index (the CUDA ordinal when the process runs with
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`, as forkless's children do).
    pub per_device: std::collections::BTreeMap<u32, u64>,
}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| {
        Nvml::builder().lib_path(std::ffi::OsStr::new("libnvidia-ml.so.1")).init().or_else(|_| Nvml::init()).ok()
    })
    .as_ref()
}

/// Reads every device's compute processes and used memory; `None` without NVML.
pub fn snapshot() -> Option<GpuMemory> {
    let nvml = nvml()?;
    let mut memory = GpuMemory::default();
    for index in 0..nvml.device_count().ok()? {
        let Ok(device) = nvml.device_by_index(index) else { continue };
        let used = device.memory_info().map(|m| m.used).unwrap_or(0);
        memory.used += used;
        memory.per_device.insert(index, used);
        for process in device.running_compute_processes().unwrap_or_default() {
            if let UsedGpuMemory::Used(bytes) = process.used_gpu_memory {
                *memory.per_process.entry(process.pid).or_default() += bytes;
            }
        }
    }
    let attributed: u64 = memory.per_process.values().sum();
    memory.unattributed = memory.used.saturating_sub(attributed);
    Some(memory)
}

#[cfg(test)]
mod tests {
    #[test]
    fn absent_nvml_is_none_not_a_panic() {
        // On machines with an NVIDIA driver this reads real numbers; without, it is None.
        if let Some(memory) = super::snapshot() {
            assert!(memory.used >= memory.per_process.values().sum::<u64>() || memory.unattributed == 0);
        }
    }
}
