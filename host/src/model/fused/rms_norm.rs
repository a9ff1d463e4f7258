//! RMSNorm as one op: `round(x · rsqrt(mean(x²) + eps)) · weight` over the last dim, the
//! statistic in f32, for f32 or bf16 `x` and `weight` of one dtype (the output keeps it). The
//! inner rounding to `x`'s dtype before the weight is transformers' order, kept so fused and
//! unfused agree bit for bit wherever their sums do.
//!
//! Unfused, the forward is six passes (upcast, square, mean, scale, downcast, weight) and its
//! backward about ten; fused, each direction is one read of the rows and one write. The weight
//! is frozen in QLoRA, so its gradient is only computed when the weight is tracked (and then
//! by candle's ops: it is a sum over all rows, a different kernel shape). The CPU rows below
//! are the reference the CUDA kernels (`gpu/rms_norm.cu`) mirror formula for formula.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::cpu::{Element, cpu_inputs, each_dtype};

/// RMSNorm of `x: [..., n]` with `weight: [n]` (one dtype). Differentiable in both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    row_len(x.dims(), weight.dims())?;
    if x.dtype() != weight.dtype() {
        candle_core::bail!(
            "rms norm: x is {:?}, the weight {:?}",
            x.dtype(),
            weight.dtype()
        );
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

/// The gradient of [`rms_norm`] with respect to `x`, for a frozen weight: `grad` (any float
/// dtype, rounded to `x`'s) back through the row's scaling. Records no autograd graph.
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let grad = grad.contiguous()?.to_dtype(x.dtype())?;
    x.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &grad, &RmsNormGrad { eps })
}

/// `(x + y, rms_norm(x + y, weight))` in one pass for `x`, `y: [..., n]` of one dtype: a
/// residual sum and the norm that reads it, as a decoder layer's attention block ends and its
/// MLP block begins. The sum is rounded to the dtype before the norm reads it (as candle's
/// `x + y` then [`rms_norm`]: the same bits). The two are views of one buffer `[2, ...]` (the
/// sum first). Records no autograd graph.
pub fn residual_rms_norm(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    row_len(x.dims(), weight.dims())?;
    if x.dims() != y.dims() || x.dtype() != y.dtype() || x.dtype() != weight.dtype() {
        candle_core::bail!(
            "residual rms norm: x {:?} {:?}, y {:?} {:?}, weight {:?}",
            x.dims(),
            x.dtype(),
            y.dims(),
            y.dtype(),
            weight.dtype()
        );
    }
    let both = x.contiguous()?.apply_op3_no_bwd(
        &y.contiguous()?,
        &weight.contiguous()?,
        &ResidualRmsNorm { eps },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `residual + d x` in one pass, `d x` being [`rms_norm_backward`]'s: the gradient of a
/// residual block's input, where the norm's gradient and the block's skip connection meet.
/// `d x` is rounded to `x`'s dtype before the sum (as the unfused sum of the two: the same
/// bits); `grad` and `residual` are rounded to it first. Records no autograd graph.
pub fn rms_norm_backward_add(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    residual: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let grad = grad.contiguous()?.to_dtype(x.dtype())?;
    let residual = residual.contiguous()?.to_dtype(x.dtype())?;
    let op = RmsNormGradAdd {
        eps,
        weight: weight.contiguous()?,
    };
    x.contiguous()?.apply_op3_no_bwd(&grad, &residual, &op)
}

/// The chain [`rms_norm`] replaces (kept for the before/after measurement).
pub fn rms_norm_unfused(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + f64::from(eps))?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// The row length `n` of `x: [..., n]`, when `weight` is `[n]` and `n > 0`.
fn row_len(x: &[usize], weight: &[usize]) -> candle_core::Result<usize> {
    match (x.last(), weight) {
        (Some(&n), &[w]) if n == w && n > 0 => Ok(n),
        _ => candle_core::bail!("rms norm: x {x:?} and weight {weight:?} do not match"),
    }
}

/// `1 / sqrt(Σ x² / n + eps)` of one row.
fn inverse_rms<T: Element>(row: &[T], eps: f32) -> f32 {
    let squares: f32 = row.iter().map(|v| v.widen() * v.widen()).sum();
    1.0 / (squares / row.len() as f32 + eps).sqrt()
}

/// Forward over whole rows of `weight.len()` values.
pub fn forward_rows<T: Element>(x: &[T], weight: &[T], out: &mut [T], eps: f32) {
    let n = weight.len();
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(o, x)| {
            let inv = inverse_rms(x, eps);
            for ((o, v), w) in o.iter_mut().zip(x).zip(weight) {
                *o = T::narrow(T::narrow(v.widen() * inv).widen() * w.widen());
            }
        });
}

/// Backward over whole rows, w.r.t. `x`: with `g = grad · weight` and `r` the row's inverse
/// RMS, `dx = r · g - x · r³ · (Σ g · x) / n`.
pub fn backward_rows<T: Element>(x: &[T], weight: &[T], grad: &[T], out: &mut [T], eps: f32) {
    let n = weight.len();
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(grad.par_chunks(n)))
        .for_each(|(o, (x, g))| {
            let r = inverse_rms(x, eps);
            let scaled = |g: &T, w: &T| g.widen() * w.widen();
            let dot: f32 = x
                .iter()
                .zip(g.iter().zip(weight))
                .map(|(v, (g, w))| scaled(g, w) * v.widen())
                .sum();
            let c = dot * r * r * r / n as f32;
            for (o, (v, (g, w))) in o.iter_mut().zip(x.iter().zip(g.iter().zip(weight))) {
                *o = T::narrow(r * scaled(g, w) - v.widen() * c);
            }
        });
}

/// [`forward_rows`] of `x + y` (rounded to `T`): `out[..len]` the sum, `out[len..]` the
/// norm (`out` twice the inputs' length).
pub fn residual_forward_rows<T: Element>(x: &[T], y: &[T], weight: &[T], out: &mut [T], eps: f32) {
    let (sum, normed) = out.split_at_mut(x.len());
    sum.par_iter_mut()
        .zip(x.par_iter().zip(y))
        .for_each(|(s, (x, y))| *s = T::narrow(x.widen() + y.widen()));
    forward_rows(sum, weight, normed, eps);
}

/// `residual + round(d x)` over whole rows, `d x` as [`backward_rows`] gives it.
pub fn backward_add_rows<T: Element>(
    x: &[T],
    weight: &[T],
    grad: &[T],
    residual: &[T],
    out: &mut [T],
    eps: f32,
) {
    backward_rows(x, weight, grad, out, eps);
    out.par_iter_mut()
        .zip(residual)
        .for_each(|(o, r)| *o = T::narrow(r.widen() + o.widen()));
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        row_len(l1.dims(), l2.dims())?;
        let inputs = cpu_inputs(self.name(), &[(s1, l1), (s2, l2)])?;
        let out = each_dtype!(inputs, |v, out| forward_rows(
            v[0], v[1], &mut out, self.eps
        ));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = row_len(l1.dims(), l2.dims())?;
        let out = crate::gpu::rms_norm::forward((s1, l1), (s2, l2), n, self.eps)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = rms_norm_backward(x, weight, grad, self.eps)?;
        let dw = match weight.track_op() {
            true => Some(self.weight_grad(x, weight, &grad.to_dtype(x.dtype())?)?),
            false => None,
        };
        Ok((Some(dx), dw))
    }
}

impl RmsNorm {
    /// `Σ_rows grad · round(x · r)`, in the weight's dtype.
    fn weight_grad(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let ones = weight.ones_like()?;
        let normed = x.apply_op2_no_bwd(&ones, self)?.to_dtype(DType::F32)?;
        let n = weight.elem_count();
        (grad.to_dtype(DType::F32)? * normed)?
            .reshape(((), n))?
            .sum(0)?
            .to_dtype(weight.dtype())
    }
}

/// `(x, weight, grad) -> d x`.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
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
        row_len(l1.dims(), l2.dims())?;
        super::common_shape(self.name(), &[l1, l3])?;
        let inputs = cpu_inputs(self.name(), &[(s1, l1), (s2, l2), (s3, l3)])?;
        let out = each_dtype!(inputs, |v, out| backward_rows(
            v[0], v[1], v[2], &mut out, self.eps
        ));
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
        let n = row_len(l1.dims(), l2.dims())?;
        super::common_shape(self.name(), &[l1, l3])?;
        let out = crate::gpu::rms_norm::backward((s1, l1), (s2, l2), (s3, l3), n, self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

/// `(x, y, weight) -> [x + y, rms_norm(x + y)]`.
struct ResidualRmsNorm {
    eps: f32,
}

impl CustomOp3 for ResidualRmsNorm {
    fn name(&self) -> &'static str {
        "residual-rms-norm"
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
        row_len(l1.dims(), l3.dims())?;
        let shape = super::common_shape(self.name(), &[l1, l2])?;
        let inputs = cpu_inputs(self.name(), &[(s1, l1), (s2, l2), (s3, l3)])?;
        let out = each_dtype!(
            inputs,
            len = 2 * v[0].len(),
            |v, out| residual_forward_rows(v[0], v[1], v[2], &mut out, self.eps)
        );
        Ok((out, super::stacked(shape)))
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
        let n = row_len(l1.dims(), l3.dims())?;
        let shape = super::common_shape(self.name(), &[l1, l2])?;
        let out =
            crate::gpu::rms_norm::residual_forward((s1, l1), (s2, l2), (s3, l3), n, self.eps)?;
        Ok((out, super::stacked(shape)))
    }
}

/// `(x, grad, residual) -> residual + d x`, with the norm's weight held here: candle's custom
/// ops take at most three tensors.
struct RmsNormGradAdd {
    eps: f32,
    weight: Tensor,
}

impl CustomOp3 for RmsNormGradAdd {
    fn name(&self) -> &'static str {
        "rms-norm-grad-add"
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
        let (weight, wl) = self.weight.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else {
            candle_core::bail!("{}: the weight is not on the CPU", self.name());
        };
        row_len(l1.dims(), wl.dims())?;
        let shape = super::common_shape(self.name(), &[l1, l2, l3])?.clone();
        let inputs = cpu_inputs(self.name(), &[(s1, l1), (weight, wl), (s2, l2), (s3, l3)])?;
        let out = each_dtype!(inputs, |v, out| backward_add_rows(
            v[0], v[1], v[2], v[3], &mut out, self.eps
        ));
        Ok((out, shape))
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
        let (weight, wl) = self.weight.storage_and_layout();
        let Storage::Cuda(weight) = &*weight else {
            candle_core::bail!("{}: the weight is not on the GPU", self.name());
        };
        let n = row_len(l1.dims(), wl.dims())?;
        let shape = super::common_shape(self.name(), &[l1, l2, l3])?.clone();
        let out = crate::gpu::rms_norm::backward_add(
            (s1, l1),
            (weight, wl),
            (s2, l2),
            (s3, l3),
            n,
            self.eps,
        )?;
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bf16_exact, scaled_diff, weighted_sum_grads};
    use super::*;
    use candle_core::{Device, Var};

    const EPS: f32 = 1e-5;

    /// Output, d x and d weight (the weight tracked) through `Σ out · weights`.
    fn run(dtype: DType, fused: bool) -> [Tensor; 3] {
        let dims = [3, 5, 67];
        let x = Var::from_tensor(&bf16_exact(&dims, 1, 3.0, dtype)).unwrap();
        let w = Var::from_tensor(&bf16_exact(&[67], 2, 3.0, dtype)).unwrap();
        let weights = bf16_exact(&dims, 3, 3.0, dtype);
        let out = match fused {
            true => rms_norm(x.as_tensor(), w.as_tensor(), EPS).unwrap(),
            false => rms_norm_unfused(x.as_tensor(), w.as_tensor(), EPS).unwrap(),
        };
        assert_eq!(out.dtype(), dtype);
        let [dx, dw] = weighted_sum_grads(&out, &weights, [&x, &w]);
        [out, dx, dw]
    }

    #[test]
    fn matches_the_unfused_chain_in_f32() {
        let (fused, plain) = (run(DType::F32, true), run(DType::F32, false));
        for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
            let d = scaled_diff(a, b);
            assert!(d < 2e-6, "output/grad {i}: {d}");
        }
    }

    #[test]
    fn in_bf16_the_output_rounds_like_the_chain_and_the_gradient_is_nearer_f32() {
        let reference = run(DType::F32, false);
        let (fused, plain) = (run(DType::BF16, true), run(DType::BF16, false));
        // Same statistic in f32 and the same two roundings: at most one bf16 step apart (where
        // the two sums differ in their last bit and a value sits on a rounding boundary).
        assert!(scaled_diff(&fused[0], &plain[0]) < 2.0 * 2f32.powi(-8));
        // The gradient: candle rounds every step of the chain to bf16, the fused op once.
        let ours = scaled_diff(&fused[1], &reference[1]);
        let theirs = scaled_diff(&plain[1], &reference[1]);
        assert!(
            ours < 8e-3 && ours <= theirs,
            "d x: {ours} vs candle {theirs}"
        );
        assert!(scaled_diff(&fused[2], &reference[2]) < 1e-2);
    }

    /// The residual sum and its norm in one pass are `x + y` and `rms_norm` of it, bit for bit.
    #[test]
    fn the_residual_sum_and_its_norm_are_the_unfused_pair() {
        for dtype in [DType::F32, DType::BF16] {
            let dims = [2, 3, 67];
            let (x, y) = (
                bf16_exact(&dims, 1, 3.0, dtype),
                bf16_exact(&dims, 2, 3.0, dtype),
            );
            let w = bf16_exact(&[67], 3, 3.0, dtype);
            let (sum, normed) = residual_rms_norm(&x, &y, &w, EPS).unwrap();
            let want_sum = (&x + &y).unwrap();
            let want_normed = rms_norm(&want_sum, &w, EPS).unwrap();
            for (name, ours, want) in [("sum", sum, want_sum), ("norm", normed, want_normed)] {
                assert_eq!(ours.dims(), &dims, "{dtype:?} {name}");
                assert_eq!(ours.dtype(), dtype, "{dtype:?} {name}");
                assert_eq!(scaled_diff(&ours, &want), 0.0, "{dtype:?} {name}");
            }
        }
        let x = bf16_exact(&[2, 8], 0, 3.0, DType::F32);
        let w = bf16_exact(&[8], 0, 3.0, DType::F32);
        let short = bf16_exact(&[2, 7], 0, 3.0, DType::F32);
        assert!(residual_rms_norm(&x, &short, &w, EPS).is_err());
        let other = x.to_dtype(DType::BF16).unwrap();
        assert!(residual_rms_norm(&x, &other, &w, EPS).is_err());
        assert!(residual_rms_norm(&x, &x, &bf16_exact(&[7], 0, 3.0, DType::F32), EPS).is_err());
    }

    /// The norm's gradient plus the residual's in one pass is their unfused sum, bit for bit.
    #[test]
    fn the_norm_gradient_plus_the_residual_is_the_unfused_sum() {
        for dtype in [DType::F32, DType::BF16] {
            let dims = [2, 3, 67];
            let x = bf16_exact(&dims, 1, 3.0, dtype);
            let w = bf16_exact(&[67], 2, 3.0, dtype);
            let (grad, residual) = (
                bf16_exact(&dims, 3, 1.0, dtype),
                bf16_exact(&dims, 4, 1.0, dtype),
            );
            let ours = rms_norm_backward_add(&x, &w, &grad, &residual, EPS).unwrap();
            let want = (&residual + rms_norm_backward(&x, &w, &grad, EPS).unwrap()).unwrap();
            assert_eq!(ours.dims(), &dims);
            assert_eq!(ours.dtype(), dtype);
            assert_eq!(scaled_diff(&ours, &want), 0.0, "{dtype:?}");
        }
        let x = bf16_exact(&[2, 8], 0, 3.0, DType::F32);
        let short = bf16_exact(&[2, 7], 0, 3.0, DType::F32);
        let w = bf16_exact(&[8], 0, 3.0, DType::F32);
        assert!(rms_norm_backward_add(&x, &w, &x, &short, EPS).is_err());
        assert!(
            rms_norm_backward_add(&x, &bf16_exact(&[7], 0, 3.0, DType::F32), &x, &x, EPS).is_err()
        );
    }

    #[test]
    fn an_untracked_weight_gets_no_gradient() {
        let x = Var::from_tensor(&bf16_exact(&[4, 8], 1, 3.0, DType::F32)).unwrap();
        let w = bf16_exact(&[8], 2, 3.0, DType::F32);
        let out = rms_norm(x.as_tensor(), &w, EPS).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&w).is_none());
    }

    #[test]
    fn a_zero_row_stays_finite() {
        let x =
            Var::from_tensor(&Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let w = bf16_exact(&[16], 2, 3.0, DType::F32);
        let out = rms_norm(x.as_tensor(), &w, EPS).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = w
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|w| w / EPS.sqrt())
            .collect();
        for (row, chunk) in dx.chunks(16).enumerate() {
            for (got, want) in chunk.iter().zip(&want) {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs(),
                    "row {row}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let x = bf16_exact(&[2, 8], 0, 3.0, DType::F32);
        assert!(rms_norm(&x, &bf16_exact(&[7], 0, 3.0, DType::F32), EPS).is_err());
        assert!(rms_norm(&x, &bf16_exact(&[2, 8], 0, 3.0, DType::F32), EPS).is_err());
        assert!(rms_norm(&x, &bf16_exact(&[8], 0, 3.0, DType::BF16), EPS).is_err());
        let empty = Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap();
        assert!(
            rms_norm(
                &empty,
                &Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap(),
                EPS
            )
            .is_err()
        );
        let ints = Tensor::zeros((2, 8), DType::U32, &Device::Cpu).unwrap();
        assert!(
            rms_norm(
                &ints,
                &Tensor::zeros(8, DType::U32, &Device::Cpu).unwrap(),
                EPS
            )
            .is_err()
        );
    }
}
