//! `acc += lhs · rhs` by one strided-batched cuBLAS call with `beta = 1` on candle's stream:
//! the CUDA side of `model::fused::add_product`, which checks the layouts and maps the row-major
//! sum to the column-major call (`Operands::blas`, tested on the CPU against BLAS's
//! definition).

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::{CudaStorage, DType, Layout};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use half::{bf16, f16};

use crate::model::fused::add_product::Operands;

/// A tensor's storage and layout.
type Input<'a> = (&'a CudaStorage, &'a Layout);

/// `acc += lhs · rhs` in `acc`'s memory, for layouts [`Operands::of`] accepted.
pub fn add_in_place(
    acc: (&mut CudaStorage, &Layout),
    lhs: Input<'_>,
    rhs: Input<'_>,
    operands: Operands,
) -> candle_core::Result<()> {
    if operands.is_empty() {
        return Ok(());
    }
    match acc.0.dtype() {
        DType::F32 => add::<f32>(acc, lhs, rhs, operands, 1.0),
        DType::BF16 => add::<bf16>(acc, lhs, rhs, operands, bf16::ONE),
        DType::F16 => add::<f16>(acc, lhs, rhs, operands, f16::ONE),
        other => candle_core::bail!("add product: unsupported dtype {other:?}"),
    }
}

fn add<T: CudaDType + Copy>(
    (acc, acc_l): (&mut CudaStorage, &Layout),
    (lhs, lhs_l): Input<'_>,
    (rhs, rhs_l): Input<'_>,
    operands: Operands,
    one: T,
) -> candle_core::Result<()>
where
    CudaBlas: Gemm<T>,
{
    let blas = acc.device().cublas_handle();
    let g = operands.blas();
    let int = |v: usize| {
        i32::try_from(v).map_err(|_| candle_core::Error::msg("add product: matrix too large"))
    };
    let long = |v: usize| {
        i64::try_from(v).map_err(|_| candle_core::Error::msg("add product: stride too large"))
    };
    let op = |transposed: bool| match transposed {
        true => cublasOperation_t::CUBLAS_OP_T,
        false => cublasOperation_t::CUBLAS_OP_N,
    };
    let cfg = GemmConfig {
        transa: op(g.transpose_a),
        transb: op(g.transpose_b),
        m: int(g.m)?,
        n: int(g.n)?,
        k: int(g.k)?,
        alpha: one,
        lda: int(g.lda)?,
        ldb: int(g.ldb)?,
        beta: one,
        ldc: int(g.ldc)?,
    };
    let batched = StridedBatchedConfig {
        gemm: cfg,
        batch_size: int(g.batch)?,
        stride_a: long(g.stride_a)?,
        stride_b: long(g.stride_b)?,
        stride_c: long(g.stride_c)?,
    };
    let (batch, m, n, k) = (operands.batch, operands.m, operands.n, operands.k);
    let a = rhs.as_cuda_slice::<T>()?.slice(rhs_l.start_offset()..);
    let b = lhs.as_cuda_slice::<T>()?.slice(lhs_l.start_offset()..);
    let mut c = acc
        .as_cuda_slice_mut::<T>()?
        .slice_mut(acc_l.start_offset()..);
    if a.len() < operands.rhs.span(batch, k, n)
        || b.len() < operands.lhs.span(batch, m, k)
        || c.len() < operands.acc.span(batch, m, n)
    {
        candle_core::bail!("add product: a buffer is shorter than its matrices");
    }
    // SAFETY: the three views hold every element the calls read and write (checked above by
    // each operand's span; `Operands::of` checked that each is a batch of row- or column-major
    // matrices with the leading dimensions and strides `blas()` gives, and that `acc`'s
    // matrices do not overlap). The borrow of `acc` ends when the call is queued, not when it
    // runs: what keeps the write ordered is that candle queues all its work on the one stream
    // this handle uses (cudarc's events order any other), and candle refuses an in-place op
    // whose inputs share `acc`'s storage.
    unsafe { blas.gemm_strided_batched(batched, &a, &b, &mut c) }.map_err(candle_core::Error::wrap)
}
