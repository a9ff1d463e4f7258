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

    /// `scale * B[:, :r] A[:r] x` for `x: [..., in]`.
    pub fn delta(
        &self,
        x: &Tensor,
        r: usize,
        grad: RankGrad,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        // The adapter keeps its own dtype; the product runs in the activations' (bf16 on a GPU).
        let a = self.a_slice(r, grad)?.to_dtype(x.dtype())?;
        let b = self.b_slice(r, grad)?.to_dtype(x.dtype())?;
        let u = x.broadcast_matmul(&a.t()?)?;
        u.broadcast_matmul(&b.t()?)? * scale
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
        if self.p <= 0.0 {
            return Ok(x.clone());
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
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
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
    /// `y + delta(x)` for the linear at `key`, or `y` when it carries no adapter.
    pub fn add_delta(&self, key: ModuleKey, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        let Some(module) = self.adapter.modules.get(&key) else {
            return Ok(y);
        };
        let x = match self.dropout {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        let delta = module.delta(&x, self.rank, self.grad, self.adapter.scale(self.rank))?;
        y + delta
    }
}
