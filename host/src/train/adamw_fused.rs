//! The masked AdamW update of [`super::optim`] as three in-place ops per adapter matrix (the
//! first moment, the second, then the parameter), each touching only the rank indices being
//! trained; on a GPU, by default, one kernel launch for every matrix of the step instead
//! ([`update_all`]). `--unfuse adamw` runs the candle-op update instead, `--unfuse
//! adamw-multi` the three ops per matrix.
//!
//! Why: the candle-op update is ~20 ops per matrix and three `slice_assign`s of ~12 ops each
//! (ones, zero padding, concatenation, `where_cond` over the whole matrix): ~55 launches. At the
//! LLaMA-7B shape (448 matrices: `A` and `B` of 224 adapted linears) that is ~25,000 launches
//! after every backward, each microseconds of GPU work, so the GPU waits on the CPU to issue
//! them; fused per matrix it is 1,344, and with [`update_all`] one.
//!
//! Same numbers: every f32 operation is the one candle's ops perform, in the same order
//! (`t * c` is candle's affine `t * (c as f32) + 0.0`, `t / c` multiplies by `(1 / c) as f32`,
//! `t + c` is `t * 1.0 + c as f32`), so on the CPU the fused update gives the candle-op update
//! bit for bit (tested below, and the trainer's histories with it). The CUDA kernels
//! (`gpu/adamw.cu`) are the same loops, checked against [`moment_values`] and [`param_values`]
//! under the CUDA emulation.
//!
//! It applies when the trained ranks have all been trained equally often (always in DyLoRA's
//! frozen mode, which trains one rank per step) and the matrices are f32; otherwise
//! [`update`] says so and the caller runs the candle-op update.

use std::ops::Range;

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use half::bf16;

use super::optim::{AdamWConfig, ParamState};

/// The trained part of a row-major `[rows, cols]` matrix: rank indices `start..start + len`
/// along `rank_dim` (rows of `A` when 0, columns of `B` when 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankSlice {
    /// Rows of the matrix.
    pub rows: usize,
    /// Columns of the matrix.
    pub cols: usize,
    /// 0 or 1.
    pub rank_dim: usize,
    /// First trained rank index.
    pub start: usize,
    /// Trained rank indices.
    pub len: usize,
}

impl RankSlice {
    /// Values in the slice.
    pub fn values(&self) -> usize {
        let across = if self.rank_dim == 0 {
            self.cols
        } else {
            self.rows
        };
        across * self.len
    }

    /// The slice as the kernels' `u32` arguments `[rows, cols, rank_dim, start, len]`; an error
    /// when a dimension does not fit or the ranks lie outside the matrix.
    pub fn kernel_dims(&self) -> candle_core::Result<[u32; 5]> {
        let fits = |v: usize| {
            u32::try_from(v).map_err(|_| candle_core::Error::msg("fused AdamW: matrix too large"))
        };
        let across = if self.rank_dim == 0 {
            self.rows
        } else {
            self.cols
        };
        if self.rank_dim > 1 || self.len == 0 || self.start + self.len > across {
            candle_core::bail!(
                "fused AdamW: ranks {}..+{} outside the matrix",
                self.start,
                self.len
            );
        }
        Ok([
            fits(self.rows)?,
            fits(self.cols)?,
            fits(self.rank_dim)?,
            fits(self.start)?,
            fits(self.len)?,
        ])
    }

    /// The flat index of the slice's `i`-th value (as `slice_index` in `adamw.cu`).
    pub fn index(&self, i: usize) -> usize {
        match self.rank_dim {
            0 => self.start * self.cols + i,
            _ => (i / self.len) * self.cols + self.start + i % self.len,
        }
    }
}

/// One moment's update: `moment = beta moment + (1 - beta) g` (or `g²` when `squared`), with
/// `g = grad · grad_scale` (the clipping factor, 1 when not clipping).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MomentStep {
    /// The clipping factor.
    pub grad_scale: f32,
    /// The moment's decay.
    pub beta: f32,
    /// `1 - beta`, rounded from f64 as candle's affine rounds it.
    pub one_minus_beta: f32,
    /// The second moment (`g²`) rather than the first.
    pub squared: bool,
}

/// The parameter's update: `p = p decay - lr m̂ / (sqrt(v̂) + eps)`, `m̂ = m inv_bc1`,
/// `v̂ = v inv_bc2`, then rounded to bf16 values when `round_bf16`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamStep {
    /// `1 / (1 - beta1^t)`.
    pub inv_bc1: f32,
    /// `1 / (1 - beta2^t)`.
    pub inv_bc2: f32,
    /// The denominator's epsilon.
    pub eps: f32,
    /// `1 - lr · weight_decay`.
    pub decay: f32,
    /// The learning rate.
    pub lr: f32,
    /// Re-round to bf16 values (bf16 adapters keep f32 optimizer math).
    pub round_bf16: bool,
}

/// What the matrices of one [`update_all`] step share: both moments' steps and the parameter
/// step but for its bias corrections, which each matrix takes from its own step count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiStep {
    /// The first moment's step (`squared` false).
    pub first: MomentStep,
    /// The second moment's step (`squared` true).
    pub second: MomentStep,
    /// The parameter step; its `inv_bc1` and `inv_bc2` are replaced by each matrix's own.
    pub param: ParamStep,
}

/// Bytes per matrix in `adamw_multi`'s table.
pub const TABLE_ENTRY_BYTES: usize = 64;

/// One matrix's entry in `adamw_multi`'s table (`AdamwEntry` in `adamw.cu`): the device
/// addresses of its parameter, first moment, second moment and gradient (each the first value
/// of a contiguous f32 `[rows, cols]` matrix), the slice, and its bias corrections
/// `[inv_bc1, inv_bc2]`, little-endian.
pub fn table_entry(
    addresses: [u64; 4],
    slice: &RankSlice,
    inv_bc: [f32; 2],
) -> candle_core::Result<[u8; TABLE_ENTRY_BYTES]> {
    let dims = slice.kernel_dims()?;
    let bytes = addresses
        .iter()
        .flat_map(|a| a.to_le_bytes())
        .chain(dims.iter().flat_map(|d| d.to_le_bytes()))
        .chain(inv_bc.iter().flat_map(|f| f.to_le_bytes()));
    let mut entry = [0u8; TABLE_ENTRY_BYTES];
    for (to, from) in entry.iter_mut().zip(bytes) {
        *to = from;
    }
    Ok(entry)
}

/// The moment update on the slice, on the CPU (the reference for `adamw_moment`).
pub fn moment_values(moment: &mut [f32], grad: &[f32], step: &MomentStep, slice: &RankSlice) {
    for i in 0..slice.values() {
        let at = slice.index(i);
        let g = grad[at] * step.grad_scale + 0.0;
        let term = if step.squared { g * g } else { g };
        moment[at] = (moment[at] * step.beta + 0.0) + (term * step.one_minus_beta + 0.0);
    }
}

/// The parameter update on the slice, on the CPU (the reference for `adamw_param`).
pub fn param_values(param: &mut [f32], m: &[f32], v: &[f32], step: &ParamStep, slice: &RankSlice) {
    for i in 0..slice.values() {
        let at = slice.index(i);
        let m_hat = m[at] * step.inv_bc1 + 0.0;
        let v_hat = v[at] * step.inv_bc2 + 0.0;
        let update = m_hat / (v_hat.sqrt() * 1.0 + step.eps);
        let p = (param[at] * step.decay + 0.0) - (update * step.lr + 0.0);
        param[at] = match step.round_bf16 {
            true => bf16::from_f32(p).to_f32(),
            false => p,
        };
    }
}

/// Applies one masked AdamW step to `ranks` of `param` in place, with the gradient scaled by
/// `grad_scale`. Returns `false`, changing nothing, where the fused update does not apply (see
/// the module notes); the caller then runs [`super::optim`]'s update.
#[allow(clippy::too_many_arguments)] // the optimizer's step, one matrix at a time
pub fn update(
    c: AdamWConfig,
    state: &mut ParamState,
    param: &Var,
    grad: &Tensor,
    ranks: Range<usize>,
    lr: f64,
    round_to: DType,
    grad_scale: f64,
) -> candle_core::Result<bool> {
    let Some(slice) = trained_slice(state, param, grad, &ranks, round_to)? else {
        return Ok(false);
    };
    let step = shared_step(c, lr, round_to, grad_scale);
    let inv_bc = count_step(c, state, &ranks);
    let first = MomentOp {
        step: step.first,
        slice,
    };
    let second = MomentOp {
        step: step.second,
        slice,
    };
    state.m.inplace_op2(grad, &first)?;
    state.v.inplace_op2(grad, &second)?;
    let step = with_bias_corrections(step.param, inv_bc);
    param
        .as_tensor()
        .inplace_op3(&state.m, &state.v, &ParamOp { step, slice })?;
    Ok(true)
}

/// [`update`] on every matrix at once: on a GPU one launch of `adamw_multi` for all of them
/// (`gpu::adamw::update_all`) instead of three per matrix, the same values. Returns `false`,
/// changing nothing, unless the fused update applies to every matrix and they are on a GPU (on
/// the CPU the per-matrix ops cost no launches); the caller then runs [`update`] per matrix.
#[allow(clippy::too_many_arguments)] // the optimizer's step
pub fn update_all(
    c: AdamWConfig,
    states: &mut [ParamState],
    params: &[&Var],
    grads: &[Tensor],
    ranks: Range<usize>,
    lr: f64,
    round_to: DType,
    grad_scale: f64,
) -> candle_core::Result<bool> {
    let on_gpu = params.first().is_some_and(|p| p.device().is_cuda());
    let matched = params.len() == grads.len() && params.len() == states.len();
    if !on_gpu || !matched {
        return Ok(false);
    }
    let mut slices = Vec::with_capacity(params.len());
    for ((param, grad), state) in params.iter().zip(grads).zip(states.iter()) {
        match trained_slice(state, param, grad, &ranks, round_to)? {
            Some(slice) if param.device().same_device(params[0].device()) => slices.push(slice),
            _ => return Ok(false),
        }
    }
    let step = shared_step(c, lr, round_to, grad_scale);
    let entries: Vec<MultiEntry<'_>> = states
        .iter_mut()
        .zip(params.iter().zip(grads))
        .zip(slices)
        .map(|((state, (param, grad)), slice)| {
            let inv_bc = count_step(c, state, &ranks);
            MultiEntry {
                param: param.as_tensor(),
                m: &state.m,
                v: &state.v,
                grad,
                slice,
                inv_bc,
            }
        })
        .collect();
    launch_all(&entries, &step)?;
    Ok(true)
}

/// One matrix of [`update_all`]: its tensors, trained slice and bias corrections
/// `[inv_bc1, inv_bc2]`.
pub struct MultiEntry<'a> {
    /// The parameter, updated in place.
    pub param: &'a Tensor,
    /// The first moment, updated in place.
    pub m: &'a Tensor,
    /// The second moment, updated in place.
    pub v: &'a Tensor,
    /// The gradient.
    pub grad: &'a Tensor,
    /// The trained ranks.
    pub slice: RankSlice,
    /// This matrix's bias corrections.
    pub inv_bc: [f32; 2],
}

#[cfg(feature = "cuda")]
fn launch_all(entries: &[MultiEntry<'_>], step: &MultiStep) -> candle_core::Result<()> {
    crate::gpu::adamw::update_all(entries, step)
}

#[cfg(not(feature = "cuda"))]
fn launch_all(_: &[MultiEntry<'_>], _: &MultiStep) -> candle_core::Result<()> {
    candle_core::bail!("fused AdamW: one launch for all matrices needs the `cuda` feature")
}

/// The trained slice of `param`, or `None` where the fused update does not apply: the ranks
/// trained unequally often (so their bias corrections differ), a matrix that is not a
/// contiguous f32 one like the parameter, or a rounding other than to f32 or bf16.
fn trained_slice(
    state: &ParamState,
    param: &Var,
    grad: &Tensor,
    ranks: &Range<usize>,
    round_to: DType,
) -> candle_core::Result<Option<RankSlice>> {
    let p = param.as_tensor();
    let same_f32_matrices = [p, grad, &state.m, &state.v]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.dims() == p.dims() && t.is_contiguous());
    let counts = &state.steps[ranks.clone()];
    let uniform = counts.iter().all(|&t| t == counts[0]);
    let rounding = matches!(round_to, DType::F32 | DType::BF16);
    if ranks.is_empty() || p.rank() != 2 || !same_f32_matrices || !uniform || !rounding {
        return Ok(None);
    }
    let (rows, cols) = p.dims2()?;
    Ok(Some(RankSlice {
        rows,
        cols,
        rank_dim: state.rank_dim,
        start: ranks.start,
        len: ranks.len(),
    }))
}

/// The constants of one step that do not depend on a matrix's step count, each rounded from
/// f64 where candle's op rounds it (see the module notes).
fn shared_step(c: AdamWConfig, lr: f64, round_to: DType, grad_scale: f64) -> MultiStep {
    let moment = |beta: f64, squared| MomentStep {
        grad_scale: grad_scale as f32,
        beta: beta as f32,
        one_minus_beta: (1.0 - beta) as f32,
        squared,
    };
    MultiStep {
        first: moment(c.beta1, false),
        second: moment(c.beta2, true),
        param: ParamStep {
            inv_bc1: 1.0,
            inv_bc2: 1.0,
            eps: c.eps as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
            lr: lr as f32,
            round_bf16: round_to == DType::BF16,
        },
    }
}

/// Counts one more step for `ranks` (trained equally often) and returns the bias corrections
/// `[1 / (1 - beta1^t), 1 / (1 - beta2^t)]` at the new count `t`.
fn count_step(c: AdamWConfig, state: &mut ParamState, ranks: &Range<usize>) -> [f32; 2] {
    for k in ranks.clone() {
        state.steps[k] += 1;
    }
    let t = state.steps[ranks.start] as i32;
    [
        (1.0 / (1.0 - c.beta1.powi(t))) as f32,
        (1.0 / (1.0 - c.beta2.powi(t))) as f32,
    ]
}

/// `step` with the bias corrections `[inv_bc1, inv_bc2]`.
pub fn with_bias_corrections(step: ParamStep, [inv_bc1, inv_bc2]: [f32; 2]) -> ParamStep {
    ParamStep {
        inv_bc1,
        inv_bc2,
        ..step
    }
}

/// The moment update as an in-place op on the moment.
struct MomentOp {
    step: MomentStep,
    slice: RankSlice,
}

/// The parameter update as an in-place op on the parameter, reading both moments.
struct ParamOp {
    step: ParamStep,
    slice: RankSlice,
}

/// The f32 values of a contiguous CPU matrix holding at least `len` of them.
fn cpu_values<'a>(s: &'a CpuStorage, l: &Layout, len: usize) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) if end - start >= len => Ok(&v[start..end]),
        _ => candle_core::bail!("fused AdamW: expected a contiguous f32 matrix of {len} values"),
    }
}

fn cpu_values_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    len: usize,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) if end - start >= len => Ok(&mut v[start..end]),
        _ => candle_core::bail!("fused AdamW: expected a contiguous f32 matrix of {len} values"),
    }
}

impl InplaceOp2 for MomentOp {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        moment: &mut CpuStorage,
        moment_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<()> {
        let len = self.slice.rows * self.slice.cols;
        let grad = cpu_values(grad, grad_l, len)?;
        let moment = cpu_values_mut(moment, moment_l, len)?;
        moment_values(moment, grad, &self.step, &self.slice);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        moment: &mut candle_core::CudaStorage,
        moment_l: &Layout,
        grad: &candle_core::CudaStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<()> {
        crate::gpu::adamw::moment((moment, moment_l), (grad, grad_l), &self.step, &self.slice)
    }
}

impl InplaceOp3 for ParamOp {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        param_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let len = self.slice.rows * self.slice.cols;
        let (m, v) = (cpu_values(m, m_l, len)?, cpu_values(v, v_l, len)?);
        let param = cpu_values_mut(param, param_l, len)?;
        param_values(param, m, v, &self.step, &self.slice);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        param: &mut candle_core::CudaStorage,
        param_l: &Layout,
        m: &candle_core::CudaStorage,
        m_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let inputs = [(m, m_l), (v, v_l)];
        crate::gpu::adamw::param((param, param_l), inputs, &self.step, &self.slice)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::train::optim::MaskedAdamW;

    fn random(rng: &mut StdRng, dims: (usize, usize), scale: f32) -> Tensor {
        let v: Vec<f32> = (0..dims.0 * dims.1)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Steps of (ranks, clipping factor): one rank at a time as frozen DyLoRA trains, a rank
    /// again, the first and the last index, and a range trained equally often.
    const STEPS: [(Range<usize>, Option<f64>); 6] = [
        (2..3, None),
        (0..1, Some(0.37)),
        (2..3, None),
        (5..6, Some(0.9)),
        (3..5, None),
        (3..5, Some(0.5)),
    ];

    #[test]
    fn fused_steps_give_the_candle_op_update_bit_for_bit() {
        for (rank_dim, dims) in [(0, (6, 7)), (1, (9, 6))] {
            for (round_to, wd) in [(DType::F32, 0.0), (DType::BF16, 0.1)] {
                let mut rng = StdRng::seed_from_u64(rank_dim as u64 * 10 + wd as u64);
                let init = random(&mut rng, dims, 0.5);
                let cfg = AdamWConfig {
                    weight_decay: wd,
                    ..AdamWConfig::default()
                };
                let (ours, theirs) = (
                    Var::from_tensor(&init).unwrap(),
                    Var::from_tensor(&init).unwrap(),
                );
                let mut fused = MaskedAdamW::new(cfg, &[(&ours, rank_dim)]).unwrap();
                let mut plain = MaskedAdamW::new(cfg, &[(&theirs, rank_dim)]).unwrap();
                for (step, (ranks, clip)) in STEPS.iter().enumerate() {
                    let grad = random(&mut rng, dims, 3.0);
                    let lr = 1e-2 / (step + 1) as f64;
                    let applied = update(
                        cfg,
                        &mut fused.states[0],
                        &ours,
                        &grad,
                        ranks.clone(),
                        lr,
                        round_to,
                        clip.unwrap_or(1.0),
                    )
                    .unwrap();
                    assert!(applied, "step {step}: the ranks were trained equally often");
                    let scaled = match clip {
                        Some(s) => (&grad * *s).unwrap(),
                        None => grad,
                    };
                    plain
                        .step(&[&theirs], &[scaled], ranks.clone(), lr, round_to)
                        .unwrap();
                    let case = format!("rank_dim {rank_dim}, {round_to:?}, step {step}");
                    assert_eq!(
                        bits(ours.as_tensor()),
                        bits(theirs.as_tensor()),
                        "{case}: param"
                    );
                    assert_eq!(
                        bits(&fused.states[0].m),
                        bits(&plain.states[0].m),
                        "{case}: m"
                    );
                    assert_eq!(
                        bits(&fused.states[0].v),
                        bits(&plain.states[0].v),
                        "{case}: v"
                    );
                    assert_eq!(fused.states[0].steps, plain.states[0].steps, "{case}");
                }
            }
        }
    }

    #[test]
    fn ranks_trained_unequally_often_are_left_to_the_candle_op_update() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::ones((4, 3), DType::F32, &dev).unwrap()).unwrap();
        let mut opt = MaskedAdamW::new(AdamWConfig::default(), &[(&p, 0)]).unwrap();
        let grad = Tensor::ones((4, 3), DType::F32, &dev).unwrap();
        let c = opt.config;
        assert!(update(c, &mut opt.states[0], &p, &grad, 1..2, 0.1, DType::F32, 1.0).unwrap());
        let before = bits(p.as_tensor());
        // Rank 1 has one step, rank 0 none: the bias corrections differ per row.
        let applied = update(c, &mut opt.states[0], &p, &grad, 0..2, 0.1, DType::F32, 1.0);
        assert!(!applied.unwrap());
        assert_eq!(bits(p.as_tensor()), before, "nothing changed");
        assert_eq!(opt.states[0].steps, vec![0, 1, 0, 0]);
    }

    #[test]
    fn one_launch_for_all_matrices_is_left_to_the_per_matrix_ops_on_the_cpu() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::ones((4, 3), DType::F32, &dev).unwrap()).unwrap();
        let mut opt = MaskedAdamW::new(AdamWConfig::default(), &[(&p, 0)]).unwrap();
        let grad = Tensor::ones((4, 3), DType::F32, &dev).unwrap();
        let (c, params) = (opt.config, [&p]);
        let states = &mut opt.states;
        let applied = update_all(c, states, &params, &[grad], 1..2, 0.1, DType::F32, 1.0);
        assert!(!applied.unwrap(), "no launches to save on the CPU");
        assert_eq!(
            bits(p.as_tensor()),
            vec![1.0f32.to_bits(); 12],
            "nothing changed"
        );
        assert_eq!(opt.states[0].steps, vec![0; 4], "no step counted");
    }

    #[test]
    fn a_table_entry_refuses_ranks_outside_the_matrix() {
        let slice = |rank_dim, start, len| RankSlice {
            rows: 4,
            cols: 3,
            rank_dim,
            start,
            len,
        };
        assert!(table_entry([0; 4], &slice(0, 3, 1), [1.0; 2]).is_ok());
        for bad in [
            slice(0, 3, 2),
            slice(1, 3, 1),
            slice(2, 0, 1),
            slice(0, 0, 0),
        ] {
            let err = table_entry([0; 4], &bad, [1.0; 2]).unwrap_err().to_string();
            assert!(err.contains("outside the matrix"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_slice_indexes_rows_of_a_and_columns_of_b() {
        let a = RankSlice {
            rows: 4,
            cols: 3,
            rank_dim: 0,
            start: 1,
            len: 2,
        };
        let got: Vec<usize> = (0..a.values()).map(|i| a.index(i)).collect();
        assert_eq!(got, vec![3, 4, 5, 6, 7, 8]);
        let b = RankSlice {
            rows: 3,
            cols: 4,
            rank_dim: 1,
            start: 2,
            len: 1,
        };
        let got: Vec<usize> = (0..b.values()).map(|i| b.index(i)).collect();
        assert_eq!(got, vec![2, 6, 10]);
    }
}
