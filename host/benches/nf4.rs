//! NF4 kernels against candle-core's Q4_0 and a dense f32 baseline, each pair in one criterion
//! group so the ratios come from one run:
//!
//! * `matvec_4096x11008`: our fused NF4 matvec, candle's Q4_0 `QMatMul::forward` on `[1, 11008]`,
//!   and a dense f32 gemm matvec for scale (LLaMA-7B's down_proj shape).
//! * `dequantize_4096x11008`: ours to f32 and bf16, candle's Q4_0 `dequantize` for scale.
//! * `linear_fwd_bwd`: our frozen linear (forward + input gradient) against the same two
//!   products on a dense f32 weight with gemm, for a 7B-sized and a small-model shape.
//!
//! `cargo bench -p qdylora --bench nf4 -- --warm-up-time 1 --measurement-time 5`

use std::hint::black_box;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use qdylora::kernels::{
    Isa, dequantize_into, linear_backward_input, linear_forward, matvec, matvec_with,
};
use qdylora_formats::Nf4Weight;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROWS: usize = 4096;
const COLS: usize = 11008;

/// Weight-like values: roughly Gaussian (sum of uniforms), scale 0.02.
fn random_values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| (0..4).map(|_| rng.random_range(-0.01f32..0.01)).sum())
        .collect()
}

/// `dst[m, n] = lhs[m, k] · rhsᵀ` with `rhs: [n, k]` row-major, on every core.
fn dense_matmul_t(m: usize, k: usize, n: usize, lhs: &[f32], rhs: &[f32], dst: &mut [f32]) {
    assert!(lhs.len() == m * k && rhs.len() == n * k && dst.len() == m * n);
    // SAFETY: the lengths are asserted above; the strides describe exactly those buffers.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// `dst[m, k] = lhs[m, n] · rhs` with `rhs: [n, k]` row-major, on every core.
fn dense_matmul(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32], dst: &mut [f32]) {
    assert!(lhs.len() == m * n && rhs.len() == n * k && dst.len() == m * k);
    // SAFETY: the lengths are asserted above; the strides describe exactly those buffers.
    unsafe {
        gemm::gemm(
            m,
            k,
            n,
            dst.as_mut_ptr(),
            1,
            k as isize,
            false,
            lhs.as_ptr(),
            1,
            n as isize,
            rhs.as_ptr(),
            1,
            k as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

fn q4_0(dense: &[f32], rows: usize, cols: usize) -> QTensor {
    let t = Tensor::from_slice(dense, (rows, cols), &Device::Cpu).expect("tensor");
    QTensor::quantize(&t, GgmlDType::Q4_0).expect("Q4_0 quantization")
}

fn bench_matvec(c: &mut Criterion) {
    let dense = random_values(ROWS * COLS, 1);
    let w = Nf4Weight::quantize(ROWS, COLS, &dense, 64).expect("NF4 quantization");
    let x = random_values(COLS, 2);
    let qmatmul = QMatMul::from_qtensor(q4_0(&dense, ROWS, COLS)).expect("QMatMul");
    let xt = Tensor::from_slice(&x, (1, COLS), &Device::Cpu).expect("tensor");
    let mut y = vec![0.0f32; ROWS];

    let mut group = c.benchmark_group("matvec_4096x11008");
    group.bench_function("nf4_ours", |b| {
        b.iter(|| matvec(&w, black_box(&x), &mut y).expect("matvec"))
    });
    group.bench_function("q4_0_candle", |b| {
        b.iter(|| qmatmul.forward(black_box(&xt)).expect("candle forward"))
    });
    group.bench_function("f32_dense_gemm", |b| {
        b.iter(|| dense_matmul_t(1, COLS, ROWS, black_box(&x), &dense, &mut y))
    });
    group.sample_size(10);
    group.bench_function("nf4_ours_scalar", |b| {
        b.iter(|| matvec_with(Isa::Scalar, &w, black_box(&x), &mut y).expect("matvec"))
    });
    group.finish();
}

fn bench_dequantize(c: &mut Criterion) {
    let dense = random_values(ROWS * COLS, 1);
    let w = Nf4Weight::quantize(ROWS, COLS, &dense, 64).expect("NF4 quantization");
    let q = q4_0(&dense, ROWS, COLS);
    drop(dense);
    let mut out32 = vec![0.0f32; ROWS * COLS];
    let mut out16 = vec![bf16::ZERO; ROWS * COLS];

    let mut group = c.benchmark_group("dequantize_4096x11008");
    group.sample_size(20);
    group.bench_function("nf4_ours_f32", |b| {
        b.iter(|| dequantize_into(black_box(&w), &mut out32).expect("dequantize"))
    });
    group.bench_function("nf4_ours_bf16", |b| {
        b.iter(|| dequantize_into(black_box(&w), &mut out16).expect("dequantize"))
    });
    group.bench_function("q4_0_candle_f32", |b| {
        b.iter(|| q.dequantize(&Device::Cpu).expect("candle dequantize"))
    });
    group.finish();
}

fn bench_linear(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear_fwd_bwd");
    group.sample_size(10);
    for (m, rows, cols) in [(256, 256, 256), (64, ROWS, COLS)] {
        let dense = random_values(rows * cols, 3);
        let w = Nf4Weight::quantize(rows, cols, &dense, 64).expect("NF4 quantization");
        let x = random_values(m * cols, 4);
        let grad_y = random_values(m * rows, 5);
        let mut y = vec![0.0f32; m * rows];
        let mut grad_x = vec![0.0f32; m * cols];
        let shape = format!("m{m}_{rows}x{cols}");
        group.bench_function(format!("nf4_ours/{shape}"), |b| {
            b.iter(|| {
                linear_forward(black_box(&x), m, &w, &mut y).expect("forward");
                linear_backward_input(black_box(&grad_y), m, &w, &mut grad_x).expect("backward");
            })
        });
        group.bench_function(format!("f32_dense/{shape}"), |b| {
            b.iter(|| {
                dense_matmul_t(m, cols, rows, black_box(&x), &dense, &mut y);
                dense_matmul(m, rows, cols, black_box(&grad_y), &dense, &mut grad_x);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_matvec, bench_dequantize, bench_linear);
criterion_main!(benches);
