//! The model's matrix products, through one door that refuses operand layouts candle's CUDA
//! backend would refuse, on every device.
//!
//! Why: candle's CPU matmul accepts any strides, but its CUDA matmul hands cuBLAS a leading
//! dimension taken from the shape, so it accepts only operands whose last two dimensions are
//! contiguous or transposed-contiguous, and a few batch-stride patterns (`gemm_config` in
//! candle-core 0.11's `cuda_backend/mod.rs`), and fails with `MatMulNonContiguous` otherwise.
//! A narrowed adapter such as `B[:, :b]` is such an operand. The CPU tests would never see it;
//! the first GPU run would. Checking here turns that into a CPU test failure with the call
//! named. Autograd's products for a checked one need no check of their own: candle's backward
//! multiplies `grad · rhsᵀ` and `lhsᵀ · grad` with a contiguous `grad`, and the rules below
//! accept a transposed matrix exactly when they accept the matrix, with the same batch strides.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Error, Layout, Result, Shape, Tensor};

/// `lhs · rhs` (candle's `matmul`), refusing layouts candle's CUDA backend refuses.
pub fn matmul(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    check(&Operand::of(lhs), &Operand::of(rhs))?;
    lhs.matmul(rhs)
}

/// `lhs · rhs` with broadcast batch dimensions (candle's `broadcast_matmul`), with the same
/// check on the operands candle's `broadcast_matmul` passes on to its `matmul`.
pub fn broadcast_matmul(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let (l_shape, r_shape) = match broadcast_shapes(lhs, rhs) {
        Some(shapes) => shapes,
        None => return lhs.broadcast_matmul(rhs), // candle reports the shape error
    };
    let (l_broadcast, r_broadcast) = (l_shape != *lhs.shape(), r_shape != *rhs.shape());
    // What candle 0.11.1's broadcast_matmul multiplies: a broadcast operand is copied to a
    // contiguous tensor, except a rank-2 rhs next to a contiguous lhs, which multiplies the lhs
    // folded to rank 2.
    let (l, r) = if r_broadcast && !l_broadcast && rhs.rank() == 2 && lhs.is_contiguous() {
        let k = lhs.dims()[lhs.rank() - 1];
        (
            Operand::contiguous(&[lhs.elem_count() / k.max(1), k]),
            Operand::of(rhs),
        )
    } else {
        let side = |t: &Tensor, shape: &Shape, broadcast| match broadcast {
            true => Operand::contiguous(shape.dims()),
            false => Operand::of(t),
        };
        (
            side(lhs, &l_shape, l_broadcast),
            side(rhs, &r_shape, r_broadcast),
        )
    };
    check(&l, &r)?;
    lhs.broadcast_matmul(rhs)
}

/// `lhs [.., k] · rhs [k, n]` for an `rhs` autograd does not track (a frozen weight, such as
/// the LM head in fine-tuning): the product [`broadcast_matmul`] computes, but its backward
/// gives `lhs` its gradient and nothing else. candle's matmul backward computes both operands'
/// gradients whether or not one is wanted; for the LM head the unwanted one is as large a
/// product as the wanted one (1.1 TFLOP per step at the LLaMA-7B benchmark's shape) plus a
/// zero-filled sum as large as the head. A tracked `rhs` (pretraining the head) takes
/// [`broadcast_matmul`].
pub fn matmul_const_rhs(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let (&[k, n], Some(&lhs_k)) = (rhs.dims(), lhs.dims().last()) else {
        return broadcast_matmul(lhs, rhs);
    };
    if rhs.track_op() || lhs_k != k {
        return broadcast_matmul(lhs, rhs); // which reports a mismatch itself
    }
    let mut out_dims = lhs.dims().to_vec();
    *out_dims.last_mut().expect("lhs has a last dim") = n;
    // Folded to rows, as broadcast_matmul folds a contiguous lhs next to a rank-2 rhs: the
    // same product, value for value.
    let rows = lhs.contiguous()?.reshape(((), k))?;
    check(&Operand::of(&rows), &Operand::of(rhs))?;
    rows.apply_op2(rhs, ConstRhsMatmul)?.reshape(out_dims)
}

/// [`matmul_const_rhs`]'s op: `lhs [m, k] · rhs [k, n]`, backward to `lhs` only.
struct ConstRhsMatmul;

impl ConstRhsMatmul {
    /// The product on either backend: candle's own matmul of the two storages.
    fn product<S: BackendStorage>(s1: &S, l1: &Layout, s2: &S, l2: &Layout) -> Result<(S, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (_, n) = l2.shape().dims2()?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }
}

impl CustomOp2 for ConstRhsMatmul {
    fn name(&self) -> &'static str {
        "matmul-const-rhs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::product(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Self::product(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _lhs: &Tensor,
        rhs: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // What candle's matmul backward gives lhs.
        Ok((Some(matmul(grad, &rhs.t()?)?), None))
    }
}

/// The shapes candle broadcasts `lhs` and `rhs` to: common batch dimensions, then each one's
/// matrix. `None` when they do not broadcast.
fn broadcast_shapes(lhs: &Tensor, rhs: &Tensor) -> Option<(Shape, Shape)> {
    let (l, r) = (lhs.dims(), rhs.dims());
    if l.len() < 2 || r.len() < 2 {
        return None;
    }
    let (l_batch, r_batch) = (
        Shape::from(&l[..l.len() - 2]),
        Shape::from(&r[..r.len() - 2]),
    );
    let batch = l_batch
        .broadcast_shape_binary_op(&r_batch, "broadcast_matmul")
        .ok()?;
    let with = |matrix: &[usize]| Shape::from([batch.dims(), matrix].concat());
    Some((with(&l[l.len() - 2..]), with(&r[r.len() - 2..])))
}

/// An operand's dims and strides.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Operand {
    dims: Vec<usize>,
    strides: Vec<usize>,
}

impl Operand {
    fn of(t: &Tensor) -> Self {
        Self {
            dims: t.dims().to_vec(),
            strides: t.stride().to_vec(),
        }
    }

    fn contiguous(dims: &[usize]) -> Self {
        let mut strides = vec![1; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        Self {
            dims: dims.to_vec(),
            strides,
        }
    }

    /// (rows, cols) strides of the matrix part.
    fn matrix_strides(&self) -> (usize, usize) {
        let n = self.strides.len();
        (self.strides[n - 2], self.strides[n - 1])
    }
}

/// Checks `lhs · rhs`.
fn check(lhs: &Operand, rhs: &Operand) -> Result<()> {
    if lhs.dims.len() < 2 || lhs.dims.len() != rhs.dims.len() {
        return Ok(()); // candle's matmul reports the shape mismatch itself
    }
    cuda_accepts(lhs, rhs).map_err(|why| refused(lhs, rhs, why))
}

fn refused(lhs: &Operand, rhs: &Operand, why: &str) -> Error {
    Error::Msg(format!(
        "this product would fail on candle's CUDA backend (MatMulNonContiguous: {why}): lhs dims \
         {:?} strides {:?}, rhs dims {:?} strides {:?}; make the operand contiguous first",
        lhs.dims, lhs.strides, rhs.dims, rhs.strides
    ))
}

/// candle's CUDA rules for `lhs [.., m, k] · rhs [.., k, n]`: each matrix is contiguous or
/// transposed-contiguous (a dimension of size one may have any stride), and the batch strides
/// are one stride per batch (rank 3) or fold into one (rank 4).
fn cuda_accepts(lhs: &Operand, rhs: &Operand) -> std::result::Result<(), &'static str> {
    let r = lhs.dims.len();
    let (m, k, n) = (lhs.dims[r - 2], lhs.dims[r - 1], rhs.dims[r - 1]);
    let matrix_ok = |(rows, cols): (usize, usize), (height, width): (usize, usize)| {
        let plain = (cols == 1 || width == 1) && (rows == width || height == 1);
        let transposed = (cols == height || width == 1) && (rows == 1 || height == 1);
        plain || transposed
    };
    if !matrix_ok(rhs.matrix_strides(), (k, n)) {
        return Err("rhs is neither contiguous nor transposed-contiguous");
    }
    if !matrix_ok(lhs.matrix_strides(), (m, k)) {
        return Err("lhs is neither contiguous nor transposed-contiguous");
    }
    let batch_ok = |o: &Operand| match (&o.dims[..r - 2], &o.strides[..r - 2]) {
        ([], []) | ([_], [_]) => true,
        ([d0, d1], [s0, s1]) => *s0 == s1 * d1 || *d0 == 1 || *d1 == 1,
        _ => false,
    };
    if !batch_ok(lhs) || !batch_ok(rhs) {
        return Err("the batch dimensions do not fold into one stride");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(dims: &[usize]) -> Tensor {
        Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
    }

    /// Seeded values in (-1, 1).
    fn values(dims: &[usize], seed: u32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_constant_rhs_gets_no_gradient_and_lhs_the_same_one() {
        let head = values(&[10, 8], 1); // [vocab, hidden], used transposed like the LM head
        let h = candle_core::Var::from_tensor(&values(&[2, 3, 8], 2)).unwrap();
        let seed = values(&[2, 3, 10], 3);
        let backward = |out: Tensor| (out * &seed).unwrap().sum_all().unwrap().backward();
        let head_t = head.t().unwrap();
        let plain = broadcast_matmul(h.as_tensor(), &head_t).unwrap();
        let fused = matmul_const_rhs(h.as_tensor(), &head_t).unwrap();
        assert_eq!(fused.dims(), &[2, 3, 10]);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            flat(&fused),
            flat(&plain),
            "the same product, value for value"
        );
        let (plain, fused) = (backward(plain).unwrap(), backward(fused).unwrap());
        let grad =
            |store: &candle_core::backprop::GradStore| flat(store.get(h.as_tensor()).unwrap());
        assert_eq!(grad(&fused), grad(&plain));
        // candle's own backward filled a gradient for the constant head; this one made none.
        assert!(plain.get(&head_t).is_some());
        assert!(fused.get(&head_t).is_none());

        // A head being trained (pretraining) keeps its gradient.
        let trained = candle_core::Var::from_tensor(&head).unwrap();
        let out = matmul_const_rhs(h.as_tensor(), &trained.as_tensor().t().unwrap()).unwrap();
        assert!(backward(out).unwrap().get(trained.as_tensor()).is_some());
    }

    #[test]
    fn contiguous_and_transposed_operands_pass() {
        let (x, w) = (t(&[4, 8]), t(&[6, 8]));
        assert_eq!(matmul(&x, &w.t().unwrap()).unwrap().dims(), &[4, 6]);
        assert!(broadcast_matmul(&t(&[2, 4, 8]), &w.t().unwrap()).is_ok());
        assert!(matmul(&t(&[2, 3, 4, 8]), &t(&[2, 3, 8, 5])).is_ok());
        // Transposed batches of attention: [b, h, s, d] · [b, h, d, s].
        let k = t(&[2, 3, 5, 8]);
        assert!(matmul(&t(&[2, 3, 5, 8]), &k.t().unwrap()).is_ok());
    }

    #[test]
    fn a_narrowed_column_block_is_refused_with_the_fix_named() {
        // B[:, :b] of a [out, r_max] adapter, used as `x · B[:, :b]ᵀ`'s rhs.
        let b = t(&[6, 8]).narrow(1, 0, 3).unwrap();
        let err = matmul(&t(&[4, 6]), &b).unwrap_err().to_string();
        assert!(
            err.contains("MatMulNonContiguous") && err.contains("contiguous first"),
            "{err}"
        );
        assert!(matmul(&t(&[4, 3]), &b.t().unwrap()).is_err());
        assert!(matmul(&t(&[4, 3]), &b.contiguous().unwrap().t().unwrap()).is_ok());
        // A leading row block A[:b, :] stays contiguous.
        let a = t(&[8, 5]).narrow(0, 0, 3).unwrap();
        assert!(matmul(&t(&[4, 3]), &a).is_ok());
    }

    #[test]
    fn a_dimension_of_size_one_may_have_any_stride_but_the_other_may_not() {
        // [6, 1] with strides (1, 6): a column of a transposed matrix; the column stride is
        // never read.
        let col = t(&[8, 6]).t().unwrap().narrow(1, 0, 1).unwrap();
        assert!(matmul(&t(&[4, 6]), &col).is_ok());
        // [6, 1] with strides (8, 1): B[:, :1], the rank-1 slice of a [6, 8] adapter. Its
        // row stride must still be 1 or the width.
        let rank_one = t(&[6, 8]).narrow(1, 0, 1).unwrap();
        assert!(matmul(&t(&[4, 6]), &rank_one).is_err());
        assert!(matmul(&t(&[4, 6]), &rank_one.contiguous().unwrap()).is_ok());
    }

    #[test]
    fn batch_strides_that_do_not_fold_are_refused() {
        // [2, 3, 4, 5] made from a [3, 2, 4, 5] by swapping the batch dims.
        let lhs = t(&[3, 2, 4, 5]).transpose(0, 1).unwrap();
        assert!(matmul(&lhs, &t(&[2, 3, 5, 6])).is_err());
        assert!(matmul(&lhs.contiguous().unwrap(), &t(&[2, 3, 5, 6])).is_ok());
    }

    #[test]
    fn broadcast_rhs_of_rank_two_is_checked_as_the_folded_product() {
        let w_t = t(&[8, 6]).narrow(1, 0, 3).unwrap(); // [8, 3], stride (6, 1)
        assert!(broadcast_matmul(&t(&[2, 4, 8]), &w_t).is_err());
        // A non-contiguous lhs makes candle copy the broadcast rhs: then only lhs counts.
        let lhs = t(&[2, 5, 8]).narrow(1, 0, 4).unwrap(); // [2, 4, 8], batch stride 40
        assert!(broadcast_matmul(&lhs, &w_t).is_ok());
    }
}
