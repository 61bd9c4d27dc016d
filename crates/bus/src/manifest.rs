//! A generation: the immutable, versioned set of named tensors that owners publish and
//! workers attach, plus the arenas (one allocation per device) the tensors live in.
//!
//! Nothing in a received manifest is trusted until [`Manifest::validate`] has passed: offsets
//! and lengths lie inside their arena, `dtype × shape = length`, tensors are aligned and do not
//! overlap, names are unique. Readers index raw memory with these numbers, so this check is
//! what keeps a bad (or hostile) frame from turning into an out-of-bounds read.
//!
//! ```
//! use forkless_bus::manifest::{Dtype, LayoutBuilder, Manifest};
//! let mut layout = LayoutBuilder::default();
//! layout.push("weight", Dtype::F32, vec![2, 3]);
//! layout.push("bias", Dtype::F32, vec![2]);
//! let (arena, tensors) = layout.finish();
//! let manifest = Manifest::new("model.safetensors".into(), vec![arena], tensors);
//! assert!(manifest.validate().is_ok());
//! assert_eq!(manifest.tensor("bias").unwrap().offset, 256);
//! ```

use serde::{Deserialize, Serialize};

/// Every tensor starts at a multiple of this many bytes inside its arena (GPU-friendly, and
/// more than enough for any element type's alignment).
pub const TENSOR_ALIGN: u64 = 256;
/// Arenas are sized in whole pages of this size (host pages; the CUDA kind rounds further).
pub const ARENA_ALIGN: u64 = 4096;
/// Upper bound on arenas (and so on file descriptors) in one generation.
pub const MAX_ARENAS: usize = 16;
/// Upper bound on a tensor's rank.
pub const MAX_RANK: usize = 16;
/// Upper bound on a tensor name's length in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// Element type of a tensor, named as in safetensors.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// Size of one element in bytes.
    pub const fn size(self) -> u64 {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// Which memory kind backs an arena, and so how a reader maps its handle.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// A sealed memfd (`F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW`), mapped read-only.
    /// [`ArenaDesc::checksum`] is the xxh3-64 of its bytes.
    Host,
    /// Device memory from `cuMemCreate` on CUDA device `device`, exported as a POSIX fd
    /// (`cuMemExportToShareableHandle`) and mapped by workers with
    /// `CU_MEM_ACCESS_FLAGS_PROT_READ`. Its size is a multiple of the device's allocation
    /// granularity. [`ArenaDesc::checksum`] is `forkless_gpu::checksum::arena_checksum` of its
    /// bytes, computed on the GPU (reading 2 GB back to hash it would cost the re-adoption
    /// hundreds of milliseconds).
    CudaVmm { device: u32 },
}

impl MemoryKind {
    /// True for device memory.
    pub fn is_gpu(self) -> bool {
        matches!(self, MemoryKind::CudaVmm { .. })
    }
}

/// One allocation holding tensors; travels as one file descriptor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ArenaDesc {
    /// Index of this arena in [`Manifest::arenas`]; also the index of its fd in the frame.
    pub id: u32,
    pub kind: MemoryKind,
    /// Size in bytes, a multiple of [`ARENA_ALIGN`].
    pub size: u64,
    /// A checksum of the arena's bytes (which one depends on [`MemoryKind`]), recorded when it
    /// was filled; a re-adopting owner checks the memory still holds exactly this. 0 until
    /// computed.
    pub checksum: u64,
}

/// Where one tensor lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub arena: u32,
    pub offset: u64,
    pub len: u64,
}

impl TensorEntry {
    /// Number of elements (`shape` product); `None` on overflow.
    pub fn elements(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// A generation's layout. The file descriptors of its arenas travel beside it, in arena order,
/// followed by those of its replicas.
///
/// On several GPUs a generation has one arena per device: the first is `arenas[0]`, which the
/// tensors index; the others are **replicas**, copies of it with the same size and checksum on
/// other devices. A worker is sent the view of its own device only ([`Manifest::for_device`]):
/// one arena, no replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Monotonic generation number, assigned by the supervisor when the owner publishes.
    pub generation: u64,
    /// Where the weights came from (a path), for logs and status.
    pub source: String,
    pub arenas: Vec<ArenaDesc>,
    pub tensors: Vec<TensorEntry>,
    /// Copies of `arenas[0]` on other devices; their ids continue after the arenas' (an
    /// arena's id is the index of its fd in the frame).
    #[serde(default)]
    pub replicas: Vec<ArenaDesc>,
    /// xxh3-64 of the layout (arenas and tensors, see [`Manifest::compute_layout_hash`]):
    /// a manifest changed in transit or in memory is refused.
    pub layout_hash: u64,
}

/// Why a manifest was refused. Each variant names the offending tensor or arena.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest has no arena")]
    NoArena,
    #[error("manifest has {0} arenas, more than the limit of {MAX_ARENAS}")]
    TooManyArenas(usize),
    #[error("arena {index} says its id is {id}; ids must equal their position")]
    ArenaId { index: usize, id: u32 },
    #[error("arena {id} has size {size}, which is zero or not a multiple of {ARENA_ALIGN}")]
    ArenaSize { id: u32, size: u64 },
    #[error("replica arena {id} {problem}")]
    BadReplica { id: u32, problem: String },
    #[error("tensor #{index} has an empty or over-long name")]
    BadName { index: usize },
    #[error("tensor {name:?} appears twice")]
    DuplicateName { name: String },
    #[error("tensor {name:?} has rank {rank}, more than {MAX_RANK}")]
    Rank { name: String, rank: usize },
    #[error("tensor {name:?} names arena {arena}, which does not exist")]
    UnknownArena { name: String, arena: u32 },
    #[error("tensor {name:?}: dtype {dtype:?} x shape {shape:?} does not equal its length {len}")]
    LengthMismatch { name: String, dtype: Dtype, shape: Vec<u64>, len: u64 },
    #[error("tensor {name:?} at offset {offset} is not aligned to {TENSOR_ALIGN} bytes")]
    Misaligned { name: String, offset: u64 },
    #[error("tensor {name:?} [{offset}, +{len}) ends outside arena {arena} of {arena_size} bytes")]
    OutOfBounds { name: String, arena: u32, offset: u64, len: u64, arena_size: u64 },
    #[error("tensors {first:?} and {second:?} overlap in arena {arena}")]
    Overlap { first: String, second: String, arena: u32 },
    #[error("layout hash {stated:#x} does not match the layout ({actual:#x}): the manifest was altered")]
    LayoutHash { stated: u64, actual: u64 },
}

impl Manifest {
    /// A manifest for generation 0 (the supervisor numbers it on publish), layout hash included.
    pub fn new(source: String, arenas: Vec<ArenaDesc>, tensors: Vec<TensorEntry>) -> Self {
        let mut manifest = Manifest { generation: 0, source, arenas, tensors, replicas: Vec::new(), layout_hash: 0 };
        manifest.layout_hash = manifest.compute_layout_hash();
        manifest
    }

    /// The same generation with copies of its arena on other devices (see [`Manifest::replicas`]).
    pub fn with_replicas(mut self, replicas: Vec<ArenaDesc>) -> Self {
        self.replicas = replicas;
        self.layout_hash = self.compute_layout_hash();
        self
    }

    /// xxh3-64 over the encoded arenas (sizes, kinds, checksums) and tensors (names, dtypes,
    /// shapes, places): everything a reader indexes memory with. Generation and source are
    /// left out: they name a layout, they do not shape it.
    pub fn compute_layout_hash(&self) -> u64 {
        let bytes = crate::codec::encode(&(&self.arenas, &self.tensors, &self.replicas)).expect("plain data encodes");
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }

    /// Checks every invariant a reader relies on. Run on every manifest received.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.validate_arenas()?;
        let mut names = std::collections::HashSet::with_capacity(self.tensors.len());
        for (index, tensor) in self.tensors.iter().enumerate() {
            self.validate_tensor(index, tensor)?;
            if !names.insert(tensor.name.as_str()) {
                return Err(ManifestError::DuplicateName { name: tensor.name.clone() });
            }
        }
        self.validate_no_overlap()?;
        let actual = self.compute_layout_hash();
        if actual != self.layout_hash {
            return Err(ManifestError::LayoutHash { stated: self.layout_hash, actual });
        }
        Ok(())
    }

    fn validate_arenas(&self) -> Result<(), ManifestError> {
        if self.arenas.is_empty() {
            return Err(ManifestError::NoArena);
        }
        if self.arenas.len() + self.replicas.len() > MAX_ARENAS {
            return Err(ManifestError::TooManyArenas(self.arenas.len() + self.replicas.len()));
        }
        self.validate_replicas()?;
        for (index, arena) in self.arenas.iter().chain(&self.replicas).enumerate() {
            if arena.id as usize != index {
                return Err(ManifestError::ArenaId { index, id: arena.id });
            }
            if arena.size == 0 || arena.size % ARENA_ALIGN != 0 {
                return Err(ManifestError::ArenaSize { id: arena.id, size: arena.size });
            }
        }
        Ok(())
    }

    /// Replicas copy the one arena of a generation onto other GPUs: same size, same checksum,
    /// one per device.
    fn validate_replicas(&self) -> Result<(), ManifestError> {
        if self.replicas.is_empty() {
            return Ok(());
        }
        let primary = &self.arenas[0];
        if self.arenas.len() != 1 || !primary.kind.is_gpu() {
            return Err(ManifestError::BadReplica {
                id: primary.id,
                problem: "replicas copy the one GPU arena of a generation".into(),
            });
        }
        let mut devices = std::collections::HashSet::new();
        for arena in std::iter::once(primary).chain(&self.replicas) {
            let MemoryKind::CudaVmm { device } = arena.kind else {
                return Err(ManifestError::BadReplica { id: arena.id, problem: "is not GPU memory".into() });
            };
            if !devices.insert(device) {
                return Err(ManifestError::BadReplica {
                    id: arena.id,
                    problem: format!("a second arena on GPU {device}"),
                });
            }
            if arena.size != primary.size || arena.checksum != primary.checksum {
                return Err(ManifestError::BadReplica {
                    id: arena.id,
                    problem: "differs from arena 0 in size or checksum".into(),
                });
            }
        }
        Ok(())
    }

    /// The devices this generation is on, arena 0's first (empty for host memory).
    pub fn devices(&self) -> Vec<u32> {
        self.arenas
            .iter()
            .take(1)
            .chain(&self.replicas)
            .filter_map(|a| match a.kind {
                MemoryKind::CudaVmm { device } => Some(device),
                MemoryKind::Host => None,
            })
            .collect()
    }

    /// The view a worker on `device` is sent: one arena (this device's copy, as arena 0), no
    /// replica; and the index of that arena's fd among this manifest's. `None` if the
    /// generation has no copy on `device`. A host generation is the same for every worker.
    pub fn for_device(&self, device: Option<u32>) -> Option<(Manifest, usize)> {
        let on = |a: &ArenaDesc, d: u32| a.kind == MemoryKind::CudaVmm { device: d };
        let index = match device {
            None if self.replicas.is_empty() => return Some((self.clone(), 0)),
            None => return None,
            Some(d) if on(&self.arenas[0], d) => 0,
            Some(d) => 1 + self.replicas.iter().position(|r| on(r, d))?,
        };
        let mut arena = if index == 0 { self.arenas[0].clone() } else { self.replicas[index - 1].clone() };
        arena.id = 0;
        let mut view = Manifest { arenas: vec![arena], replicas: Vec::new(), ..self.clone() };
        view.layout_hash = view.compute_layout_hash();
        Some((view, index))
    }

    fn validate_tensor(&self, index: usize, t: &TensorEntry) -> Result<(), ManifestError> {
        if t.name.is_empty() || t.name.len() > MAX_NAME_LEN {
            return Err(ManifestError::BadName { index });
        }
        if t.shape.len() > MAX_RANK {
            return Err(ManifestError::Rank { name: t.name.clone(), rank: t.shape.len() });
        }
        let arena = self
            .arenas
            .get(t.arena as usize)
            .ok_or_else(|| ManifestError::UnknownArena { name: t.name.clone(), arena: t.arena })?;
        let expected = t.elements().and_then(|n| n.checked_mul(t.dtype.size()));
        if expected != Some(t.len) {
            return Err(ManifestError::LengthMismatch {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                len: t.len,
            });
        }
        if t.offset % TENSOR_ALIGN != 0 {
            return Err(ManifestError::Misaligned { name: t.name.clone(), offset: t.offset });
        }
        match t.offset.checked_add(t.len) {
            Some(end) if end <= arena.size => Ok(()),
            _ => Err(ManifestError::OutOfBounds {
                name: t.name.clone(),
                arena: t.arena,
                offset: t.offset,
                len: t.len,
                arena_size: arena.size,
            }),
        }
    }

    /// Bounds are already checked, so `offset + len` cannot overflow here.
    fn validate_no_overlap(&self) -> Result<(), ManifestError> {
        let mut spans: Vec<&TensorEntry> = self.tensors.iter().filter(|t| t.len > 0).collect();
        spans.sort_by_key(|t| (t.arena, t.offset));
        for pair in spans.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if a.arena == b.arena && a.offset + a.len > b.offset {
                return Err(ManifestError::Overlap { first: a.name.clone(), second: b.name.clone(), arena: a.arena });
            }
        }
        Ok(())
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total bytes of all arenas and replicas. Saturating: the supervisor logs this for a
    /// publish before the manifest is validated, and a hostile owner's sizes must not overflow it.
    pub fn total_bytes(&self) -> u64 {
        self.all_arenas().fold(0u64, |total, a| total.saturating_add(a.size))
    }

    /// Every arena then every replica, in fd order.
    pub fn all_arenas(&self) -> impl Iterator<Item = &ArenaDesc> {
        self.arenas.iter().chain(&self.replicas)
    }
}

/// Packs tensors one after another into a single arena at [`TENSOR_ALIGN`]ed offsets.
#[derive(Default, Debug)]
pub struct LayoutBuilder {
    next: u64,
    tensors: Vec<TensorEntry>,
}

impl LayoutBuilder {
    /// Reserves room for one tensor and returns its offset.
    pub fn push(&mut self, name: impl Into<String>, dtype: Dtype, shape: Vec<u64>) -> u64 {
        let len = shape.iter().product::<u64>() * dtype.size();
        let offset = self.next.next_multiple_of(TENSOR_ALIGN);
        self.next = offset + len;
        self.tensors.push(TensorEntry { name: name.into(), dtype, shape, arena: 0, offset, len });
        offset
    }

    /// The arena (host kind, page-rounded) and the tensor entries.
    pub fn finish(self) -> (ArenaDesc, Vec<TensorEntry>) {
        let size = self.next.max(1).next_multiple_of(ARENA_ALIGN);
        (ArenaDesc { id: 0, kind: MemoryKind::Host, size, checksum: 0 }, self.tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let mut layout = LayoutBuilder::default();
        layout.push("w", Dtype::F32, vec![3, 5]);
        layout.push("b", Dtype::F32, vec![3]);
        layout.push("empty", Dtype::U8, vec![0]);
        let (arena, tensors) = layout.finish();
        Manifest::new("t".into(), vec![arena], tensors)
    }

    /// Found while writing the validator's fuzz target: arena sizes summing past u64::MAX overflowed (a
    /// panic in debug builds) on a manifest not yet validated.
    #[test]
    fn total_bytes_of_a_hostile_manifest_saturates() {
        let mut m = sample();
        m.arenas.push(ArenaDesc { id: 1, kind: MemoryKind::Host, size: u64::MAX, checksum: 0 });
        m.arenas[0].size = u64::MAX - 4095;
        assert_eq!(m.total_bytes(), u64::MAX);
    }

    #[test]
    fn sample_is_valid() {
        sample().validate().unwrap();
    }

    #[test]
    fn rejects_out_of_bounds() {
        let mut m = sample();
        m.tensors[1].offset = m.arenas[0].size - 256;
        m.tensors[1].shape = vec![1024];
        m.tensors[1].len = 4096;
        assert!(matches!(m.validate(), Err(ManifestError::OutOfBounds { .. })));
    }

    #[test]
    fn rejects_offset_overflow() {
        let mut m = sample();
        m.tensors[1].offset = u64::MAX - 255;
        assert!(matches!(m.validate(), Err(ManifestError::OutOfBounds { .. })));
    }

    #[test]
    fn rejects_length_mismatch_and_shape_overflow() {
        let mut m = sample();
        m.tensors[0].len += 4;
        assert!(matches!(m.validate(), Err(ManifestError::LengthMismatch { .. })));
        let mut m = sample();
        m.tensors[0].shape = vec![u64::MAX, 2];
        assert!(matches!(m.validate(), Err(ManifestError::LengthMismatch { .. })));
    }

    #[test]
    fn rejects_overlap_duplicates_and_misalignment() {
        let mut m = sample();
        m.tensors[1].offset = 0;
        assert!(matches!(m.validate(), Err(ManifestError::Overlap { .. })));
        let mut m = sample();
        m.tensors[1].name = "w".into();
        assert!(matches!(m.validate(), Err(ManifestError::DuplicateName { .. })));
        let mut m = sample();
        m.tensors[1].offset += 4;
        assert!(matches!(m.validate(), Err(ManifestError::Misaligned { .. })));
    }

    #[test]
    fn rejects_bad_arenas() {
        let mut m = sample();
        m.arenas.clear();
        assert_eq!(m.validate(), Err(ManifestError::NoArena));
        let mut m = sample();
        m.arenas[0].size = 100;
        assert!(matches!(m.validate(), Err(ManifestError::ArenaSize { .. })));
        let mut m = sample();
        m.tensors[0].arena = 3;
        assert!(matches!(m.validate(), Err(ManifestError::UnknownArena { .. })));
    }

    fn on_gpus(devices: &[u32]) -> Manifest {
        let mut manifest = sample();
        manifest.arenas[0].kind = MemoryKind::CudaVmm { device: devices[0] };
        manifest.arenas[0].checksum = 7;
        let replicas = devices[1..]
            .iter()
            .enumerate()
            .map(|(i, &device)| ArenaDesc {
                id: 1 + i as u32,
                kind: MemoryKind::CudaVmm { device },
                ..manifest.arenas[0].clone()
            })
            .collect();
        manifest.with_replicas(replicas)
    }

    #[test]
    fn replicas_copy_the_one_gpu_arena_onto_other_devices() {
        let manifest = on_gpus(&[2, 0, 1]);
        manifest.validate().unwrap();
        assert_eq!(manifest.devices(), vec![2, 0, 1]);
        assert_eq!(manifest.total_bytes(), 3 * manifest.arenas[0].size);
        let (view, fd_index) = manifest.for_device(Some(1)).unwrap();
        assert_eq!(fd_index, 2);
        assert!(view.replicas.is_empty());
        assert_eq!((view.arenas[0].id, view.arenas[0].kind), (0, MemoryKind::CudaVmm { device: 1 }));
        view.validate().unwrap();
        assert_eq!(manifest.for_device(Some(2)).unwrap().1, 0);
        assert!(manifest.for_device(Some(3)).is_none());
        assert!(manifest.for_device(None).is_none(), "a GPU generation has no host view");
        let host = sample();
        assert_eq!(host.for_device(None).unwrap(), (host.clone(), 0));
    }

    #[test]
    fn replicas_must_match_and_sit_on_distinct_gpus() {
        let twice = on_gpus(&[0, 0]);
        assert!(matches!(twice.validate(), Err(ManifestError::BadReplica { id: 1, .. })));
        let mut other = on_gpus(&[0, 1]);
        other.replicas[0].checksum = 8;
        let other = other.clone().with_replicas(other.replicas);
        assert!(matches!(other.validate(), Err(ManifestError::BadReplica { id: 1, .. })));
        let mut host = sample();
        host.replicas = on_gpus(&[0, 1]).replicas;
        host.layout_hash = host.compute_layout_hash();
        assert!(matches!(host.validate(), Err(ManifestError::BadReplica { .. })));
        let mut numbered = on_gpus(&[0, 1]);
        numbered.replicas[0].id = 5;
        let numbered = numbered.clone().with_replicas(numbered.replicas);
        assert!(matches!(numbered.validate(), Err(ManifestError::ArenaId { index: 1, id: 5 })));
    }

    fn arb_dtype() -> impl Strategy<Value = Dtype> {
        prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::U8), Just(Dtype::I64)]
    }

    proptest! {
        /// Whatever the builder lays out is valid, and every tensor lies inside the arena.
        #[test]
        fn builder_layouts_are_valid(specs in prop::collection::vec((arb_dtype(), prop::collection::vec(0u64..64, 0..4)), 1..20)) {
            let mut layout = LayoutBuilder::default();
            for (i, (dtype, shape)) in specs.into_iter().enumerate() {
                layout.push(format!("t{i}"), dtype, shape);
            }
            let (arena, tensors) = layout.finish();
            let m = Manifest::new("p".into(), vec![arena], tensors);
            prop_assert!(m.validate().is_ok());
        }

        /// Random edits of a valid manifest either keep every tensor inside the arena
        /// without overlap, or are refused: validation never lets a bad span through.
        #[test]
        fn mutated_manifests_never_escape(offset in any::<u64>(), len in any::<u64>(), dim in any::<u64>(), which in 0usize..3) {
            let mut m = sample();
            let t = &mut m.tensors[which];
            t.offset = offset;
            t.len = len;
            t.shape = vec![dim];
            if m.validate().is_ok() {
                for t in &m.tensors {
                    prop_assert!(t.offset.checked_add(t.len).unwrap() <= m.arenas[0].size);
                }
            }
        }
    }
}
