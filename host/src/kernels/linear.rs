//! The frozen linear for a batch, as training runs it: `x · Wᵀ` forward and `grad_y · W`
//! backward (the gradient w.r.t. the input only; W is frozen).
//!
//! W is dequantized one 2-D tile at a time (at most [`MAX_TILE_BYTES`]) into a counted
//! [`DequantScratch`] and multiplied with `gemm`; the scratch is dropped before the call returns,
//! so no dequantized weight outlives it. Each parallel task owns a band of output columns and
//! walks the reduction dimension tile by tile, accumulating into its band: no task sums into
//! another's output, and the activations are re-read once per tile of the band, not once per
//! row of W.

use std::ops::Range;

use gemm::Parallelism;
use qdylora_formats::Nf4Weight;
use rayon::prelude::*;

use super::dequant::dequantize_span;
use super::error::{check_len, mul};
use super::isa::Supported;
use super::matvec::matvec_view;
use super::scratch::DequantScratch;
use super::view::WeightView;
use super::{Isa, KernelError};

/// The most dequantized bytes one tile of a linear call holds; each rayon thread holds at most
/// one tile at a time.
pub const MAX_TILE_BYTES: usize = 1 << 20;

/// The widest band of output columns one task owns.
const MAX_BAND: usize = 256;

/// Tile sides: `band` output columns (W rows forward, W columns backward) by `depth` along the
/// reduction.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tiling {
    band: usize,
    depth: usize,
}

impl Tiling {
    /// Bands at most `widest` wide and narrow enough that every thread gets at least two, in
    /// multiples of 8 (gemm's register blocking) where possible; the depth fills the byte budget
    /// in multiples of 64 (whole NF4 blocks of QLoRA's blocksize when rows start on one).
    fn plan(outputs: usize, reduction: usize, widest: usize) -> Self {
        let balanced = outputs.div_ceil(2 * rayon::current_num_threads());
        let band = round_down(widest.min(balanced).max(1), 8);
        let fits = TILE_FLOATS / band;
        let depth = if fits >= reduction {
            reduction
        } else {
            round_down(fits, 64)
        };
        Self { band, depth }
    }

    /// Forward: the widest band whose tiles still span all of W's columns (one gemm per band
    /// where the budget allows). On the 2-core EPYC this ran faster than wide bands with shallow
    /// tiles (m = 64, 4096 x 11008: about 130 ms against 170 ms).
    fn forward(rows: usize, cols: usize) -> Self {
        let full_depth_band = round_down(TILE_FLOATS / cols.max(1), 8).max(8);
        Self::plan(rows, cols, full_depth_band.min(MAX_BAND))
    }

    /// Backward: wide bands of W's columns, several tiles down W's rows.
    fn backward(rows: usize, cols: usize) -> Self {
        Self::plan(cols, rows, MAX_BAND)
    }
}

/// f32 values in one tile.
const TILE_FLOATS: usize = MAX_TILE_BYTES / size_of::<f32>();

/// `n` rounded down to a multiple of `step`, unless that would be 0.
fn round_down(n: usize, step: usize) -> usize {
    if n >= step { n / step * step } else { n }
}

/// Consecutive ranges of at most `step` covering `0..total`.
fn ranges(total: usize, step: usize) -> impl Iterator<Item = Range<usize>> {
    (0..total)
        .step_by(step)
        .map(move |start| start..(start + step).min(total))
}

/// Dequantizes `W[rows, cols]` into `tile` (row-major, `cols.len()` wide).
fn fill_tile(
    isa: Supported,
    w: &WeightView<'_>,
    rows: Range<usize>,
    cols: Range<usize>,
    tile: &mut [f32],
) {
    for (r, tile_row) in rows.zip(tile.chunks_exact_mut(cols.len())) {
        dequantize_span(isa, w, r * w.cols + cols.start, tile_row);
    }
}

/// A pointer to an output matrix that parallel tasks write disjoint parts of.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: every use hands each task a disjoint set of elements (see the call sites), and the
// owning `&mut [f32]` is not touched while the tasks run.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `y = x · Wᵀ` for `x: [m, cols]`, `W: [rows, cols]`, `y: [m, rows]` (row-major).
pub fn linear_forward(
    x: &[f32],
    m: usize,
    w: &Nf4Weight,
    y: &mut [f32],
) -> Result<(), KernelError> {
    forward(Isa::detect().checked()?, x, m, w, y)
}

/// `grad_x = grad_y · W` for `grad_y: [m, rows]`, `W: [rows, cols]`, `grad_x: [m, cols]`.
pub fn linear_backward_input(
    grad_y: &[f32],
    m: usize,
    w: &Nf4Weight,
    grad_x: &mut [f32],
) -> Result<(), KernelError> {
    backward_input(Isa::detect().checked()?, grad_y, m, w, grad_x)
}

pub(crate) fn forward(
    isa: Supported,
    x: &[f32],
    m: usize,
    w: &Nf4Weight,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let view = WeightView::new(w)?;
    let (rows, cols) = (view.rows, view.cols);
    check_len("x", mul(m, cols, "x")?, x.len())?;
    check_len("y", mul(m, rows, "y")?, y.len())?;
    match m {
        0 => return Ok(()),
        1 => {
            matvec_view(isa, &view, x, y);
            return Ok(());
        }
        _ => {}
    }
    // A task owns y's columns `band` (rows of W) and sums over tiles of W's columns.
    let tiling = Tiling::forward(rows, cols);
    let out = SharedOut(y.as_mut_ptr());
    let bands: Vec<Range<usize>> = ranges(rows, tiling.band).collect();
    bands.into_par_iter().for_each_init(
        || DequantScratch::new(tiling.band * tiling.depth),
        |scratch, band| {
            for (i, depth) in ranges(cols, tiling.depth).enumerate() {
                let tile = &mut scratch[..band.len() * depth.len()];
                fill_tile(isa, &view, band.clone(), depth.clone(), tile);
                // SAFETY: lengths were checked above: x is [m, cols] and y is [m, rows]; the
                // tile is [band, depth] with band within 0..rows and depth within 0..cols, so
                // every access is in bounds. Tasks write disjoint column bands of y and nothing
                // else reads or writes y meanwhile. Slice lengths never exceed isize::MAX, so
                // the stride casts are exact.
                unsafe {
                    gemm::gemm(
                        m,
                        band.len(),
                        depth.len(),
                        out.ptr().add(band.start),
                        1,
                        rows as isize,
                        i > 0,
                        x.as_ptr().add(depth.start),
                        1,
                        cols as isize,
                        tile.as_ptr(),
                        depth.len() as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                }
            }
        },
    );
    Ok(())
}

pub(crate) fn backward_input(
    isa: Supported,
    grad_y: &[f32],
    m: usize,
    w: &Nf4Weight,
    grad_x: &mut [f32],
) -> Result<(), KernelError> {
    let view = WeightView::new(w)?;
    let (rows, cols) = (view.rows, view.cols);
    check_len("grad_y", mul(m, rows, "grad_y")?, grad_y.len())?;
    check_len("grad_x", mul(m, cols, "grad_x")?, grad_x.len())?;
    if m == 0 {
        return Ok(());
    }
    // A task owns grad_x's columns `band` (columns of W) and sums over tiles of W's rows.
    let tiling = Tiling::backward(rows, cols);
    let out = SharedOut(grad_x.as_mut_ptr());
    let bands: Vec<Range<usize>> = ranges(cols, tiling.band).collect();
    bands.into_par_iter().for_each_init(
        || DequantScratch::new(tiling.band * tiling.depth),
        |scratch, band| {
            for (i, depth) in ranges(rows, tiling.depth).enumerate() {
                let tile = &mut scratch[..depth.len() * band.len()];
                fill_tile(isa, &view, depth.clone(), band.clone(), tile);
                // SAFETY: lengths were checked above: grad_y is [m, rows] and grad_x is
                // [m, cols]; the tile is [depth, band] with depth within 0..rows and band within
                // 0..cols, so every access is in bounds. Tasks write disjoint column bands of
                // grad_x and nothing else reads or writes it meanwhile. Slice lengths never
                // exceed isize::MAX, so the stride casts are exact.
                unsafe {
                    gemm::gemm(
                        m,
                        band.len(),
                        depth.len(),
                        out.ptr().add(band.start),
                        1,
                        cols as isize,
                        i > 0,
                        grad_y.as_ptr().add(depth.start),
                        1,
                        rows as isize,
                        tile.as_ptr(),
                        1,
                        band.len() as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                }
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{random_values, random_weight, supported_isas};

    /// `a · b` with `a: [m, k]`, `b: [k, n]` given by an element function, in f64.
    fn dense(m: usize, k: usize, n: usize, a: &[f32], b: impl Fn(usize, usize) -> f32) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| f64::from(a[i * k + p]) * f64::from(b(p, j)))
                    .sum();
            }
        }
        out
    }

    /// Elementwise closeness relative to the size of the result (f32 accumulation of k terms).
    fn assert_close(got: &[f32], want: &[f64], k: usize, what: &str) {
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        let tolerance = 8.0 * (k as f64).sqrt() * f64::from(f32::EPSILON) * scale;
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= tolerance,
                "{what}[{i}]: {g} vs {w} (tolerance {tolerance})"
            );
        }
    }

    #[test]
    fn forward_and_backward_match_a_dense_f32_weight() {
        // Shapes with rows that straddle blocks, several bands, several tiles per band (backward
        // through the 2000 rows, forward through the 40,000 columns), and m = 1 (the matvec
        // path).
        for (i, &(m, rows, cols, bs)) in [
            (1, 7, 100, 64),
            (2, 7, 100, 64),
            (5, 33, 65, 32),
            (3, 300, 256, 64),
            (17, 64, 4100, 64),
            (4, 2000, 600, 128),
            (2, 64, 40_000, 64),
        ]
        .iter()
        .enumerate()
        {
            let w = random_weight(rows, cols, bs, 40 + i as u64);
            let wd = w.dequantize_f32().unwrap();
            let x = random_values(m * cols, 1 + i as u64);
            let gy = random_values(m * rows, 2 + i as u64);
            let want_y = dense(m, cols, rows, &x, |p, j| wd[j * cols + p]);
            let want_gx = dense(m, rows, cols, &gy, |p, j| wd[p * cols + j]);
            for isa in supported_isas() {
                let what = format!("{:?} m={m} {rows}x{cols}", isa.isa());
                let mut y = vec![f32::NAN; m * rows];
                forward(isa, &x, m, &w, &mut y).unwrap();
                assert_close(&y, &want_y, cols, &format!("y {what}"));
                let mut gx = vec![f32::NAN; m * cols];
                backward_input(isa, &gy, m, &w, &mut gx).unwrap();
                assert_close(&gx, &want_gx, rows, &format!("grad_x {what}"));
            }
        }
    }

    #[test]
    fn tiles_stay_within_budget_and_cover_the_threads() {
        let threads = rayon::current_num_threads();
        for (rows, cols) in [
            (4096, 11008),
            (11008, 4096),
            (256, 256),
            (3, 1_000_000),
            (1, 1),
        ] {
            for (outputs, reduction, t) in [
                (rows, cols, Tiling::forward(rows, cols)),
                (cols, rows, Tiling::backward(rows, cols)),
            ] {
                assert!(t.band * t.depth * 4 <= MAX_TILE_BYTES, "{t:?}");
                assert!(t.band >= 1 && t.depth >= 1 && t.depth <= reduction, "{t:?}");
                assert!(
                    outputs.div_ceil(t.band) >= (2 * threads).min(outputs),
                    "{t:?} leaves threads idle"
                );
            }
        }
        // LLaMA-7B's down_proj forward: whole rows per tile.
        assert_eq!(Tiling::forward(4096, 11008).depth, 11008);
        assert_eq!(ranges(10, 4).collect::<Vec<_>>(), vec![0..4, 4..8, 8..10]);
    }

    #[test]
    fn empty_batch_and_bad_lengths() {
        let w = random_weight(6, 10, 32, 9);
        let mut nothing: [f32; 0] = [];
        linear_forward(&[], 0, &w, &mut nothing).unwrap();
        linear_backward_input(&[], 0, &w, &mut nothing).unwrap();
        let mut y = vec![0.0f32; 12];
        assert!(matches!(
            linear_forward(&[0.0; 19], 2, &w, &mut y),
            Err(KernelError::Length { buffer: "x", .. })
        ));
        let mut gx = [0.0f32; 20];
        assert!(matches!(
            linear_backward_input(&[0.0; 12], 2, &w, &mut gx[..19]),
            Err(KernelError::Length {
                buffer: "grad_x",
                ..
            })
        ));
        assert!(matches!(
            linear_forward(&[], usize::MAX, &w, &mut y),
            Err(KernelError::SizeOverflow { what: "x" })
        ));
    }
}
