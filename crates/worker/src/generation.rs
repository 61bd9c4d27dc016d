//! An attached generation: its manifest and its arenas, with typed read-only views: host
//! slices ([`Generation::tensor`]) for the `host` kind, device views
//! ([`Generation::device_tensor`]) for `cuda-vmm`.
//!
//! The views borrow from the [`Generation`], which a service holds in an `Arc` for as long as a
//! request uses it; so a request never sees two generations, and the memory stays mapped for
//! exactly as long as some request or the worker itself refers to it. [`Generations`] is the
//! slot a hot swap replaces.
//!
//! ```no_run
//! # fn f(generation: &forkless_worker::Generation) -> Result<(), forkless_worker::ViewError> {
//! let weight: &[f32] = generation.tensor::<f32>("weight")?;
//! let shape = generation.shape("weight")?;
//! assert_eq!(weight.len() as u64, shape.iter().product::<u64>());
//! # Ok(()) }
//! ```

use forkless_bus::host::ArenaMap;
use forkless_bus::lane::Lane;
use forkless_bus::wire::LaneSettings;
use forkless_bus::{Dtype, Manifest, TensorEntry};
use forkless_gpu::{DeviceView, Gpu, ImportedArena, VmmArena};

/// Where one arena of a generation is mapped in this process.
#[derive(Debug)]
pub(crate) enum MappedArena {
    /// A read-only mapping of host memory (shared memfd or private copy).
    Host(ArenaMap),
    /// GPU memory imported from the escrow, mapped with `CU_MEM_ACCESS_FLAGS_PROT_READ`.
    Device(ImportedArena),
    /// A private GPU copy (the `sharing = none` baseline).
    PrivateDevice(VmmArena),
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Work queued on the GPU before the last reference went away may still read this memory
        // (a foreign consumer such as PyTorch launches kernels asynchronously): let it finish
        // before unmapping.
        if let Some(gpu) = self.gpu.as_ref().filter(|_| self.on_gpu()) {
            if let Err(e) = gpu.synchronize() {
                tracing::warn!("generation {}: {e} before unmapping", self.manifest.generation);
            }
        }
        self.arenas.clear(); // unmap first: the notice means "no longer mapped here"
        if let Some(notice) = self.on_release.take() {
            let _ = notice.send(self.manifest.generation);
        }
    }
}

/// The generation a worker serves now. Cheap to clone; every request takes
/// [`Generations::current`] once and uses that `Arc` to the end, so a request never mixes two
/// generations, and a swapped-out generation is unmapped when its last request finishes.
#[derive(Debug, Clone)]
pub struct Generations(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Generation>>>);

impl Generations {
    pub(crate) fn new(first: std::sync::Arc<Generation>) -> Self {
        Generations(std::sync::Arc::new(std::sync::RwLock::new(first)))
    }

    /// The generation to use for the next request.
    pub fn current(&self) -> std::sync::Arc<Generation> {
        self.0.read().expect("generation slot poisoned").clone()
    }

    /// Makes `next` current; returns the previous one (dropped by the caller).
    pub(crate) fn replace(&self, next: std::sync::Arc<Generation>) -> std::sync::Arc<Generation> {
        std::mem::replace(&mut *self.0.write().expect("generation slot poisoned"), next)
    }
}

/// Element types a tensor may be viewed as: one per [`Dtype`], so a view is exactly the file's
/// numbers (`half::f16`/`half::bf16` for the half-precision dtypes, `bool` for safetensors'
/// one-byte booleans, whose bytes are checked to be 0 or 1 when viewed).
pub trait Element: Sized + Send + Sync + 'static {
    const DTYPE: Dtype;

    /// `bytes` as elements, or `None` if they are not valid values (only `bool` can fail).
    fn view(bytes: &[u8]) -> Option<&[Self]>;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => { $(
        impl Element for $t {
            const DTYPE: Dtype = Dtype::$d;

            fn view(bytes: &[u8]) -> Option<&[Self]> {
                // Every bit pattern is a value: a plain cast, no pass over the data.
                bytemuck::try_cast_slice(bytes).ok()
            }
        }
    )* };
}
element!(
    f64 => F64, f32 => F32, half::f16 => F16, half::bf16 => BF16,
    i64 => I64, i32 => I32, i16 => I16, i8 => I8, u8 => U8,
);

impl Element for bool {
    const DTYPE: Dtype = Dtype::Bool;

    fn view(bytes: &[u8]) -> Option<&[Self]> {
        bytemuck::checked::try_cast_slice(bytes).ok()
    }
}

/// Why a view could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("generation {generation} has no tensor named {name:?}")]
    NoSuchTensor { generation: u64, name: String },
    #[error("tensor {name:?} is {actual:?}, not {requested:?}")]
    WrongDtype { name: String, actual: Dtype, requested: Dtype },
    #[error("tensor {name:?} is in GPU memory: use device_tensor() (or run the host backend)")]
    OnDevice { name: String },
    #[error("tensor {name:?} is in host memory: use tensor() (or run the cuda backend)")]
    OnHost { name: String },
    #[error("tensor {name:?} holds values that are not valid {dtype:?} (a bool byte other than 0 or 1)")]
    InvalidValues { name: String, dtype: Dtype },
}

/// Read-only weights of one generation, mapped into this process.
#[derive(Debug)]
pub struct Generation {
    manifest: Manifest,
    arenas: Vec<MappedArena>,
    /// The GPU the device arenas are mapped on (absent on the host backend).
    gpu: Option<Gpu>,
    /// Told this generation's number once it is unmapped (the supervisor frees a retiring
    /// generation when no worker maps it any more).
    on_release: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
    /// The generation's batch lane and its runner settings (`[lane]` on).
    lane: Option<(Lane, LaneSettings)>,
}

impl Generation {
    /// Pairs a validated manifest with its mapped arenas (same order, same sizes).
    pub(crate) fn new(manifest: Manifest, arenas: Vec<MappedArena>, gpu: Option<Gpu>) -> Self {
        debug_assert_eq!(manifest.arenas.len(), arenas.len());
        Generation { manifest, arenas, gpu, on_release: None, lane: None }
    }

    /// Adds the generation's batch lane (mapped read-write: it holds requests, never weights).
    pub(crate) fn with_lane(mut self, lane: Option<(Lane, LaneSettings)>) -> Self {
        self.lane = lane;
        self
    }

    /// The generation's batch lane: submit a request's input there and await its output, and
    /// one pass serves the requests of every worker (see [`crate::lane`]). `None` when the
    /// supervisor runs without `[lane]`.
    pub fn lane(&self) -> Option<&Lane> {
        self.lane.as_ref().map(|(lane, _)| lane)
    }

    /// How the lane's passes are formed (largest batch, longest wait), as `[lane]` says.
    pub fn lane_settings(&self) -> Option<LaneSettings> {
        self.lane.as_ref().map(|(_, settings)| *settings)
    }

    pub(crate) fn lane_parts(&self) -> Option<(&Lane, LaneSettings)> {
        self.lane.as_ref().map(|(lane, settings)| (lane, *settings))
    }

    /// Reports this generation's number on `notice` once it is dropped and unmapped.
    pub(crate) fn notify_release(mut self, notice: tokio::sync::mpsc::UnboundedSender<u64>) -> Self {
        self.on_release = Some(notice);
        self
    }

    pub fn number(&self) -> u64 {
        self.manifest.generation
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry, ViewError> {
        self.manifest
            .tensor(name)
            .ok_or_else(|| ViewError::NoSuchTensor { generation: self.manifest.generation, name: name.into() })
    }

    /// True when the weights are in GPU memory (use [`Self::device_tensor`]).
    pub fn on_gpu(&self) -> bool {
        self.arenas.iter().any(|a| !matches!(a, MappedArena::Host(_)))
    }

    /// The GPU the weights are mapped on, with its context; `None` on the host backend.
    pub fn gpu(&self) -> Option<&Gpu> {
        self.gpu.as_ref()
    }

    /// The raw bytes of a tensor in host memory.
    pub fn bytes(&self, name: &str) -> Result<&[u8], ViewError> {
        let t = self.entry(name)?;
        match &self.arenas[t.arena as usize] {
            // In bounds: the manifest was validated against the arena sizes, which the mapping
            // checked against the real fd sizes.
            MappedArena::Host(map) => Ok(&map.bytes()[t.offset as usize..][..t.len as usize]),
            _ => Err(ViewError::OnDevice { name: name.into() }),
        }
    }

    /// A tensor in GPU memory as a typed, read-only device view (for cuBLAS and kernels),
    /// valid while this generation is held.
    pub fn device_tensor<T: Element>(&self, name: &str) -> Result<DeviceView<'_, T>, ViewError> {
        let t = self.entry(name)?;
        if t.dtype != T::DTYPE {
            return Err(ViewError::WrongDtype { name: name.into(), actual: t.dtype, requested: T::DTYPE });
        }
        let len = (t.len / T::DTYPE.size()) as usize;
        // Cannot fail: validated bounds and TENSOR_ALIGN offsets in granularity-aligned mappings.
        let view = match &self.arenas[t.arena as usize] {
            MappedArena::Device(arena) => arena.view::<T>(t.offset, len),
            MappedArena::PrivateDevice(arena) => arena.view::<T>(t.offset, len),
            MappedArena::Host(_) => return Err(ViewError::OnHost { name: name.into() }),
        };
        Ok(view.expect("validated manifest fits its mapping"))
    }

    /// The device address of a tensor in GPU memory, whatever its dtype, valid while this
    /// generation is held: for consumers that take a raw pointer (DLPack). Typed Rust code
    /// uses [`Self::device_tensor`].
    pub fn device_address(&self, name: &str) -> Result<u64, ViewError> {
        let t = self.entry(name)?;
        match &self.arenas[t.arena as usize] {
            // In bounds: the manifest was validated against the mapped arena's size.
            MappedArena::Device(arena) => Ok(arena.device_ptr() + t.offset),
            MappedArena::PrivateDevice(arena) => Ok(arena.device_ptr() + t.offset),
            MappedArena::Host(_) => Err(ViewError::OnHost { name: name.into() }),
        }
    }

    /// A tensor as a slice of `T`, row-major.
    pub fn tensor<T: Element>(&self, name: &str) -> Result<&[T], ViewError> {
        let t = self.entry(name)?;
        if t.dtype != T::DTYPE {
            return Err(ViewError::WrongDtype { name: name.into(), actual: t.dtype, requested: T::DTYPE });
        }
        // Alignment and length cannot fail: offsets are TENSOR_ALIGN-aligned in page-aligned
        // mappings, and the length is a multiple of the element size (both checked by
        // Manifest::validate). Only a bool byte other than 0/1 can.
        T::view(self.bytes(name)?).ok_or_else(|| ViewError::InvalidValues { name: name.into(), dtype: T::DTYPE })
    }

    /// Every tensor of this generation: name, dtype and shape (and where it lies in its arena),
    /// in arena order (by name for a weights file the owner loaded).
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.manifest.tensors
    }

    /// A tensor's shape.
    pub fn shape(&self, name: &str) -> Result<&[u64], ViewError> {
        Ok(&self.entry(name)?.shape)
    }
}

#[cfg(test)]
mod tests {
    use forkless_bus::host::ArenaWriter;
    use forkless_bus::manifest::LayoutBuilder;

    use super::*;

    /// A host generation holding `tensors` (name, dtype, shape, bytes).
    fn generation(tensors: &[(&str, Dtype, Vec<u64>, Vec<u8>)]) -> Generation {
        let mut layout = LayoutBuilder::default();
        let offsets: Vec<u64> = tensors.iter().map(|(n, d, s, _)| layout.push(*n, *d, s.clone())).collect();
        let (desc, entries) = layout.finish();
        let writer = ArenaWriter::create("test-arena", desc.size).unwrap();
        for ((_, _, _, bytes), offset) in tensors.iter().zip(offsets) {
            writer.write_at(offset, bytes).unwrap();
        }
        let fd = writer.seal().unwrap().read_only_fd().unwrap();
        let manifest = Manifest::new("test".into(), vec![desc], entries);
        crate::map_generation(manifest, vec![fd], None, None).unwrap()
    }

    #[test]
    fn half_precision_and_bool_views_and_the_tensor_list() {
        let halves: Vec<u8> =
            [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)].iter().flat_map(|h| h.to_le_bytes()).collect();
        let g = generation(&[
            ("h", Dtype::F16, vec![2], halves),
            ("ok", Dtype::Bool, vec![3], vec![0, 1, 1]),
            ("bad", Dtype::Bool, vec![2], vec![1, 7]),
        ]);
        assert_eq!(g.tensor::<half::f16>("h").unwrap()[0].to_f32(), 1.5);
        assert_eq!(g.tensor::<bool>("ok").unwrap(), &[false, true, true]);
        assert!(matches!(g.tensor::<bool>("bad"), Err(ViewError::InvalidValues { .. })));
        assert!(matches!(g.tensor::<half::bf16>("h"), Err(ViewError::WrongDtype { .. })));
        let listed: Vec<(&str, Dtype, &[u64])> =
            g.tensors().iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice())).collect();
        assert_eq!(
            listed,
            [("h", Dtype::F16, &[2][..]), ("ok", Dtype::Bool, &[3][..]), ("bad", Dtype::Bool, &[2][..])]
        );
    }
}
