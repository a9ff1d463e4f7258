//! AVX2 + FMA kernels (x86-64). Every function here needs those features: callers hold a
//! [`Supported`](super::isa::Supported) proof before calling.
//!
//! Two decoders turn packed NF4 codes into f32 code values in registers:
//! * [`in_order`]: 8 values at a time in element order, for any span (dequantization, rows
//!   that start mid-block);
//! * [`planes`]: 64 values at a time with fewer shuffles but out of element order, for the
//!   matvec over whole blocks, where `x` is put in the same order once per call.

mod in_order;
mod lanes;
mod planes;

pub(crate) use in_order::{dequantize_span, row_dots_aligned, span_dot};
pub(crate) use planes::{PLANE_CHUNK, plane_ordered, row_dots_planes};

use std::arch::x86_64::*;

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn load8(x: &[f32; 8]) -> __m256 {
    // SAFETY: `x` is exactly 8 readable f32; loadu has no alignment requirement.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

#[cfg(test)]
mod test_support {
    use std::arch::x86_64::*;

    /// The 8 lanes of a vector.
    pub(crate) fn lanes(v: __m256) -> [f32; 8] {
        let mut out = [0.0f32; 8];
        // SAFETY: 8 writable f32; the caller only has a vector if AVX is available.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    /// Packed bytes whose nibbles run through all 16 codes in both positions.
    pub(crate) fn every_code_bytes() -> [u8; 32] {
        std::array::from_fn(|i| (((i * 7 % 16) << 4) | ((i * 5 + 3) % 16)) as u8)
    }
}
