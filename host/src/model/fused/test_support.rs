//! Inputs and comparisons shared by the fused ops' unit tests.

use candle_core::{DType, Device, Tensor, Var};
use qdylora_core::infer::DecoderConfig;
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

/// A small LLaMA shape for the model-level tests: hidden 64, MLP 128, grouped-query attention
/// (4 query heads on 2 key/value heads of 16), vocabulary 32.
pub fn small_gqa_config(num_layers: u32) -> DecoderConfig {
    DecoderConfig {
        vocab_size: 32,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
    }
}
