//! LoRA / DyLoRA adapters on the frozen linears, with nested-rank views.
//!
//! Each adapted linear has `A: [r_max, in]` and `B: [out, r_max]`. At rank `r` the update is
//! `scale(r) * B[:, :r] A[:r, :] x`. DyLoRA's frozen mode detaches every row of `A` (column of `B`)
//! below the sampled rank `b`, so only row/column `b` receives gradient.

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use qdylora_core::infer::LinearKind;
use qdylora_core::rank::Scaling;
use rand::Rng;
use rand::rngs::StdRng;

use super::matmul::broadcast_matmul;

/// Where an adapted linear sits: layer index and which of the seven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModuleKey {
    /// Decoder layer.
    pub layer: usize,
    /// Which linear.
    pub kind: LinearKind,
}

impl ModuleKey {
    /// The HF module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn hf_path(&self) -> String {
        format!("model.layers.{}.{}", self.layer, self.kind.layer_path())
    }

    /// Parses an HF module path back into a key.
    pub fn parse_hf_path(path: &str) -> Option<Self> {
        let rest = path.strip_prefix("model.layers.")?;
        let (layer, tail) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        let kind = LinearKind::ALL
            .into_iter()
            .find(|k| k.layer_path() == tail)?;
        Some(Self { layer, kind })
    }
}

/// Which rows of the rank-`r` slice receive gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankGrad {
    /// None: evaluation.
    None,
    /// Only row/column `r` (DyLoRA frozen mode).
    Last,
    /// All rows/columns `1..=r` (DyLoRA non-frozen mode, plain LoRA).
    All,
}

impl RankGrad {
    /// The rank indices (rows of `A`, columns of `B`) that learn at rank `r`.
    pub fn learning_rows(self, r: usize) -> std::ops::Range<usize> {
        match self {
            Self::None => 0..0,
            Self::Last => r.saturating_sub(1)..r,
            Self::All => 0..r,
        }
    }
}

/// One adapted linear.
#[derive(Debug)]
pub struct LoraModule {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// `[r_max, in]`.
    pub a: Var,
    /// `[out, r_max]`.
    pub b: Var,
}

impl LoraModule {
    /// A Kaiming-uniform (as PEFT's `kaiming_uniform_(a=sqrt(5))`: bound `1/sqrt(in)`), B zero.
    pub fn init(
        in_features: usize,
        out_features: usize,
        r_max: usize,
        rng: &mut StdRng,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / (in_features as f32).sqrt();
        let a: Vec<f32> = (0..r_max * in_features)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Self::from_vecs(
            in_features,
            out_features,
            r_max,
            a,
            vec![0.0; out_features * r_max],
            device,
        )
    }

    /// From row-major `A: [r_max, in]` and `B: [out, r_max]`.
    pub fn from_vecs(
        in_features: usize,
        out_features: usize,
        r_max: usize,
        a: Vec<f32>,
        b: Vec<f32>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            in_features,
            out_features,
            a: Var::from_tensor(&Tensor::from_vec(a, (r_max, in_features), device)?)?,
            b: Var::from_tensor(&Tensor::from_vec(b, (out_features, r_max), device)?)?,
        })
    }

    /// `A[:r]` with the gradient rule applied.
    fn a_slice(&self, r: usize, grad: RankGrad) -> candle_core::Result<Tensor> {
        let a = self.a.as_tensor();
        match grad {
            RankGrad::None => Ok(a.narrow(0, 0, r)?.detach()),
            RankGrad::All => a.narrow(0, 0, r),
            RankGrad::Last if r == 1 => a.narrow(0, 0, 1),
            RankGrad::Last => Tensor::cat(
                &[&a.narrow(0, 0, r - 1)?.detach(), &a.narrow(0, r - 1, 1)?],
                0,
            ),
        }
    }

    /// `B[:, :r]` with the gradient rule applied.
    fn b_slice(&self, r: usize, grad: RankGrad) -> candle_core::Result<Tensor> {
        let b = self.b.as_tensor();
        match grad {
            RankGrad::None => Ok(b.narrow(1, 0, r)?.detach()),
            RankGrad::All => b.narrow(1, 0, r),
            RankGrad::Last if r == 1 => b.narrow(1, 0, 1),
            RankGrad::Last => Tensor::cat(
                &[&b.narrow(1, 0, r - 1)?.detach(), &b.narrow(1, r - 1, 1)?],
                1,
            ),
        }
    }

    /// `scale * B[:, :r] A[:r] x` for `x: [..., in]`. With `scale_at_rank` the scale multiplies
    /// the `[..., r]` product `A x` (r values per token) rather than the `[..., out]` result
    /// (thousands per token): the same sum, one pass over the output less in forward and in
    /// backward. PEFT scales the output.
    pub fn delta(
        &self,
        x: &Tensor,
        r: usize,
        grad: RankGrad,
        scale: f64,
        scale_at_rank: bool,
    ) -> candle_core::Result<Tensor> {
        // The adapter keeps its own dtype; the product runs in the activations' (bf16 on a GPU).
        // `B[:, :r]` is a strided view (rows of r_max) that candle's CUDA matmul refuses, so it
        // is copied to a contiguous [out, r] (small next to the product).
        let a = self.a_slice(r, grad)?.to_dtype(x.dtype())?;
        let b = self.b_slice(r, grad)?.to_dtype(x.dtype())?.contiguous()?;
        let u = broadcast_matmul(x, &a.t()?)?;
        match scale_at_rank {
            true => broadcast_matmul(&(u * scale)?, &b.t()?),
            false => broadcast_matmul(&u, &b.t()?)? * scale,
        }
    }

    /// `A` and `B` as row-major f32 vectors.
    pub fn to_vecs(&self) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            self.a.as_tensor().flatten_all()?.to_vec1()?,
            self.b.as_tensor().flatten_all()?.to_vec1()?,
        ))
    }
}

/// A set of adapted linears sharing `r_max`, alpha and the scale rule.
#[derive(Debug)]
pub struct Adapter {
    /// Largest rank stored.
    pub r_max: usize,
    /// LoRA alpha.
    pub alpha: f32,
    /// `alpha / r` or `alpha / sqrt(r)`.
    pub scaling: Scaling,
    /// The adapted linears.
    pub modules: BTreeMap<ModuleKey, LoraModule>,
}

impl Adapter {
    /// The scale at rank `r`.
    pub fn scale(&self, r: usize) -> f64 {
        f64::from(self.scaling.scale(self.alpha, r as u32))
    }

    /// Every trainable variable, in a stable order (A then B per module, modules sorted).
    pub fn vars(&self) -> Vec<&Var> {
        self.modules.values().flat_map(|m| [&m.a, &m.b]).collect()
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.modules
            .values()
            .map(|m| self.r_max * (m.in_features + m.out_features))
            .sum()
    }
}

/// Dropout on the adapter input, from a seeded generator so runs repeat exactly.
#[derive(Debug)]
pub struct Dropout {
    /// Probability of zeroing an element.
    pub p: f32,
    /// The generator masks are drawn from.
    pub rng: RefCell<StdRng>,
}

impl Dropout {
    /// `x * mask / (1 - p)`.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.mask_for(x)? {
            Some(mask) => x.mul(&mask),
            None => Ok(x.clone()),
        }
    }

    /// The next mask for a tensor like `x` (its shape and dtype), holding `1 / (1 - p)` where
    /// an element is kept and 0 where it is dropped; `None` when `p` drops nothing. Draws as
    /// many values as [`Dropout::apply`] does, so the two can stand in for each other.
    pub fn mask_for(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.p <= 0.0 {
            return Ok(None);
        }
        let keep = 1.0 - self.p;
        let mut rng = self.rng.borrow_mut();
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f32>() < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(Some(mask))
    }
}

/// An adapter as the forward pass uses it: which rank, which rows learn, optional dropout.
#[derive(Debug, Clone, Copy)]
pub struct AdapterCall<'a> {
    /// The adapter.
    pub adapter: &'a Adapter,
    /// The active rank (`1..=r_max`).
    pub rank: usize,
    /// Gradient rule for the active slice.
    pub grad: RankGrad,
    /// Dropout on the adapter input while training.
    pub dropout: Option<&'a Dropout>,
}

impl AdapterCall<'_> {
    /// `y + delta(x)` for the linear at `key`, or `y` when it carries no adapter (see
    /// [`LoraModule::delta`] for `scale_at_rank`).
    pub fn add_delta(
        &self,
        key: ModuleKey,
        x: &Tensor,
        y: Tensor,
        scale_at_rank: bool,
    ) -> candle_core::Result<Tensor> {
        let Some(module) = self.adapter.modules.get(&key) else {
            return Ok(y);
        };
        let x = match self.dropout {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        let scale = self.adapter.scale(self.rank);
        // Inference runs as PEFT does (its adapters are upcast to f32 by default,
        // `autocast_adapter_dtype`): the adapter's product in its own dtype and the sum rounded
        // once. On the golden tiny model in bf16 that is 1.05e-2 of transformers' f32 logits
        // instead of 1.29e-2 (`golden_logits.rs::bf16_activations_*`). Training keeps the
        // product in the activations' dtype: it is on the hot path. (A cast to the dtype a
        // tensor already has is free.)
        let compute = match self.grad {
            RankGrad::None => module.a.dtype(),
            _ => y.dtype(),
        };
        let delta = module.delta(
            &x.to_dtype(compute)?,
            self.rank,
            self.grad,
            scale,
            scale_at_rank,
        )?;
        (y.to_dtype(compute)? + delta)?.to_dtype(y.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Scaling the rank-wide product instead of the output gives the same delta and the same
    /// gradients (to f32 rounding), and still only the sampled rank's row and column learn.
    #[test]
    fn the_scale_may_go_on_either_product() {
        let mut rng = StdRng::seed_from_u64(3);
        let (inputs, outputs, r_max, rank) = (24, 40, 8, 5);
        let a: Vec<f32> = (0..r_max * inputs)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let b: Vec<f32> = (0..outputs * r_max)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x: Vec<f32> = (0..6 * inputs)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let dev = &Device::Cpu;
        let module = LoraModule::from_vecs(inputs, outputs, r_max, a, b, dev).unwrap();
        let x = Tensor::from_vec(x, (2, 3, inputs), dev).unwrap();
        let run = |at_rank: bool| {
            let delta = module
                .delta(&x, rank, RankGrad::Last, 16.0 / 5.0, at_rank)
                .unwrap();
            let grads = delta.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let grad_a = flat(grads.get(module.a.as_tensor()).unwrap());
            let grad_b = flat(grads.get(module.b.as_tensor()).unwrap());
            [flat(&delta), grad_a, grad_b]
        };
        let (at_rank, at_output) = (run(true), run(false));
        for (i, (p, q)) in at_rank.iter().zip(&at_output).enumerate() {
            let scale = q.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = p.iter().zip(q).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(diff <= 1e-5 * scale, "value {i}: {diff} (scale {scale})");
        }
        // Frozen mode: A's row rank-1 and B's column rank-1 only, in both.
        for [_, grad_a, grad_b] in [&at_rank, &at_output] {
            for (k, g) in grad_a.iter().enumerate() {
                assert_eq!(
                    *g != 0.0,
                    k / inputs == rank - 1,
                    "A[{}][{}]",
                    k / inputs,
                    k % inputs
                );
            }
            for (k, g) in grad_b.iter().enumerate() {
                assert_eq!(
                    *g != 0.0,
                    k % r_max == rank - 1,
                    "B[{}][{}]",
                    k / r_max,
                    k % r_max
                );
            }
        }
    }
}
