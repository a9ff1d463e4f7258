//! Double quantization (QLoRA's `compress_statistics=True`): the f32 absmax constants of an NF4
//! tensor are themselves quantized to 8 bits.
//!
//! `offset = mean(absmax)`; `absmax - offset` is quantized blockwise (blocks of 256) with the
//! signed dynamic code, each block keeping an f32 nested absmax. The reconstruction is
//! `code8[q] * nested_absmax[i / 256] + offset`, two f32 roundings as bitsandbytes does it
//! (a dequantize kernel, then a separate tensor add).
//!
//! The mean: torch's CUDA reduction sums in f32 (in an order set by its launch configuration)
//! and multiplies by the f32 reciprocal of the count. Here the sum is accumulated in f64 and
//! rounded once, then multiplied the same way. The two agree whenever torch's f32 partial sums are
//! exact, which holds for every golden tensor (bf16 absmax values share a coarse grid); for
//! very large tensors with a wide absmax range they can differ in the last bit of the offset.
//! A checkpoint read from disk always carries its own offset, so that difference never reaches
//! dequantization of an existing file.

use crate::dynamic_map::{self, CODE_LEN};
use crate::error::{Buffer, Error, check_len};
use crate::nf4::{self, AbsmaxSource};

/// The nested blocksize bitsandbytes uses.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Number of nested blocks for `blocks` absmax values.
pub const fn nested_block_count(blocks: usize) -> usize {
    blocks.div_ceil(NESTED_BLOCKSIZE)
}

/// `mean(absmax)` as the double-quantization offset (see the module notes on rounding).
/// An empty slice has offset 0.
pub fn mean_offset(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    let sum: f64 = absmax.iter().map(|&a| f64::from(a)).sum();
    (sum as f32) * (1.0 / absmax.len() as f32)
}

/// Compresses `absmax` into 8-bit `codes` (one per value) and `nested_absmax` (one per 256),
/// returning the offset. `code` is the signed dynamic map.
pub fn compress(
    code: &[f32; CODE_LEN],
    absmax: &[f32],
    codes: &mut [u8],
    nested_absmax: &mut [f32],
) -> Result<f32, Error> {
    check_len(Buffer::AbsmaxCodes, absmax.len(), codes.len())?;
    check_len(
        Buffer::NestedAbsmax,
        nested_block_count(absmax.len()),
        nested_absmax.len(),
    )?;
    if let Some(index) = absmax.iter().position(|a| !a.is_finite()) {
        return Err(Error::NonFinite { index });
    }
    let offset = mean_offset(absmax);
    for ((values, out), nested) in absmax
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
        .zip(nested_absmax.iter_mut())
    {
        let amax = values
            .iter()
            .fold(0.0f32, |m, &a| m.max((a - offset).abs()));
        *nested = amax;
        let inv = 1.0 / amax;
        for (q, &a) in out.iter_mut().zip(values) {
            *q = dynamic_map::quantize_scaled(code, (a - offset) * inv);
        }
    }
    Ok(offset)
}

/// `code8[q] * nested_absmax + offset`, rounded as bitsandbytes rounds it.
#[inline]
pub fn reconstruct(code: &[f32; CODE_LEN], q: u8, nested_absmax: f32, offset: f32) -> f32 {
    code[usize::from(q)] * nested_absmax + offset
}

/// Borrowed double-quantized absmax constants of one NF4 tensor.
#[derive(Debug, Clone, Copy)]
pub struct DoubleQuantRef<'a> {
    /// The signed dynamic map (`nested_quant_map` in checkpoints).
    pub code: &'a [f32; CODE_LEN],
    /// One 8-bit code per NF4 block (`absmax` in checkpoints).
    pub codes: &'a [u8],
    /// One f32 per 256 codes.
    pub nested_absmax: &'a [f32],
    /// The mean that was subtracted.
    pub offset: f32,
}

impl<'a> DoubleQuantRef<'a> {
    /// Checks that the nested absmax count fits the code count.
    pub fn new(
        code: &'a [f32; CODE_LEN],
        codes: &'a [u8],
        nested_absmax: &'a [f32],
        offset: f32,
    ) -> Result<Self, Error> {
        check_len(
            Buffer::NestedAbsmax,
            nested_block_count(codes.len()),
            nested_absmax.len(),
        )?;
        Ok(Self {
            code,
            codes,
            nested_absmax,
            offset,
        })
    }

    /// Writes every reconstructed absmax into `out` (one per block).
    pub fn reconstruct_all(&self, out: &mut [f32]) -> Result<(), Error> {
        check_len(Buffer::Absmax, self.codes.len(), out.len())?;
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.absmax(i);
        }
        Ok(())
    }
}

impl AbsmaxSource for DoubleQuantRef<'_> {
    fn blocks(&self) -> usize {
        self.codes.len()
    }
    fn absmax(&self, block: usize) -> f32 {
        match (
            self.codes.get(block),
            self.nested_absmax.get(block / NESTED_BLOCKSIZE),
        ) {
            (Some(&q), Some(&nested)) => reconstruct(self.code, q, nested, self.offset),
            _ => 0.0,
        }
    }
}

/// NF4 + double quantization in one call, as `quantize_4bit(..., compress_statistics=True)`.
/// `absmax_scratch` receives the f32 absmax (one per block) on the way; the result lives in
/// `packed`, `codes`, `nested_absmax` and the returned offset.
pub fn quantize_nf4_double<T: crate::Element>(
    code: &[f32; CODE_LEN],
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax_scratch: &mut [f32],
    codes: &mut [u8],
    nested_absmax: &mut [f32],
) -> Result<f32, Error> {
    nf4::quantize(input, blocksize, packed, absmax_scratch)?;
    compress(code, absmax_scratch, codes, nested_absmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_absmax_reconstructs_exactly() {
        let code = dynamic_map::signed_dynamic_map();
        let absmax = [0.25f32; 300];
        let mut codes = [0u8; 300];
        let mut nested = [0.0f32; 2];
        let offset = compress(&code, &absmax, &mut codes, &mut nested).unwrap();
        assert_eq!(offset, 0.25);
        let dq = DoubleQuantRef::new(&code, &codes, &nested, offset).unwrap();
        for i in 0..300 {
            assert_eq!(dq.absmax(i), 0.25);
        }
    }

    #[test]
    fn length_errors() {
        let code = dynamic_map::signed_dynamic_map();
        let mut codes = [0u8; 3];
        let mut nested = [0.0f32; 2];
        assert!(compress(&code, &[1.0; 3], &mut codes, &mut nested).is_err());
        assert!(DoubleQuantRef::new(&code, &codes, &nested, 0.0).is_err());
    }
}
