//! Dequantization of whole tensors or row ranges, in parallel, bit-identical to the core's
//! reference (`qdylora_core::nf4::dequantize`).

use std::ops::Range;

use half::bf16;
use qdylora_formats::Nf4Weight;
use rayon::prelude::*;

use super::error::check_len;
use super::isa::Supported;
use super::view::WeightView;
use super::{Isa, KernelError, scalar};

/// Elements per parallel task: big enough to amortize scheduling, small enough to balance.
const ELEMENTS_PER_TASK: usize = 1 << 15;

/// The element types weights dequantize to: f32 and bf16.
pub trait DequantElement: sealed::Kernel + Send + Sync {}
impl DequantElement for f32 {}
impl DequantElement for bf16 {}

mod sealed {
    /// The per-type SIMD kernel; sealed so only types with a checked kernel implement it.
    pub trait Kernel: qdylora_core::Element {
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        unsafe fn dequantize_span_avx2(w: &super::WeightView<'_>, start: usize, out: &mut [Self]);
    }

    impl Kernel for f32 {
        #[cfg(target_arch = "x86_64")]
        unsafe fn dequantize_span_avx2(w: &super::WeightView<'_>, start: usize, out: &mut [f32]) {
            // SAFETY: the caller guarantees AVX2 + FMA.
            unsafe { super::super::avx2::dequantize_span(w, start, out) }
        }
    }

    impl Kernel for super::bf16 {
        #[cfg(target_arch = "x86_64")]
        unsafe fn dequantize_span_avx2(
            w: &super::WeightView<'_>,
            start: usize,
            out: &mut [super::bf16],
        ) {
            // SAFETY: the caller guarantees AVX2 + FMA.
            unsafe { super::super::avx2::dequantize_span(w, start, out) }
        }
    }
}

/// Dequantizes flat elements `start..start + out.len()` on the calling thread.
pub(crate) fn dequantize_span<T: DequantElement>(
    isa: Supported,
    w: &WeightView<'_>,
    start: usize,
    out: &mut [T],
) {
    match isa.isa() {
        // SAFETY: `Supported` proves the CPU has AVX2 + FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { T::dequantize_span_avx2(w, start, out) },
        _ => scalar::dequantize_span(w, start, out),
    }
}

/// [`dequantize_span`] split over the rayon pool.
pub(crate) fn dequantize_span_par<T: DequantElement>(
    isa: Supported,
    w: &WeightView<'_>,
    start: usize,
    out: &mut [T],
) {
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .enumerate()
        .for_each(|(task, chunk)| dequantize_span(isa, w, start + task * ELEMENTS_PER_TASK, chunk));
}

/// Dequantizes `rows` of `w` (row-major, `rows.len() * w.cols` values) into `out`.
pub fn dequantize_rows(
    w: &Nf4Weight,
    rows: Range<usize>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    dequantize_rows_with(Isa::detect(), w, rows, out)
}

/// [`dequantize_rows`] on a chosen instruction set.
pub fn dequantize_rows_with(
    isa: Isa,
    w: &Nf4Weight,
    rows: Range<usize>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let isa = isa.checked()?;
    let view = WeightView::new(w)?;
    if rows.start > rows.end || rows.end > view.rows {
        return Err(KernelError::RowRange {
            start: rows.start,
            end: rows.end,
            rows: view.rows,
        });
    }
    check_len("out", rows.len() * view.cols, out.len())?;
    dequantize_span_par(isa, &view, rows.start * view.cols, out);
    Ok(())
}

/// Dequantizes the whole `[rows, cols]` weight into `out` as f32 or bf16.
pub fn dequantize_into<T: DequantElement>(w: &Nf4Weight, out: &mut [T]) -> Result<(), KernelError> {
    dequantize_into_with(Isa::detect(), w, out)
}

/// [`dequantize_into`] on a chosen instruction set.
pub fn dequantize_into_with<T: DequantElement>(
    isa: Isa,
    w: &Nf4Weight,
    out: &mut [T],
) -> Result<(), KernelError> {
    let isa = isa.checked()?;
    let view = WeightView::new(w)?;
    check_len("out", view.len(), out.len())?;
    dequantize_span_par(isa, &view, 0, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{random_weight, supported_isas};
    use proptest::prelude::*;
    use qdylora_core::nf4;

    fn reference<T: qdylora_core::Element + Default + Clone>(w: &Nf4Weight) -> Vec<T> {
        let mut out = vec![T::default(); w.rows * w.cols];
        nf4::dequantize(&w.packed, &w.absmax(), w.blocksize, &mut out).unwrap();
        out
    }

    fn f32_bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn bf16_bits(v: &[bf16]) -> Vec<u16> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every path, f32 and bf16, whole tensor and row ranges, against the core bit for bit.
    fn check_bit_identical(w: &Nf4Weight, row_ranges: &[(usize, usize)]) {
        let want32 = reference::<f32>(w);
        let want16 = reference::<bf16>(w);
        for isa in supported_isas() {
            let isa = isa.isa();
            let mut got32 = vec![f32::NAN; want32.len()];
            dequantize_into_with(isa, w, &mut got32).unwrap();
            assert_eq!(f32_bits(&got32), f32_bits(&want32), "{isa:?} f32");
            let mut got16 = vec![bf16::NAN; want16.len()];
            dequantize_into_with(isa, w, &mut got16).unwrap();
            assert_eq!(bf16_bits(&got16), bf16_bits(&want16), "{isa:?} bf16");
            for &(start, end) in row_ranges {
                let rows = start..end;
                let mut got = vec![f32::NAN; rows.len() * w.cols];
                dequantize_rows_with(isa, w, rows.clone(), &mut got).unwrap();
                let want = &want32[rows.start * w.cols..rows.end * w.cols];
                assert_eq!(f32_bits(&got), f32_bits(want), "{isa:?} rows {rows:?}");
            }
        }
    }

    #[test]
    fn odd_shapes_partial_blocks_and_straddling_rows() {
        // (rows, cols, blocksize): odd element counts, rows that start mid-byte and mid-block,
        // a last block that is short, rows longer and shorter than a block.
        for (i, &(rows, cols, bs)) in [
            (1, 1, 64),
            (3, 7, 32),
            (5, 33, 64),
            (7, 129, 64),
            (4, 96, 64),
            (16, 128, 64),
            (9, 100, 128),
            (2, 4100, 4096),
        ]
        .iter()
        .enumerate()
        {
            let w = random_weight(rows, cols, bs, i as u64);
            check_bit_identical(&w, &[(0, rows), (1, rows), (rows / 2, rows), (rows, rows)]);
        }
    }

    #[test]
    fn many_parallel_tasks_with_odd_task_starts() {
        // 37 x 2049 = 75,813 elements: three tasks, odd rows start on odd elements.
        let w = random_weight(37, 2049, 64, 7);
        check_bit_identical(&w, &[(3, 36), (0, 37), (17, 18)]);
    }

    #[test]
    fn zero_blocks_and_non_finite_constants_match_the_reference() {
        let mut data = crate::kernels::testutil::random_values(8 * 80, 3);
        data[64..128].fill(0.0);
        let mut w = Nf4Weight::quantize(8, 80, &data, 64).unwrap();
        check_bit_identical(&w, &[(1, 7)]);
        // A corrupt file could carry a NaN or inf nested absmax: same bits as the reference.
        w.nested_absmax[0] = f32::NAN;
        check_bit_identical(&w, &[(2, 3)]);
        w.nested_absmax[0] = f32::INFINITY;
        check_bit_identical(&w, &[(0, 8)]);
        // A NaN payload that naive bf16 rounding would carry into the sign bit.
        w.nested_absmax[0] = f32::from_bits(0x7fff_ffff);
        check_bit_identical(&w, &[(0, 8)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_shapes_are_bit_identical(
            rows in 1usize..24,
            cols in 1usize..300,
            bs_log in 5u32..8,
            seed in any::<u64>(),
            cut in 0usize..24,
        ) {
            let w = random_weight(rows, cols, 1 << bs_log, seed);
            let start = cut.min(rows);
            check_bit_identical(&w, &[(start, rows)]);
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        let w = random_weight(4, 10, 32, 1);
        let mut out = vec![0.0f32; 20];
        assert_eq!(
            dequantize_rows(&w, 3..5, &mut out),
            Err(KernelError::RowRange {
                start: 3,
                end: 5,
                rows: 4
            })
        );
        assert!(matches!(
            dequantize_rows(&w, 0..1, &mut out),
            Err(KernelError::Length {
                buffer: "out",
                expected: 10,
                actual: 20
            })
        ));
        let mut short = vec![bf16::ZERO; 39];
        assert!(matches!(
            dequantize_into(&w, &mut short),
            Err(KernelError::Length { .. })
        ));
        // A weight whose buffers disagree with its shape is refused, not read out of bounds.
        let mut truncated = w.clone();
        truncated.packed.pop();
        let mut full = vec![0.0f32; 40];
        assert!(matches!(
            dequantize_into(&truncated, &mut full),
            Err(KernelError::Weight(_))
        ));
        let mut no_nested = w.clone();
        no_nested.nested_absmax.clear();
        assert!(matches!(
            dequantize_into(&no_nested, &mut full),
            Err(KernelError::Weight(_))
        ));
        let mut bad_block = w;
        bad_block.blocksize = 48;
        assert!(matches!(
            dequantize_into(&bad_block, &mut full),
            Err(KernelError::Weight(_))
        ));
    }
}
