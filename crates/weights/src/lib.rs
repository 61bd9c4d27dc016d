//! Weights files: a safetensors file read without trusting it ([`model_file`]), laid out as one
//! arena, and copied into host memory or onto a GPU ([`cuda`]). The owner loads generations
//! with it; a worker of the `sharing = "none"` baseline reads its private copy with it. Neither
//! the bus protocol nor HTTP is here, so a worker that only maps the shared arena does not
//! need this crate's GPU upload at all, and a CPU-only service compiles no owner code.
//!
//! ```no_run
//! let file = forkless_weights::ModelFile::open("model.safetensors".as_ref()).unwrap();
//! let (arena, tensors) = file.layout();
//! println!("{} tensors in one {}-byte arena", tensors.len(), arena.size);
//! ```
#![forbid(unsafe_code)]

pub mod cuda;
mod cuda_error;
pub mod model_file;

pub use model_file::{LoadError, ModelFile};
