//! One of a layer's linears with its adapter, forward and backward written out:
//! `y = x Wᵀ + (s · dropout(x) A_rᵀ) B_rᵀ`, with the scale `s` on the rank-wide product as
//! [`crate::model::lora::LoraModule::delta`] puts it. The forward keeps what the backward needs;
//! the backward gives the input gradient and the gradient of only the adapter rows that learn at
//! this rank (DyLoRA's frozen mode: one row of `A`, one column of `B`). Linears that read one
//! input ([`forward_shared`]: q, k, v; gate, up) can run their adapters' rank-wide products as one.

use candle_core::Tensor;

use crate::model::fused::add_product::add_product;
use crate::model::linear::BaseLinear;
use crate::model::lora::{AdapterCall, LoraModule, ModuleKey};
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
    /// Linears that read one input multiply it by their adapters' stacked `A`s in one product,
    /// and take their adapters' input-gradient terms from one product over the stacked ranks
    /// ([`forward_shared`], `Fusions::lora_stack`): the input is read once, not once per
    /// linear. Only without dropout, where each module draws its own mask (as PEFT's do).
    pub lora_stack: bool,
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

impl LoraSaved {
    /// What every adapter keeps besides its input, mask and product.
    fn new(
        key: ModuleKey,
        module: &LoraModule,
        call: &AdapterCall<'_>,
        parts: LoraParts,
    ) -> candle_core::Result<Self> {
        let r = call.rank;
        let dtype = parts.input.dtype();
        // Detached: the gradients below are computed here, not by autograd.
        let b = module.b.as_tensor().detach().narrow(1, 0, r)?;
        Ok(Self {
            key,
            input: parts.input,
            mask: parts.mask,
            scaled: parts.scaled,
            a: parts.a,
            b: b.to_dtype(dtype)?.contiguous()?,
            scale: call.adapter.scale(r),
            var_dtype: module.a.dtype(),
            stored_rank: module.a.dim(0)?,
            learning: call.grad.learning_rows(r),
        })
    }
}

/// The tensors of a [`LoraSaved`] that depend on how its product ran (alone or stacked).
struct LoraParts {
    input: Tensor,
    mask: Option<Tensor>,
    scaled: Tensor,
    a: Tensor,
}

/// `A[:r]` of `module` in `dtype`, detached.
fn leading_a(
    module: &LoraModule,
    r: usize,
    dtype: candle_core::DType,
) -> candle_core::Result<Tensor> {
    let a = module.a.as_tensor().detach().narrow(0, 0, r)?;
    a.to_dtype(dtype)?.contiguous()
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
        let a = leading_a(module, call.rank, input.dtype())?;
        let scaled = (matmul(&input, &a.t()?)? * call.adapter.scale(call.rank))?;
        let parts = LoraParts {
            input,
            mask,
            scaled,
            a,
        };
        LoraSaved::new(key, module, call, parts)
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
    let y = saved.output(x)?;
    Ok((y, saved))
}

/// The linears of a layer that read one input (q, k, v; gate, up), kept for their backward
/// ([`SharedInput::backward`]).
pub(super) struct SharedInput<'a> {
    linears: Vec<Saved<'a>>,
    /// Their adapters' `A[:r]` stacked, `[n r, in]`, when their products ran as one.
    stacked_a: Option<Tensor>,
}

/// [`forward`] of each of `linears` for the one input `x: [..., in]`, in order. With
/// `Sums::lora_stack`, no dropout and an adapter on each, their adapters' products `x A_rᵀ` run
/// as one product by the stacked `A`s, reading `x` once.
pub(super) fn forward_shared<'a>(
    linears: &[(&'a BaseLinear, ModuleKey)],
    x: &Tensor,
    call: &AdapterCall<'_>,
    sums: Sums,
) -> candle_core::Result<(Vec<Tensor>, SharedInput<'a>)> {
    let modules: Option<Vec<&LoraModule>> = linears
        .iter()
        .map(|(_, key)| call.adapter.modules.get(key))
        .collect();
    let no_dropout = call.dropout.is_none_or(|d| d.p <= 0.0);
    let modules = match modules {
        Some(modules) if sums.lora_stack && no_dropout && modules.len() > 1 => modules,
        _ => {
            let mut outputs = Vec::with_capacity(linears.len());
            let mut saved = Vec::with_capacity(linears.len());
            for &(base, key) in linears {
                let (y, s) = forward(base, key, x, call, sums)?;
                outputs.push(y);
                saved.push(s);
            }
            let shared = SharedInput {
                linears: saved,
                stacked_a: None,
            };
            return Ok((outputs, shared));
        }
    };
    let r = call.rank;
    let (saved, stacked_a) = phases::within(LORA, || {
        let input = x.reshape(((), modules[0].in_features))?;
        let dtype = input.dtype();
        let a = modules
            .iter()
            .map(|m| leading_a(m, r, dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let stacked_a = Tensor::cat(&a, 0)?;
        let scaled = (matmul(&input, &stacked_a.t()?)? * call.adapter.scale(r))?;
        let mut saved = Vec::with_capacity(linears.len());
        for (i, ((&(base, key), module), a)) in linears.iter().zip(&modules).zip(a).enumerate() {
            let parts = LoraParts {
                input: input.clone(),
                mask: None,
                // Each adapter's own columns, copied: `[m, r]`, small beside `[m, in]`.
                scaled: scaled.narrow(1, i * r, r)?.contiguous()?,
                a,
            };
            saved.push(Saved {
                base,
                lora: Some(LoraSaved::new(key, module, call, parts)?),
                sums,
            });
        }
        Ok((saved, stacked_a))
    })?;
    let outputs = saved
        .iter()
        .map(|s| s.output(x))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let shared = SharedInput {
        linears: saved,
        stacked_a: Some(stacked_a),
    };
    Ok((outputs, shared))
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
    /// `y = x Wᵀ + delta(x)` from the adapter's product kept by [`prepare`].
    fn output(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.lora {
            None => self.base.forward(x),
            // The memory-bound product writes `[m, out]` once; the base GEMM adds into it as it
            // writes, where the other order reads and writes its output again.
            Some(lora) if self.sums.base_add => {
                let delta = phases::within(LORA, || {
                    let shape = rows_of(x, self.base.out_features());
                    matmul(&lora.scaled, &lora.b.t()?)?.reshape(shape)
                })?;
                self.base.add_forward(delta, x)
            }
            Some(lora) => {
                let y = self.base.forward(x)?;
                phases::within(LORA, || self.add_product(y, &lora.scaled, &lora.b.t()?))
            }
        }
    }

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
        let d_product = lora.d_product(&dy)?;
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
        // d A[rows] = d_product[:, rows]ᵀ input.
        let d_a = matmul(&lora.learning_columns(&d_product)?, &lora.input)?;
        Ok((dx, Some(lora.grads(&dy, d_a)?)))
    }

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

impl LoraSaved {
    /// Back through `scaled B_rᵀ`, then the scale: `d (input A_rᵀ) = s · dy B_r`, `[m, r]`,
    /// for `dy: [m, out]`.
    fn d_product(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        matmul(dy, &self.b)? * self.scale
    }

    /// The learning columns of an `[m, r]` tensor, transposed: `[n, m]` (only this side is
    /// copied).
    fn learning_columns(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let (start, n) = (self.learning.start, self.learning.len());
        t.narrow(1, start, n)?.t()?.contiguous()
    }

    /// The module's gradients, padded to its stored rank, from `dy: [m, out]` and the learning
    /// rows of `d A`.
    fn grads(&self, dy: &Tensor, d_a: Tensor) -> candle_core::Result<ModuleGrads> {
        let start = self.learning.start;
        // d B[:, rows] = dyᵀ scaled[:, rows], as its transpose.
        let d_b = matmul(&self.learning_columns(&self.scaled)?, dy)?.t()?;
        let after = self
            .stored_rank
            .checked_sub(self.learning.end)
            .ok_or_else(|| {
                candle_core::Error::msg(format!(
                    "{:?}: rank {} is above the {} stored",
                    self.key, self.learning.end, self.stored_rank
                ))
            })?;
        let pad = |t: Tensor, dim: usize| {
            t.to_dtype(self.var_dtype)?
                .pad_with_zeros(dim, start, after)?
                .contiguous()
        };
        Ok(ModuleGrads {
            key: self.key,
            a: pad(d_a, 0)?,
            b: pad(d_b, 1)?,
        })
    }
}

impl SharedInput<'_> {
    /// Whether the adapters' products ran as one.
    #[cfg(test)]
    pub(super) fn is_stacked(&self) -> bool {
        self.stacked_a.is_some()
    }

    /// The input gradient `[..., in]` summed over the linears for their output gradients
    /// `grads` (in [`forward_shared`]'s order), and the gradients of their adapters whose rows
    /// learn.
    pub(super) fn backward(
        &self,
        grads: &[&Tensor],
    ) -> candle_core::Result<(Tensor, Vec<ModuleGrads>)> {
        if grads.len() != self.linears.len() || grads.is_empty() {
            candle_core::bail!(
                "{} output gradients for {} linears that share an input",
                grads.len(),
                self.linears.len()
            );
        }
        let mut modules = Vec::with_capacity(grads.len());
        let Some(stacked_a) = &self.stacked_a else {
            // Each linear on its own, adding into one sum.
            let mut acc = None;
            for (saved, grad) in self.linears.iter().zip(grads) {
                let (dx, module) = saved.backward(grad, acc)?;
                modules.extend(module);
                acc = Some(dx);
            }
            let dx = acc.ok_or_else(|| candle_core::Error::msg("no linear"))?;
            return Ok((dx, modules));
        };
        let first = &self.linears[0];
        let d_stacked = phases::within(LORA, || {
            let mut d_products = Vec::with_capacity(grads.len());
            let mut learning = Vec::with_capacity(grads.len());
            for (saved, grad) in self.linears.iter().zip(grads) {
                let lora = saved.lora.as_ref().ok_or_else(|| {
                    candle_core::Error::msg("a stacked linear without its adapter")
                })?;
                let dy = grad.reshape(((), saved.base.out_features()))?;
                let d_product = lora.d_product(&dy)?;
                if !lora.learning.is_empty() {
                    learning.push((lora, dy, lora.learning_columns(&d_product)?));
                }
                d_products.push(d_product);
            }
            // d A[rows] of every adapter from one product reading the shared input once.
            if let Some((lora, ..)) = learning.first() {
                let columns: Vec<&Tensor> = learning.iter().map(|(.., c)| c).collect();
                let d_a = matmul(&Tensor::cat(&columns, 0)?, &lora.input)?;
                let n = lora.learning.len();
                for (i, (lora, dy, _)) in learning.iter().enumerate() {
                    modules.push(lora.grads(dy, d_a.narrow(0, i * n, n)?)?);
                }
            }
            Tensor::cat(&d_products, 1)
        })?;
        let shape = rows_of(grads[0], first.base.in_features());
        if first.sums.base_add {
            // The adapters' terms as one product, then each base GEMM adds into it.
            let mut dx = phases::within(LORA, || matmul(&d_stacked, stacked_a)?.reshape(shape))?;
            for (saved, grad) in self.linears.iter().zip(grads) {
                dx = saved.base.add_input_grad(dx, grad)?;
            }
            return Ok((dx, modules));
        }
        let mut sum = first.base.input_grad(grads[0])?;
        for (saved, grad) in self.linears.iter().zip(grads).skip(1) {
            sum = (sum + saved.base.input_grad(grad)?)?;
        }
        let dx = phases::within(LORA, || first.add_product(sum, &d_stacked, stacked_a))?;
        Ok((dx, modules))
    }
}
