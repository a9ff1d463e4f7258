//! The fused NF4 matrix-vector product: codes are decoded in registers and never written out.

use qdylora_formats::Nf4Weight;
use rayon::prelude::*;

use super::error::check_len;
use super::isa::Supported;
use super::view::WeightView;
use super::{Isa, KernelError, scalar};

/// Rows per parallel task (4 to 256 measured the same within noise on 4096 x 11008).
const ROWS_PER_TASK: usize = 16;

/// `y = W x` for `W: [rows, cols]`, `x: [cols]`, `y: [rows]`, accumulated in f32.
pub fn matvec(w: &Nf4Weight, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    matvec_with(Isa::detect(), w, x, y)
}

/// [`matvec`] on a chosen instruction set.
pub fn matvec_with(isa: Isa, w: &Nf4Weight, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    let isa = isa.checked()?;
    let view = WeightView::new(w)?;
    check_len("x", view.cols, x.len())?;
    check_len("y", view.rows, y.len())?;
    matvec_view(isa, &view, x, y);
    Ok(())
}

/// [`matvec`] on a checked view and checked lengths.
pub(crate) fn matvec_view(isa: Supported, w: &WeightView<'_>, x: &[f32], y: &mut [f32]) {
    let kernel = RowKernel::choose(isa, w, x);
    y.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, ys)| kernel.row_dots(w, task * ROWS_PER_TASK, ys));
}

/// How rows are dotted with `x`, chosen once per call from the CPU and the weight's layout.
enum RowKernel<'x> {
    /// Rows of whole blocks, blocksize a multiple of 64: the byte-plane decoder, with `x`
    /// reordered to its lane order (the fastest; QLoRA's blocksize 64 lands here).
    #[cfg(target_arch = "x86_64")]
    Planes(Vec<f32>),
    /// Rows of whole 32-blocks: the in-order decoder, block sums kept in vector lanes.
    #[cfg(target_arch = "x86_64")]
    Aligned(&'x [f32]),
    /// Rows that start inside a block or a byte: the in-order decoder per block piece.
    #[cfg(target_arch = "x86_64")]
    Span(&'x [f32]),
    /// No AVX2: the portable kernel.
    Scalar(&'x [f32]),
}

impl<'x> RowKernel<'x> {
    fn choose(isa: Supported, w: &WeightView<'_>, x: &'x [f32]) -> Self {
        match isa.isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                use super::avx2::{PLANE_CHUNK, plane_ordered};
                if !w.cols.is_multiple_of(w.blocksize) {
                    RowKernel::Span(x)
                } else if w.blocksize.is_multiple_of(PLANE_CHUNK) {
                    RowKernel::Planes(plane_ordered(x))
                } else {
                    RowKernel::Aligned(x)
                }
            }
            _ => RowKernel::Scalar(x),
        }
    }

    /// `ys[i] = W[first_row + i, :] · x` on the calling thread.
    fn row_dots(&self, w: &WeightView<'_>, first_row: usize, ys: &mut [f32]) {
        // SAFETY (every AVX2 arm): those variants are only built from a `Supported` AVX2 + FMA.
        match self {
            #[cfg(target_arch = "x86_64")]
            RowKernel::Planes(x_ordered) => unsafe {
                super::avx2::row_dots_planes(w, first_row, x_ordered, ys)
            },
            #[cfg(target_arch = "x86_64")]
            RowKernel::Aligned(x) => unsafe { super::avx2::row_dots_aligned(w, first_row, x, ys) },
            #[cfg(target_arch = "x86_64")]
            RowKernel::Span(x) => {
                for (row, y) in (first_row..).zip(ys) {
                    *y = unsafe { super::avx2::span_dot(w, row * w.cols, x) };
                }
            }
            RowKernel::Scalar(x) => {
                for (row, y) in (first_row..).zip(ys) {
                    *y = scalar::span_dot(w, row * w.cols, x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{random_values, random_weight, supported_isas};
    use proptest::prelude::*;

    /// Checks every path against the core's `row_dot`. The tolerance is relative to
    /// `sum(|w_ij x_j|)`: two f32 summation orders of n terms differ by about
    /// `sqrt(n) * eps * sum(|terms|)`; four times that is far in the tail.
    fn check_against_core(w: &Nf4Weight, seed: u64) {
        let x = random_values(w.cols, seed ^ 0x5eed);
        let dense = w.dequantize_f32().unwrap();
        let matrix = w.matrix().unwrap();
        let tolerance = 4.0 * (w.cols as f32).sqrt() * f32::EPSILON;
        for isa in supported_isas() {
            let mut y = vec![f32::NAN; w.rows];
            matvec_with(isa.isa(), w, &x, &mut y).unwrap();
            for (row, &got) in y.iter().enumerate() {
                let want = matrix.row_dot(row, &x).unwrap();
                let magnitude: f32 = dense[row * w.cols..(row + 1) * w.cols]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                assert!(
                    (got - want).abs() <= tolerance * magnitude + f32::MIN_POSITIVE,
                    "{:?} row {row}: {got} vs {want} (scale {magnitude})",
                    isa.isa()
                );
            }
        }
    }

    #[test]
    fn aligned_and_straddling_rows_match_the_core() {
        // Rows of whole 64-multiple blocks (byte-plane kernel), of whole 32-blocks, and rows
        // that start mid-block or mid-byte (span kernel).
        for (i, &(rows, cols, bs)) in [
            (1, 1, 64),
            (3, 21, 32),
            (6, 96, 32),
            (17, 64, 64),
            (40, 256, 64),
            (9, 384, 128),
            (33, 100, 64),
            (5, 1001, 64),
            (3, 4096, 4096),
        ]
        .iter()
        .enumerate()
        {
            check_against_core(&random_weight(rows, cols, bs, 100 + i as u64), i as u64);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_shapes_match_the_core(
            rows in 1usize..40,
            cols in 1usize..400,
            bs_log in 5u32..8,
            seed in any::<u64>(),
        ) {
            check_against_core(&random_weight(rows, cols, 1 << bs_log, seed), seed);
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        let w = random_weight(4, 10, 32, 1);
        let mut y = vec![0.0f32; 4];
        assert!(matches!(
            matvec(&w, &[0.0; 9], &mut y),
            Err(KernelError::Length { buffer: "x", .. })
        ));
        assert!(matches!(
            matvec(&w, &[0.0; 10], &mut y[..3]),
            Err(KernelError::Length { buffer: "y", .. })
        ));
    }
}
