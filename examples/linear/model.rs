//! The seed's model, `y = W x + b` with `W: [out, in]`, served from an attached generation.

use std::sync::Arc;

use forkless_worker::Generation;

use crate::seeded::linear_forward;

/// Why a generation does not hold a linear layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    View(#[from] forkless_worker::ViewError),
    #[error("expected weight [out, in] and bias [out], found weight {weight:?} and bias {bias:?}")]
    Shape { weight: Vec<u64>, bias: Vec<u64> },
}

/// A linear layer whose weights live in an attached generation.
#[derive(Debug, Clone)]
pub struct Linear {
    generation: Arc<Generation>,
    pub inputs: usize,
    pub outputs: usize,
}

impl Linear {
    pub fn new(generation: Arc<Generation>) -> Result<Self, ModelError> {
        let weight = generation.shape("weight")?.to_vec();
        let bias = generation.shape("bias")?.to_vec();
        if generation.on_gpu() {
            generation.device_tensor::<f32>("weight")?;
            generation.device_tensor::<f32>("bias")?;
        } else {
            generation.tensor::<f32>("weight")?;
            generation.tensor::<f32>("bias")?;
        }
        match (weight.as_slice(), bias.as_slice()) {
            ([out, inp], [b]) if out == b => {
                Ok(Linear { inputs: *inp as usize, outputs: *out as usize, generation: generation.clone() })
            }
            _ => Err(ModelError::Shape { weight, bias }),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.number()
    }

    /// The generation this layer's weights live in.
    pub fn generation_ref(&self) -> &Generation {
        &self.generation
    }

    /// True when the weights are on a GPU (answered by the [`crate::gpu::GpuEngine`]).
    pub fn on_gpu(&self) -> bool {
        self.generation.on_gpu()
    }

    /// `y = W x + b` on the CPU (host backend). `x.len()` must equal `inputs`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.inputs, "caller checks the input length");
        let w = self.generation.tensor::<f32>("weight").expect("checked in new");
        let b = self.generation.tensor::<f32>("bias").expect("checked in new");
        linear_forward(w, b, x)
    }
}
