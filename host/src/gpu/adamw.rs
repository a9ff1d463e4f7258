//! The masked AdamW update on the GPU: the CUDA side of `train::adamw_fused`, launching
//! `adamw.cu`'s kernels on candle's stream over the trained slice of one adapter matrix, in
//! place.
//!
//! Not yet run on a GPU (see the module notes in `gpu`); the kernels run under the CUDA
//! emulation in CI against `train::adamw_fused`'s CPU loops.

use candle_core::backend::BackendStorage;
use candle_core::cuda::WrapErr;
use candle_core::{CudaStorage, Layout};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

use super::fused::elementwise_grid;
use super::kernels::ADAMW;
use crate::train::adamw_fused::{MomentStep, ParamStep, RankSlice};

/// `moment` updated in place from `grad` on the slice.
pub fn moment(
    (moment, moment_l): (&mut CudaStorage, &Layout),
    (grad, grad_l): (&CudaStorage, &Layout),
    step: &MomentStep,
    slice: &RankSlice,
) -> candle_core::Result<()> {
    let dims = Dims::of(slice)?;
    let dev = moment.device().clone();
    let func = ADAMW.function(&dev, "adamw_moment")?;
    let grad = matrix(grad, grad_l, slice)?;
    let mut moment = matrix_mut(moment, moment_l, slice)?;
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(&func);
    args.arg(&mut moment).arg(&grad);
    dims.push(&mut args);
    args.arg(&step.grad_scale)
        .arg(&step.beta)
        .arg(&step.one_minus_beta);
    let squared = u32::from(step.squared);
    args.arg(&squared);
    // SAFETY: `adamw_moment(float*, const float*, u32 x5, float x3, u32)`, the arguments in that
    // order; it reads and writes only slice indices of the two rows x cols matrices, whose
    // views hold at least rows x cols values (checked by `matrix`).
    unsafe { args.launch(elementwise_grid(slice.values())) }.w()?;
    Ok(())
}

/// `param` updated in place from the (already updated) moments `[m, v]` on the slice.
pub fn param(
    (param, param_l): (&mut CudaStorage, &Layout),
    [(m, m_l), (v, v_l)]: [(&CudaStorage, &Layout); 2],
    step: &ParamStep,
    slice: &RankSlice,
) -> candle_core::Result<()> {
    let dims = Dims::of(slice)?;
    let dev = param.device().clone();
    let func = ADAMW.function(&dev, "adamw_param")?;
    let (m, v) = (matrix(m, m_l, slice)?, matrix(v, v_l, slice)?);
    let mut param = matrix_mut(param, param_l, slice)?;
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(&func);
    args.arg(&mut param).arg(&m).arg(&v);
    dims.push(&mut args);
    args.arg(&step.inv_bc1)
        .arg(&step.inv_bc2)
        .arg(&step.eps)
        .arg(&step.decay)
        .arg(&step.lr);
    let round = u32::from(step.round_bf16);
    args.arg(&round);
    // SAFETY: `adamw_param(float*, const float*, const float*, u32 x5, float x5, u32)`, the
    // arguments in that order; it reads and writes only slice indices of the three rows x cols
    // matrices, whose views hold at least rows x cols values (checked by `matrix`).
    unsafe { args.launch(elementwise_grid(slice.values())) }.w()?;
    Ok(())
}

/// The slice's shape as the kernels' `u32` arguments.
struct Dims([u32; 5]);

impl Dims {
    fn of(s: &RankSlice) -> candle_core::Result<Self> {
        let fits = |v: usize| {
            u32::try_from(v).map_err(|_| candle_core::Error::msg("fused AdamW: matrix too large"))
        };
        let across = if s.rank_dim == 0 { s.rows } else { s.cols };
        if s.rank_dim > 1 || s.len == 0 || s.start + s.len > across {
            candle_core::bail!(
                "fused AdamW: ranks {}..+{} outside the matrix",
                s.start,
                s.len
            );
        }
        Ok(Self([
            fits(s.rows)?,
            fits(s.cols)?,
            fits(s.rank_dim)?,
            fits(s.start)?,
            fits(s.len)?,
        ]))
    }

    fn push<'a>(&'a self, args: &mut cudarc::driver::LaunchArgs<'a>) {
        for v in &self.0 {
            args.arg(v);
        }
    }
}

/// The f32 values of a contiguous matrix of the slice's size.
fn matrix<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    slice: &RankSlice,
) -> candle_core::Result<CudaView<'a, f32>> {
    let (start, end) = contiguous(l, slice)?;
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}

fn matrix_mut<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
    slice: &RankSlice,
) -> candle_core::Result<CudaViewMut<'a, f32>> {
    let (start, end) = contiguous(l, slice)?;
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(start..end))
}

fn contiguous(l: &Layout, slice: &RankSlice) -> candle_core::Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some((start, end)) if end - start == slice.rows * slice.cols => Ok((start, end)),
        _ => candle_core::bail!(
            "fused AdamW: expected a contiguous {}x{} f32 matrix",
            slice.rows,
            slice.cols
        ),
    }
}
