//! Portable kernels over a span of the flattened matrix: the fallback on CPUs without AVX2, and
//! the odd ends (an unaligned first element, a short tail) of the SIMD kernels.

use qdylora_core::Element;
use qdylora_core::nf4::{CODE, unpack_index};

use super::view::WeightView;

/// The NF4 value (before scaling) of flat element `i`.
#[inline]
pub(crate) fn code_at(packed: &[u8], i: usize) -> f32 {
    CODE[usize::from(unpack_index(packed, i))]
}

/// The block of element `first` and the end of that block's piece of `first..end`.
#[inline]
pub(crate) fn block_segment(blocksize: usize, first: usize, end: usize) -> (usize, usize) {
    let block = first / blocksize;
    (block, ((block + 1) * blocksize).min(end))
}

/// Calls `f(block, first, end)` for each piece of `start..end` that lies in one block.
#[inline]
fn for_each_block_segment(
    blocksize: usize,
    start: usize,
    end: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    let mut first = start;
    while first < end {
        let (block, seg_end) = block_segment(blocksize, first, end);
        f(block, first, seg_end);
        first = seg_end;
    }
}

/// Dequantizes flat elements `start..start + out.len()` (the caller keeps them in range):
/// `CODE[q] * absmax`, one f32 rounding, then the rounding to `T` — as the core's reference.
pub(crate) fn dequantize_span<T: Element>(w: &WeightView<'_>, start: usize, out: &mut [T]) {
    let end = start + out.len();
    for_each_block_segment(w.blocksize, start, end, |block, first, seg_end| {
        let scale = w.absmax(block);
        for (i, o) in (first..seg_end).zip(&mut out[first - start..seg_end - start]) {
            *o = T::from_f32(code_at(w.packed, i) * scale);
        }
    });
}

/// `sum(CODE[q[first + j]] * x[j])`, unscaled.
#[inline]
pub(crate) fn code_dot(packed: &[u8], first: usize, x: &[f32]) -> f32 {
    (first..)
        .zip(x)
        .map(|(i, &xj)| code_at(packed, i) * xj)
        .sum()
}

/// `W_flat[start..start + x.len()] · x`: each block piece summed, then scaled by its absmax
/// (the same order as the core's `row_dot`).
pub(crate) fn span_dot(w: &WeightView<'_>, start: usize, x: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for_each_block_segment(
        w.blocksize,
        start,
        start + x.len(),
        |block, first, seg_end| {
            let sum = code_dot(w.packed, first, &x[first - start..seg_end - start]);
            acc += sum * w.absmax(block);
        },
    );
    acc
}
