//! The tensor bus: everything that crosses a process boundary in forkless.
//!
//! - [`manifest`]: the immutable description of one generation of weights (tensors, arenas)
//!   and its validation, which every receiver runs before trusting a single offset;
//! - [`codec`]: the one place that knows the byte encoding (bincode 2.0.1);
//! - [`wire`]: the messages of the bus protocol and the version handshake;
//! - [`channel`]: length-prefixed frames over a Unix stream socket, with file descriptors
//!   travelling as `SCM_RIGHTS` beside the frame that names them;
//! - [`host`]: the `host` memory kind, one sealed memfd per arena, mapped read-only by readers;
//! - [`arena`]: an arena fd as the escrow holds it, of either memory kind, and the fds it hands
//!   to readers;
//! - [`lane`]: the batch lane, a shared-memory queue through which every worker's requests join
//!   one pass, with a crash-proof lease (robust mutexes) and recovery.
//!
//! `unsafe` in this crate is limited to mapping memory ([`host`], [`lane`]) and the lane's pthread
//! mutexes; every block says why it holds.
//!
//! ```
//! use forkless_bus::manifest::{Dtype, Manifest, TensorEntry};
//! use forkless_bus::host::ArenaWriter;
//!
//! let mut layout = forkless_bus::manifest::LayoutBuilder::default();
//! let offset = layout.push("bias", Dtype::F32, vec![4]);
//! let (arena, tensors) = layout.finish();
//! let writer = ArenaWriter::create("doc", arena.size).unwrap();
//! writer.write_at(offset, bytemuck::cast_slice(&[1.0f32, 2.0, 3.0, 4.0])).unwrap();
//! let sealed = writer.seal().unwrap();
//! let manifest = Manifest::new("doc".into(), vec![arena], tensors);
//! manifest.validate().unwrap();
//! let map = forkless_bus::host::ArenaMap::map(sealed.read_only_fd().unwrap(), manifest.arenas[0].size).unwrap();
//! let bias: &[f32] = bytemuck::cast_slice(&map.bytes()[offset as usize..][..16]);
//! assert_eq!(bias, &[1.0, 2.0, 3.0, 4.0]);
//! ```

// The one place besides `gpu` (bus) / `bus` (gpu) where `unsafe` is allowed (the workspace
// denies it): every block carries a `// SAFETY:` invariant (clippy's
// undocumented_unsafe_blocks, denied workspace-wide).
#![allow(unsafe_code)]

pub mod arena;
pub mod channel;
pub mod child;
pub mod child_env;
pub mod codec;
pub mod host;
pub mod lane;
pub mod manifest;
pub mod wire;

pub use channel::BusStream;
pub use manifest::{Dtype, Manifest, TensorEntry};
pub use wire::{Message, Role};

/// Environment variable through which a child learns the bus socket's path.
pub const ENV_BUS: &str = "FORKLESS_BUS";
/// Environment variable with the number of the inherited, already-connected bus fd.
pub const ENV_BUS_FD: &str = "FORKLESS_BUS_FD";
/// Environment variable naming the child's role (`owner` or `worker`).
pub const ENV_ROLE: &str = "FORKLESS_ROLE";
/// Environment variable with the worker's index (0..N-1).
pub const ENV_INDEX: &str = "FORKLESS_INDEX";
/// Environment variable with the supervisor's pid; children compare it with `getppid()`.
pub const ENV_SUPERVISOR_PID: &str = "FORKLESS_SUPERVISOR_PID";
/// Environment variable with the model (safetensors) path.
pub const ENV_MODEL: &str = "FORKLESS_MODEL";
/// Environment variable with a worker's heartbeat period in milliseconds (unset: none).
pub const ENV_HEARTBEAT_MS: &str = "FORKLESS_HEARTBEAT_MS";
/// Environment variable with the number of requests after which a worker recycles itself.
pub const ENV_MAX_REQUESTS: &str = "FORKLESS_MAX_REQUESTS";
/// Environment variable with a worker's HTTP limits (`[workers.http]`), as
/// `header_timeout_ms=…,body_timeout_ms=…,idle_timeout_ms=…,max_body_bytes=…,max_connections=…`.
pub const ENV_HTTP: &str = "FORKLESS_HTTP";
/// Environment variable with the sharing mode: `shared` (default) or `none`.
pub const ENV_SHARING: &str = "FORKLESS_SHARING";
/// Environment variable with the resolved memory backend of owner and workers: `host` or
/// `cuda` (the supervisor resolves `auto` before starting anyone).
pub const ENV_BACKEND: &str = "FORKLESS_BACKEND";
/// Environment variable with the CUDA device ordinal the arena lives on (backend `cuda`).
pub const ENV_CUDA_DEVICE: &str = "FORKLESS_CUDA_DEVICE";
/// Environment variable with the ordinal a worker opens its device by, where the supervisor
/// narrowed the worker's `CUDA_VISIBLE_DEVICES` to that one device (`0`).
pub const ENV_CUDA_ORDINAL: &str = "FORKLESS_CUDA_ORDINAL";
/// CUDA's own variable: which GPUs a process sees, and in what order.
pub const ENV_CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// Environment variable with the other GPUs a multi-GPU owner copies the arena to (`1,2,3`).
pub const ENV_CUDA_REPLICAS: &str = "FORKLESS_CUDA_REPLICAS";
/// Environment variable with the per-thread stack limit in bytes for CUDA contexts
/// (`cuCtxSetLimit(CU_LIMIT_STACK_SIZE)`): most of a context's memory is this reservation.
pub const ENV_CUDA_STACK_BYTES: &str = "FORKLESS_CUDA_STACK_BYTES";
/// Environment variable naming a folder where compiled CUDA kernels are cached (by source,
/// architecture and NVRTC version), so restarted processes skip NVRTC.
pub const ENV_KERNEL_CACHE: &str = "FORKLESS_KERNEL_CACHE";
