//! The loss's cross-entropy as one op: per row of `[n, vocab]` logits (f32 or bf16),
//! `logsumexp(row) - row[target]`, math in f32, one f32 loss per row.
//!
//! Unfused, the chain converts the logits to an f32 copy (kept alive for the backward pass:
//! 0.5 GB for 4096 tokens of a 32,000-token vocabulary) and makes about eight passes over it
//! (upcast, max, subtract, exp, sum, log, gather, and the backward's). Fused, the forward reads
//! the logits twice (max, then the sum of exponentials) and writes one value per row; the
//! backward recomputes the row's max and sum from the saved logits (two more reads, cheap next
//! to a second saved `[n]` output and the bookkeeping of a two-output op) and writes
//! `grad · (softmax - onehot)` once, in the logits' dtype. The CPU rows below are the
//! reference the CUDA kernel (`gpu/cross_entropy.cu`) mirrors formula for formula.
//!
//! A target outside the vocabulary is an error here; the row functions themselves (and the
//! CUDA kernel, which cannot raise one) give NaN for that row instead of reading past it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::cpu::{Element, cpu_slice};

/// Per-row `logsumexp(logits[i]) - logits[i, targets[i]]` of `logits: [n, vocab]` (f32 or
/// bf16) and `targets: [n]` (u32): `[n]` f32. Differentiable in the logits.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    check_inputs(
        logits.dims(),
        logits.dtype(),
        targets.dims(),
        targets.dtype(),
    )?;
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}

/// The chain [`cross_entropy`] replaces, as the loss ran it before (kept for the before/after
/// measurement and as the reference in tests): an f32 copy of the logits, a detached max,
/// `log Σ exp(x - max) + max`, minus the gathered target logit.
pub fn cross_entropy_unfused(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (n, _) = check_inputs(
        logits.dims(),
        logits.dtype(),
        targets.dims(),
        targets.dtype(),
    )?;
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let picked = logits.gather(&targets.reshape((n, 1))?, D::Minus1)?;
    (lse - picked)?.squeeze(D::Minus1)
}

/// `(n, vocab)`, or an error unless the logits are `[n, vocab]` f32 or bf16 with `vocab > 0`
/// and the targets `[n]` u32.
fn check_inputs(
    logits: &[usize],
    logits_dtype: DType,
    targets: &[usize],
    targets_dtype: DType,
) -> candle_core::Result<(usize, usize)> {
    let &[n, vocab] = logits else {
        candle_core::bail!("cross entropy: expected [n, vocab] logits, got {logits:?}");
    };
    if vocab == 0 {
        candle_core::bail!("cross entropy: an empty vocabulary ({logits:?})");
    }
    if targets != [n] {
        candle_core::bail!("cross entropy: {n} rows of logits but targets {targets:?}");
    }
    if !matches!(logits_dtype, DType::F32 | DType::BF16) {
        candle_core::bail!("cross entropy: f32 or bf16 logits, got {logits_dtype:?}");
    }
    if targets_dtype != DType::U32 {
        candle_core::bail!("cross entropy: u32 targets, got {targets_dtype:?}");
    }
    Ok((n, vocab))
}

/// The row's max and the sum of `exp(x - max)` over it.
fn row_stats<T: Element>(row: &[T]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.widen()));
    let sum = row.iter().map(|v| (v.widen() - max).exp()).sum();
    (max, sum)
}

/// Losses of whole rows: `logits` holds `targets.len()` rows of `vocab` values. A target
/// `>= vocab` gives NaN for its row.
pub fn forward_rows<T: Element>(logits: &[T], targets: &[u32], vocab: usize, losses: &mut [f32]) {
    losses
        .par_iter_mut()
        .zip(logits.par_chunks(vocab).zip(targets))
        .for_each(|(loss, (row, &target))| {
            *loss = match row.get(target as usize) {
                Some(picked) => {
                    let (max, sum) = row_stats(row);
                    (sum.ln() + max) - picked.widen()
                }
                None => f32::NAN,
            };
        });
}

/// Logit gradients of whole rows: `grad[i] · (softmax(row i)[j] - [j == targets[i]])`, the
/// softmax recomputed in f32. A target `>= vocab` gives a row of NaN.
pub fn backward_rows<T: Element>(
    logits: &[T],
    targets: &[u32],
    grad: &[f32],
    vocab: usize,
    grad_logits: &mut [T],
) {
    grad_logits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab).zip(targets.par_iter().zip(grad)))
        .for_each(|(d, (row, (&target, &g)))| {
            if target as usize >= vocab {
                d.fill(T::narrow(f32::NAN));
                return;
            }
            let (max, sum) = row_stats(row);
            for (j, (out, v)) in d.iter_mut().zip(row).enumerate() {
                let p = (v.widen() - max).exp() / sum;
                let hit = if j == target as usize { 1.0 } else { 0.0 };
                *out = T::narrow(g * (p - hit));
            }
        });
}

/// An error naming the first target `>= vocab`.
fn check_targets(targets: &[u32], vocab: usize) -> candle_core::Result<()> {
    match targets.iter().position(|&t| t as usize >= vocab) {
        Some(i) => candle_core::bail!(
            "cross entropy: target {} of row {i} is outside the vocabulary of {vocab}",
            targets[i]
        ),
        None => Ok(()),
    }
}

/// `(logits, targets) -> losses`.
struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vocab) = check_inputs(l1.dims(), s1.dtype(), l2.dims(), s2.dtype())?;
        let targets = cpu_slice::<u32>(s2, l2)?;
        check_targets(targets, vocab)?;
        let mut losses = vec![0f32; n];
        match s1.dtype() {
            DType::F32 => forward_rows(cpu_slice::<f32>(s1, l1)?, targets, vocab, &mut losses),
            _ => forward_rows(cpu_slice::<bf16>(s1, l1)?, targets, vocab, &mut losses),
        }
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = check_inputs(l1.dims(), s1.dtype(), l2.dims(), s2.dtype())?;
        let shape = crate::gpu::cross_entropy::Rows { rows, vocab };
        let out = crate::gpu::cross_entropy::forward((s1, l1), (s2, l2), shape)?;
        Ok((out, Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _losses: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let d_logits = logits.apply_op3_no_bwd(targets, &grad, &CrossEntropyBackward)?;
        Ok((Some(d_logits), None))
    }
}

/// `(logits, targets, grad losses) -> grad logits`, in the logits' dtype.
struct CrossEntropyBackward;

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vocab) = check_inputs(l1.dims(), s1.dtype(), l2.dims(), s2.dtype())?;
        if l3.dims() != [n] || s3.dtype() != DType::F32 {
            candle_core::bail!("cross entropy backward: expected [{n}] f32 loss gradients");
        }
        let targets = cpu_slice::<u32>(s2, l2)?;
        check_targets(targets, vocab)?;
        let grad = cpu_slice::<f32>(s3, l3)?;
        let out = match s1.dtype() {
            DType::F32 => {
                let mut out = vec![0f32; n * vocab];
                backward_rows(cpu_slice::<f32>(s1, l1)?, targets, grad, vocab, &mut out);
                CpuStorage::F32(out)
            }
            _ => {
                let mut out = vec![bf16::ZERO; n * vocab];
                backward_rows(cpu_slice::<bf16>(s1, l1)?, targets, grad, vocab, &mut out);
                CpuStorage::BF16(out)
            }
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = check_inputs(l1.dims(), s1.dtype(), l2.dims(), s2.dtype())?;
        let shape = crate::gpu::cross_entropy::Rows { rows, vocab };
        let out = crate::gpu::cross_entropy::backward((s1, l1), (s2, l2), (s3, l3), shape)?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `[n, vocab]` logits uniform in `centre ± spread`, rounded to bf16 (so both dtypes hold
    /// the same values), random targets and per-row loss weights.
    fn inputs(n: usize, vocab: usize, centre: f32, seed: u64) -> (Tensor, Tensor, Tensor) {
        let mut rng = StdRng::seed_from_u64(seed);
        let logits: Vec<f32> = (0..n * vocab)
            .map(|_| bf16::from_f32(centre + rng.random_range(-8.0f32..8.0)).to_f32())
            .collect();
        let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
        let weights: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let dev = &Device::Cpu;
        (
            Tensor::from_vec(logits, (n, vocab), dev).unwrap(),
            Tensor::from_vec(targets, n, dev).unwrap(),
            Tensor::from_vec(weights, n, dev).unwrap(),
        )
    }

    /// Losses and logit gradients through `Σ loss · weights` (a non-uniform incoming
    /// gradient), fused or unfused, with the logits in `dtype`.
    fn run(
        logits: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        dtype: DType,
        fused: bool,
    ) -> [Vec<f32>; 2] {
        let x = Var::from_tensor(&logits.to_dtype(dtype).unwrap()).unwrap();
        let losses = match fused {
            true => cross_entropy(x.as_tensor(), targets).unwrap(),
            false => cross_entropy_unfused(x.as_tensor(), targets).unwrap(),
        };
        assert_eq!(losses.dtype(), DType::F32);
        let grads = (&losses * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = grads.get(x.as_tensor()).unwrap();
        assert_eq!(grad.dtype(), dtype);
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        [flat(&losses), flat(grad)]
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    // (rows, vocab, centre): one column, a short row, a long ragged row, and logits near 90
    // where exp overflows unless the max goes first.
    const CASES: [(usize, usize, f32); 4] =
        [(3, 1, 0.0), (5, 7, 0.0), (6, 1001, 0.0), (4, 300, 90.0)];

    #[test]
    fn matches_the_unfused_chain_in_f32() {
        for (seed, &(n, vocab, centre)) in CASES.iter().enumerate() {
            let (x, t, w) = inputs(n, vocab, centre, seed as u64);
            let [loss_f, grad_f] = run(&x, &t, &w, DType::F32, true);
            let [loss_u, grad_u] = run(&x, &t, &w, DType::F32, false);
            // The losses are log-sums of size up to ~ln(1001) + 16 (+ 90): relative 1e-6.
            let scale = loss_u.iter().fold(1f32, |m, v| m.max(v.abs())) + centre;
            let dl = max_abs_diff(&loss_f, &loss_u);
            let dg = max_abs_diff(&grad_f, &grad_u);
            assert!(
                dl <= 1e-6 * scale && dg <= 1e-6,
                "{n}x{vocab}: losses {dl}, grads {dg}"
            );
        }
    }

    #[test]
    fn bf16_gradients_round_once_from_the_f32_values() {
        // The same bf16-exact logits: f32 math is the reference. The loss is f32 in both; the
        // gradient differs from the f32 one by its one rounding to bf16 (half an ulp: at most
        // 2^-8 of the value) and the f32 noise (1e-6 absolute, as above). candle's chain upcasts first,
        // so it rounds once too: no worse than that either.
        for (seed, &(n, vocab, centre)) in CASES.iter().enumerate() {
            let (x, t, w) = inputs(n, vocab, centre, 10 + seed as u64);
            let [loss_ref, grad_ref] = run(&x, &t, &w, DType::F32, false);
            let [loss_f, grad_f] = run(&x, &t, &w, DType::BF16, true);
            let [_, grad_u] = run(&x, &t, &w, DType::BF16, false);
            let scale = loss_ref.iter().fold(1f32, |m, v| m.max(v.abs())) + centre;
            let dl = max_abs_diff(&loss_f, &loss_ref);
            assert!(dl <= 1e-6 * scale, "{n}x{vocab}: losses {dl}");
            for (j, ((f, u), r)) in grad_f.iter().zip(&grad_u).zip(&grad_ref).enumerate() {
                let bound = r.abs() / 256.0 + 1e-6;
                assert!((f - r).abs() <= bound, "{n}x{vocab} [{j}]: {f} vs f32 {r}");
                assert!(
                    (f - r).abs() <= (u - r).abs() + 1e-6,
                    "{n}x{vocab} [{j}]: {f}, candle {u}, f32 {r}"
                );
            }
        }
    }

    #[test]
    fn a_row_is_logsumexp_minus_the_target() {
        // ln(e^0 + e^ln3) = ln 4: targets 0 and 1 of the row [0, ln 3].
        let x = Tensor::new(&[[0f32, 3f32.ln()], [0.0, 3f32.ln()]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let loss: Vec<f32> = cross_entropy(&x, &t).unwrap().to_vec1().unwrap();
        let want = [4f32.ln(), 4f32.ln() - 3f32.ln()];
        assert!(max_abs_diff(&loss, &want) < 1e-6, "{loss:?} vs {want:?}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let dev = &Device::Cpu;
        let x = Tensor::zeros((2, 5), DType::F32, dev).unwrap();
        let t = Tensor::new(&[1u32, 4], dev).unwrap();
        assert!(cross_entropy(&x, &t).is_ok());
        let bad_target = Tensor::new(&[1u32, 5], dev).unwrap();
        let err = cross_entropy(&x, &bad_target).unwrap_err().to_string();
        assert!(err.contains("target 5 of row 1"), "{err}");
        let cases = [
            (x.reshape(10).unwrap(), t.clone()), // not [n, vocab]
            (x.clone(), Tensor::new(&[1u32, 2, 3], dev).unwrap()), // three targets, two rows
            (x.to_dtype(DType::F16).unwrap(), t.clone()), // logits dtype
            (x.clone(), t.to_dtype(DType::I64).unwrap()), // targets dtype
            (Tensor::zeros((2, 0), DType::F32, dev).unwrap(), t.clone()), // empty vocabulary
        ];
        for (i, (x, t)) in cases.iter().enumerate() {
            assert!(cross_entropy(x, t).is_err(), "case {i}");
            assert!(cross_entropy_unfused(x, t).is_err(), "case {i}");
        }
    }

    #[test]
    fn the_rows_give_nan_for_a_bad_target_and_read_nothing_past_the_row() {
        let logits = [0f32, 1.0, 2.0, 3.0];
        let mut losses = [0f32; 2];
        forward_rows(&logits, &[1, 2], 2, &mut losses);
        assert!(losses[0].is_finite() && losses[1].is_nan(), "{losses:?}");
        let mut grads = [0f32; 4];
        backward_rows(&logits, &[u32::MAX, 0], &[1.0, 1.0], 2, &mut grads);
        assert!(grads[..2].iter().all(|v| v.is_nan()), "{grads:?}");
        assert!(grads[2..].iter().all(|v| v.is_finite()), "{grads:?}");
    }
}
