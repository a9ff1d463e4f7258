//! The masked AdamW update on the GPU: the CUDA side of `train::adamw_fused`, launching
//! `adamw.cu`'s kernels on candle's stream over the trained slice of one adapter matrix, in
//! place, or over every matrix of the step in one launch ([`update_all`]).
//!
//! Not yet run on a GPU (see the module notes in `gpu`); the kernels run under the CUDA
//! emulation in CI against `train::adamw_fused`'s CPU loops.

use candle_core::backend::BackendStorage;
use candle_core::cuda::WrapErr;
use candle_core::{CudaStorage, Device, Layout, Storage, Tensor};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, PushKernelArg};

use super::fused::elementwise_grid;
use super::kernels::ADAMW;
use crate::train::adamw_fused::{
    MomentStep, MultiEntry, MultiStep, ParamStep, RankSlice, TABLE_ENTRY_BYTES, table_entry,
};

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
        s.kernel_dims().map(Self)
    }

    fn push<'a>(&'a self, args: &mut cudarc::driver::LaunchArgs<'a>) {
        for v in &self.0 {
            args.arg(v);
        }
    }
}

/// Every matrix's masked AdamW step in one launch of `adamw_multi` (one per 65,535 matrices,
/// CUDA's limit on the grid's y), which finds each matrix in a table of device addresses
/// uploaded for the launch.
///
/// Why: three launches per matrix are 1,344 at the LLaMA-7B shape, issued after the gradient
/// norm's read-back has drained the GPU, so it idles while the CPU issues them.
pub fn update_all(entries: &[MultiEntry<'_>], step: &MultiStep) -> candle_core::Result<()> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    let Device::Cuda(dev) = first.param.device() else {
        candle_core::bail!("fused AdamW: expected the matrices on a GPU");
    };
    let func = ADAMW.function(dev, "adamw_multi")?;
    let stream = dev.cuda_stream();
    let (first_moment, second_moment, param) = (&step.first, &step.second, &step.param);
    let round = u32::from(param.round_bf16);
    for chunk in entries.chunks(u16::MAX as usize) {
        let mut table = Vec::with_capacity(chunk.len() * TABLE_ENTRY_BYTES);
        let mut widest = 0;
        for e in chunk {
            let addresses = [
                address(e.param, &e.slice, &stream)?,
                address(e.m, &e.slice, &stream)?,
                address(e.v, &e.slice, &stream)?,
                address(e.grad, &e.slice, &stream)?,
            ];
            table.extend_from_slice(&table_entry(addresses, &e.slice, e.inv_bc)?);
            widest = widest.max(e.slice.values());
        }
        // Copied from pageable memory: the call returns once the bytes are staged, and the
        // device copy is ordered before the launch on the same stream. Dropping it frees it in
        // stream order, after the launch.
        let table = stream.clone_htod(&table).w()?;
        let mut cfg = elementwise_grid(widest);
        cfg.grid_dim.1 = chunk.len() as u32;
        let mut args = stream.launch_builder(&func);
        args.arg(&table)
            .arg(&first_moment.grad_scale)
            .arg(&first_moment.beta)
            .arg(&first_moment.one_minus_beta)
            .arg(&second_moment.beta)
            .arg(&second_moment.one_minus_beta)
            .arg(&param.eps)
            .arg(&param.decay)
            .arg(&param.lr)
            .arg(&round);
        // SAFETY: `adamw_multi(const AdamwEntry*, float x9, u32)`, the arguments in that order;
        // the table holds `chunk.len()` entries, one per blockIdx.y, each the addresses of
        // four contiguous f32 matrices of its slice's size (checked by `address`), so every
        // index it touches lies inside them. It writes the parameter and the two moments
        // through addresses taken under candle's read locks: the write is queued on candle's
        // one stream, after every op that produced those values and before every op queued
        // later, which is the order candle's own in-place ops get under the write lock; the
        // trainer holds the optimizer state exclusively and issues from one thread.
        unsafe { args.launch(cfg) }.w()?;
    }
    Ok(())
}

/// The device address of `t`'s first value: a contiguous f32 CUDA matrix of the slice's size.
fn address(t: &Tensor, slice: &RankSlice, stream: &CudaStream) -> candle_core::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        candle_core::bail!("fused AdamW: expected the matrices on a GPU");
    };
    let (start, _) = contiguous(layout, slice)?;
    let (base, _record) = storage.as_cuda_slice::<f32>()?.device_ptr(stream);
    Ok(base + (start * std::mem::size_of::<f32>()) as u64)
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
