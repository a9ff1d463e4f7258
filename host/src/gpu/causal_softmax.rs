//! The fused attention softmax (`causal_softmax.cu`) on candle's stream: the CUDA side of
//! `model::fused::softmax`, whose CPU rows are the reference it mirrors.

use candle_core::{CudaStorage, Layout};

use super::fused::{FusedKernel, Param, Scalar, expect_lengths, warp_per_row_grid};
use super::kernels::CAUSAL_SOFTMAX;

const FORWARD: FusedKernel = FusedKernel {
    source: &CAUSAL_SOFTMAX,
    name: "causal_softmax_fwd",
    inputs: &[Param::Float],
    output: Param::Float,
};
const BACKWARD: FusedKernel = FusedKernel {
    source: &CAUSAL_SOFTMAX,
    name: "causal_softmax_bwd",
    inputs: &[Param::Float, Param::Float],
    output: Param::Float,
};

/// `rows` rows of `tk` scores, row `r` being query `r % tq`.
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    /// All rows of all heads and batch entries.
    pub rows: usize,
    /// Queries per sequence.
    pub tq: usize,
    /// Keys per sequence.
    pub tk: usize,
}

impl Rows {
    /// The kernel's scalar arguments `(rows, tq, tk, scale)`, the launch grid and the number of
    /// values, or an error past its limits.
    fn launch(
        self,
        scale: f32,
    ) -> candle_core::Result<(Vec<Scalar>, cudarc::driver::LaunchConfig, usize)> {
        let Self { rows, tq, tk } = self;
        if tq == 0 || tq > tk {
            candle_core::bail!("causal softmax: needs 0 < tq <= tk, got tq {tq}, tk {tk}");
        }
        let (rows32, cfg) = warp_per_row_grid("causal softmax", rows)?;
        let small = |v: usize| {
            u32::try_from(v).map_err(|_| candle_core::Error::msg("causal softmax: rows too long"))
        };
        let len = rows
            .checked_mul(tk)
            .ok_or_else(|| candle_core::Error::msg("causal softmax: too many values"))?;
        let scalars = vec![
            Scalar::U32(rows32),
            Scalar::U32(small(tq)?),
            Scalar::U32(small(tk)?),
            Scalar::F32(scale),
        ];
        Ok((scalars, cfg, len))
    }
}

/// Probabilities for `scores` (f32 or bf16, contiguous `[rows, tk]` values).
pub fn forward(
    scores: &CudaStorage,
    layout: &Layout,
    shape: Rows,
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    let (scalars, cfg, len) = shape.launch(scale)?;
    expect_lengths("causal softmax", &[(scores, layout)], len)?;
    // SAFETY: `causal_softmax_fwd_*(scores, probs, rows, tq, tk, scale)` reads `rows * tk`
    // scores and writes as many probabilities (masked keys as 0), with `0 < tq <= tk`.
    unsafe { FORWARD.launch(&[(scores, layout)], len, &scalars, cfg) }
}

/// Score gradients from `scores` and the probabilities' gradients (same dtype and shape).
pub fn backward(
    scores: &CudaStorage,
    scores_layout: &Layout,
    grad_probs: &CudaStorage,
    grad_layout: &Layout,
    shape: Rows,
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    let (scalars, cfg, len) = shape.launch(scale)?;
    let inputs = [(scores, scores_layout), (grad_probs, grad_layout)];
    expect_lengths("causal softmax", &inputs, len)?;
    // SAFETY: `causal_softmax_bwd_*(scores, grad_probs, grad_scores, rows, tq, tk, scale)`
    // reads `rows * tk` values of each input and writes as many, with `0 < tq <= tk`.
    unsafe { BACKWARD.launch(&inputs, len, &scalars, cfg) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shape() {
        let (scalars, cfg, len) = Rows {
            rows: 9,
            tq: 3,
            tk: 5,
        }
        .launch(0.5)
        .unwrap();
        assert!(
            matches!(scalars[..], [Scalar::U32(9), Scalar::U32(3), Scalar::U32(5), Scalar::F32(s)] if s == 0.5)
        );
        assert_eq!(cfg.grid_dim, (3, 1, 1));
        assert_eq!(len, 45);
        assert!(
            Rows {
                rows: 4,
                tq: 6,
                tk: 5
            }
            .launch(1.0)
            .is_err()
        );
        assert!(
            Rows {
                rows: 4,
                tq: 0,
                tk: 5
            }
            .launch(1.0)
            .is_err()
        );
        assert!(
            Rows {
                rows: 1 << 40,
                tq: 1,
                tk: 1
            }
            .launch(1.0)
            .is_err()
        );
    }
}
