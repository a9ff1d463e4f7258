//! Small inference kernels for devices: NF4 matrix-vector products over packed weights and the
//! rank-r LoRA update, all accumulating in f32, none allocating.
//!
//! These are the portable reference kernels (the firmware runs them as they are); the host has
//! SIMD versions of the hot ones that must agree with these.

use crate::element::ElementSource;
use crate::error::{Buffer, Error, check_len};
use crate::nf4::{self, AbsmaxSource, CODE};

/// A borrowed NF4 weight matrix `W: [rows, cols]`, blocked over its row-major flattening.
#[derive(Debug, Clone, Copy)]
pub struct Nf4Matrix<'a, A: AbsmaxSource> {
    rows: usize,
    cols: usize,
    blocksize: usize,
    packed: &'a [u8],
    absmax: A,
}

impl<'a, A: AbsmaxSource> Nf4Matrix<'a, A> {
    /// Checks every length against the shape.
    pub fn new(
        rows: usize,
        cols: usize,
        blocksize: usize,
        packed: &'a [u8],
        absmax: A,
    ) -> Result<Self, Error> {
        nf4::check_blocksize(blocksize)?;
        if rows == 0 || cols == 0 {
            return Err(Error::Shape {
                expected: 1,
                actual: 0,
            });
        }
        let n = rows.checked_mul(cols).ok_or(Error::SizeOverflow)?;
        check_len(Buffer::Packed, nf4::packed_len(n), packed.len())?;
        check_len(
            Buffer::Absmax,
            nf4::block_count(n, blocksize),
            absmax.blocks(),
        )?;
        Ok(Self {
            rows,
            cols,
            blocksize,
            packed,
            absmax,
        })
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `W[row, :] · x`. Rows need not start on a block boundary: each block segment is summed
    /// in f32 and scaled by its absmax.
    pub fn row_dot(&self, row: usize, x: &[f32]) -> Result<f32, Error> {
        check_len(Buffer::Input, self.cols, x.len())?;
        if row >= self.rows {
            return Err(Error::Shape {
                expected: self.rows,
                actual: row,
            });
        }
        let start = row * self.cols;
        let end = start + self.cols;
        let mut acc = 0.0f32;
        let mut e = start;
        while e < end {
            let block = e / self.blocksize;
            let seg_end = ((block + 1) * self.blocksize).min(end);
            let sum = segment_dot(self.packed, e, &x[e - start..seg_end - start]);
            acc += sum * self.absmax.absmax(block);
            e = seg_end;
        }
        Ok(acc)
    }

    /// `y = W x`.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<(), Error> {
        check_len(Buffer::Input, self.cols, x.len())?;
        check_len(Buffer::Output, self.rows, y.len())?;
        for (row, out) in y.iter_mut().enumerate() {
            *out = self.row_dot(row, x)?;
        }
        Ok(())
    }
}

/// `sum(CODE[q[first + j]] * x[j])` over a run of packed codes starting at element `first`.
fn segment_dot(packed: &[u8], first: usize, x: &[f32]) -> f32 {
    let code = |i: usize| CODE[usize::from(nf4::unpack_index(packed, i))];
    let mut acc = 0.0f32;
    let mut xs = x;
    let mut e = first;
    if !e.is_multiple_of(2)
        && let Some((&x0, rest)) = xs.split_first()
    {
        acc += code(e) * x0;
        xs = rest;
        e += 1;
    }
    let mut pairs = xs.chunks_exact(2);
    for (k, pair) in pairs.by_ref().enumerate() {
        let byte = packed.get(e / 2 + k).copied().unwrap_or(0x77);
        acc += CODE[usize::from(byte >> 4)] * pair[0] + CODE[usize::from(byte & 0x0f)] * pair[1];
    }
    if let [last] = pairs.remainder() {
        acc += code(e + xs.len() - 1) * last;
    }
    acc
}

/// `a · x` for an element source of any type.
pub fn dot<S: ElementSource + ?Sized>(a: &S, x: &[f32]) -> Result<f32, Error> {
    check_len(Buffer::Input, a.len(), x.len())?;
    Ok(x.iter().enumerate().map(|(i, &xi)| a.get(i) * xi).sum())
}

/// Adds a rank-r LoRA update to `y`: `y += scale * sum_k B[:, k] (A[k, :] · x)`, given the
/// rank pairs `(A row k, B column k)` for `k < r` — the order a nested bundle stores them in.
pub fn lora_accumulate<S, I>(pairs: I, scale: f32, x: &[f32], y: &mut [f32]) -> Result<(), Error>
where
    S: ElementSource,
    I: IntoIterator<Item = (S, S)>,
{
    for (a_row, b_col) in pairs {
        let u = scale * dot(&a_row, x)?;
        check_len(Buffer::Output, b_col.len(), y.len())?;
        for (i, out) in y.iter_mut().enumerate() {
            *out += b_col.get(i) * u;
        }
    }
    Ok(())
}

/// Root-mean-square norm as LLaMA computes it: `x * rsqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm<W: ElementSource + ?Sized>(
    x: &[f32],
    weight: &W,
    eps: f32,
    out: &mut [f32],
) -> Result<(), Error> {
    check_len(Buffer::Weights, x.len(), weight.len())?;
    check_len(Buffer::Output, x.len(), out.len())?;
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    let inv = 1.0 / libm::sqrtf(mean_sq + eps);
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = weight.get(i) * (v * inv);
    }
    Ok(())
}

/// In-place softmax (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = libm::expf(*v - max);
        sum += *v;
    }
    if sum > 0.0 {
        for v in x.iter_mut() {
            *v /= sum;
        }
    }
}

/// SiLU: `x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_dot_matches_dequantized_dot_across_block_boundaries() {
        // 3 rows of 21: rows straddle the 32-element blocks and start on odd elements.
        let w: [f32; 63] = core::array::from_fn(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0);
        let mut packed = [0u8; 32];
        let mut absmax = [0.0f32; 2];
        nf4::quantize(&w, 32, &mut packed, &mut absmax).unwrap();
        let mut deq = [0.0f32; 63];
        nf4::dequantize(&packed, &absmax[..], 32, &mut deq).unwrap();
        let m = Nf4Matrix::new(3, 21, 32, &packed, &absmax[..]).unwrap();
        let x: [f32; 21] = core::array::from_fn(|i| i as f32 * 0.1 - 1.0);
        for r in 0..3 {
            let want: f32 = (0..21).map(|j| deq[r * 21 + j] * x[j]).sum();
            let got = m.row_dot(r, &x).unwrap();
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{got} {want}"
            );
        }
        assert!(m.row_dot(3, &x).is_err());
    }

    #[test]
    fn lora_matches_dense() {
        // r = 2, in 3, out 2: A rows and B columns.
        let a = [[1.0f32, 0.0, 2.0], [0.5, 1.0, -1.0]];
        let b = [[1.0f32, -1.0], [2.0, 0.0]];
        let x = [1.0f32, 2.0, 3.0];
        let mut y = [10.0f32, 20.0];
        let pairs = a.iter().zip(b.iter()).map(|(a, b)| (&a[..], &b[..]));
        lora_accumulate(pairs, 0.5, &x, &mut y).unwrap();
        // u = [7, -0.5] * 0.5 = [3.5, -0.25]; y += 3.5*[1,-1] - 0.25*[2,0]
        assert_eq!(y, [10.0 + 3.5 - 0.5, 20.0 - 3.5]);
    }
}
