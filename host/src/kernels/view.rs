//! A weight whose buffers were checked against its shape once, so the kernels can slice it
//! without re-checking (and without panicking on a malformed [`Nf4Weight`]).

use qdylora_core::double_quant::DoubleQuantRef;
use qdylora_core::nf4::AbsmaxSource;
use qdylora_formats::Nf4Weight;

use super::KernelError;

/// A checked, borrowed NF4 weight.
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    pub rows: usize,
    pub cols: usize,
    pub blocksize: usize,
    /// `ceil(rows * cols / 2)` bytes, even element in the high nibble.
    pub packed: &'a [u8],
    absmax: DoubleQuantRef<'a>,
}

impl<'a> WeightView<'a> {
    /// Checks blocksize, non-zero shape, and every buffer length against the shape.
    pub fn new(w: &'a Nf4Weight) -> Result<Self, KernelError> {
        // The core checks the blocksize, the shape and the packed / code lengths ...
        w.matrix()?;
        // ... and the nested absmax count against the code count.
        let absmax = DoubleQuantRef::new(&w.code8, &w.absmax_codes, &w.nested_absmax, w.offset)?;
        Ok(Self {
            rows: w.rows,
            cols: w.cols,
            blocksize: w.blocksize,
            packed: &w.packed,
            absmax,
        })
    }

    /// Elements in the matrix (cannot overflow: checked in `new`).
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// The absmax of `block`, rounded exactly as bitsandbytes does (`code8[q] * nested + offset`,
    /// two roundings). Computed on the fly: no f32 copy of the absmax is kept.
    #[inline]
    pub fn absmax(&self, block: usize) -> f32 {
        self.absmax.absmax(block)
    }
}
