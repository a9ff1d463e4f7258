//! `acc + lhs · rhs` as one product, added into `acc`'s own memory. On a GPU, cuBLAS with
//! `beta = 1` adds the product as it writes it (`gpu/add_product.rs`): `acc` is read and written
//! once, where the unfused sum writes the product, then reads it and `acc` and writes the sum.
//! The written-out layer backward uses it for the LoRA path (`(s A x) Bᵀ` added to the base
//! product's output, `d_product A` to the base input gradient) and for the chunked causal
//! attention's key and value gradients, where `acc` is a leading slice of a larger tensor. On
//! the CPU the product is candle's matmul, then added in place (the CPU's products are not
//! memory-bound).

use candle_core::{CpuStorage, Layout, Tensor};

/// `acc + lhs · rhs`, in `acc`'s memory, returning `acc`. See [`add_product_into`].
pub(crate) fn add_product(acc: Tensor, lhs: &Tensor, rhs: &Tensor) -> candle_core::Result<Tensor> {
    add_product_into(&acc, lhs, rhs)?;
    Ok(acc)
}

/// `acc += lhs · rhs` for `acc: [..., m, n]`, `lhs: [..., m, k]`, `rhs: [..., k, n]` (the same
/// batch dims, no broadcasting), one float dtype, none tracked by autograd. Each operand may be
/// a view (a narrowed slice, a transpose) as long as its batch dims fold into one stride and
/// each matrix is row-major or transposed with no gaps inside a row ([`Operands::of`]); `acc`
/// must be row-major. The sum overwrites `acc`'s storage, so every other view of it changes
/// too: crate-private, for the written-out backward's fresh outputs and their slices.
pub(crate) fn add_product_into(
    acc: &Tensor,
    lhs: &Tensor,
    rhs: &Tensor,
) -> candle_core::Result<()> {
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
        return Ok(());
    }
    if acc.device().is_cpu() {
        let product = crate::model::matmul::matmul(lhs, rhs)?.contiguous()?;
        return acc.inplace_op2(&product, &AddInto(operands));
    }
    acc.inplace_op3(lhs, rhs, &AddProduct)
}

/// The sizes of `acc [batch, m, n] += lhs [batch, m, k] · rhs [batch, k, n]` and where each
/// operand's entries lie in its storage (from its start offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operands {
    /// Matrices in each operand (the product of the batch dims).
    pub batch: usize,
    /// Rows of `acc` and `lhs`.
    pub m: usize,
    /// Columns of `acc` and `rhs`.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// How `acc` is stored (never transposed).
    pub acc: Strides,
    /// How `lhs` is stored.
    pub lhs: Strides,
    /// How `rhs` is stored.
    pub rhs: Strides,
}

/// How one operand's matrices lie in memory: row-major with `ld` elements from one row to the
/// next, or `transposed` (column-major) with `ld` from one column to the next; `batch_stride`
/// from one matrix to the next (0 for a single matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    /// Stored column by column: the transpose of a row-major matrix.
    pub transposed: bool,
    /// The leading dimension: at least the row's length (or the column's, transposed).
    pub ld: usize,
    /// Elements from one matrix of the batch to the next.
    pub batch_stride: usize,
}

impl Strides {
    /// How a `[..., rows, cols]` layout is stored, or `None` when its batch dims do not fold
    /// into one stride or a matrix is neither row- nor column-major.
    fn of(layout: &Layout) -> Option<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        let [.., rows, cols] = *dims else {
            return None;
        };
        let [.., row_stride, col_stride] = *stride else {
            return None;
        };
        let rank = dims.len();
        let batch_stride = fold_batch(&dims[..rank - 2], &stride[..rank - 2])?;
        let stored = |transposed, ld| {
            Some(Self {
                transposed,
                ld,
                batch_stride,
            })
        };
        if rows == 0 || cols == 0 {
            return stored(false, cols.max(1)); // No entries: nothing is read or written.
        }
        // A dim of size 1 has no stride that matters; read it as the denser layout.
        let row_major_ld = if rows == 1 { cols } else { row_stride };
        if (cols == 1 || col_stride == 1) && row_major_ld >= cols {
            return stored(false, row_major_ld);
        }
        let column_major_ld = if cols == 1 { rows } else { col_stride };
        if (rows == 1 || row_stride == 1) && column_major_ld >= rows {
            return stored(true, column_major_ld);
        }
        None
    }

    /// Elements from the first entry of `batch` `[rows, cols]` matrices to one past their last.
    pub fn span(&self, batch: usize, rows: usize, cols: usize) -> usize {
        let (outer, inner) = match self.transposed {
            true => (cols, rows),
            false => (rows, cols),
        };
        if batch == 0 || outer == 0 || inner == 0 {
            return 0;
        }
        (batch - 1) * self.batch_stride + (outer - 1) * self.ld + inner
    }
}

/// The single stride of batch dims `dims` with `stride`s (0 when they hold one matrix), or
/// `None` when no single stride walks them in order.
fn fold_batch(dims: &[usize], stride: &[usize]) -> Option<usize> {
    if dims.contains(&0) {
        return Some(0);
    }
    let mut folded: Option<(usize, usize)> = None; // (matrices so far, from the innermost; their stride)
    for (&d, &s) in dims.iter().zip(stride).rev() {
        if d == 1 {
            continue;
        }
        folded = match folded {
            None => Some((d, s)),
            Some((count, inner)) if s == inner * count => Some((count * d, inner)),
            Some(_) => return None,
        };
    }
    Some(folded.map_or(0, |(_, s)| s))
}

impl Operands {
    /// Checks the layouts and reads the sizes; an error for any other layout.
    pub fn of(acc: &Layout, lhs: &Layout, rhs: &Layout) -> candle_core::Result<Self> {
        let (ad, ld, rd) = (acc.dims(), lhs.dims(), rhs.dims());
        let mismatch = || {
            candle_core::Error::msg(format!(
                "add product: {ad:?} += {ld:?} · {rd:?}: expected [..., m, n] += [..., m, k] · \
                 [..., k, n] with the same batch dims"
            ))
        };
        let ([abatch @ .., m, n], [lbatch @ .., lm, k], [rbatch @ .., rk, rn]) = (ad, ld, rd)
        else {
            return Err(mismatch());
        };
        if lm != m || rk != k || rn != n || abatch != lbatch || abatch != rbatch {
            return Err(mismatch());
        }
        let strides = |name: &str, layout: &Layout| {
            Strides::of(layout).ok_or_else(|| {
                candle_core::Error::msg(format!(
                    "add product: {name} must be a batch of row- or column-major matrices \
                     whose batch dims fold into one stride, got dims {:?} strides {:?}",
                    layout.dims(),
                    layout.stride()
                ))
            })
        };
        let operands = Self {
            batch: abatch.iter().product(),
            m: *m,
            n: *n,
            k: *k,
            acc: strides("acc", acc)?,
            lhs: strides("lhs", lhs)?,
            rhs: strides("rhs", rhs)?,
        };
        let a = operands.acc;
        // The sum is written in place: each entry of `acc` must be its own memory.
        let disjoint = operands.batch <= 1 || a.batch_stride >= a.span(1, operands.m, operands.n);
        if a.transposed || !disjoint {
            candle_core::bail!(
                "add product: acc must be row-major matrices that do not overlap, got dims {ad:?} \
                 strides {:?}",
                acc.stride()
            );
        }
        Ok(operands)
    }

    /// Nothing to multiply (the sum is `acc` itself, or the product has no terms).
    pub fn is_empty(&self) -> bool {
        self.batch == 0 || self.m == 0 || self.n == 0 || self.k == 0
    }

    /// The column-major BLAS call that computes this row-major sum: a row-major `[r, c]` matrix
    /// is a column-major `[c, r]` one, so `acc += lhs · rhs` is `accᵀ += rhsᵀ · lhsᵀ`, with
    /// `rhs` as BLAS's `A` and `lhs` as its `B`; a transposed operand is BLAS's transpose.
    pub fn blas(&self) -> BlasGemm {
        BlasGemm {
            transpose_a: self.rhs.transposed,
            transpose_b: self.lhs.transposed,
            m: self.n,
            n: self.m,
            k: self.k,
            lda: self.rhs.ld,
            ldb: self.lhs.ld,
            ldc: self.acc.ld,
            batch: self.batch,
            stride_a: self.rhs.batch_stride,
            stride_b: self.lhs.batch_stride,
            stride_c: self.acc.batch_stride,
        }
    }
}

/// A strided batch of BLAS `gemm` calls, `C = alpha op(A) op(B) + beta C` on column-major
/// matrices (here alpha and beta are both 1), with `op(A): [m, k]`, `op(B): [k, n]`,
/// `C: [m, n]`, the `i`-th of each `stride_*` elements after the `i - 1`-th.
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
    /// Products in the batch.
    pub batch: usize,
    /// Elements between consecutive `A`, `B`, `C` of the batch.
    pub stride_a: usize,
    /// See `stride_a`.
    pub stride_b: usize,
    /// See `stride_a`.
    pub stride_c: usize,
}

/// The CPU's in-place sum: adds a contiguous `[batch, m, n]` product into `acc`'s entries.
struct AddInto(Operands);

impl candle_core::InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "add-into"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        acc_l: &Layout,
        product: &CpuStorage,
        product_l: &Layout,
    ) -> candle_core::Result<()> {
        let Some((from, to)) = product_l.contiguous_offsets() else {
            candle_core::bail!("add product: the CPU product is not contiguous");
        };
        let o = self.0;
        if to - from != o.batch * o.m * o.n {
            candle_core::bail!("add product: the CPU product has the wrong size");
        }
        let start = acc_l.start_offset();
        match (acc, product) {
            (CpuStorage::F32(a), CpuStorage::F32(p)) => add_rows(&mut a[start..], &p[from..to], o),
            (CpuStorage::BF16(a), CpuStorage::BF16(p)) => {
                add_rows(&mut a[start..], &p[from..to], o)
            }
            (CpuStorage::F16(a), CpuStorage::F16(p)) => add_rows(&mut a[start..], &p[from..to], o),
            _ => candle_core::bail!("add product: unsupported dtype"),
        }
    }
}

/// `acc[b, i, j] += product[b, i, j]`, `acc` laid out as `o.acc` says.
fn add_rows<T>(acc: &mut [T], product: &[T], o: Operands) -> candle_core::Result<()>
where
    T: Copy + std::ops::Add<Output = T>,
{
    if acc.len() < o.acc.span(o.batch, o.m, o.n) {
        candle_core::bail!("add product: acc's buffer is shorter than its matrices");
    }
    for (index, row) in product.chunks_exact(o.n).enumerate() {
        let (b, i) = (index / o.m, index % o.m);
        let at = b * o.acc.batch_stride + i * o.acc.ld;
        for (a, p) in acc[at..at + o.n].iter_mut().zip(row) {
            *a = *a + *p;
        }
    }
    Ok(())
}

/// The GPU's in-place op: one strided-batched cuBLAS call with `beta = 1`.
struct AddProduct;

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "add-product"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!(
            "add product: the CPU multiplies with candle, then adds (add_product_into does)"
        )
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

    /// BLAS's definition of a strided batch of `gemm`s with alpha = beta = 1 (netlib's
    /// reference, column-major, once per matrix of the batch): `C[i + j ldc] += Σ_l op(A)[i, l]
    /// op(B)[l, j]`, `op(A)[i, l] = A[i + l lda]`, or `A[l + i lda]` when transposed.
    fn reference_gemm(g: &BlasGemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        for p in 0..g.batch {
            let (a, b) = (&a[p * g.stride_a..], &b[p * g.stride_b..]);
            let c = &mut c[p * g.stride_c..];
            for j in 0..g.n {
                for i in 0..g.m {
                    let mut sum = 0.0;
                    for l in 0..g.k {
                        let a_il = match g.transpose_a {
                            true => a[l + i * g.lda],
                            false => a[i + l * g.lda],
                        };
                        let b_lj = match g.transpose_b {
                            true => b[j + l * g.ldb],
                            false => b[l + j * g.ldb],
                        };
                        sum += a_il * b_lj;
                    }
                    c[i + j * g.ldc] += sum;
                }
            }
        }
    }

    fn random(dims: &[usize], seed: u64) -> Tensor {
        bf16_exact(dims, seed, 1.0, DType::F32)
    }

    /// A view's storage from its start offset, as the GPU call is handed it.
    fn storage_from_start(view: &Tensor, whole: &Tensor) -> Vec<f32> {
        flat(whole)[view.layout().start_offset()..].to_vec()
    }

    /// `[..., rows, cols]` operands made as the chunked attention makes them: plain, the
    /// transpose of a contiguous tensor, or a slice of rows of a larger one (starting at
    /// `row`), each with batch dims `[2, 3]`. Returns the view and the tensor it is a view of.
    fn operand(kind: usize, rows: usize, cols: usize, seed: u64) -> (Tensor, Tensor) {
        match kind {
            0 => {
                let t = random(&[2, 3, rows, cols], seed);
                (t.clone(), t)
            }
            1 => {
                let t = random(&[2, 3, cols, rows], seed);
                (t.t().unwrap(), t)
            }
            _ => {
                let t = random(&[2, 3, rows + 4, cols], seed);
                (t.narrow(2, 1, rows).unwrap(), t)
            }
        }
    }

    #[test]
    fn the_blas_call_computes_the_row_major_sum() {
        for (m, n, k) in [(5, 7, 3), (1, 9, 4), (6, 1, 2), (4, 4, 1), (8, 3, 16)] {
            for (lhs_kind, rhs_kind, acc_kind) in [(0, 0, 0), (0, 1, 0), (1, 2, 2), (2, 1, 2)] {
                let (acc, acc_whole) = operand(acc_kind, m, n, 1);
                let (lhs, lhs_whole) = operand(lhs_kind, m, k, 2);
                let (rhs, rhs_whole) = operand(rhs_kind, k, n, 3);
                let operands = Operands::of(acc.layout(), lhs.layout(), rhs.layout()).unwrap();
                assert_eq!(
                    (operands.batch, operands.m, operands.n, operands.k),
                    (6, m, n, k)
                );
                // A 1-wide transpose is row-major as well; either reading of it is right.
                assert!(operands.lhs.transposed == (lhs_kind == 1) || m == 1 || k == 1);
                assert!(operands.rhs.transposed == (rhs_kind == 1) || n == 1 || k == 1);
                // The BLAS call on the tensors' own storage, in place of cuBLAS.
                let mut c = storage_from_start(&acc, &acc_whole);
                reference_gemm(
                    &operands.blas(),
                    &storage_from_start(&rhs, &rhs_whole),
                    &storage_from_start(&lhs, &lhs_whole),
                    &mut c,
                );
                let expected = (&acc + lhs.matmul(&rhs).unwrap()).unwrap();
                // Read the sum back through the view's own strides.
                let o = operands.acc;
                let read: Vec<f32> = (0..6 * m * n)
                    .map(|e| c[(e / (m * n)) * o.batch_stride + (e / n % m) * o.ld + e % n])
                    .collect();
                let read = Tensor::from_vec(read, (2, 3, m, n), &Device::Cpu).unwrap();
                let diff = scaled_diff(&read, &expected);
                assert!(
                    diff < 1e-6,
                    "{m}x{n}x{k} kinds {lhs_kind}/{rhs_kind}/{acc_kind}: {diff}"
                );
            }
        }
    }

    #[test]
    fn the_cpu_adds_into_a_slice_and_leaves_the_rest() {
        for dtype in [DType::F32, DType::BF16] {
            let whole = random(&[2, 3, 9, 5], 4).to_dtype(dtype).unwrap();
            let before = flat(&whole);
            let acc = whole.narrow(2, 0, 6).unwrap();
            let lhs = random(&[2, 3, 4, 6], 5)
                .to_dtype(dtype)
                .unwrap()
                .t()
                .unwrap();
            let rhs = random(&[2, 3, 8, 5], 6)
                .to_dtype(dtype)
                .unwrap()
                .narrow(2, 2, 4)
                .unwrap();
            let expected = (acc.copy().unwrap() + lhs.matmul(&rhs).unwrap()).unwrap();
            add_product_into(&acc, &lhs, &rhs).unwrap();
            assert_eq!(flat(&acc), flat(&expected), "{dtype:?}");
            // Rows 6.. of each matrix are not in the slice and keep their values.
            let after = flat(&whole);
            for (e, (a, b)) in after.iter().zip(&before).enumerate() {
                if e / 5 % 9 >= 6 {
                    assert_eq!(a, b, "{dtype:?}: entry {e} outside the slice changed");
                }
            }
        }
    }

    #[test]
    fn a_product_without_terms_leaves_acc() {
        let acc = random(&[3, 2], 1);
        let empty = |shape| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let sum = add_product(acc.clone(), &empty((3, 0)), &empty((0, 2))).unwrap();
        assert_eq!(flat(&sum), flat(&acc));
        let none = add_product(empty((0, 2)), &empty((0, 4)), &random(&[4, 2], 2)).unwrap();
        assert_eq!(none.dims(), &[0, 2]);
    }

    #[test]
    fn layouts_it_cannot_read_are_refused() {
        let dev = &Device::Cpu;
        let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, dev).unwrap();
        let of =
            |a: &Tensor, l: &Tensor, r: &Tensor| Operands::of(a.layout(), l.layout(), r.layout());
        // Neither row- nor column-major: [3, 2] with strides [4, 12].
        let scattered = z(&[2, 3, 4])
            .transpose(0, 2)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap();
        assert!(of(&z(&[1, 5, 2]), &z(&[1, 5, 3]), &scattered).is_err());
        // Batch dims that no single stride walks.
        let swapped = z(&[2, 3, 4, 5]).transpose(0, 1).unwrap();
        assert!(of(&z(&[3, 2, 4, 6]), &z(&[3, 2, 4, 5]), &swapped.t().unwrap()).is_err());
        assert!(of(&z(&[3, 2, 4, 5]), &swapped, &z(&[3, 2, 5, 5])).is_err());
        // Sizes or batch dims that do not match.
        assert!(of(&z(&[2, 3]), &z(&[2, 5]), &z(&[4, 3])).is_err());
        assert!(of(&z(&[2, 2, 3]), &z(&[3, 2, 4]), &z(&[2, 4, 3])).is_err());
        assert!(of(&z(&[2, 3]), &z(&[2, 4]), &z(&[2, 4, 3])).is_err());
        // acc transposed, or its matrices sharing memory (a broadcast batch).
        let acc_t = z(&[3, 2]).t().unwrap();
        assert!(of(&acc_t, &z(&[2, 4]), &z(&[4, 3])).is_err());
        let shared = z(&[2, 3]).broadcast_as((4, 2, 3)).unwrap();
        assert!(of(&shared, &z(&[4, 2, 4]), &z(&[4, 4, 3])).is_err());
        let tracked = candle_core::Var::zeros((2, 3), DType::F32, dev).unwrap();
        let err = add_product(tracked.as_tensor().clone(), &z(&[2, 4]), &z(&[4, 3])).unwrap_err();
        assert!(err.to_string().contains("tracked"), "{err}");
    }
}
