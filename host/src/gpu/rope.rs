//! The fused rotary position embedding (`rope.cu`) on candle's stream: the CUDA side of
//! `model::fused::rope`, whose CPU loop is the reference it mirrors bit for bit.

use candle_core::{CudaStorage, Layout};

use super::fused::{FusedKernel, Param, Scalar, elementwise_grid, expect_lengths};
use super::kernels::ROPE;
use crate::model::fused::rope::{Direction, Rows};

const ROTATE: FusedKernel = FusedKernel {
    source: &ROPE,
    name: "rope",
    inputs: &[Param::Float, Param::Float, Param::Float],
    output: Param::Float,
};

/// A tensor's storage and layout.
type Input<'a> = (&'a CudaStorage, &'a Layout);

/// `x` (contiguous, rows of `d` ordered as `rows.input` says) rotated by the `[t, d/2]` tables
/// `(cos, sin)`, in `direction`, written in `rows.output`'s order.
pub fn rotate(
    x: Input<'_>,
    tables: [Input<'_>; 2],
    rows: Rows,
    d: usize,
    direction: Direction,
) -> candle_core::Result<CudaStorage> {
    let len = x.1.shape().elem_count();
    let (t, heads) = (rows.t, rows.heads);
    if t == 0 || heads == 0 || d == 0 || !d.is_multiple_of(2) || !len.is_multiple_of(t * heads * d)
    {
        candle_core::bail!("rope: {len} values are not [..., {heads} x {t}, {d}] with an even {d}");
    }
    expect_lengths("rope", &tables, t * d / 2)?;
    let small =
        |v: usize| u32::try_from(v).map_err(|_| candle_core::Error::msg("rope: tables too large"));
    let pairs = len / 2;
    let scalars = [
        Scalar::U64(pairs as u64),
        Scalar::U32(small(t)?),
        Scalar::U32(small(d / 2)?),
        Scalar::U32(small(heads)?),
        Scalar::U32(rows.order_bits()),
        Scalar::F32(direction.sign()),
    ];
    let [cos, sin] = tables;
    // SAFETY: `rope_*(x, cos, sin, out, pairs, t, half, heads, orders, sign)` reads and writes
    // `2 * pairs` values of x and out (each output row reads one input row of the same whole
    // `[heads, t]` batch row) and `t * half` of each table (checked above: x is whole batch
    // rows of `heads * t` rows of `2 * half`).
    unsafe { ROTATE.launch(&[x, cos, sin], len, &scalars, elementwise_grid(pairs)) }
}
