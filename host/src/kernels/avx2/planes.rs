//! The byte-plane decoder: `vpshufb` maps 32 nibbles at once to one byte of their f32 codes,
//! four lookups give the four bytes, and two rounds of unpacking assemble them into f32 lanes.
//! About 3 shuffles per 8 values against 4 for the in-order decoder, but the lanes come out in
//! [`PLANE_ORDER`], so `x` is reordered to match once per call.

use std::arch::x86_64::*;

use qdylora_core::nf4::CODE;

use super::{hsum, load8};
use crate::kernels::view::WeightView;

/// Elements per 32-byte load in the plane decoder.
pub(crate) const PLANE_CHUNK: usize = 64;

/// Where output lane `p` (vector `p / 8`, lane `p % 8`) of [`PlaneDecoder::decode64`] comes
/// from in its 64-element chunk. Vectors 0..4 hold the high nibbles (even elements), 4..8 the
/// low ones; within a vector, `vpunpck` leaves bytes `4q..4q + 4` of each 128-bit half.
const PLANE_ORDER: [usize; PLANE_CHUNK] = {
    let mut order = [0; PLANE_CHUNK];
    let mut p = 0;
    while p < PLANE_CHUNK {
        let (nibble, q, half, i) = (p / 32, p / 8 % 4, p / 4 % 2, p % 4);
        let byte = 16 * half + 4 * q + i;
        order[p] = 2 * byte + nibble;
        p += 1;
    }
    order
};

/// `x` reordered chunk by chunk to match [`PlaneDecoder::decode64`]'s lanes (`x.len()` a
/// multiple of [`PLANE_CHUNK`]), so no decoded value has to be moved back into element order.
pub(crate) fn plane_ordered(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(PLANE_CHUNK)
        .flat_map(|chunk| PLANE_ORDER.iter().map(move |&e| chunk[e]))
        .collect()
}

/// Decodes 64 elements (32 bytes) at a time with byte lookups: `vpshufb` maps each nibble to
/// one byte of its f32 code, for each of the 4 bytes, and two rounds of unpacking assemble the
/// bytes into f32 lanes. Fewer shuffles per value than the in-order decoder, but the lanes come out of
/// element order ([`PLANE_ORDER`]).
#[derive(Clone, Copy)]
struct PlaneDecoder {
    planes: [__m256i; 4],
    low_nibble: __m256i,
}

impl PlaneDecoder {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn new() -> Self {
        let plane = |k: usize| {
            let b: [u8; 16] = std::array::from_fn(|c| CODE[c].to_bits().to_le_bytes()[k]);
            let half = _mm_setr_epi8(
                b[0] as i8,
                b[1] as i8,
                b[2] as i8,
                b[3] as i8,
                b[4] as i8,
                b[5] as i8,
                b[6] as i8,
                b[7] as i8,
                b[8] as i8,
                b[9] as i8,
                b[10] as i8,
                b[11] as i8,
                b[12] as i8,
                b[13] as i8,
                b[14] as i8,
                b[15] as i8,
            );
            _mm256_broadcastsi128_si256(half)
        };
        Self {
            planes: [plane(0), plane(1), plane(2), plane(3)],
            low_nibble: _mm256_set1_epi8(0x0f),
        }
    }

    /// The four f32 vectors of one nibble vector (one nibble index per byte).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lookup32(&self, nibbles: __m256i) -> [__m256; 4] {
        let [t0, t1, t2, t3] = self.planes;
        let b0 = _mm256_shuffle_epi8(t0, nibbles);
        let b1 = _mm256_shuffle_epi8(t1, nibbles);
        let b2 = _mm256_shuffle_epi8(t2, nibbles);
        let b3 = _mm256_shuffle_epi8(t3, nibbles);
        let lo01 = _mm256_unpacklo_epi8(b0, b1);
        let hi01 = _mm256_unpackhi_epi8(b0, b1);
        let lo23 = _mm256_unpacklo_epi8(b2, b3);
        let hi23 = _mm256_unpackhi_epi8(b2, b3);
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)),
        ]
    }

    /// The 64 code values of 32 packed bytes, in [`PLANE_ORDER`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn decode64(&self, bytes: &[u8; 32]) -> ([__m256; 4], [__m256; 4]) {
        // SAFETY: `bytes` is 32 readable bytes; loadu has no alignment requirement.
        let v = unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) };
        let high = _mm256_and_si256(_mm256_srli_epi16::<4>(v), self.low_nibble);
        let low = _mm256_and_si256(v, self.low_nibble);
        (self.lookup32(high), self.lookup32(low))
    }
}

/// `y[i] = W[first_row + i, :] · x` for rows made of whole blocks whose size is a multiple of
/// [`PLANE_CHUNK`], with `x_ordered = plane_ordered(x)`.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn row_dots_planes(
    w: &WeightView<'_>,
    first_row: usize,
    x_ordered: &[f32],
    y: &mut [f32],
) {
    let decoder = PlaneDecoder::new();
    let blocks_per_row = w.cols / w.blocksize;
    let x_blocks = x_ordered.chunks_exact(w.blocksize);
    for (row, out) in (first_row..).zip(y.iter_mut()) {
        let row_bytes = &w.packed[row * w.cols / 2..(row + 1) * w.cols / 2];
        let first_block = row * blocks_per_row;
        let mut acc = _mm256_setzero_ps();
        for (k, (xb, bytes)) in x_blocks
            .clone()
            .zip(row_bytes.chunks_exact(w.blocksize / 2))
            .enumerate()
        {
            let mut s = [_mm256_setzero_ps(); 4];
            for (xc, bc) in xb
                .as_chunks::<8>()
                .0
                .chunks_exact(8)
                .zip(bytes.as_chunks::<32>().0)
            {
                let (high, low) = decoder.decode64(bc);
                for q in 0..4 {
                    s[q] = _mm256_fmadd_ps(high[q], load8(&xc[q]), s[q]);
                    s[q] = _mm256_fmadd_ps(low[q], load8(&xc[4 + q]), s[q]);
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
            acc = _mm256_fmadd_ps(sum, _mm256_set1_ps(w.absmax(first_block + k)), acc);
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
    fn decodes_every_code_in_plane_order() {
        let mut sorted = PLANE_ORDER;
        sorted.sort_unstable();
        assert!(
            sorted.iter().enumerate().all(|(i, &e)| i == e),
            "not a permutation"
        );
        if !Isa::Avx2Fma.is_supported() {
            return;
        }
        let bytes = every_code_bytes();
        let code_of = |e: usize| CODE[usize::from(qdylora_core::nf4::unpack_index(&bytes, e))];
        // SAFETY (both): AVX2 was checked above.
        let planes = unsafe { PlaneDecoder::new() };
        let (high, low) = unsafe { planes.decode64(&bytes) };
        for (v, vector) in high.into_iter().chain(low).enumerate() {
            for (lane, g) in lanes(vector).iter().enumerate() {
                let e = PLANE_ORDER[8 * v + lane];
                assert_eq!(g.to_bits(), code_of(e).to_bits(), "vector {v} lane {lane}");
            }
        }
    }
}
