//! The self-check the main binary runs before any model work: NF4 + double quantization of a
//! weight matrix, the device matvec over it, and two checks of the product.
//!
//! * The kernel (`Nf4Matrix::matvec`, which never materializes weights) must agree with
//!   dequantizing the matrix and taking plain dot products, to f32 rounding.
//! * The quantized product must stay close to the unquantized one (NF4 is a 4-bit code, so
//!   "close" is a loose bound that only catches garbage); its relative error is logged.

use qdylora_core::double_quant::{self, DoubleQuantRef};
use qdylora_core::dynamic_map::{self, CODE_LEN};
use qdylora_core::kernels::Nf4Matrix;
use qdylora_core::nf4;

use crate::{FirmwareError, synthetic};

/// Output features of the check matrix.
pub const ROWS: usize = 48;
/// Input features; rows of 96 start in the middle of 64-element blocks, as real ones can.
pub const COLS: usize = 96;
/// The QLoRA blocksize.
pub const BLOCKSIZE: usize = nf4::DEFAULT_BLOCKSIZE;
const ELEMENTS: usize = ROWS * COLS;
const PACKED_LEN: usize = nf4::packed_len(ELEMENTS);
const BLOCKS: usize = nf4::block_count(ELEMENTS, BLOCKSIZE);
const NESTED_BLOCKS: usize = double_quant::nested_block_count(BLOCKS);

/// The weight matrix, row-major, in flash.
pub static WEIGHT: [f32; ELEMENTS] = synthetic::fill(1, 0.5);
/// The input vector, in flash.
pub static INPUT: [f32; COLS] = synthetic::fill(2, 1.0);

/// f32 rounding bound, relative to `sum |w x|` of a row, for kernel vs dequantized dot.
const ROUNDING_BOUND: f32 = 1e-5;
/// Relative L2 error bound of the quantized product: NF4 of uniform weights gives about 0.1.
const QUANTIZATION_BOUND: f32 = 0.25;

/// [`WEIGHT`] in NF4 with double-quantized absmax.
pub struct Quantized {
    /// Two codes per byte.
    pub packed: [u8; PACKED_LEN],
    dynamic_map: [f32; CODE_LEN],
    absmax_codes: [u8; BLOCKS],
    nested_absmax: [f32; NESTED_BLOCKS],
    offset: f32,
}

impl Quantized {
    /// Quantizes `weight` as `quantize_4bit(compress_statistics=True)` does.
    pub fn new(weight: &[f32; ELEMENTS]) -> Result<Self, FirmwareError> {
        let mut q = Quantized {
            packed: [0; PACKED_LEN],
            dynamic_map: dynamic_map::signed_dynamic_map(),
            absmax_codes: [0; BLOCKS],
            nested_absmax: [0.0; NESTED_BLOCKS],
            offset: 0.0,
        };
        let mut absmax = [0.0f32; BLOCKS];
        q.offset = double_quant::quantize_nf4_double(
            &q.dynamic_map,
            weight,
            BLOCKSIZE,
            &mut q.packed,
            &mut absmax,
            &mut q.absmax_codes,
            &mut q.nested_absmax,
        )?;
        Ok(q)
    }

    /// The double-quantized absmax, as the kernels read it.
    pub fn absmax(&self) -> Result<DoubleQuantRef<'_>, FirmwareError> {
        Ok(DoubleQuantRef::new(
            &self.dynamic_map,
            &self.absmax_codes,
            &self.nested_absmax,
            self.offset,
        )?)
    }
}

/// What the self-check measured.
#[derive(Debug, Clone, Copy, defmt::Format)]
pub struct Report {
    /// Multiply-accumulates of one matvec (the work size; QEMU has no cycle counter).
    pub macs: u32,
    /// Largest `|kernel - dequantized dot| / sum |w x|` over rows.
    pub rounding_error: f32,
    /// `|y_nf4 - y_f32| / |y_f32|` (L2).
    pub quantization_error: f32,
    /// `sum(y)` of the kernel's output, to compare runs.
    pub checksum: f32,
}

/// Multiplies the quantized matrix (its codes read from `packed`, normally `quantized.packed`)
/// by [`INPUT`] and checks the product.
pub fn run(packed: &[u8], quantized: &Quantized) -> Result<Report, FirmwareError> {
    let absmax = quantized.absmax()?;
    let matrix = Nf4Matrix::new(ROWS, COLS, BLOCKSIZE, packed, absmax)?;
    let mut y = [0.0f32; ROWS];
    matrix.matvec(&INPUT, &mut y)?;

    let mut dequantized = [0.0f32; ELEMENTS];
    nf4::dequantize(packed, &absmax, BLOCKSIZE, &mut dequantized)?;

    let mut rounding_error = 0.0f32;
    let (mut diff_sq, mut exact_sq) = (0.0f32, 0.0f32);
    for (row, &got) in y.iter().enumerate() {
        let w_q = &dequantized[row * COLS..][..COLS];
        let w = &WEIGHT[row * COLS..][..COLS];
        let (mut want, mut magnitude, mut exact) = (0.0f32, 0.0f32, 0.0f32);
        for ((&wq, &w), &x) in w_q.iter().zip(w).zip(&INPUT) {
            want += wq * x;
            magnitude += (wq * x).abs();
            exact += w * x;
        }
        rounding_error = rounding_error.max((got - want).abs() / magnitude.max(f32::MIN_POSITIVE));
        diff_sq += (got - exact) * (got - exact);
        exact_sq += exact * exact;
    }
    let quantization_error = libm::sqrtf(diff_sq / exact_sq);
    check("kernel vs dequantized dot", rounding_error, ROUNDING_BOUND)?;
    check("NF4 vs f32 product", quantization_error, QUANTIZATION_BOUND)?;
    Ok(Report {
        macs: ELEMENTS as u32,
        rounding_error,
        quantization_error,
        checksum: y.iter().sum(),
    })
}

/// `Ok` when `error` is within `bound` (a NaN error fails).
fn check(name: &'static str, error: f32, bound: f32) -> Result<(), FirmwareError> {
    if error <= bound {
        Ok(())
    } else {
        Err(FirmwareError::CheckFailed {
            check: name,
            error,
            bound,
        })
    }
}
