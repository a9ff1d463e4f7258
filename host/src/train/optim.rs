//! AdamW whose update can be confined to a range of rank indices (rows of `A`, columns of
//! `B`), with per-rank step counts for the bias correction; gradient-norm clipping; learning-rate
//! schedules.
//!
//! DyLoRA's frozen mode trains only rank `b` in a step. Plain AdamW would still move every other
//! row through its momentum and weight decay; here the moments, the decay and the parameters
//! outside the sampled range are left exactly as they were, and each rank's bias correction
//! counts only the steps that rank was trained in.

use std::ops::Range;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adamw_fused;

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter's optimizer state.
#[derive(Debug, Clone)]
pub struct ParamState {
    /// First moment, same shape as the parameter.
    pub m: Tensor,
    /// Second moment.
    pub v: Tensor,
    /// Updates each rank index has received.
    pub steps: Vec<u64>,
    /// The dimension that indexes ranks (0 for `A`, 1 for `B`).
    pub rank_dim: usize,
}

/// Masked AdamW over a fixed list of parameters.
#[derive(Debug, Clone)]
pub struct MaskedAdamW {
    /// Hyperparameters.
    pub config: AdamWConfig,
    /// Per-parameter state, in the order of the parameter list.
    pub states: Vec<ParamState>,
    /// In [`MaskedAdamW::step_fused`], every matrix in one op where that applies
    /// ([`adamw_fused::update_all`]: one kernel launch on a GPU) rather than three per matrix.
    pub one_launch: bool,
}

impl MaskedAdamW {
    /// Zero state for `params`, each with the dimension that indexes ranks.
    pub fn new(config: AdamWConfig, params: &[(&Var, usize)]) -> candle_core::Result<Self> {
        let states = params
            .iter()
            .map(|(p, rank_dim)| {
                let t = p.as_tensor();
                Ok(ParamState {
                    m: t.zeros_like()?,
                    v: t.zeros_like()?,
                    steps: vec![0; t.dim(*rank_dim)?],
                    rank_dim: *rank_dim,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            config,
            states,
            one_launch: true,
        })
    }

    /// Applies one update to rank indices `ranks` of every parameter, with learning rate `lr`.
    /// `round_to` re-rounds the parameters (bf16 adapter weights keep f32 optimizer math).
    pub fn step(
        &mut self,
        params: &[&Var],
        grads: &[Tensor],
        ranks: Range<usize>,
        lr: f64,
        round_to: DType,
    ) -> candle_core::Result<()> {
        let c = self.config;
        for ((param, grad), state) in params.iter().zip(grads).zip(self.states.iter_mut()) {
            update(c, state, param, grad, ranks.clone(), lr, round_to)?;
        }
        Ok(())
    }

    /// [`MaskedAdamW::step`] on gradients to be scaled by `grad_scale` (the clipping factor),
    /// each matrix updated in place by the fused ops ([`super::adamw_fused`]) where they apply
    /// and by the candle ops otherwise. The same values either way.
    pub fn step_fused(
        &mut self,
        params: &[&Var],
        grads: &[Tensor],
        ranks: Range<usize>,
        lr: f64,
        round_to: DType,
        grad_scale: Option<f64>,
    ) -> candle_core::Result<()> {
        let c = self.config;
        let scale = grad_scale.unwrap_or(1.0);
        if self.one_launch
            && adamw_fused::update_all(
                c,
                &mut self.states,
                params,
                grads,
                ranks.clone(),
                lr,
                round_to,
                scale,
            )?
        {
            return Ok(());
        }
        for ((param, grad), state) in params.iter().zip(grads).zip(self.states.iter_mut()) {
            let fused =
                adamw_fused::update(c, state, param, grad, ranks.clone(), lr, round_to, scale)?;
            if !fused {
                let grad = match grad_scale {
                    Some(s) => (grad * s)?,
                    None => grad.clone(),
                };
                update(c, state, param, &grad, ranks.clone(), lr, round_to)?;
            }
        }
        Ok(())
    }

    /// Plain AdamW: every element of every parameter.
    pub fn step_all(
        &mut self,
        params: &[&Var],
        grads: &[Tensor],
        lr: f64,
    ) -> candle_core::Result<()> {
        let c = self.config;
        for ((param, grad), state) in params.iter().zip(grads).zip(self.states.iter_mut()) {
            let all = 0..state.steps.len();
            update(c, state, param, grad, all, lr, DType::F32)?;
        }
        Ok(())
    }
}

fn update(
    c: AdamWConfig,
    state: &mut ParamState,
    param: &Var,
    grad: &Tensor,
    ranks: Range<usize>,
    lr: f64,
    round_to: DType,
) -> candle_core::Result<()> {
    let d = state.rank_dim;
    let len = ranks.len();
    // Detached: gradients and parameters would otherwise chain every step's graph to the
    // moments, keeping all of them alive.
    let narrow = |t: &Tensor| t.detach().narrow(d, ranks.start, len);
    let g = narrow(grad)?;
    let m = ((narrow(&state.m)? * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
    let v = ((narrow(&state.v)? * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
    for k in ranks.clone() {
        state.steps[k] += 1;
    }
    let counts = &state.steps[ranks.clone()];
    let (m_hat, v_hat) = if counts.iter().all(|&t| t == counts[0]) {
        let t = counts[0] as i32;
        (
            (m.clone() / (1.0 - c.beta1.powi(t)))?,
            (v.clone() / (1.0 - c.beta2.powi(t)))?,
        )
    } else {
        // Ranks trained different numbers of times: correct each row (or column) by its own count.
        let bc = |beta: f64| -> Vec<f32> {
            counts
                .iter()
                .map(|&t| (1.0 - beta.powi(t as i32)) as f32)
                .collect()
        };
        let shape: (usize, usize) = if d == 0 { (len, 1) } else { (1, len) };
        let bc1 = Tensor::from_vec(bc(c.beta1), shape, g.device())?;
        let bc2 = Tensor::from_vec(bc(c.beta2), shape, g.device())?;
        (m.broadcast_div(&bc1)?, v.broadcast_div(&bc2)?)
    };
    let p = narrow(param.as_tensor())?;
    let step = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
    let p = ((p * (1.0 - lr * c.weight_decay))? - (step * lr)?)?;
    let p = if round_to == DType::F32 {
        p
    } else {
        p.to_dtype(round_to)?.to_dtype(DType::F32)?
    };
    let full = param.as_tensor().detach();
    let ranges = slice_ranges(full.dims(), d, ranks);
    param.set(&full.slice_assign(&ranges, &p)?)?;
    state.m = state.m.slice_assign(&ranges, &m)?;
    state.v = state.v.slice_assign(&ranges, &v)?;
    Ok(())
}

fn slice_ranges(dims: &[usize], d: usize, ranks: Range<usize>) -> Vec<Range<usize>> {
    dims.iter()
        .enumerate()
        .map(|(i, &n)| if i == d { ranks.clone() } else { 0..n })
        .collect()
}

/// The global L2 norm of `grads`; scales them to `max_norm` when above it. Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> candle_core::Result<f64> {
    let norm = grad_norm(grads)?;
    if let Some(scale) = clip_factor(norm, max_norm) {
        scale_grads(grads, scale)?;
    }
    Ok(norm)
}

/// Multiplies every gradient by `scale` (the clipping factor).
pub fn scale_grads(grads: &mut [Tensor], scale: f64) -> candle_core::Result<()> {
    for g in grads.iter_mut() {
        *g = (&*g * scale)?;
    }
    Ok(())
}

/// The global L2 norm of f32 `grads`. The per-gradient sums of squares are read back together,
/// one synchronization on a GPU rather than one per gradient, and added in f64 in order.
pub fn grad_norm(grads: &[Tensor]) -> candle_core::Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let sums = grads
        .iter()
        .map(|g| g.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let sums: Vec<f32> = Tensor::stack(&sums, 0)?.to_vec1()?;
    let total = sums.iter().fold(0.0f64, |total, &s| total + f64::from(s));
    Ok(total.sqrt())
}

/// The factor that scales gradients of global norm `norm` to `max_norm`, when above it (and
/// `max_norm` > 0).
pub fn clip_factor(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// Learning-rate shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum ScheduleKind {
    /// Constant (the QLoRA recipe).
    Constant,
    /// Cosine decay to zero at the last step.
    Cosine,
}

/// Linear warmup, then constant or cosine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// Total optimizer steps.
    pub total_steps: u64,
    /// Shape after warmup.
    pub kind: ScheduleKind,
}

impl Schedule {
    /// The rate for 0-based optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn masked_update_leaves_other_ranks_and_their_moments_alone() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::ones((4, 3), DType::F32, &dev).unwrap()).unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = MaskedAdamW::new(cfg, &[(&a, 0)]).unwrap();
        let grad = Tensor::ones((4, 3), DType::F32, &dev).unwrap();
        // Two steps on rank index 2 only, then one on 0..2.
        opt.step(&[&a], std::slice::from_ref(&grad), 2..3, 0.01, DType::F32)
            .unwrap();
        opt.step(&[&a], std::slice::from_ref(&grad), 2..3, 0.01, DType::F32)
            .unwrap();
        let rows: Vec<Vec<f32>> = a.as_tensor().to_vec2().unwrap();
        assert_eq!(rows[0], vec![1.0; 3]);
        assert_eq!(rows[3], vec![1.0; 3]);
        // A constant gradient makes Adam's step exactly lr (m̂ = v̂ = 1), after the decay.
        let decay = 1.0 - 0.01 * 0.1;
        let expected = (decay - 0.01) * decay - 0.01;
        assert!((rows[2][0] - expected).abs() < 1e-4, "{}", rows[2][0]);
        assert_eq!(opt.states[0].steps, vec![0, 0, 2, 0]);
        let m: Vec<Vec<f32>> = opt.states[0].m.to_vec2().unwrap();
        assert_eq!(m[0], vec![0.0; 3]);
        opt.step(&[&a], std::slice::from_ref(&grad), 0..2, 0.01, DType::F32)
            .unwrap();
        assert_eq!(opt.states[0].steps, vec![1, 1, 2, 0]);
        let rows: Vec<Vec<f32>> = a.as_tensor().to_vec2().unwrap();
        assert!((rows[0][1] - (1.0 - 0.01 - 0.001)).abs() < 1e-4);
        assert_eq!(rows[3], vec![1.0; 3]);
    }

    #[test]
    fn columns_for_b_and_bf16_rounding() {
        let dev = Device::Cpu;
        let b = Var::from_tensor(&Tensor::zeros((2, 5), DType::F32, &dev).unwrap()).unwrap();
        let mut opt = MaskedAdamW::new(AdamWConfig::default(), &[(&b, 1)]).unwrap();
        let grad = Tensor::ones((2, 5), DType::F32, &dev).unwrap();
        opt.step(&[&b], &[grad], 4..5, 0.001, DType::BF16).unwrap();
        let rows: Vec<Vec<f32>> = b.as_tensor().to_vec2().unwrap();
        assert_eq!(&rows[0][..4], &[0.0; 4]);
        let v = rows[0][4];
        assert!(v < 0.0 && half::bf16::from_f32(v).to_f32() == v);
    }

    #[test]
    fn clipping_and_schedules() {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3.0f32, 4.0], &dev).unwrap()];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let v: Vec<f32> = g[0].to_vec1().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
        let s = Schedule {
            lr: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            kind: ScheduleKind::Cosine,
        };
        assert_eq!(s.lr_at(0), 0.25);
        assert_eq!(s.lr_at(3), 1.0);
        assert!((s.lr_at(4) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(9) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(14).abs() < 1e-12);
        let c = Schedule {
            kind: ScheduleKind::Constant,
            ..s
        };
        assert_eq!(c.lr_at(13), 1.0);
    }
}
