//! The signed 8-bit dynamic code that double quantization uses for the absmax constants, and
//! the 8-bit blockwise quantizer of bitsandbytes' `quantize_blockwise`.
//!
//! bitsandbytes builds the code with `create_dynamic_map(signed=True, max_exponent_bits=7,
//! total_bits=8)` in PyTorch on the CPU: for each decade `10^(i-6)`, `i = 0..7`, it takes
//! `2^i + 1` points of `torch.linspace(0.1, 1)` in f32, the f32 means of neighbours, scales them
//! by the decade (both signs), adds 0 and 1 and sorts. torch's CPU linspace computes
//! `start + step*i` for the first half and `end - step*(steps-1-i)` for the second half, and its
//! build contracts those into fused multiply-adds; the values below reproduce that, which the
//! golden vectors from bitsandbytes confirm entry by entry.

use crate::error::{Buffer, Error, check_len};

/// Number of entries in an 8-bit code.
pub const CODE_LEN: usize = 256;

/// Index of 0.0 in the signed map, where the kernel's binary search starts.
const PIVOT: usize = 127;

/// torch's f32 `linspace(start, end, steps)` value at index `i` (as its CPU kernel computes it).
fn linspace_at(start: f32, end: f32, steps: usize, i: usize) -> f32 {
    let step = (end - start) / (steps - 1) as f32;
    if i < steps / 2 {
        libm::fmaf(step, i as f32, start)
    } else {
        libm::fmaf(-step, (steps - 1 - i) as f32, end)
    }
}

/// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`): 256 sorted values,
/// 0.0 at index 127, 1.0 at index 255, smallest about -0.99297.
pub fn signed_dynamic_map() -> [f32; CODE_LEN] {
    let mut code = [0.0f32; CODE_LEN];
    let mut n = 0;
    // The decade is a Python number multiplied into an f32 tensor: it is rounded to f32.
    let decades: [f32; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    for (i, decade) in decades.into_iter().enumerate() {
        let steps = (1usize << i) + 1;
        for j in 0..steps - 1 {
            let lo = linspace_at(0.1, 1.0, steps, j);
            let hi = linspace_at(0.1, 1.0, steps, j + 1);
            let mean = (lo + hi) / 2.0;
            code[n] = decade * mean;
            code[n + 1] = -(decade * mean);
            n += 2;
        }
    }
    // 2 * (1 + 2 + ... + 64) = 254 values so far, then 0 and 1.
    code[n] = 0.0;
    code[n + 1] = 1.0;
    code.sort_unstable_by(f32::total_cmp);
    code
}

/// The code index of an already-scaled value, by the kernel's binary search (`dQuantize<0>`):
/// seven halving steps from index 127, then a comparison with the midpoint to the neighbour on
/// the side the value lies. The walk only reaches indices 0..=254 and picks 255 only as a
/// neighbour, so it is reproduced step by step rather than as a nearest-code search. NaN
/// returns 0.
pub fn quantize_scaled(code: &[f32; CODE_LEN], x: f32) -> u8 {
    let mut pivot = PIVOT;
    let mut upper_pivot = CODE_LEN - 1;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == CODE_LEN - 1 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let chosen = if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint { upper_pivot } else { pivot }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint { lower_pivot } else { pivot }
    };
    chosen as u8
}

/// 8-bit blockwise quantization with `code` (bitsandbytes `quantize_blockwise`): per block an
/// f32 absmax, each value scaled by the f32 reciprocal of it and searched in the code.
pub fn quantize_blockwise(
    code: &[f32; CODE_LEN],
    input: &[f32],
    blocksize: usize,
    out: &mut [u8],
    absmax: &mut [f32],
) -> Result<(), Error> {
    if blocksize == 0 {
        return Err(Error::InvalidBlockSize { blocksize });
    }
    check_len(Buffer::Output, input.len(), out.len())?;
    check_len(
        Buffer::Absmax,
        input.len().div_ceil(blocksize),
        absmax.len(),
    )?;
    for (block, ((values, codes), amax_out)) in input
        .chunks(blocksize)
        .zip(out.chunks_mut(blocksize))
        .zip(absmax.iter_mut())
        .enumerate()
    {
        let mut amax = 0.0f32;
        for (j, &x) in values.iter().enumerate() {
            if !x.is_finite() {
                return Err(Error::NonFinite {
                    index: block * blocksize + j,
                });
            }
            amax = amax.max(x.abs());
        }
        *amax_out = amax;
        let inv = 1.0 / amax;
        for (q, &x) in codes.iter_mut().zip(values) {
            *q = quantize_scaled(code, x * inv);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_shape() {
        let code = signed_dynamic_map();
        assert_eq!(code[PIVOT], 0.0);
        assert_eq!(code[CODE_LEN - 1], 1.0);
        assert!(code.windows(2).all(|w| w[0] <= w[1]));
        assert!((code[0] + 0.99297).abs() < 1e-4);
        // Symmetric apart from the extra 1.0 at the top.
        for i in 0..PIVOT {
            assert_eq!(code[i], -code[2 * PIVOT - i]);
        }
    }

    #[test]
    fn search_returns_exact_codes() {
        let code = signed_dynamic_map();
        for (i, &c) in code.iter().enumerate() {
            let q = usize::from(quantize_scaled(&code, c));
            assert_eq!(code[q], c, "index {i}");
        }
        assert_eq!(quantize_scaled(&code, f32::NAN), 0);
    }
}
