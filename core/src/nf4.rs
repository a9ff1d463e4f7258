//! 4-bit NormalFloat (NF4): the code, blockwise quantization, nibble packing and dequantization.
//!
//! Bit-exact with bitsandbytes' CUDA `quantize_4bit(quant_type="nf4")`: the kernel scales each
//! value by an f32 reciprocal of its block's absmax and walks a binary tree of strict `>`
//! comparisons against the midpoints between neighbouring codes (ties go to the lower code).
//! Values are blocked over the row-major flattened tensor; a short last block gets its own absmax.
//!
//! Degenerate inputs:
//! * an all-zero block has absmax 0; its reciprocal is +inf and `0 * inf` is NaN, which fails every
//!   comparison and lands on code 0 (-1.0). That is what bitsandbytes stores too, and it still
//!   dequantizes to zero (`-1.0 * 0`) when the absmax is kept exactly.
//! * the padding nibble of an odd-length tensor is the code of 0.0 in the last block (7), as the
//!   kernel quantizes a zero it loads past the end.
//! * inf and NaN are rejected with [`Error::NonFinite`]: bitsandbytes silently produces an inf or
//!   NaN absmax there, which poisons the double quantization of the whole tensor.
//! * bitsandbytes is built with `--use_fast_math`, so its reciprocal is `rcp.approx` (at most one
//!   ulp off) and subnormals flush to zero; this module uses the IEEE reciprocal. The two agree on
//!   every element of the golden vectors; they could differ only for a value within one ulp of a
//!   code midpoint or for a block whose absmax is subnormal (below 1.2e-38).

use crate::element::Element;
use crate::error::{Buffer, Error, check_len};

/// The 16 NF4 values, index 0..15 (bitsandbytes' `get_4bit_type("nf4")`).
#[allow(clippy::excessive_precision)]
pub const CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Code index of 0.0, used for the padding nibble.
pub const ZERO_INDEX: u8 = 7;

/// The blocksize QLoRA uses.
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// Checks a blocksize against the set bitsandbytes accepts: powers of two from 32 to 4096.
pub fn check_blocksize(blocksize: usize) -> Result<(), Error> {
    if blocksize.is_power_of_two() && (32..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidBlockSize { blocksize })
    }
}

/// The code index for a value already scaled into [-1, 1], by the kernel's comparison tree.
///
/// The midpoint constants are the kernel's own literals rounded to f32. NaN fails every
/// comparison and returns 0.
#[inline]
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
pub fn quantize_scaled(x: f32) -> u8 {
    if x > 0.03979014977812767 {
        if x > 0.3893125355243683 {
            if x > 0.6427869200706482 {
                if x > 0.8614784181118011 { 15 } else { 14 }
            } else if x > 0.5016634166240692 {
                13
            } else {
                12
            }
        } else if x > 0.2035212516784668 {
            if x > 0.2920137718319893 { 11 } else { 10 }
        } else if x > 0.1202552504837513 {
            9
        } else {
            8
        }
    } else if x > -0.33967943489551544 {
        if x > -0.13791173323988914 {
            if x > -0.045525018125772476 { 7 } else { 6 }
        } else if x > -0.23460740596055984 {
            5
        } else {
            4
        }
    } else if x > -0.6106329262256622 {
        if x > -0.4599952697753906 { 3 } else { 2 }
    } else if x > -0.8480964004993439 {
        1
    } else {
        0
    }
}

/// Packed length in bytes of `n` NF4 values.
pub const fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of blocks (absmax values) for `n` values.
pub const fn block_count(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// The code index of element `i` in a packed buffer (even elements sit in the high nibble).
/// Out-of-range indices read as [`ZERO_INDEX`].
#[inline]
pub fn unpack_index(packed: &[u8], i: usize) -> u8 {
    match packed.get(i / 2) {
        Some(&byte) if i.is_multiple_of(2) => byte >> 4,
        Some(&byte) => byte & 0x0f,
        None => ZERO_INDEX,
    }
}

/// Packs code indices (each < 16) two per byte, the even element in the high nibble; an odd
/// count is padded with [`ZERO_INDEX`].
pub fn pack_indices(indices: &[u8], packed: &mut [u8]) -> Result<(), Error> {
    check_len(Buffer::Packed, packed_len(indices.len()), packed.len())?;
    for (out, pair) in packed.iter_mut().zip(indices.chunks(2)) {
        let hi = pair[0] & 0x0f;
        let lo = pair.get(1).copied().unwrap_or(ZERO_INDEX) & 0x0f;
        *out = (hi << 4) | lo;
    }
    Ok(())
}

/// Unpacks `indices.len()` code indices from a packed buffer.
pub fn unpack_indices(packed: &[u8], indices: &mut [u8]) -> Result<(), Error> {
    check_len(Buffer::Packed, packed_len(indices.len()), packed.len())?;
    for (i, out) in indices.iter_mut().enumerate() {
        *out = unpack_index(packed, i);
    }
    Ok(())
}

/// Blockwise NF4 quantization of `input` into `packed` (`ceil(n/2)` bytes) and `absmax`
/// (`ceil(n/blocksize)` f32). On error the output buffers hold unspecified values.
pub fn quantize<T: Element>(
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    let n = input.len();
    check_len(Buffer::Packed, packed_len(n), packed.len())?;
    check_len(Buffer::Absmax, block_count(n, blocksize), absmax.len())?;
    // blocksize is even, so a block never splits a byte.
    let bytes_per_block = blocksize / 2;
    for (block, ((values, out), amax_out)) in input
        .chunks(blocksize)
        .zip(packed.chunks_mut(bytes_per_block))
        .zip(absmax.iter_mut())
        .enumerate()
    {
        let mut amax = 0.0f32;
        for (j, v) in values.iter().enumerate() {
            let x = v.to_f32();
            if !x.is_finite() {
                return Err(Error::NonFinite {
                    index: block * blocksize + j,
                });
            }
            amax = amax.max(x.abs());
        }
        *amax_out = amax;
        let inv = 1.0 / amax;
        for (byte, pair) in out.iter_mut().zip(values.chunks(2)) {
            let hi = quantize_scaled(pair[0].to_f32() * inv);
            // The kernel loads a 0.0 past the end and quantizes it like any other value.
            let lo = quantize_scaled(pair.get(1).map_or(0.0, |v| v.to_f32()) * inv);
            *byte = (hi << 4) | lo;
        }
    }
    Ok(())
}

/// Where the per-block absmax of a quantized tensor comes from: a plain f32 array, or the
/// double-quantized form ([`crate::double_quant::DoubleQuantRef`]).
pub trait AbsmaxSource {
    /// Number of blocks.
    fn blocks(&self) -> usize;
    /// The absmax of block `block` (0.0 past the end).
    fn absmax(&self, block: usize) -> f32;
}

impl<A: AbsmaxSource + ?Sized> AbsmaxSource for &A {
    fn blocks(&self) -> usize {
        (**self).blocks()
    }
    fn absmax(&self, block: usize) -> f32 {
        (**self).absmax(block)
    }
}

impl AbsmaxSource for [f32] {
    fn blocks(&self) -> usize {
        self.len()
    }
    fn absmax(&self, block: usize) -> f32 {
        self.get(block).copied().unwrap_or(0.0)
    }
}

/// Blockwise NF4 dequantization into `out` (its length is the element count):
/// `out[i] = CODE[q[i]] * absmax[i / blocksize]`, computed in f32 and rounded to `T`.
pub fn dequantize<T: Element, A: AbsmaxSource + ?Sized>(
    packed: &[u8],
    absmax: &A,
    blocksize: usize,
    out: &mut [T],
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    let n = out.len();
    check_len(Buffer::Packed, packed_len(n), packed.len())?;
    check_len(Buffer::Absmax, block_count(n, blocksize), absmax.blocks())?;
    for (block, (values, bytes)) in out
        .chunks_mut(blocksize)
        .zip(packed.chunks(blocksize / 2))
        .enumerate()
    {
        let scale = absmax.absmax(block);
        for (pair, &byte) in values.chunks_mut(2).zip(bytes) {
            pair[0] = T::from_f32(CODE[usize::from(byte >> 4)] * scale);
            if let Some(second) = pair.get_mut(1) {
                *second = T::from_f32(CODE[usize::from(byte & 0x0f)] * scale);
            }
        }
    }
    Ok(())
}

/// Half the gap between code `index` and its nearer-or-equal neighbour on the side `x` lies on:
/// the largest error quantization to `index` can make for a value scaled into [-1, 1].
pub fn half_gap(index: u8, scaled: f32) -> f32 {
    let i = usize::from(index & 0x0f);
    let c = CODE[i];
    let neighbour = if scaled >= c {
        CODE.get(i + 1).copied().unwrap_or(c)
    } else if i > 0 {
        CODE[i - 1]
    } else {
        c
    };
    (neighbour - c).abs() / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_picks_nearest_code_away_from_midpoints() {
        for (i, &c) in CODE.iter().enumerate() {
            assert_eq!(usize::from(quantize_scaled(c)), i, "code {c}");
        }
    }

    #[test]
    fn nan_and_zero_block_follow_the_kernel() {
        assert_eq!(quantize_scaled(f32::NAN), 0);
        let zeros = [0.0f32; 64];
        let mut packed = [0xffu8; 32];
        let mut absmax = [1.0f32; 1];
        quantize(&zeros, 64, &mut packed, &mut absmax).unwrap();
        assert_eq!(absmax[0], 0.0);
        assert!(packed.iter().all(|&b| b == 0));
        let mut out = [1.0f32; 64];
        dequantize(&packed, &absmax[..], 64, &mut out).unwrap();
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn rejects_non_finite_and_bad_sizes() {
        let mut packed = [0u8; 2];
        let mut absmax = [0.0f32; 1];
        let input = [1.0, f32::INFINITY, 0.5];
        assert_eq!(
            quantize(&input, 64, &mut packed, &mut absmax),
            Err(Error::NonFinite { index: 1 })
        );
        assert_eq!(
            quantize(&[1.0f32; 3], 48, &mut packed, &mut absmax),
            Err(Error::InvalidBlockSize { blocksize: 48 })
        );
        assert!(matches!(
            quantize(&[1.0f32; 5], 64, &mut packed, &mut absmax),
            Err(Error::BufferLength {
                buffer: Buffer::Packed,
                ..
            })
        ));
    }
}
