//! Inputs and comparisons shared by the fused ops' unit tests.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Uniform values in `[-range, range)` rounded to bf16 (so f32 and bf16 runs of a test start
/// from the same inputs), as `dtype`.
pub fn bf16_exact(dims: &[usize], seed: u64, range: f32, dtype: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-range..range)).collect();
    let t = Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
    t.to_dtype(DType::BF16).unwrap().to_dtype(dtype).unwrap()
}

/// The values as f32, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    t.to_vec1().unwrap()
}

/// `max |a - b| / max |b|`.
pub fn scaled_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// The gradients of `Σ out · weights` (the product summed in f32) with respect to `vars`.
pub fn weighted_sum_grads<const N: usize>(
    out: &Tensor,
    weights: &Tensor,
    vars: [&Var; N],
) -> [Tensor; N] {
    let loss = (out * weights).unwrap().to_dtype(DType::F32).unwrap();
    let grads = loss.sum_all().unwrap().backward().unwrap();
    vars.map(|v| grads.get(v.as_tensor()).unwrap().clone())
}
