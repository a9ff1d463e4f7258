//! The owned NF4 + double-quant weight: what a frozen linear keeps in memory, and what the
//! bitsandbytes bridge and the device container read and write.

use qdylora_core::double_quant::{self, DoubleQuantRef};
use qdylora_core::dynamic_map::{CODE_LEN, signed_dynamic_map};
use qdylora_core::kernels::Nf4Matrix;
use qdylora_core::{Element, ElementType, nf4};

use std::boxed::Box;
use std::vec;
use std::vec::Vec;

/// A frozen `[rows, cols]` weight (`rows` = out features) in NF4 with double-quantized absmax,
/// laid out exactly as bitsandbytes stores it. No f32 copy of the weight is kept.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Weight {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Elements per absmax block (64 for QLoRA).
    pub blocksize: usize,
    /// Two codes per byte, even element in the high nibble; `ceil(rows*cols/2)` bytes.
    pub packed: Vec<u8>,
    /// One 8-bit code per block.
    pub absmax_codes: Vec<u8>,
    /// One f32 per 256 blocks.
    pub nested_absmax: Vec<f32>,
    /// Mean subtracted from the absmax before the 8-bit quantization.
    pub offset: f32,
    /// The 8-bit code (bitsandbytes' signed dynamic map).
    pub code8: Box<[f32; CODE_LEN]>,
    /// The element type the weight had before quantization (`dtype` in bitsandbytes' quant state).
    pub dtype: ElementType,
}

impl Nf4Weight {
    /// Quantizes a row-major `[rows, cols]` matrix as `quantize_4bit(..., compress_statistics=True)`.
    pub fn quantize<T: Element>(
        rows: usize,
        cols: usize,
        data: &[T],
        blocksize: usize,
    ) -> Result<Self, qdylora_core::Error> {
        let n = rows
            .checked_mul(cols)
            .ok_or(qdylora_core::Error::SizeOverflow)?;
        if data.len() != n {
            return Err(qdylora_core::Error::Shape {
                expected: n,
                actual: data.len(),
            });
        }
        let blocks = nf4::block_count(n, blocksize);
        let code8 = Box::new(signed_dynamic_map());
        let mut packed = vec![0u8; nf4::packed_len(n)];
        let mut absmax = vec![0.0f32; blocks];
        let mut absmax_codes = vec![0u8; blocks];
        let mut nested_absmax = vec![0.0f32; double_quant::nested_block_count(blocks)];
        let offset = double_quant::quantize_nf4_double(
            &code8,
            data,
            blocksize,
            &mut packed,
            &mut absmax,
            &mut absmax_codes,
            &mut nested_absmax,
        )?;
        Ok(Self {
            rows,
            cols,
            blocksize,
            packed,
            absmax_codes,
            nested_absmax,
            offset,
            code8,
            dtype: T::TYPE,
        })
    }

    /// The double-quantized absmax as the core's view.
    pub fn absmax(&self) -> DoubleQuantRef<'_> {
        DoubleQuantRef {
            code: &self.code8,
            codes: &self.absmax_codes,
            nested_absmax: &self.nested_absmax,
            offset: self.offset,
        }
    }

    /// The core's matrix view (reference kernels).
    pub fn matrix(&self) -> Result<Nf4Matrix<'_, DoubleQuantRef<'_>>, qdylora_core::Error> {
        Nf4Matrix::new(
            self.rows,
            self.cols,
            self.blocksize,
            &self.packed,
            self.absmax(),
        )
    }

    /// The whole matrix dequantized to f32 by the core's reference kernel (tests, export).
    pub fn dequantize_f32(&self) -> Result<Vec<f32>, qdylora_core::Error> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        nf4::dequantize(&self.packed, &self.absmax(), self.blocksize, &mut out)?;
        Ok(out)
    }

    /// Bytes this weight keeps resident: packed codes and the double-quant constants.
    pub fn resident_bytes(&self) -> usize {
        self.packed.len()
            + self.absmax_codes.len()
            + self.nested_absmax.len() * 4
            + CODE_LEN * 4
            + std::mem::size_of::<Self>()
    }
}
