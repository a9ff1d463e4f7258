//! Storing 8 f32 lanes as the output element type, rounded exactly as the scalar path rounds.

use std::arch::x86_64::*;

use half::bf16;
use qdylora_core::Element;

/// Output element types the dequantizer can store 8 at a time.
pub(crate) trait Lanes: Element {
    /// Rounds 8 f32 lanes to `Self` exactly as `Element::from_f32` does and stores them.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn store8(v: __m256, out: &mut [Self; 8]);
}

impl Lanes for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store8(v: __m256, out: &mut [f32; 8]) {
        // SAFETY: `out` is 8 writable f32; storeu has no alignment requirement.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
    }
}

impl Lanes for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store8(v: __m256, out: &mut [bf16; 8]) {
        // Round to nearest even on the bits, as `half::bf16::from_f32`: add 0x7fff plus the
        // lowest kept bit, keep the top half. NaN keeps its top half with the quiet bit set.
        let bits = _mm256_castps_si256(v);
        let upper = _mm256_srli_epi32::<16>(bits);
        let bias = _mm256_add_epi32(
            _mm256_and_si256(upper, _mm256_set1_epi32(1)),
            _mm256_set1_epi32(0x7fff),
        );
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
        let quiet_nan = _mm256_or_si256(upper, _mm256_set1_epi32(0x40));
        let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        let halves = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
        // Every lane is < 2^16, so the unsigned saturating pack is exact; it packs within each
        // 128-bit half, and the qword permute puts elements 0..3 and 4..7 side by side.
        let packed = _mm256_packus_epi32(halves, halves);
        let ordered = _mm256_permute4x64_epi64::<0b00_00_10_00>(packed);
        // SAFETY: `out` is 8 writable bf16 (repr(transparent) u16), 16 bytes; storeu is unaligned.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), _mm256_castsi256_si128(ordered)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Isa;

    #[test]
    fn bf16_rounding_matches_half_on_ties_and_specials() {
        if !Isa::Avx2Fma.is_supported() {
            return;
        }
        let specials: [u32; 16] = [
            0x3f80_8000, // tie, even kept bit: stays
            0x3f81_8000, // tie, odd kept bit: rounds up
            0x3f80_8001, // above the tie
            0x3f80_7fff, // below the tie
            0x7f7f_ffff, // largest finite: rounds to inf
            0xff7f_ffff, // same, negative
            0x7f80_0000, // inf
            0x7f80_0001, // signaling NaN: must stay NaN
            0x7fff_ffff, // NaN whose rounding would carry into the sign
            0xffc0_0000, // negative quiet NaN
            0x0000_8000, // subnormal tie
            0x0001_8000, // subnormal tie, odd
            0x8000_0000, // -0
            0x0000_0000, // +0
            0xbf00_c000, // negative, rounds up in magnitude
            0x3eaa_aaab, // 1/3
        ];
        for chunk in specials.chunks_exact(8) {
            let values: [f32; 8] = std::array::from_fn(|i| f32::from_bits(chunk[i]));
            let mut got = [bf16::ZERO; 8];
            // SAFETY: AVX2 was checked above.
            unsafe {
                let v = _mm256_loadu_ps(values.as_ptr());
                <bf16 as Lanes>::store8(v, &mut got);
            }
            for (g, v) in got.iter().zip(values) {
                assert_eq!(
                    g.to_bits(),
                    bf16::from_f32(v).to_bits(),
                    "{:#010x}",
                    v.to_bits()
                );
            }
        }
    }
}
