//! The attention softmax as one op: `softmax(scale · scores + causal mask)` over the last dim,
//! statistics in f32, for `[..., tq, tk]` scores in f32 or bf16 (the output keeps their dtype).
//!
//! Unfused, the chain is nine passes over the scores (scale, upcast, add the mask, max,
//! subtract, exp, sum, divide, downcast) and keeps an f32 copy alive for the backward pass; this
//! op reads the scores once and writes the probabilities once, and its backward recomputes the
//! probabilities in f32 from the saved scores. The CPU rows below are the reference the CUDA
//! kernel (`gpu/causal_softmax.cu`) mirrors step for step.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

pub use super::cpu::Element;
use super::cpu::{cpu_pass, each_dtype};

/// `softmax(scale · scores + causal mask)` over the last dim of `scores: [..., tq, tk]`
/// (`tq <= tk`: query `i` sees keys `0 ..= i + tk - tq`). Differentiable.
pub fn causal_softmax(scores: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    check_shape(scores.dims())?;
    scores.contiguous()?.apply_op1(CausalSoftmax { scale })
}

/// The gradient of [`causal_softmax`] with respect to its scores, from the saved `scores` and
/// `grad_probs` (any float dtype, rounded to the scores'). Records no autograd graph.
pub fn causal_softmax_backward(
    scores: &Tensor,
    grad_probs: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    check_shape(scores.dims())?;
    scores.contiguous()?.apply_op2_no_bwd(
        &grad_probs.contiguous()?.to_dtype(scores.dtype())?,
        &CausalSoftmaxBackward { scale },
    )
}

/// `(rows, tq, tk)` of a `[..., tq, tk]` tensor.
fn check_shape(dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    let [.., tq, tk] = dims else {
        candle_core::bail!("causal softmax: expected [..., tq, tk] scores, got {dims:?}");
    };
    if *tq == 0 || tq > tk {
        candle_core::bail!("causal softmax: needs 0 < tq <= tk, got {dims:?}");
    }
    Ok((dims.iter().product::<usize>() / tk, *tq, *tk))
}

/// Keys visible to row `row` (query `row % tq`).
fn visible(row: usize, tq: usize, tk: usize) -> usize {
    row % tq + (tk - tq) + 1
}

/// The max of `scale · s` and the sum of `exp(scale · s - max)` over one row's visible keys.
fn row_stats<T: Element>(s: &[T], scale: f32) -> (f32, f32) {
    let max = s
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| m.max(v.widen() * scale));
    let sum = s.iter().map(|v| (v.widen() * scale - max).exp()).sum();
    (max, sum)
}

/// Forward over whole rows: `scores` and `probs` hold `rows * tk` values, rows in order
/// (row `r` is query `r % tq`). Masked keys get exactly 0.
pub fn forward_rows<T: Element>(scores: &[T], probs: &mut [T], tq: usize, tk: usize, scale: f32) {
    probs
        .par_chunks_mut(tk)
        .zip(scores.par_chunks(tk))
        .enumerate()
        .for_each(|(row, (p, s))| {
            let n = visible(row, tq, tk);
            let (max, sum) = row_stats(&s[..n], scale);
            for (j, (out, v)) in p.iter_mut().zip(s).enumerate() {
                let value = if j < n {
                    (v.widen() * scale - max).exp() / sum
                } else {
                    0.0
                };
                *out = T::narrow(value);
            }
        });
}

/// Backward over whole rows: `grad_scores = scale · p · (grad_probs - Σ p · grad_probs)`, with
/// `p` recomputed in f32 from `scores`; masked keys get exactly 0.
pub fn backward_rows<T: Element>(
    scores: &[T],
    grad_probs: &[T],
    grad_scores: &mut [T],
    tq: usize,
    tk: usize,
    scale: f32,
) {
    grad_scores
        .par_chunks_mut(tk)
        .zip(scores.par_chunks(tk).zip(grad_probs.par_chunks(tk)))
        .enumerate()
        .for_each(|(row, (d, (s, g)))| {
            let n = visible(row, tq, tk);
            let (max, sum) = row_stats(&s[..n], scale);
            let prob = |v: &T| (v.widen() * scale - max).exp() / sum;
            let dot: f32 = s[..n].iter().zip(g).map(|(v, g)| prob(v) * g.widen()).sum();
            for (j, (out, (v, g))) in d.iter_mut().zip(s.iter().zip(g)).enumerate() {
                let value = if j < n {
                    scale * (prob(v) * (g.widen() - dot))
                } else {
                    0.0
                };
                *out = T::narrow(value);
            }
        });
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, tq, tk) = check_shape(layout.dims())?;
        cpu_pass(self.name(), &[(storage, layout)], |inputs| {
            each_dtype!(inputs, |v, out| forward_rows(
                v[0], &mut out, tq, tk, self.scale
            ))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, tq, tk) = check_shape(layout.dims())?;
        let shape = crate::gpu::causal_softmax::Rows { rows, tq, tk };
        let out = crate::gpu::causal_softmax::forward(storage, layout, shape, self.scale)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        scores: &Tensor,
        _probs: &Tensor,
        grad_probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        causal_softmax_backward(scores, grad_probs, self.scale).map(Some)
    }
}

/// `(scores, grad_probs) -> grad_scores`.
struct CausalSoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, tq, tk) = check_shape(l1.dims())?;
        cpu_pass(self.name(), &[(s1, l1), (s2, l2)], |inputs| {
            each_dtype!(inputs, |v, out| backward_rows(
                v[0], v[1], &mut out, tq, tk, self.scale
            ))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, tq, tk) = check_shape(super::common_shape(self.name(), &[l1, l2])?.dims())?;
        let shape = crate::gpu::causal_softmax::Rows { rows, tq, tk };
        let out = crate::gpu::causal_softmax::backward(s1, l1, s2, l2, shape, self.scale)?;
        Ok((out, l1.shape().clone()))
    }
}

/// The additive causal mask of the unfused chain: `[tq, tk]` f32, 0 where query `i` sees key
/// `j` (`j <= i + tk - tq`) and -inf elsewhere.
pub fn causal_mask(tq: usize, tk: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..tq * tk)
        .map(|i| match i % tk < visible(i / tk, tq, tk) {
            true => 0.0,
            false => f32::NEG_INFINITY,
        })
        .collect();
    Tensor::from_vec(mask, (tq, tk), device)
}

/// The unfused chain [`causal_softmax`] replaces, as the model ran it before (kept for the
/// before/after measurement and as the reference in tests): scale in the scores' dtype, f32
/// upcast, additive causal mask ([`causal_mask`]), max-subtracted softmax, back to the scores'
/// dtype.
pub fn causal_softmax_unfused(
    scores: &Tensor,
    scale: f32,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let x = (scores * f64::from(scale))?
        .to_dtype(DType::F32)?
        .broadcast_add(mask)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(scores.dtype())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::weighted_sum_grads;
    use super::*;
    use candle_core::Var;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(dims: &[usize], seed: u64, spread: f32) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-spread..spread)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let d: Vec<f32> = (a - b).unwrap().abs().unwrap().to_vec1().unwrap();
        d.into_iter().fold(0.0, f32::max)
    }

    /// The fused op's value and gradient against the unfused chain, through
    /// `loss = Σ probs · weights` so the incoming gradient is not uniform.
    fn compare(dims: &[usize], dtype: DType, seed: u64) -> (f32, f32) {
        let [.., tq, tk] = dims else { unreachable!() };
        let scale = 0.35;
        let scores = random(dims, seed, 8.0).to_dtype(dtype).unwrap();
        let weights = random(dims, seed + 1, 1.0).to_dtype(dtype).unwrap();
        let mask = causal_mask(*tq, *tk, &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let x = Var::from_tensor(&scores).unwrap();
            let probs = match fused {
                true => causal_softmax(x.as_tensor(), scale).unwrap(),
                false => causal_softmax_unfused(x.as_tensor(), scale, &mask).unwrap(),
            };
            assert_eq!(probs.dtype(), dtype);
            let [dx] = weighted_sum_grads(&probs, &weights, [&x]);
            (probs, dx)
        };
        let (p_fused, g_fused) = run(true);
        let (p_plain, g_plain) = run(false);
        (
            max_abs_diff(&p_fused, &p_plain),
            max_abs_diff(&g_fused, &g_plain),
        )
    }

    #[test]
    fn matches_the_unfused_chain_in_f32() {
        // Square, a cache-shaped tq < tk, one query, rows longer than a warp's stride.
        for (i, dims) in [&[2, 3, 5, 5][..], &[2, 4, 7], &[3, 1, 9], &[1, 2, 70, 70]]
            .into_iter()
            .enumerate()
        {
            let (dp, dg) = compare(dims, DType::F32, i as u64);
            assert!(dp < 1e-6 && dg < 1e-6, "{dims:?}: probs {dp}, grads {dg}");
        }
    }

    #[test]
    fn matches_the_unfused_chain_in_bf16() {
        // The unfused chain scales in bf16 before the upcast (one more rounding) and its
        // backward sees bf16-rounded probabilities: agreement to bf16 precision.
        for (i, dims) in [&[2, 3, 6, 6][..], &[2, 3, 40]].into_iter().enumerate() {
            let (dp, dg) = compare(dims, DType::BF16, 10 + i as u64);
            assert!(dp < 2e-2 && dg < 2e-2, "{dims:?}: probs {dp}, grads {dg}");
        }
    }

    #[test]
    fn masked_keys_are_zero_and_rows_sum_to_one() {
        let (tq, tk) = (4, 6);
        let p = causal_softmax(&random(&[tq, tk], 7, 30.0), 1.0).unwrap();
        let rows: Vec<Vec<f32>> = p.to_vec2().unwrap();
        for (i, row) in rows.iter().enumerate() {
            let visible = i + tk - tq + 1;
            assert!(row[visible..].iter().all(|v| *v == 0.0), "row {i}: {row:?}");
            assert!(row[..visible].iter().all(|v| *v > 0.0), "row {i}: {row:?}");
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "row {i} sums to {sum}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        for dims in [&[5][..], &[3, 2], &[2, 0, 4]] {
            let x = Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
            assert!(causal_softmax(&x, 1.0).is_err(), "{dims:?}");
        }
        let ints = Tensor::zeros((2, 2), DType::U32, &Device::Cpu).unwrap();
        assert!(causal_softmax(&ints, 1.0).is_err());
    }
}
