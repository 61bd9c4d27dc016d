//! Generation acceptance: what a service needs from the weights, checked before it serves them.
//!
//! A worker checks the generation it attaches (a refusal exits with [`crate::EXIT_FATAL`] and
//! the reason, so the supervisor stops instead of restarting a worker that can never serve) and
//! every generation a hot swap offers (a refusal is answered `Rejected{reason}`: the swap is
//! aborted everywhere and the live generation keeps serving). So a worker only ever serves
//! weights its service accepted.
//!
//! [`Expect`] covers the common case, "these tensors, with these dtypes and shapes"; a shape may
//! name a dimension instead of fixing it, and every tensor that names it must agree. Any
//! `Fn(&Generation) -> Result<(), String>` is a check too, for anything else.
//!
//! ```
//! use forkless_worker::{Dim, Expect};
//! // An MLP with fixed sizes:
//! let mlp = Expect::new()
//!     .tensor::<f32>("fc1.weight", [1024, 256])
//!     .tensor::<f32>("fc1.bias", [1024]);
//! // A linear layer of any size, as long as weight is [out, in] and bias is [out]:
//! let linear = Expect::new().tensor::<f32>("weight", ["out", "in"]).tensor::<f32>("bias", ["out"]);
//! // Both at once: a fixed input size, any output size.
//! let mixed = Expect::new().tensor::<f32>("weight", [Dim::Named("out"), Dim::Fixed(256)]);
//! # let _ = (mlp, linear, mixed);
//! ```

use std::collections::BTreeMap;

use forkless_bus::Dtype;

use crate::{Element, Generation};

/// A service's check of a generation: `Err(reason)` refuses it. The reason reaches whoever
/// asked for the weights (`supervisor reload-model` prints it), so it should say what is wrong
/// and what was expected.
pub trait Acceptance: Send + Sync + 'static {
    fn check(&self, generation: &Generation) -> Result<(), String>;
}

impl<F> Acceptance for F
where
    F: Fn(&Generation) -> Result<(), String> + Send + Sync + 'static,
{
    fn check(&self, generation: &Generation) -> Result<(), String> {
        self(generation)
    }
}

/// One dimension of an expected shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// Exactly this size.
    Fixed(u64),
    /// Any size, the same in every tensor that names it.
    Named(&'static str),
}

/// An expected shape: `[1024, 256]`, `["out", "in"]`, or `[Dim; N]` to mix both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape(Vec<Dim>);

impl<const N: usize> From<[u64; N]> for Shape {
    fn from(dims: [u64; N]) -> Self {
        Shape(dims.into_iter().map(Dim::Fixed).collect())
    }
}

impl<const N: usize> From<[&'static str; N]> for Shape {
    fn from(dims: [&'static str; N]) -> Self {
        Shape(dims.into_iter().map(Dim::Named).collect())
    }
}

impl<const N: usize> From<[Dim; N]> for Shape {
    fn from(dims: [Dim; N]) -> Self {
        Shape(dims.to_vec())
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self
            .0
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => n.to_string(),
                Dim::Named(name) => name.to_string(),
            })
            .collect();
        write!(f, "[{}]", dims.join(", "))
    }
}

/// "These tensors, with these dtypes and shapes" (more tensors in the file are fine).
#[derive(Debug, Clone, Default)]
pub struct Expect {
    tensors: Vec<(String, Dtype, Shape)>,
}

impl Expect {
    pub fn new() -> Self {
        Expect::default()
    }

    /// Requires a tensor `name` of element type `T` with `shape`.
    pub fn tensor<T: Element>(mut self, name: impl Into<String>, shape: impl Into<Shape>) -> Self {
        self.tensors.push((name.into(), T::DTYPE, shape.into()));
        self
    }

    /// The sizes of the named dimensions in `generation` (e.g. `{"in": 256, "out": 1024}`), or
    /// why it does not fit: every problem, in one message.
    pub fn sizes(&self, generation: &Generation) -> Result<BTreeMap<&'static str, u64>, String> {
        let mut sizes = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, dtype, shape) in &self.tensors {
            let Some(entry) = generation.tensors().iter().find(|t| &t.name == name) else {
                problems.push(format!("no tensor {name:?} ({dtype:?} {shape})"));
                continue;
            };
            if entry.dtype != *dtype {
                problems.push(format!("tensor {name:?} is {:?}, expected {dtype:?}", entry.dtype));
            }
            if let Err(problem) = match_shape(&shape.0, &entry.shape, &mut sizes) {
                problems.push(format!("tensor {name:?} has shape {:?}, expected {shape}{problem}", entry.shape));
            }
        }
        if problems.is_empty() {
            return Ok(sizes);
        }
        let found: Vec<String> =
            generation.tensors().iter().map(|t| format!("{} {:?} {:?}", t.name, t.dtype, t.shape)).collect();
        Err(format!("{} (the file has: {})", problems.join("; "), found.join(", ")))
    }
}

/// Matches `actual` against `expected`, binding named dimensions in `sizes`.
fn match_shape(expected: &[Dim], actual: &[u64], sizes: &mut BTreeMap<&'static str, u64>) -> Result<(), String> {
    if expected.len() != actual.len() {
        return Err(String::new());
    }
    for (dim, &size) in expected.iter().zip(actual) {
        match *dim {
            Dim::Fixed(n) if n != size => return Err(String::new()),
            Dim::Fixed(_) => {}
            Dim::Named(name) => match sizes.insert(name, size) {
                Some(earlier) if earlier != size => {
                    return Err(format!(" ({name} is {earlier} in another tensor)"));
                }
                _ => {}
            },
        }
    }
    Ok(())
}

impl Acceptance for Expect {
    fn check(&self, generation: &Generation) -> Result<(), String> {
        self.sizes(generation).map(|_| ())
    }
}

/// Several checks, all of which must pass (what [`crate::WorkerBuilder::accept`] builds up).
#[derive(Default)]
pub(crate) struct Checks(Vec<Box<dyn Acceptance>>);

impl Checks {
    pub(crate) fn push(&mut self, check: impl Acceptance) {
        self.0.push(Box::new(check));
    }

    pub(crate) fn check(&self, generation: &Generation) -> Result<(), String> {
        self.0.iter().try_for_each(|c| c.check(generation))
    }
}

impl std::fmt::Debug for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} acceptance checks", self.0.len())
    }
}
