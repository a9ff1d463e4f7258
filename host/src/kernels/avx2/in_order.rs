//! The in-order decoder: a little-endian `u32` of packed codes holds 8 elements. Broadcast to
//! 8 lanes, a per-lane variable shift brings each lane's nibble to bits 0..3; `vpermps` looks
//! bits 0..2 up in the low and the high half of the 16-entry code, and the nibble's bit 3
//! (shifted up to the sign bit) picks one of the two with `vblendvps`.

use std::arch::x86_64::*;

use qdylora_core::nf4::CODE;

use super::lanes::Lanes;
use super::{hsum, load8};
use crate::kernels::scalar::{block_segment, code_at};
use crate::kernels::view::WeightView;

/// Right shifts that bring element `j` of a packed `u32` to bits 0..3 (even elements are the
/// high nibble of their byte).
const INDEX_SHIFTS: [i32; 8] = [4, 0, 12, 8, 20, 16, 28, 24];
/// Left shifts that bring bit 3 of element `j`'s nibble to bit 31.
const SELECT_SHIFTS: [i32; 8] = [24, 28, 16, 20, 8, 12, 0, 4];

/// The code tables and shift vectors, built once per call and kept in registers.
#[derive(Clone, Copy)]
struct Decoder {
    low: __m256,
    high: __m256,
    index_shift: __m256i,
    select_shift: __m256i,
}

impl Decoder {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn new() -> Self {
        let lane = |t: &[i32; 8]| _mm256_setr_epi32(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
        let half = |c: &[f32]| _mm256_setr_ps(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]);
        Self {
            low: half(&CODE[..8]),
            high: half(&CODE[8..]),
            index_shift: lane(&INDEX_SHIFTS),
            select_shift: lane(&SELECT_SHIFTS),
        }
    }

    /// The 8 code values (unscaled) of 4 packed bytes, in element order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn decode8(&self, bytes: &[u8; 4]) -> __m256 {
        let word = _mm256_set1_epi32(i32::from_le_bytes(*bytes));
        let index = _mm256_srlv_epi32(word, self.index_shift);
        let select = _mm256_castsi256_ps(_mm256_sllv_epi32(word, self.select_shift));
        let low = _mm256_permutevar8x32_ps(self.low, index);
        let high = _mm256_permutevar8x32_ps(self.high, index);
        _mm256_blendv_ps(low, high, select)
    }
}

/// Dequantizes flat elements `start..start + out.len()` (in range), bit-identical to the scalar
/// kernel: the same f32 product, rounded to `T` the same way.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn dequantize_span<T: Lanes>(w: &WeightView<'_>, start: usize, out: &mut [T]) {
    let decoder = Decoder::new();
    let end = start + out.len();
    let mut first = start;
    while first < end {
        let (block, seg_end) = block_segment(w.blocksize, first, end);
        let scale = w.absmax(block);
        let seg = &mut out[first - start..seg_end - start];
        // An odd first element shares its byte with the previous one: do it alone.
        let (head, body) = seg.split_at_mut(first % 2);
        for o in head {
            *o = T::from_f32(code_at(w.packed, first) * scale);
        }
        let body_first = first + first % 2;
        let (groups, tail) = body.as_chunks_mut::<8>();
        let bytes = w.packed[body_first / 2..].as_chunks::<4>().0;
        let scale_v = _mm256_set1_ps(scale);
        for (o, b) in groups.iter_mut().zip(bytes) {
            // SAFETY: this function runs only where AVX2 is available.
            unsafe { T::store8(_mm256_mul_ps(decoder.decode8(b), scale_v), o) };
        }
        let tail_first = body_first + groups.len() * 8;
        for (i, o) in (tail_first..).zip(tail) {
            *o = T::from_f32(code_at(w.packed, i) * scale);
        }
        first = seg_end;
    }
}

/// `sum(CODE[q[first + j]] * x[j])` for an even `first`, unscaled.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn code_dot_even(decoder: &Decoder, packed: &[u8], first: usize, x: &[f32]) -> f32 {
    let (groups, tail) = x.as_chunks::<8>();
    let bytes = packed[first / 2..].as_chunks::<4>().0;
    let mut acc = _mm256_setzero_ps();
    for (xg, b) in groups.iter().zip(bytes) {
        acc = _mm256_fmadd_ps(decoder.decode8(b), load8(xg), acc);
    }
    let tail_first = first + groups.len() * 8;
    let tail_sum: f32 = (tail_first..)
        .zip(tail)
        .map(|(i, &xi)| code_at(packed, i) * xi)
        .sum();
    hsum(acc) + tail_sum
}

/// `W_flat[start..start + x.len()] · x` for any start and length: each block piece summed, then
/// scaled by its absmax.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn span_dot(w: &WeightView<'_>, start: usize, x: &[f32]) -> f32 {
    let decoder = Decoder::new();
    let end = start + x.len();
    let mut acc = 0.0f32;
    let mut first = start;
    while first < end {
        let (block, seg_end) = block_segment(w.blocksize, first, end);
        let xs = &x[first - start..seg_end - start];
        let (head, body) = xs.split_at(first % 2);
        let head_sum: f32 = head.iter().map(|&xi| code_at(w.packed, first) * xi).sum();
        let sum = head_sum + code_dot_even(&decoder, w.packed, first + head.len(), body);
        acc += sum * w.absmax(block);
        first = seg_end;
    }
    acc
}

/// `y[i] = W[first_row + i, :] · x` for rows that start on a block boundary
/// (`cols % blocksize == 0`): block sums stay in vector lanes and are scaled by a broadcast
/// absmax, one horizontal sum per row.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn row_dots_aligned(w: &WeightView<'_>, first_row: usize, x: &[f32], y: &mut [f32]) {
    let decoder = Decoder::new();
    let blocks_per_row = w.cols / w.blocksize;
    let bytes_per_block = w.blocksize / 2;
    for (row, out) in (first_row..).zip(y.iter_mut()) {
        let row_bytes = &w.packed[row * w.cols / 2..(row + 1) * w.cols / 2];
        let first_block = row * blocks_per_row;
        let mut acc = _mm256_setzero_ps();
        for (k, (xb, bytes)) in x
            .chunks_exact(w.blocksize)
            .zip(row_bytes.chunks_exact(bytes_per_block))
            .enumerate()
        {
            let xg = xb.as_chunks::<8>().0;
            let bg = bytes.as_chunks::<4>().0;
            let mut s0 = _mm256_setzero_ps();
            let mut s1 = _mm256_setzero_ps();
            for (xp, bp) in xg.chunks_exact(2).zip(bg.chunks_exact(2)) {
                s0 = _mm256_fmadd_ps(decoder.decode8(&bp[0]), load8(&xp[0]), s0);
                s1 = _mm256_fmadd_ps(decoder.decode8(&bp[1]), load8(&xp[1]), s1);
            }
            let scale = _mm256_set1_ps(w.absmax(first_block + k));
            acc = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), scale, acc);
        }
        *out = hsum(acc);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{every_code_bytes, lanes};
    use super::*;
    use crate::kernels::Isa;

    #[test]
    fn decodes_every_code_in_element_order() {
        if !Isa::Avx2Fma.is_supported() {
            return;
        }
        let bytes = every_code_bytes();
        let code_of = |e: usize| CODE[usize::from(qdylora_core::nf4::unpack_index(&bytes, e))];
        // SAFETY: AVX2 was checked above.
        let decoder = unsafe { Decoder::new() };
        for (k, word) in bytes.as_chunks::<4>().0.iter().enumerate() {
            // SAFETY: as above.
            let got = lanes(unsafe { decoder.decode8(word) });
            for (j, g) in got.iter().enumerate() {
                assert_eq!(g.to_bits(), code_of(8 * k + j).to_bits());
            }
        }
    }
}
