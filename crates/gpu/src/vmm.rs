//! The `cuda-vmm` memory kind: one `cuMemCreate` allocation per arena, shared by POSIX fd.
//!
//! The owner creates a [`VmmArena`] (physical memory + a mapping of its own), fills it with
//! [`VmmArena::write_at`] and exports it with [`VmmArena::export_fd`]. The fd travels over the
//! bus (SCM_RIGHTS). Any process holding it, even one with no CUDA context, keeps the physical
//! memory alive: the memory is freed only when every fd and every mapping of it are gone. A
//! worker maps it with [`ImportedArena::import`], read-only; the driver then refuses writes.
//!
//! Sizes and mapped ranges are multiples of the allocation granularity (2 MiB on current GPUs);
//! [`VmmArena::create`] rounds up, and [`VmmArena::size`] is what importers must be told.
//!
//! Imported memory is never wrapped in cudarc's `CudaSlice`: its drop would `cuMemFree` memory
//! that `cuMemCreate` made. Use [`ImportedArena::device_ptr`] and the arena's lifetime instead.
//!
//! ```no_run
//! use forkless_gpu::{Access, Gpu, ImportedArena, VmmArena};
//! let gpu = Gpu::open(0)?;
//! let arena = VmmArena::create(&gpu, 3 << 20)?; // rounded up to 4 MiB
//! arena.write_at(0, b"weights")?;
//! let fd = arena.export_fd()?; // send this to another process
//! let view = ImportedArena::import(&gpu, fd, arena.size(), Access::ReadOnly)?;
//! assert_eq!(view.read_at(0, 7)?, b"weights");
//! assert!(view.attempt_write(0, b"x", forkless_gpu::WriteMethod::Memcpy).is_err());
//! # Ok::<(), forkless_gpu::GpuError>(())
//! ```

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use cudarc::driver::sys::{
    self, CUmemAccess_flags, CUmemAllocationGranularity_flags, CUmemAllocationHandleType, CUmemAllocationType,
    CUmemLocationType,
};

use crate::device::Gpu;
use crate::error::{check, GpuError};

/// Writes up to this size go straight from pageable memory; larger ones through pinned staging.
const DIRECT_WRITE_MAX: usize = 1 << 20;
/// Size of each of the two pinned staging buffers of [`VmmArena::write_at`].
const STAGING_CHUNK: usize = 16 << 20;
/// Size of each pinned buffer of an upload lane ([`VmmArena::upload_file`]): large enough for
/// full-speed DMA, small enough that pinning the buffers costs little at start.
const UPLOAD_CHUNK: usize = 4 << 20;
/// At most this many upload lanes (threads reading the file in parallel).
const MAX_UPLOAD_LANES: usize = 8;

/// How an upload went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadStats {
    /// Threads that read and copied in parallel.
    pub lanes: usize,
    /// The slowest lane's setup (stream, events and two pinned buffers).
    pub setup: std::time::Duration,
    /// The whole upload, setup included.
    pub total: std::time::Duration,
}

/// How an importer may touch an arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `CU_MEM_ACCESS_FLAGS_PROT_READ`: the driver refuses writes (workers).
    ReadOnly,
    /// `CU_MEM_ACCESS_FLAGS_PROT_READWRITE` (an owner re-adopting its arena).
    ReadWrite,
}

impl Access {
    fn flags(self) -> CUmemAccess_flags {
        match self {
            Access::ReadOnly => CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READ,
            Access::ReadWrite => CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        }
    }
}

/// How [`ImportedArena::attempt_write`] asks the driver to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    /// `cuMemcpyHtoD` of the given bytes.
    Memcpy,
    /// `cuMemsetD8` with the first given byte over the given length (runs on the GPU).
    Memset,
}

/// Rounds `size` up to a multiple of `granularity` (a power of two, or any non-zero value);
/// `None` on overflow or a zero granularity.
///
/// ```
/// assert_eq!(forkless_gpu::round_up(1, 2 << 20), Some(2 << 20));
/// assert_eq!(forkless_gpu::round_up(4 << 20, 2 << 20), Some(4 << 20));
/// ```
pub fn round_up(size: u64, granularity: u64) -> Option<u64> {
    if granularity == 0 {
        return None;
    }
    size.checked_add(granularity - 1).map(|s| s / granularity * granularity)
}

fn allocation_prop(gpu: &Gpu) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        location: sys::CUmemLocation { type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: gpu.cu_device() },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

impl Gpu {
    /// The allocation granularity of shareable device memory (`cuMemGetAllocationGranularity`,
    /// minimum): arena sizes and mapped ranges are multiples of it. 2 MiB on an H100.
    pub fn granularity(&self) -> Result<u64, GpuError> {
        self.bind()?;
        let prop = allocation_prop(self);
        let mut granularity: usize = 0;
        // SAFETY: context bound; `prop` is a fully initialised allocation description and
        // `granularity` a valid out-pointer.
        check("cuMemGetAllocationGranularity", unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut granularity,
                &prop,
                CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        })?;
        Ok(granularity as u64)
    }
}

/// A reserved virtual range with one allocation mapped into it. Unmaps and frees the range on
/// drop. The allocation handle itself is the caller's to release.
#[derive(Debug)]
struct Mapping {
    gpu: Gpu,
    ptr: sys::CUdeviceptr,
    size: usize,
    mapped: bool,
}

impl Mapping {
    /// Reserves `size` bytes of address space, maps `handle` there and grants `access` to
    /// this GPU. On failure everything done so far is undone.
    fn new(
        gpu: &Gpu,
        handle: sys::CUmemGenericAllocationHandle,
        size: usize,
        access: Access,
    ) -> Result<Mapping, GpuError> {
        gpu.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: context bound; valid out-pointer; alignment 0 = the granularity, no fixed
        // address, no flags.
        check("cuMemAddressReserve", unsafe { sys::cuMemAddressReserve(&mut ptr, size, 0, 0, 0) })?;
        let mut mapping = Mapping { gpu: gpu.clone(), ptr, size, mapped: false };
        // SAFETY: `ptr..ptr+size` was just reserved and is unused; `handle` is a live
        // allocation handle of at least `size` bytes (the driver checks and fails otherwise).
        check("cuMemMap", unsafe { sys::cuMemMap(ptr, size, 0, handle, 0) })?;
        mapping.mapped = true;
        let desc = sys::CUmemAccessDesc {
            location: sys::CUmemLocation { type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: gpu.cu_device() },
            flags: access.flags(),
        };
        // SAFETY: the whole range is mapped (above); `desc` points to one initialised entry.
        check("cuMemSetAccess", unsafe { sys::cuMemSetAccess(ptr, size, &desc, 1) })?;
        Ok(mapping)
    }

    /// The device address of `offset`, once `offset + len` is checked to be inside.
    fn at(&self, offset: u64, len: usize) -> Result<sys::CUdeviceptr, GpuError> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.size as u64) {
            return Err(GpuError::OutOfBounds { offset, len, size: self.size as u64 });
        }
        Ok(self.ptr + offset)
    }

    fn read_into(&self, offset: u64, out: &mut [u8]) -> Result<(), GpuError> {
        let src = self.at(offset, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        self.gpu.bind()?;
        // SAFETY: `src..src+len` lies inside our live mapping (checked by `at`), which every
        // mapping grants at least read access; `out` is a valid writable host buffer of len.
        check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast::<c_void>(), src, out.len()) })
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, GpuError> {
        self.at(offset, len)?;
        let mut out = vec![0u8; len];
        self.read_into(offset, &mut out)?;
        Ok(out)
    }

    fn write_pageable(&self, offset: u64, bytes: &[u8]) -> Result<(), GpuError> {
        let dst = self.at(offset, bytes.len())?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.gpu.bind()?;
        // SAFETY: `dst..dst+len` lies inside our live mapping (checked by `at`); `bytes` is a
        // valid host buffer. If the mapping is read-only the driver returns an error.
        check("cuMemcpyHtoD", unsafe { sys::cuMemcpyHtoD_v2(dst, bytes.as_ptr().cast::<c_void>(), bytes.len()) })
    }

    fn memset(&self, offset: u64, value: u8, len: usize) -> Result<(), GpuError> {
        let dst = self.at(offset, len)?;
        self.gpu.bind()?;
        // SAFETY: `dst..dst+len` lies inside our live mapping (checked by `at`).
        check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(dst, value, len) })?;
        self.gpu.synchronize()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the context is still alive (we hold a clone).
        let _ = self.gpu.bind();
        if self.mapped {
            // SAFETY: `ptr..ptr+size` is mapped by us and nothing refers to it any more (the
            // arena owning this mapping is being dropped, and no view outlives it).
            let _ = unsafe { sys::cuMemUnmap(self.ptr, self.size) };
        }
        // SAFETY: the range was reserved by us with this size and is no longer mapped.
        let _ = unsafe { sys::cuMemAddressFree(self.ptr, self.size) };
    }
}

/// Two pinned host buffers and a stream: large host-to-device writes are copied into one
/// buffer while the other is on its way to the GPU.
#[derive(Debug)]
struct Staging {
    gpu: Gpu,
    chunk: usize,
    stream: sys::CUstream,
    buffers: [*mut u8; 2],
    events: [sys::CUevent; 2],
    in_flight: [bool; 2],
    next: usize,
}

// SAFETY: the raw pointers are owned exclusively by this struct (pinned host buffers, a
// stream and events of a context we hold); the driver objects may be used from any thread,
// and access is serialised by the `Mutex` around the staging.
unsafe impl Send for Staging {}

impl Staging {
    fn new(gpu: &Gpu, chunk: usize) -> Result<Staging, GpuError> {
        gpu.bind()?;
        let mut staging = Staging {
            gpu: gpu.clone(),
            chunk,
            stream: std::ptr::null_mut(),
            buffers: [std::ptr::null_mut(); 2],
            events: [std::ptr::null_mut(); 2],
            in_flight: [false; 2],
            next: 0,
        };
        // SAFETY: context bound; valid out-pointer; flag 1 = CU_STREAM_NON_BLOCKING.
        check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut staging.stream, 1) })?;
        for i in 0..2 {
            // SAFETY: valid out-pointer; flag 2 = CU_EVENT_DISABLE_TIMING.
            check("cuEventCreate", unsafe { sys::cuEventCreate(&mut staging.events[i], 2) })?;
        }
        staging.pin(0)?;
        Ok(staging)
    }

    /// Allocates pinned buffer `b` if it is not yet. Pinning costs ~0.5 ms per MiB, so the
    /// second buffer is pinned only when first needed: while the first one's copy is running.
    fn pin(&mut self, b: usize) -> Result<(), GpuError> {
        if !self.buffers[b].is_null() {
            return Ok(());
        }
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; flags 0 = portable-less page-locked host memory.
        check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut ptr, self.chunk, 0) })?;
        self.buffers[b] = ptr.cast::<u8>();
        Ok(())
    }

    /// Copies `bytes` to device address `dst` through the two buffers; returns once the GPU
    /// has all of it (also on error, so the buffers are never reused while in flight).
    fn write(&mut self, dst: sys::CUdeviceptr, bytes: &[u8]) -> Result<(), GpuError> {
        self.gpu.bind()?;
        let chunk = self.chunk;
        let result = bytes.chunks(chunk).enumerate().try_for_each(|(i, piece)| {
            self.send(dst + (i * chunk) as u64, piece.len(), |buffer| {
                buffer.copy_from_slice(piece);
                Ok(())
            })
        });
        result.and(self.finish())
    }

    /// Fills the next free buffer with `len <= chunk` bytes through `fill` and starts its copy
    /// to `dst`, without waiting for it. The caller checked `dst..dst+len` to be inside a live
    /// mapping, and calls [`Self::finish`] before returning to its own caller.
    fn send(
        &mut self,
        dst: sys::CUdeviceptr,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        debug_assert!(len <= self.chunk);
        let b = self.next;
        self.next = 1 - b;
        self.pin(b)?;
        if self.in_flight[b] {
            // SAFETY: our own live event, recorded after the last copy from buffer `b`.
            check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(self.events[b]) })?;
            self.in_flight[b] = false;
        }
        // SAFETY: buffer `b` holds `chunk >= len` bytes allocated by us, and no copy reads it
        // (its event completed above), so a unique mutable slice over it is sound.
        let buffer = unsafe { std::slice::from_raw_parts_mut(self.buffers[b], len) };
        fill(buffer)?;
        // SAFETY: the caller checked `dst..dst+len` to be inside a live mapping; the pinned
        // source stays untouched until the event below has completed.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, self.buffers[b].cast::<c_void>(), len, self.stream)
        })?;
        // SAFETY: our own live event and stream.
        check("cuEventRecord", unsafe { sys::cuEventRecord(self.events[b], self.stream) })?;
        self.in_flight[b] = true;
        Ok(())
    }

    /// Waits until every copy started by [`Self::send`] has landed.
    fn finish(&mut self) -> Result<(), GpuError> {
        // SAFETY: our own live stream.
        let synced = check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(self.stream) });
        self.in_flight = [false; 2];
        synced
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        if !self.stream.is_null() {
            // SAFETY: our own stream; wait so no copy still reads the buffers freed below.
            let _ = unsafe { sys::cuStreamSynchronize(self.stream) };
        }
        for i in 0..2 {
            if !self.events[i].is_null() {
                // SAFETY: our own event, no longer waited on.
                let _ = unsafe { sys::cuEventDestroy_v2(self.events[i]) };
            }
            if !self.buffers[i].is_null() {
                // SAFETY: allocated by cuMemHostAlloc above; no copy uses it (stream synced).
                let _ = unsafe { sys::cuMemFreeHost(self.buffers[i].cast::<c_void>()) };
            }
        }
        if !self.stream.is_null() {
            // SAFETY: our own stream, idle.
            let _ = unsafe { sys::cuStreamDestroy_v2(self.stream) };
        }
    }
}

/// How [`VmmArena::replicate_from`] copied an arena to another GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaCopy {
    /// Device to device over a peer link (else through host memory).
    pub peer: bool,
    pub elapsed: std::time::Duration,
}

/// An arena this process created: device memory from `cuMemCreate`, requested with a POSIX fd
/// handle type, mapped read-write here. Dropping it unmaps and releases this process's
/// reference; the memory itself lives on while an exported fd or another mapping exists.
#[derive(Debug)]
pub struct VmmArena {
    // Field order matters: the staging (which uses the context) and the mapping go first.
    staging: Mutex<Option<Staging>>,
    mapping: Mapping,
    handle: sys::CUmemGenericAllocationHandle,
}

impl VmmArena {
    /// Allocates at least `size` bytes (rounded up to [`Gpu::granularity`]) on `gpu`, maps
    /// them read-write for this process and returns the arena. Contents start undefined.
    pub fn create(gpu: &Gpu, size: u64) -> Result<VmmArena, GpuError> {
        gpu.info().require_vmm()?;
        if size == 0 {
            return Err(GpuError::Empty);
        }
        let granularity = gpu.granularity()?;
        let rounded = round_up(size, granularity).ok_or(GpuError::Misaligned { size, granularity })?;
        let rounded = usize::try_from(rounded).map_err(|_| GpuError::Misaligned { size, granularity })?;
        gpu.bind()?;
        let prop = allocation_prop(gpu);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: context bound; `prop` fully initialised; `rounded` is a multiple of the
        // granularity for exactly this `prop`; valid out-pointer; flags must be 0.
        check("cuMemCreate", unsafe { sys::cuMemCreate(&mut handle, rounded, &prop, 0) })?;
        match Mapping::new(gpu, handle, rounded, Access::ReadWrite) {
            Ok(mapping) => Ok(VmmArena { staging: Mutex::new(None), mapping, handle }),
            Err(e) => {
                // SAFETY: the handle was created above and is not mapped (Mapping undid it).
                let _ = unsafe { sys::cuMemRelease(handle) };
                Err(e)
            }
        }
    }

    /// The arena's size in bytes (the requested size rounded up to the granularity). Importers
    /// must map exactly this size.
    pub fn size(&self) -> u64 {
        self.mapping.size as u64
    }

    /// The device address of byte 0 in this process (valid while `self` lives).
    pub fn device_ptr(&self) -> u64 {
        self.mapping.ptr
    }

    /// Copies `bytes` into the arena at `offset`. Writes over 1 MiB go through two pinned
    /// staging buffers (allocated on first use, 32 MiB, kept until [`Self::release_staging`] or
    /// drop), overlapping the host copy with the transfer. Returns once the data is on the GPU.
    ///
    /// Measured on an H100 VM (256 MiB): 7.5 GB/s staged against 7.8 GB/s pageable, both bound
    /// by the host's single-threaded memcpy (10.6 GB/s). Staging only pays off where memcpy is
    /// much faster than the driver's pageable path; to go beyond it, the source itself must be
    /// registered (`cuMemHostRegister`, ~55 GB/s), which this crate does not do yet.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), GpuError> {
        if bytes.len() <= DIRECT_WRITE_MAX {
            return self.mapping.write_pageable(offset, bytes);
        }
        let dst = self.mapping.at(offset, bytes.len())?;
        let mut staging = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        if staging.is_none() {
            *staging = Some(Staging::new(&self.mapping.gpu, STAGING_CHUNK)?);
        }
        match staging.as_mut() {
            Some(s) => s.write(dst, bytes),
            None => unreachable!("staging was just created"),
        }
    }

    /// Copies `bytes` to `offset` straight from pageable host memory (one `cuMemcpyHtoD`, no
    /// staging): the simplest path, slower for large writes.
    pub fn write_at_pageable(&self, offset: u64, bytes: &[u8]) -> Result<(), GpuError> {
        self.mapping.write_pageable(offset, bytes)
    }

    /// Frees the pinned staging buffers, if any (they come back on the next large write).
    pub fn release_staging(&self) {
        let mut staging = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        *staging = None;
    }

    /// Sets `len` bytes at `offset` to `value` on the GPU (`cuMemsetD8`).
    pub fn fill(&self, offset: u64, value: u8, len: usize) -> Result<(), GpuError> {
        self.mapping.memset(offset, value, len)
    }

    /// Copies `len` bytes at `offset` back to the host.
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, GpuError> {
        self.mapping.read_at(offset, len)
    }

    /// Copies pieces of `file` into the arena: `pieces` are `(file_offset, arena_offset, len)`.
    /// Several threads (one per core, at most 8) each `pread` 4 MiB chunks into two pinned
    /// buffers of their own and copy them to the GPU on their own stream, so reading the page
    /// cache, which one thread does at ~10 GB/s, overlaps with the DMA of PCIe (~55 GB/s
    /// pinned). Returns once the GPU holds every byte, or the first error.
    pub fn upload_file(&self, file: &std::fs::File, pieces: &[(u64, u64, u64)]) -> Result<UploadStats, GpuError> {
        let started = std::time::Instant::now();
        let chunks = upload_chunks(pieces);
        for &(_, at, len) in &chunks {
            self.mapping.at(at, len)?;
        }
        let lanes = std::thread::available_parallelism().map_or(4, |n| n.get()).min(MAX_UPLOAD_LANES);
        let lanes = lanes.min(chunks.len()).max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let setups = std::thread::scope(|scope| {
            let handles: Vec<_> =
                (0..lanes).map(|_| scope.spawn(|| self.upload_lane(file, &chunks, &next, &failed))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let setup = setups.into_iter().max().unwrap_or_default();
        Ok(UploadStats { lanes, setup, total: started.elapsed() })
    }

    /// One upload thread: takes chunks off the shared counter until none is left.
    fn upload_lane(
        &self,
        file: &std::fs::File,
        chunks: &[(u64, u64, usize)],
        next: &std::sync::atomic::AtomicUsize,
        failed: &std::sync::atomic::AtomicBool,
    ) -> Result<std::time::Duration, GpuError> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        let started = std::time::Instant::now();
        let mut staging = Staging::new(&self.mapping.gpu, UPLOAD_CHUNK)?;
        let setup = started.elapsed();
        let result = loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(from, at, len)) = chunks.get(i) else { break Ok(()) };
            if failed.load(Ordering::Relaxed) {
                break Ok(());
            }
            let dst = self.mapping.ptr + at;
            let sent = staging.send(dst, len, |buffer| {
                file.read_exact_at(buffer, from).map_err(|source| GpuError::Read { offset: from, len, source })
            });
            if let Err(e) = sent {
                failed.store(true, Ordering::Relaxed);
                break Err(e);
            }
        };
        result.and(staging.finish()).map(|()| setup)
    }

    /// A typed view of `len` elements at byte `offset` (bounds and alignment checked).
    pub fn view<T>(&self, offset: u64, len: usize) -> Result<crate::DeviceView<'_, T>, GpuError> {
        crate::DeviceView::new(self.mapping.ptr, self.mapping.size as u64, offset, len)
    }

    /// Fills this arena with the bytes of `source`, an arena of the same size on another GPU
    /// of this process (a replica for a multi-GPU generation).
    ///
    /// Where this GPU can reach the source's (`cuDeviceCanAccessPeer`: NVLink or PCIe
    /// peer-to-peer), the source mapping is opened to it read-only (VMM memory is shared with a
    /// peer per mapping, by `cuMemSetAccess`, not by `cuCtxEnablePeerAccess`) and copied device
    /// to device: ~400 GB/s over the NVLink of two H200s. Otherwise the bytes go through host
    /// memory in chunks. Returns once this GPU holds every byte.
    pub fn replicate_from(&self, source: &VmmArena) -> Result<ReplicaCopy, GpuError> {
        let started = std::time::Instant::now();
        if source.size() != self.size() {
            return Err(GpuError::OutOfBounds { offset: 0, len: source.mapping.size, size: self.size() });
        }
        let peer = self.can_reach(source)?;
        if peer {
            self.copy_from_peer(source)?;
        } else {
            self.copy_through_host(source)?;
        }
        Ok(ReplicaCopy { peer, elapsed: started.elapsed() })
    }

    /// Whether this arena's GPU can read `source`'s over a peer link.
    fn can_reach(&self, source: &VmmArena) -> Result<bool, GpuError> {
        let (me, them) = (self.mapping.gpu.cu_device(), source.mapping.gpu.cu_device());
        if me == them {
            return Ok(true);
        }
        let mut can: c_int = 0;
        // SAFETY: valid out-pointer; both are device handles of GPUs this process opened.
        check("cuDeviceCanAccessPeer", unsafe { sys::cuDeviceCanAccessPeer(&mut can, me, them) })?;
        Ok(can == 1)
    }

    fn copy_from_peer(&self, source: &VmmArena) -> Result<(), GpuError> {
        let reader = sys::CUmemAccessDesc {
            location: sys::CUmemLocation {
                type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.mapping.gpu.cu_device(),
            },
            flags: Access::ReadOnly.flags(),
        };
        source.mapping.gpu.bind()?;
        // SAFETY: the source range is mapped by us for its whole size; `reader` is one
        // initialised entry; access of the source's own GPU is not touched.
        check("cuMemSetAccess(peer)", unsafe {
            sys::cuMemSetAccess(source.mapping.ptr, source.mapping.size, &reader, 1)
        })?;
        self.mapping.gpu.bind()?;
        // SAFETY: both ranges are live mappings of exactly `size` bytes (checked by the
        // caller); the destination is writable by this GPU and the source now readable by it.
        check("cuMemcpyDtoD", unsafe {
            sys::cuMemcpyDtoD_v2(self.mapping.ptr, source.mapping.ptr, self.mapping.size)
        })?;
        self.mapping.gpu.synchronize()
    }

    fn copy_through_host(&self, source: &VmmArena) -> Result<(), GpuError> {
        let mut buffer = vec![0u8; STAGING_CHUNK.min(self.mapping.size)];
        let mut offset = 0usize;
        while offset < self.mapping.size {
            let len = buffer.len().min(self.mapping.size - offset);
            source.mapping.read_into(offset as u64, &mut buffer[..len])?;
            self.write_at(offset as u64, &buffer[..len])?;
            offset += len;
        }
        self.release_staging();
        Ok(())
    }

    /// Exports the allocation as a POSIX file descriptor (`cuMemExportToShareableHandle`),
    /// close-on-exec. Each call returns a new fd. Whoever holds it keeps the memory alive,
    /// even after this arena and this process are gone.
    pub fn export_fd(&self) -> Result<OwnedFd, GpuError> {
        self.mapping.gpu.bind()?;
        let mut raw: c_int = -1;
        // SAFETY: context bound; for CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR the driver writes
        // an `int` through the pointer; `self.handle` is live until drop.
        check("cuMemExportToShareableHandle", unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut raw as *mut c_int).cast::<c_void>(),
                self.handle,
                CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        })?;
        // SAFETY: on success the driver returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).map_err(|e| GpuError::Fd(e.into()))?;
        Ok(fd)
    }
}

impl Drop for VmmArena {
    fn drop(&mut self) {
        // Release our handle; the physical memory goes when the mapping (dropped right after
        // this) and every exported fd and foreign mapping are gone.
        let _ = self.mapping.gpu.bind();
        // SAFETY: the handle came from cuMemCreate and is released exactly once, here.
        let _ = unsafe { sys::cuMemRelease(self.handle) };
    }
}

/// An arena received from another process as a POSIX fd and mapped here.
///
/// The allocation handle is released right after mapping and the fd is closed: the mapping
/// alone keeps the memory, and dropping this unmaps it.
#[derive(Debug)]
pub struct ImportedArena {
    mapping: Mapping,
    access: Access,
}

impl ImportedArena {
    /// Imports the allocation behind `fd` (`cuMemImportFromShareableHandle`), maps `size`
    /// bytes of it and grants `access` to this GPU. `size` must be the exporter's
    /// [`VmmArena::size`]. Consumes and closes `fd`, on success and on failure.
    pub fn import(gpu: &Gpu, fd: OwnedFd, size: u64, access: Access) -> Result<ImportedArena, GpuError> {
        gpu.info().require_vmm()?;
        if size == 0 {
            return Err(GpuError::Empty);
        }
        let granularity = gpu.granularity()?;
        if size % granularity != 0 {
            return Err(GpuError::Misaligned { size, granularity });
        }
        let len = usize::try_from(size).map_err(|_| GpuError::Misaligned { size, granularity })?;
        gpu.bind()?;
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: context bound; for POSIX fds the driver takes the fd number itself, passed by
        // value in the pointer argument (not a pointer to it); it does not take ownership of
        // the fd, which stays open until `fd` is dropped at the end of this function.
        check("cuMemImportFromShareableHandle", unsafe {
            sys::cuMemImportFromShareableHandle(
                &mut handle,
                fd.as_raw_fd() as usize as *mut c_void,
                CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        })?;
        let mapping = Mapping::new(gpu, handle, len, access);
        // The mapping (if any) now holds the memory; our handle and fd are no longer needed.
        // SAFETY: the handle was returned by the import above and is released exactly once.
        let released = check("cuMemRelease", unsafe { sys::cuMemRelease(handle) });
        drop(fd);
        let mapping = mapping?;
        released?;
        Ok(ImportedArena { mapping, access })
    }

    /// The arena's size in bytes.
    pub fn size(&self) -> u64 {
        self.mapping.size as u64
    }

    /// How this process may access the arena.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The device address of byte 0 in this process (valid while `self` lives). Kernels take
    /// it as a `u64` argument.
    pub fn device_ptr(&self) -> u64 {
        self.mapping.ptr
    }

    /// A typed view of `len` elements at byte `offset` (bounds and alignment checked); it
    /// borrows the arena, so it cannot outlive the mapping.
    pub fn view<T>(&self, offset: u64, len: usize) -> Result<crate::DeviceView<'_, T>, GpuError> {
        crate::DeviceView::new(self.mapping.ptr, self.mapping.size as u64, offset, len)
    }

    /// Copies `len` bytes at `offset` back to the host (for checks; kernels read in place).
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, GpuError> {
        self.mapping.read_at(offset, len)
    }

    /// Copies bytes at `offset` into `out`.
    pub fn read_into(&self, offset: u64, out: &mut [u8]) -> Result<(), GpuError> {
        self.mapping.read_into(offset, out)
    }

    /// Copies `bytes` into the arena at `offset`; [`GpuError::ReadOnly`] (without asking the
    /// driver) if it was imported read-only.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), GpuError> {
        if self.access == Access::ReadOnly {
            return Err(GpuError::ReadOnly);
        }
        self.mapping.write_pageable(offset, bytes)
    }

    /// Asks the driver to write into the arena **whatever the access**, to prove that a
    /// read-only mapping refuses it. With [`WriteMethod::Memset`], `bytes[0]` is written
    /// `bytes.len()` times. A refused write may leave this process's context unusable (a
    /// sticky fault): try it only in a process that can be thrown away.
    pub fn attempt_write(&self, offset: u64, bytes: &[u8], method: WriteMethod) -> Result<(), GpuError> {
        match method {
            WriteMethod::Memcpy => self.mapping.write_pageable(offset, bytes),
            WriteMethod::Memset => {
                let value = bytes.first().copied().unwrap_or(0);
                self.mapping.memset(offset, value, bytes.len())
            }
        }
    }
}

/// Splits `(file_offset, arena_offset, len)` pieces into chunks of at most [`UPLOAD_CHUNK`].
fn upload_chunks(pieces: &[(u64, u64, u64)]) -> Vec<(u64, u64, usize)> {
    let step = UPLOAD_CHUNK as u64;
    pieces
        .iter()
        .flat_map(|&(from, at, len)| {
            (0..len.div_ceil(step)).map(move |k| (from + k * step, at + k * step, (len - k * step).min(step) as usize))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_cut_into_chunks() {
        let c = UPLOAD_CHUNK as u64;
        let chunks = upload_chunks(&[(100, 0, 2 * c + 5), (7, 4096, 0), (9, 8192, 3)]);
        assert_eq!(
            chunks,
            vec![(100, 0, UPLOAD_CHUNK), (100 + c, c, UPLOAD_CHUNK), (100 + 2 * c, 2 * c, 5), (9, 8192, 3)]
        );
    }

    const MIB2: u64 = 2 << 20;

    #[test]
    fn round_up_to_granularity() {
        assert_eq!(round_up(0, MIB2), Some(0));
        assert_eq!(round_up(1, MIB2), Some(MIB2));
        assert_eq!(round_up(MIB2, MIB2), Some(MIB2));
        assert_eq!(round_up(MIB2 + 1, MIB2), Some(2 * MIB2));
        assert_eq!(round_up(256 << 20, MIB2), Some(256 << 20));
        assert_eq!(round_up(10, 3), Some(12));
        assert_eq!(round_up(5, 0), None);
        assert_eq!(round_up(u64::MAX, MIB2), None);
    }

    #[test]
    fn access_flags() {
        assert_eq!(Access::ReadOnly.flags(), CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READ);
        assert_eq!(Access::ReadWrite.flags(), CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    }

    #[test]
    fn arenas_cannot_be_made_without_a_gpu() {
        // On machines without a driver, opening fails cleanly; there is nothing to map.
        if crate::available().is_err() {
            assert!(Gpu::open(0).is_err());
        }
    }
}
