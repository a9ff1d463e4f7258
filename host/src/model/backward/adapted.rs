//! One of a layer's linears with its adapter, forward and backward written out:
//! `y = x Wᵀ + (s · dropout(x) A_rᵀ) B_rᵀ`, with the scale `s` on the rank-wide product as
//! [`crate::model::lora::LoraModule::delta`] puts it. The forward keeps what the backward needs;
//! the backward gives the input gradient and the gradient of only the adapter rows that learn at
//! this rank (DyLoRA's frozen mode: one row of `A`, one column of `B`).

use candle_core::Tensor;

use crate::model::fused::add_product::add_product;
use crate::model::linear::BaseLinear;
use crate::model::lora::{AdapterCall, ModuleKey};
use crate::model::matmul::matmul;
use crate::phases;

/// The [`phases::within`] category of the adapter's products, sums and gradients.
const LORA: &str = "LoRA path";

/// The gradients of one adapter module, shaped like its `A: [r_max, in]` and `B: [out, r_max]`
/// and in their dtypes; zero outside the rank indices that learn.
#[derive(Debug)]
pub struct ModuleGrads {
    /// Which module.
    pub key: ModuleKey,
    /// `d A`.
    pub a: Tensor,
    /// `d B`.
    pub b: Tensor,
}

/// How a linear's base and adapter terms are summed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sums {
    /// The adapter's products added into an existing sum by the product itself
    /// ([`add_product`], `Fusions::lora_add`).
    pub lora_add: bool,
    /// The adapter's term written first and the base product added into it by its GEMM
    /// ([`BaseLinear::add_forward`], `Fusions::base_add`); input gradients also add into the
    /// sum of the linears that share an input.
    pub base_add: bool,
}

/// What one linear's backward pass needs from its forward pass.
pub(super) struct Saved<'a> {
    base: &'a BaseLinear,
    lora: Option<LoraSaved>,
    sums: Sums,
}

/// The adapter's part of [`Saved`].
struct LoraSaved {
    key: ModuleKey,
    /// The adapter's input after dropout, `[m, in]`.
    input: Tensor,
    /// The dropout mask, `[m, in]` (`None`: no dropout).
    mask: Option<Tensor>,
    /// `s · input A_rᵀ`, `[m, r]`.
    scaled: Tensor,
    /// `A[:r]` and `B[:, :r]` in the activations' dtype.
    a: Tensor,
    b: Tensor,
    scale: f64,
    /// `A`'s and `B`'s own dtype and stored rank (`A`'s rows), for the gradients' shapes.
    var_dtype: candle_core::DType,
    stored_rank: usize,
    learning: std::ops::Range<usize>,
}

/// The adapter's share of the forward pass for `x: [..., in]`, without the base product: what
/// the backward needs when the linear's output itself is not (the last linear of a recomputed
/// layer). Draws the same dropout mask as [`forward`] would.
pub(super) fn prepare<'a>(
    base: &'a BaseLinear,
    key: ModuleKey,
    x: &Tensor,
    call: &AdapterCall<'_>,
    sums: Sums,
) -> candle_core::Result<Saved<'a>> {
    let Some(module) = call.adapter.modules.get(&key) else {
        return Ok(Saved {
            base,
            lora: None,
            sums,
        });
    };
    let lora = phases::within(LORA, || {
        let x = x.reshape(((), module.in_features))?;
        let mask = match call.dropout {
            Some(dropout) => dropout.mask_for(&x)?,
            None => None,
        };
        let input = match &mask {
            Some(mask) => (&x * mask)?,
            None => x,
        };
        let (r, dtype) = (call.rank, input.dtype());
        // Detached: the gradients below are computed here, not by autograd.
        let a = module.a.as_tensor().detach().narrow(0, 0, r)?;
        let b = module.b.as_tensor().detach().narrow(1, 0, r)?;
        let a = a.to_dtype(dtype)?.contiguous()?;
        let b = b.to_dtype(dtype)?.contiguous()?;
        let scale = call.adapter.scale(r);
        let scaled = (matmul(&input, &a.t()?)? * scale)?;
        Ok(LoraSaved {
            key,
            input,
            mask,
            scaled,
            a,
            b,
            scale,
            var_dtype: module.a.dtype(),
            stored_rank: module.a.dim(0)?,
            learning: call.grad.learning_rows(r),
        })
    })?;
    Ok(Saved {
        base,
        lora: Some(lora),
        sums,
    })
}

/// `y = x Wᵀ + delta(x)` for `x: [..., in]`, and what [`Saved::backward`] needs.
pub(super) fn forward<'a>(
    base: &'a BaseLinear,
    key: ModuleKey,
    x: &Tensor,
    call: &AdapterCall<'_>,
    sums: Sums,
) -> candle_core::Result<(Tensor, Saved<'a>)> {
    let saved = prepare(base, key, x, call, sums)?;
    let y = match &saved.lora {
        None => base.forward(x)?,
        // The memory-bound product writes `[m, out]` once; the base GEMM adds into it as it
        // writes, where the other order reads and writes its output again.
        Some(lora) if sums.base_add => {
            let delta = phases::within(LORA, || {
                matmul(&lora.scaled, &lora.b.t()?)?.reshape(rows_of(x, base.out_features()))
            })?;
            base.add_forward(delta, x)?
        }
        Some(lora) => {
            let y = base.forward(x)?;
            phases::within(LORA, || saved.add_product(y, &lora.scaled, &lora.b.t()?))?
        }
    };
    Ok((y, saved))
}

/// `t`'s leading dims with `width` last.
fn rows_of(t: &Tensor, width: usize) -> Vec<usize> {
    let mut dims = t.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = width;
    }
    dims
}

impl Saved<'_> {
    /// The input gradient `[..., in]` for `grad: [..., out]`, added to `acc` (the input
    /// gradient of linears before it that read the same input) when given, and the adapter's
    /// gradients when this linear has an adapter with rows that learn.
    pub(super) fn backward(
        &self,
        grad: &Tensor,
        acc: Option<Tensor>,
    ) -> candle_core::Result<(Tensor, Option<ModuleGrads>)> {
        if self.sums.base_add {
            // The adapter's term first, then the base GEMM adds into it as it writes.
            let (acc, grads) = match &self.lora {
                Some(lora) => {
                    let (sum, grads) =
                        phases::within(LORA, || self.lora_backward(lora, grad, acc))?;
                    (Some(sum), grads)
                }
                None => (acc, None),
            };
            let dx = match acc {
                Some(acc) => self.base.add_input_grad(acc, grad)?,
                None => self.base.input_grad(grad)?,
            };
            return Ok((dx, grads));
        }
        let dx = self.base.input_grad(grad)?;
        let (dx, grads) = match &self.lora {
            Some(lora) => phases::within(LORA, || self.lora_backward(lora, grad, Some(dx)))?,
            None => (dx, None),
        };
        match acc {
            Some(acc) => Ok(((acc + dx)?, grads)),
            None => Ok((dx, grads)),
        }
    }

    /// The adapter's share of [`Saved::backward`]: its term of the input gradient, added to
    /// `acc` when given, and its own gradients.
    fn lora_backward(
        &self,
        lora: &LoraSaved,
        grad: &Tensor,
        acc: Option<Tensor>,
    ) -> candle_core::Result<(Tensor, Option<ModuleGrads>)> {
        let dy = grad.reshape(((), self.base.out_features()))?;
        // Back through `scaled B_rᵀ`, then the scale, then `input A_rᵀ`, then the dropout.
        let d_product = (matmul(&dy, &lora.b)? * lora.scale)?;
        let shape = rows_of(grad, self.base.in_features());
        let dx = match (&lora.mask, acc) {
            (None, Some(acc)) => self.add_product(acc, &d_product, &lora.a)?,
            (None, None) => matmul(&d_product, &lora.a)?.reshape(shape)?,
            (Some(mask), acc) => {
                let d_x = (matmul(&d_product, &lora.a)? * mask)?.reshape(shape)?;
                match acc {
                    Some(acc) => (acc + d_x)?,
                    None => d_x,
                }
            }
        };
        if lora.learning.is_empty() {
            return Ok((dx, None));
        }
        let (start, n) = (lora.learning.start, lora.learning.len());
        let rows = |t: &Tensor| t.narrow(1, start, n)?.t()?.contiguous();
        // d B[:, rows] = dyᵀ scaled[:, rows] (as its transpose: only the [m, n] side is copied);
        // d A[rows] = d_product[:, rows]ᵀ input.
        let d_b = matmul(&rows(&lora.scaled)?, &dy)?.t()?;
        let d_a = matmul(&rows(&d_product)?, &lora.input)?;
        let after = lora.stored_rank.checked_sub(start + n).ok_or_else(|| {
            candle_core::Error::msg(format!(
                "{:?}: rank {} is above the {} stored",
                lora.key, lora.learning.end, lora.stored_rank
            ))
        })?;
        let pad = |t: Tensor, dim: usize| {
            t.to_dtype(lora.var_dtype)?
                .pad_with_zeros(dim, start, after)?
                .contiguous()
        };
        let grads = ModuleGrads {
            key: lora.key,
            a: pad(d_a, 0)?,
            b: pad(d_b, 1)?,
        };
        Ok((dx, Some(grads)))
    }
}

impl Saved<'_> {
    /// `acc + lhs · rhs` for `acc: [..., n]` (whose rows `lhs: [rows, k]` lists), fused or not.
    fn add_product(&self, acc: Tensor, lhs: &Tensor, rhs: &Tensor) -> candle_core::Result<Tensor> {
        let shape = acc.shape().clone();
        let acc = acc.reshape((lhs.dim(0)?, rhs.dim(1)?))?;
        let sum = match self.sums.lora_add {
            true => add_product(acc, lhs, rhs)?,
            false => (acc + matmul(lhs, rhs)?)?,
        };
        sum.reshape(shape)
    }
}
