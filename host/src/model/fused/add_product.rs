//! `acc + lhs · rhs` as one product. On a GPU, cuBLAS with `beta = 1` adds the product into
//! `acc`'s own memory as it writes it (`gpu/add_product.rs`): `acc` is read and written once,
//! where the unfused sum writes the product, then reads it and `acc` and writes the sum. The
//! written-out layer backward uses it for the LoRA path: `(s A x) Bᵀ` added to the base
//! product's output, and `d_product A` added to the base input gradient. On the CPU it is the
//! unfused sum (the CPU's products are not memory-bound).

use candle_core::{Layout, Tensor};

/// `acc + lhs · rhs` for `acc: [m, n]` (contiguous, not tracked by autograd, and not shared:
/// on a GPU it is overwritten, so every other view of its storage changes too, which the
/// CPU's out-of-place sum would not show; hence crate-private, for the written-out backward's
/// fresh outputs), `lhs: [m, k]` (contiguous) and `rhs: [k, n]` (contiguous, or the transpose
/// of a contiguous `[n, k]`), one float dtype. Records no autograd graph.
pub(crate) fn add_product(acc: Tensor, lhs: &Tensor, rhs: &Tensor) -> candle_core::Result<Tensor> {
    if acc.track_op() || lhs.track_op() || rhs.track_op() {
        candle_core::bail!("add product: the tensors must not be tracked by autograd");
    }
    if acc.dtype() != lhs.dtype() || acc.dtype() != rhs.dtype() {
        candle_core::bail!(
            "add product: dtypes {:?}, {:?}, {:?} differ",
            acc.dtype(),
            lhs.dtype(),
            rhs.dtype()
        );
    }
    let operands = Operands::of(acc.layout(), lhs.layout(), rhs.layout())?;
    if operands.is_empty() {
        // No terms (or no entries): the sum is `acc`, and a zero-size GPU product would fail.
        return Ok(acc);
    }
    if acc.device().is_cpu() {
        return acc + crate::model::matmul::matmul(lhs, rhs)?;
    }
    acc.inplace_op3(lhs, rhs, &AddProduct)?;
    Ok(acc)
}

/// The sizes of `acc [m, n] += lhs [m, k] · rhs [k, n]` and how `rhs` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operands {
    /// Rows of `acc` and `lhs`.
    pub m: usize,
    /// Columns of `acc` and `rhs`.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// `rhs` is the transpose of a contiguous `[n, k]` (else it is a contiguous `[k, n]`).
    pub rhs_transposed: bool,
}

impl Operands {
    /// Checks the layouts and reads the sizes; an error for any other layout.
    pub fn of(acc: &Layout, lhs: &Layout, rhs: &Layout) -> candle_core::Result<Self> {
        let (&[m, n], &[lm, k], &[rk, rn]) = (acc.dims(), lhs.dims(), rhs.dims()) else {
            candle_core::bail!(
                "add product: expected matrices, got {:?}, {:?}, {:?}",
                acc.dims(),
                lhs.dims(),
                rhs.dims()
            );
        };
        if lm != m || rk != k || rn != n {
            candle_core::bail!("add product: [{m}, {n}] += [{lm}, {k}] · [{rk}, {rn}] mismatch");
        }
        if !acc.is_contiguous() || !lhs.is_contiguous() {
            candle_core::bail!("add product: acc and lhs must be contiguous");
        }
        let rhs_transposed = if rhs.is_contiguous() {
            false
        } else if rhs.stride() == [1, k] {
            true
        } else {
            candle_core::bail!(
                "add product: rhs must be contiguous or a transposed contiguous matrix, \
                 got strides {:?}",
                rhs.stride()
            );
        };
        Ok(Self {
            m,
            n,
            k,
            rhs_transposed,
        })
    }

    /// Nothing to multiply (the sum is `acc` itself, or the product has no terms).
    pub fn is_empty(&self) -> bool {
        self.m == 0 || self.n == 0 || self.k == 0
    }

    /// The column-major BLAS call that computes this row-major sum: a row-major `[r, c]` matrix
    /// is a column-major `[c, r]` one, so `acc += lhs · rhs` is `accᵀ += rhsᵀ · lhsᵀ`, with
    /// `rhs` as BLAS's `A` and `lhs` as its `B`.
    pub fn blas(&self) -> BlasGemm {
        let Self { m, n, k, .. } = *self;
        BlasGemm {
            transpose_a: self.rhs_transposed,
            transpose_b: false,
            m: n,
            n: m,
            k,
            lda: if self.rhs_transposed { k } else { n },
            ldb: k,
            ldc: n,
        }
    }
}

/// A BLAS `gemm` call, `C = alpha op(A) op(B) + beta C` on column-major matrices (here alpha and
/// beta are both 1), with `op(A): [m, k]`, `op(B): [k, n]`, `C: [m, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlasGemm {
    /// `op(A) = Aᵀ`.
    pub transpose_a: bool,
    /// `op(B) = Bᵀ`.
    pub transpose_b: bool,
    /// Rows of `op(A)` and `C`.
    pub m: usize,
    /// Columns of `op(B)` and `C`.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// Leading dimensions (the stride between columns) of `A`, `B`, `C`.
    pub lda: usize,
    /// See `lda`.
    pub ldb: usize,
    /// See `lda`.
    pub ldc: usize,
}

/// The in-place op (GPU only; the CPU adds out of place).
struct AddProduct;

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "add-product"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("add product: the CPU adds out of place (add_product does)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        acc_l: &Layout,
        lhs: &candle_core::CudaStorage,
        lhs_l: &Layout,
        rhs: &candle_core::CudaStorage,
        rhs_l: &Layout,
    ) -> candle_core::Result<()> {
        let operands = Operands::of(acc_l, lhs_l, rhs_l)?;
        crate::gpu::add_product::add_in_place((acc, acc_l), (lhs, lhs_l), (rhs, rhs_l), operands)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::model::fused::test_support::{bf16_exact, flat, scaled_diff};

    /// BLAS's definition of `gemm` with alpha = beta = 1 (netlib's reference, column-major):
    /// `C[i + j ldc] += Σ_l op(A)[i, l] op(B)[l, j]`, `op(A)[i, l] = A[i + l lda]`, or
    /// `A[l + i lda]` when transposed.
    fn reference_gemm(g: &BlasGemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        for j in 0..g.n {
            for i in 0..g.m {
                let mut sum = 0.0;
                for l in 0..g.k {
                    let a_il = if g.transpose_a {
                        a[l + i * g.lda]
                    } else {
                        a[i + l * g.lda]
                    };
                    let b_lj = if g.transpose_b {
                        b[j + l * g.ldb]
                    } else {
                        b[l + j * g.ldb]
                    };
                    sum += a_il * b_lj;
                }
                c[i + j * g.ldc] += sum;
            }
        }
    }

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        bf16_exact(&[shape.0, shape.1], seed, 1.0, DType::F32)
    }

    #[test]
    fn the_blas_call_computes_the_row_major_sum() {
        for (m, n, k) in [(5, 7, 3), (1, 9, 4), (6, 1, 2), (4, 4, 1), (8, 3, 16)] {
            for rhs_transposed in [false, true] {
                let acc = random((m, n), 1);
                let lhs = random((m, k), 2);
                let rhs = match rhs_transposed {
                    true => random((n, k), 3).t().unwrap(),
                    false => random((k, n), 3),
                };
                let operands = Operands::of(acc.layout(), lhs.layout(), rhs.layout()).unwrap();
                // A 1-wide transpose is contiguous as well; either storage reading is right.
                assert!(operands.rhs_transposed == rhs_transposed || n == 1 || k == 1);
                // The BLAS call on the tensors' own storage, in place of cuBLAS.
                let rhs_storage = match operands.rhs_transposed {
                    true => flat(&rhs.t().unwrap()),
                    false => flat(&rhs),
                };
                let mut c = flat(&acc);
                reference_gemm(&operands.blas(), &rhs_storage, &flat(&lhs), &mut c);
                let expected = (&acc + lhs.matmul(&rhs).unwrap()).unwrap();
                let ours = Tensor::from_vec(c, (m, n), &Device::Cpu).unwrap();
                let diff = scaled_diff(&ours, &expected);
                assert!(
                    diff < 1e-6,
                    "{m}x{n}x{k} transposed {rhs_transposed}: {diff}"
                );
            }
        }
    }

    #[test]
    fn a_product_without_terms_leaves_acc() {
        let acc = random((3, 2), 1);
        let empty = |shape| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let sum = add_product(acc.clone(), &empty((3, 0)), &empty((0, 2))).unwrap();
        assert_eq!(flat(&sum), flat(&acc));
        let none = add_product(empty((0, 2)), &empty((0, 4)), &random((4, 2), 2)).unwrap();
        assert_eq!(none.dims(), &[0, 2]);
    }

    #[test]
    fn layouts_it_cannot_read_are_refused() {
        let dev = &Device::Cpu;
        let z = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, dev).unwrap();
        // A column slice is neither contiguous nor a plain transpose.
        let sliced = z((4, 6)).narrow(1, 0, 3).unwrap();
        assert!(Operands::of(z((2, 3)).layout(), z((2, 4)).layout(), sliced.layout()).is_err());
        assert!(Operands::of(z((2, 3)).layout(), z((2, 5)).layout(), z((4, 3)).layout()).is_err());
        let acc_t = z((3, 2)).t().unwrap();
        assert!(Operands::of(acc_t.layout(), z((2, 4)).layout(), z((4, 3)).layout()).is_err());
        let tracked = candle_core::Var::zeros((2, 3), DType::F32, dev).unwrap();
        let err = add_product(tracked.as_tensor().clone(), &z((2, 4)), &z((4, 3))).unwrap_err();
        assert!(err.to_string().contains("tracked"), "{err}");
    }
}
