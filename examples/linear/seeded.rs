//! The demo's numbers, reproducible anywhere: SplitMix64 (`state += 0x9E3779B97F4A7C15`, then
//! the usual two multiply-xorshift rounds), mapped to a float in [-1, 1) from its top 24 bits,
//! so every value is exact in f32 and any language can regenerate it:
//! - weights (seed S): `W[o][i] = u() / sqrt(in)` row by row, then `b[o] = u() / 10`, all from
//!   one stream seeded with S;
//! - input of a request `{"seed": n}`: `x[i] = u()` from a stream seeded with n.
//!
//! This file has no dependencies so that tests and benchmarks can include it and compute
//! reference answers independently of the service.

/// SplitMix64: tiny, fast, and the same in every language.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), exactly representable in f32.
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32) / (1u32 << 23) as f32 - 1.0
    }
}

/// The input vector of a `{"seed": n}` request.
pub fn input_from_seed(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| rng.uniform()).collect()
}

/// Deterministic weights: `(W, b)` for the given shape and seed.
pub fn make_weights(inputs: usize, outputs: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let scale = 1.0 / (inputs as f32).sqrt();
    let w = (0..inputs * outputs).map(|_| rng.uniform() * scale).collect();
    let b = (0..outputs).map(|_| rng.uniform() / 10.0).collect();
    (w, b)
}

/// `y = W x + b` on plain slices: the reference forward pass (`w` is `[out, in]` row-major).
pub fn linear_forward(w: &[f32], b: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len()).zip(b).map(|(row, bias)| dot(row, x) + bias).collect()
}

/// Dot product with eight independent accumulators, so the compiler vectorises it; the
/// summation order is fixed, so every worker returns bit-identical answers.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += ca[k] * cb[k];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    // Paths instead of `use super::*`: this file is also included by harness-less benches,
    // where the tests vanish and an import would be unused.

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of SplitMix64 seeded with 0 (as in the reference C implementation).
        let mut rng = super::SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn uniform_is_in_range() {
        let mut rng = super::SplitMix64::new(7);
        assert!((0..10_000).map(|_| rng.uniform()).all(|u| (-1.0..1.0).contains(&u)));
    }

    #[test]
    fn dot_matches_naive_sum_closely() {
        let a = super::input_from_seed(1, 1001);
        let b = super::input_from_seed(2, 1001);
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((super::dot(&a, &b) as f64 - naive).abs() < 1e-3);
    }
}
