//! The fused RMSNorm (`rms_norm.cu`) on candle's stream: the CUDA side of
//! `model::fused::rms_norm`, whose CPU rows are the reference it mirrors.

use candle_core::{CudaStorage, Layout};
use cudarc::driver::LaunchConfig;

use super::fused::{FusedKernel, Param, Scalar, expect_lengths, warp_per_row_grid};
use super::kernels::RMS_NORM;

const FORWARD: FusedKernel = FusedKernel {
    source: &RMS_NORM,
    name: "rms_norm_fwd",
    inputs: &[Param::Float, Param::Float],
    output: Param::Float,
};
const BACKWARD: FusedKernel = FusedKernel {
    source: &RMS_NORM,
    name: "rms_norm_bwd",
    inputs: &[Param::Float, Param::Float, Param::Float],
    output: Param::Float,
};
const RESIDUAL_FORWARD: FusedKernel = FusedKernel {
    source: &RMS_NORM,
    name: "residual_rms_norm_fwd",
    inputs: &[Param::Float, Param::Float, Param::Float],
    output: Param::Float,
};
const BACKWARD_ADD: FusedKernel = FusedKernel {
    source: &RMS_NORM,
    name: "rms_norm_bwd_add",
    inputs: &[Param::Float; 4],
    output: Param::Float,
};

/// A tensor's storage and layout.
type Input<'a> = (&'a CudaStorage, &'a Layout);

/// The scalar arguments `(rows, n, eps)` and the grid for `x` in rows of `n`, after checking
/// the lengths the kernels read: `x` and `others` (the gradient, the residual) whole rows, the
/// weight `n` values.
fn rows_of(
    x: Input<'_>,
    weight: Input<'_>,
    others: &[Input<'_>],
    n: usize,
    eps: f32,
) -> candle_core::Result<(Vec<Scalar>, LaunchConfig, usize)> {
    let len = x.1.shape().elem_count();
    if n == 0 || !len.is_multiple_of(n) {
        candle_core::bail!("rms norm: {len} values are not rows of {n}");
    }
    expect_lengths("rms norm", &[weight], n)?;
    expect_lengths("rms norm", others, len)?;
    let (rows, cfg) = warp_per_row_grid("rms norm", len / n)?;
    let n32 = u32::try_from(n).map_err(|_| candle_core::Error::msg("rms norm: rows too long"))?;
    let scalars = vec![Scalar::U32(rows), Scalar::U32(n32), Scalar::F32(eps)];
    Ok((scalars, cfg, len))
}

/// `round(x · r) · weight` for `x` in rows of `n` (f32 or bf16, contiguous).
pub fn forward(
    x: Input<'_>,
    weight: Input<'_>,
    n: usize,
    eps: f32,
) -> candle_core::Result<CudaStorage> {
    let (scalars, cfg, len) = rows_of(x, weight, &[], n, eps)?;
    // SAFETY: `rms_norm_fwd_*(x, weight, out, rows, n, eps)` reads `rows * n` values of x and
    // `n` of the weight (both checked above) and writes `rows * n`.
    unsafe { FORWARD.launch(&[x, weight], len, &scalars, cfg) }
}

/// The gradient w.r.t. `x` from `x`, the weight and the output's gradient.
pub fn backward(
    x: Input<'_>,
    weight: Input<'_>,
    grad: Input<'_>,
    n: usize,
    eps: f32,
) -> candle_core::Result<CudaStorage> {
    let (scalars, cfg, len) = rows_of(x, weight, &[grad], n, eps)?;
    // SAFETY: `rms_norm_bwd_*(x, weight, grad, out, rows, n, eps)` reads `rows * n` values of
    // x and of grad and `n` of the weight (checked above) and writes `rows * n`.
    unsafe { BACKWARD.launch(&[x, weight, grad], len, &scalars, cfg) }
}

/// `[x + y, round(x + y) normed]` (one buffer, twice `x`'s length) for `x`, `y` in rows of `n`.
pub fn residual_forward(
    x: Input<'_>,
    y: Input<'_>,
    weight: Input<'_>,
    n: usize,
    eps: f32,
) -> candle_core::Result<CudaStorage> {
    let (scalars, cfg, len) = rows_of(x, weight, &[y], n, eps)?;
    // SAFETY: `residual_rms_norm_fwd_*(x, y, weight, out, rows, n, eps)` reads `rows * n`
    // values of x and of y and `n` of the weight (checked above) and writes `2 * rows * n`.
    unsafe { RESIDUAL_FORWARD.launch(&[x, y, weight], 2 * len, &scalars, cfg) }
}

/// `residual + d x`, `d x` as [`backward`] gives it.
pub fn backward_add(
    x: Input<'_>,
    weight: Input<'_>,
    grad: Input<'_>,
    residual: Input<'_>,
    n: usize,
    eps: f32,
) -> candle_core::Result<CudaStorage> {
    let (scalars, cfg, len) = rows_of(x, weight, &[grad, residual], n, eps)?;
    // SAFETY: `rms_norm_bwd_add_*(x, weight, grad, residual, out, rows, n, eps)` reads
    // `rows * n` values of x, grad and residual and `n` of the weight (checked above) and
    // writes `rows * n`.
    unsafe { BACKWARD_ADD.launch(&[x, weight, grad, residual], len, &scalars, cfg) }
}
