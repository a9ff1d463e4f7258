//! Test data: seeded random weights whose blocks have different scales.

use qdylora_formats::Nf4Weight;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Isa;
use super::isa::Supported;

/// Values in (-1, 1) times a scale that changes every 97 elements, so blocks differ.
pub(crate) fn random_values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|i| rng.random_range(-1.0f32..1.0) * (0.25 + (i / 97 % 7) as f32))
        .collect()
}

/// A `[rows, cols]` NF4 weight quantized by the core from random values.
pub(crate) fn random_weight(rows: usize, cols: usize, blocksize: usize, seed: u64) -> Nf4Weight {
    let data = random_values(rows * cols, seed);
    Nf4Weight::quantize(rows, cols, &data, blocksize).expect("valid test shape")
}

/// Every instruction set this CPU runs, the portable one first.
pub(crate) fn supported_isas() -> Vec<Supported> {
    [Isa::Scalar, Isa::Avx2Fma]
        .into_iter()
        .filter_map(|isa| isa.checked().ok())
        .collect()
}
