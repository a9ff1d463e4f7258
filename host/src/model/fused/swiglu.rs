//! SwiGLU as one op: `silu(gate) · up`, math in f32, for f32 or bf16 tensors of one shape (the
//! output keeps their dtype). Unfused, the forward is two passes (silu, product) and its
//! backward about eight; fused, each direction is one pass per output. The CPU loops below
//! are the reference the CUDA kernels (`gpu/swiglu.cu`) mirror formula for formula.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{Element, cpu_inputs, cpu_pass, each_dtype};

/// `silu(gate) · up`, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} {:?} and up {:?} {:?} differ",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// The gradients of [`swiglu`] with respect to `gate` and `up`, for `grad` (any float dtype,
/// rounded to theirs), in one pass over the three inputs. Records no autograd graph. The two
/// gradients are views of one buffer `[2, ...]` (`d gate` first).
pub fn swiglu_backward(
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (gate, up, grad) = grad_inputs(gate, up, grad)?;
    let both = gate.apply_op3_no_bwd(&up, &grad, &SwigluGrad(Wrt::Both))?;
    Ok((both.get(0)?, both.get(1)?))
}

/// [`swiglu_backward`] as two passes, one per gradient (the same values; kept for the
/// before/after measurement).
pub fn swiglu_backward_two_pass(
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (gate, up, grad) = grad_inputs(gate, up, grad)?;
    let d_gate = gate.apply_op3_no_bwd(&up, &grad, &SwigluGrad(Wrt::Gate))?;
    let d_up = gate.apply_op3_no_bwd(&up, &grad, &SwigluGrad(Wrt::Up))?;
    Ok((d_gate, d_up))
}

/// The gradient kernels' inputs: contiguous, `grad` in the activations' dtype.
fn grad_inputs(
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let grad = grad.contiguous()?.to_dtype(gate.dtype())?;
    Ok((gate, up, grad))
}

/// The chain [`swiglu`] replaces (kept for the before/after measurement).
pub fn swiglu_unfused(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.silu()? * up
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out = silu(gate) · up`.
pub fn forward_values<T: Element>(gate: &[T], up: &[T], out: &mut [T]) {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up))
        .for_each(|(o, (g, u))| {
            let g = g.widen();
            *o = T::narrow(g * sigmoid(g) * u.widen());
        });
}

/// `out = grad · up · silu'(gate)`, `silu'(x) = s (1 + x (1 - s))` with `s = sigmoid(x)`.
pub fn grad_gate_values<T: Element>(gate: &[T], up: &[T], grad: &[T], out: &mut [T]) {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter().zip(grad)))
        .for_each(|(o, (g, (u, d)))| {
            let g = g.widen();
            let s = sigmoid(g);
            *o = T::narrow(d.widen() * u.widen() * (s * (1.0 + g * (1.0 - s))));
        });
}

/// `out = grad · silu(gate)`.
pub fn grad_up_values<T: Element>(gate: &[T], grad: &[T], out: &mut [T]) {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(grad))
        .for_each(|(o, (g, d))| {
            let g = g.widen();
            *o = T::narrow(d.widen() * (g * sigmoid(g)));
        });
}

/// `out[..n] = d gate`, `out[n..] = d up` (`out` twice the inputs' length): both gradients
/// from one read of the inputs.
pub fn grads_values<T: Element>(gate: &[T], up: &[T], grad: &[T], out: &mut [T]) {
    let (d_gate, d_up) = out.split_at_mut(gate.len());
    grad_gate_values(gate, up, grad, d_gate);
    grad_up_values(gate, grad, d_up);
}

/// Which gradient [`SwigluGrad`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrt {
    Gate,
    Up,
    /// Both, stacked: `[2, ...]`.
    Both,
}

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_pass(self.name(), &[(s1, l1), (s2, l2)], |inputs| {
            each_dtype!(inputs, |v, out| forward_values(v[0], v[1], &mut out))
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
        use crate::gpu::swiglu::{Pass, run};
        let n = super::common_shape(self.name(), &[l1, l2])?.elem_count();
        let out = run(Pass::Forward, &[(s1, l1), (s2, l2)], n)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = swiglu_backward(gate, up, grad)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// `(gate, up, grad) -> d gate` or `d up`.
struct SwigluGrad(Wrt);

impl CustomOp3 for SwigluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
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
        let wrt = self.0;
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        if wrt == Wrt::Both {
            let shape = super::common_shape(self.name(), &[l1, l2, l3])?;
            let inputs = cpu_inputs(self.name(), &inputs)?;
            let out = each_dtype!(inputs, len = 2 * v[0].len(), |v, out| grads_values(
                v[0], v[1], v[2], &mut out
            ));
            return Ok((out, super::stacked(shape)));
        }
        cpu_pass(self.name(), &inputs, |inputs| {
            each_dtype!(inputs, |v, out| match wrt {
                Wrt::Gate => grad_gate_values(v[0], v[1], v[2], &mut out),
                _ => grad_up_values(v[0], v[2], &mut out),
            })
        })
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
        use crate::gpu::swiglu::{Pass, run};
        let n = super::common_shape(self.name(), &[l1, l2, l3])?.elem_count();
        let out = match self.0 {
            Wrt::Gate => run(Pass::GradGate, &[(s1, l1), (s2, l2), (s3, l3)], n)?,
            Wrt::Up => run(Pass::GradUp, &[(s1, l1), (s3, l3)], n)?,
            Wrt::Both => {
                let out = run(Pass::Grads, &[(s1, l1), (s2, l2), (s3, l3)], n)?;
                return Ok((out, super::stacked(l1.shape())));
            }
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bf16_exact, scaled_diff, weighted_sum_grads};
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Output and both gradients, through `Σ out · weights`, of the inputs made by `seed` in
    /// `dtype`, fused or candle's `silu() * up`.
    fn run(dtype: DType, fused: bool) -> [Tensor; 3] {
        let dims = [3, 5, 37];
        let input = |seed| bf16_exact(&dims, seed, 6.0, dtype);
        let (gate, up, weights) = (input(1), input(2), input(3));
        let (g, u) = (
            Var::from_tensor(&gate).unwrap(),
            Var::from_tensor(&up).unwrap(),
        );
        let out = match fused {
            true => swiglu(g.as_tensor(), u.as_tensor()).unwrap(),
            false => swiglu_unfused(g.as_tensor(), u.as_tensor()).unwrap(),
        };
        assert_eq!(out.dtype(), dtype);
        let [d_gate, d_up] = weighted_sum_grads(&out, &weights, [&g, &u]);
        [out, d_gate, d_up]
    }

    #[test]
    fn matches_candles_chain_in_f32() {
        let (fused, plain) = (run(DType::F32, true), run(DType::F32, false));
        for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
            let d = scaled_diff(a, b);
            assert!(d < 1e-6, "output/grad {i}: {d}");
        }
    }

    #[test]
    fn in_bf16_it_is_nearer_the_f32_values_than_candles_chain() {
        // The same bf16-exact inputs: f32 math is the reference. candle rounds each step of
        // silu and of its derivative to bf16; the fused op rounds once, at the end.
        let reference = run(DType::F32, false);
        let (fused, plain) = (run(DType::BF16, true), run(DType::BF16, false));
        for i in 0..3 {
            let ours = scaled_diff(&fused[i], &reference[i]);
            let theirs = scaled_diff(&plain[i], &reference[i]);
            assert!(
                ours < 4e-3 && ours <= theirs,
                "output/grad {i}: {ours} vs candle {theirs}"
            );
        }
    }

    /// The one-pass gradients are the two passes' values, in order, shaped like the inputs.
    #[test]
    fn both_gradients_in_one_pass_are_the_two_passes_values() {
        for dtype in [DType::F32, DType::BF16] {
            let dims = [2, 3, 41];
            let (gate, up) = (
                bf16_exact(&dims, 1, 6.0, dtype),
                bf16_exact(&dims, 2, 6.0, dtype),
            );
            // An f32 gradient, rounded to the inputs' dtype by both.
            let grad = bf16_exact(&dims, 3, 2.0, DType::F32);
            let (d_gate, d_up) = swiglu_backward(&gate, &up, &grad).unwrap();
            let (want_gate, want_up) = swiglu_backward_two_pass(&gate, &up, &grad).unwrap();
            for (name, ours, want) in [("gate", d_gate, want_gate), ("up", d_up, want_up)] {
                assert_eq!(ours.dims(), &dims, "{dtype:?} d {name}");
                assert_eq!(ours.dtype(), dtype, "{dtype:?} d {name}");
                assert_eq!(scaled_diff(&ours, &want), 0.0, "{dtype:?} d {name}");
            }
        }
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let a = bf16_exact(&[2, 3], 0, 6.0, DType::F32);
        assert!(swiglu(&a, &bf16_exact(&[3, 2], 0, 6.0, DType::F32)).is_err());
        assert!(swiglu(&a, &a.to_dtype(DType::BF16).unwrap()).is_err());
        let ints = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
        assert!(swiglu(&ints, &ints).is_err());
    }
}
