//! The fused cross-entropy (`cross_entropy.cu`) on candle's stream: the CUDA side of
//! `model::fused::cross_entropy`, whose CPU rows are the reference it mirrors.

use candle_core::{CudaStorage, Layout};
use cudarc::driver::LaunchConfig;

use super::fused::{FusedKernel, Param, Scalar, expect_lengths};
use super::kernels::CROSS_ENTROPY;

/// `(logits, targets) -> f32 losses`.
const FORWARD: FusedKernel = FusedKernel {
    source: &CROSS_ENTROPY,
    name: "cross_entropy_fwd",
    inputs: &[Param::Float, Param::U32],
    output: Param::F32,
};
/// `(logits, targets, f32 loss gradients) -> logit gradients`.
const BACKWARD: FusedKernel = FusedKernel {
    source: &CROSS_ENTROPY,
    name: "cross_entropy_bwd",
    inputs: &[Param::Float, Param::U32, Param::F32],
    output: Param::Float,
};

/// Threads per block (`CE_THREADS` in the kernel: its shared memory is sized for it).
const THREADS: u32 = 256;

/// A contiguous input of a launch.
type Input<'a> = (&'a CudaStorage, &'a Layout);

/// `rows` rows of `vocab` logits, one target each.
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    /// Tokens.
    pub rows: usize,
    /// Logits per token.
    pub vocab: usize,
}

impl Rows {
    /// The kernel's scalar arguments `(rows, vocab)`, the launch grid (one block per row: see
    /// the kernel's notes) and the number of logits, or an error past its limits.
    fn launch(self) -> candle_core::Result<(Vec<Scalar>, LaunchConfig, usize)> {
        let Self { rows, vocab } = self;
        let fail = |what: &str| candle_core::Error::msg(format!("cross entropy: {what}"));
        if vocab == 0 {
            return Err(fail("an empty vocabulary"));
        }
        // A grid's x dimension holds up to 2^31 - 1 blocks.
        let rows32 = u32::try_from(rows)
            .ok()
            .filter(|&r| r < 1 << 31)
            .ok_or_else(|| fail(&format!("{rows} rows is too many")))?;
        let vocab32 = u32::try_from(vocab).map_err(|_| fail("the vocabulary is too large"))?;
        let len = rows
            .checked_mul(vocab)
            .ok_or_else(|| fail("too many logits"))?;
        let cfg = LaunchConfig {
            grid_dim: (rows32.max(1), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok((vec![Scalar::U32(rows32), Scalar::U32(vocab32)], cfg, len))
    }
}

/// Per-row losses (f32, `rows` values) of `logits` (f32 or bf16, contiguous `[rows, vocab]`)
/// and `targets` (u32, `rows`). A target `>= vocab` gives NaN for its row.
pub fn forward(
    logits: Input<'_>,
    targets: Input<'_>,
    shape: Rows,
) -> candle_core::Result<CudaStorage> {
    let (scalars, cfg, len) = shape.launch()?;
    expect_lengths("cross entropy", &[logits], len)?;
    expect_lengths("cross entropy", &[targets], shape.rows)?;
    // SAFETY: `cross_entropy_fwd_*(logits, targets, losses, rows, vocab)` reads `rows * vocab`
    // logits and `rows` targets (lengths checked above, types by `launch`), never a logit at a target `>= vocab`,
    // and writes `rows` f32 losses, one block per row.
    unsafe { FORWARD.launch(&[logits, targets], shape.rows, &scalars, cfg) }
}

/// Logit gradients (the logits' dtype, `[rows, vocab]`) from the logits, the targets and the
/// losses' gradients (f32, `rows`). A target `>= vocab` gives a row of NaN.
pub fn backward(
    logits: Input<'_>,
    targets: Input<'_>,
    grad: Input<'_>,
    shape: Rows,
) -> candle_core::Result<CudaStorage> {
    let (scalars, cfg, len) = shape.launch()?;
    expect_lengths("cross entropy", &[logits], len)?;
    expect_lengths("cross entropy", &[targets, grad], shape.rows)?;
    // SAFETY: `cross_entropy_bwd_*(logits, targets, grad, grad_logits, rows, vocab)` reads
    // `rows * vocab` logits, `rows` targets and `rows` gradients (lengths checked above, types by `launch`) and
    // writes `rows * vocab` values in the logits' dtype, one block per row.
    unsafe { BACKWARD.launch(&[logits, targets, grad], len, &scalars, cfg) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shape() {
        let (scalars, cfg, len) = Rows {
            rows: 9,
            vocab: 1000,
        }
        .launch()
        .unwrap();
        assert!(matches!(scalars[..], [Scalar::U32(9), Scalar::U32(1000)]));
        assert_eq!(cfg.grid_dim, (9, 1, 1));
        assert_eq!(cfg.block_dim, (THREADS, 1, 1));
        assert_eq!(len, 9000);
        // No rows: one block that does nothing (a grid cannot be empty).
        assert_eq!(
            Rows { rows: 0, vocab: 5 }.launch().unwrap().1.grid_dim,
            (1, 1, 1)
        );
        for bad in [
            Rows { rows: 4, vocab: 0 },
            Rows {
                rows: 1 << 31,
                vocab: 1,
            },
            Rows {
                rows: 1,
                vocab: 1 << 32,
            },
            Rows {
                rows: 1 << 30,
                vocab: usize::MAX / 4,
            },
        ] {
            assert!(bad.launch().is_err(), "{bad:?}");
        }
    }
}
