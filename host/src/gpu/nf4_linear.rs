//! The frozen NF4 linear `y = x Wᵀ` on the GPU, as a candle custom op: the forward pass and
//! the input gradient each dequantize `W` into a scratch buffer of the activations' dtype,
//! multiply with cuBLAS through candle, and free the scratch before returning. Autograd keeps
//! only the packed weight alive between them (the CPU twin is `model::linear`). The `add`
//! variants add the product into an existing sum with `beta = 1` instead (the written-out
//! backward's adapter product, or another linear's input gradient).
//!
//! **Not yet run on a GPU.** `qdylora gpu-dequant` checks both directions against a CPU
//! reference before it times anything.

use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, InplaceOp2, Layout, Shape, Tensor};
use half::bf16;

use super::add_product::add_in_place;
use super::dequant::{self, DequantElement};
pub use super::weight::CudaNf4Weight;
use crate::model::fused::add_product::Operands;
use crate::phases;

/// `x [m, in] -> x Wᵀ [m, out]` for `x` on `w`'s CUDA device, f32 or bf16 (the result has
/// `x`'s dtype). Differentiable with respect to `x` only: `W` is frozen.
pub fn linear_forward(x: &Tensor, w: &Arc<CudaNf4Weight>) -> candle_core::Result<Tensor> {
    check_input("nf4 linear", x.dims(), x.dtype(), w.cols())?;
    x.contiguous()?
        .apply_op1(Nf4LinearForward { weight: w.clone() })
}

/// `g [m, out] -> g W [m, in]`: the input gradient of [`linear_forward`], dequantizing `W`
/// again. Records no autograd graph.
pub fn linear_input_grad(g: &Tensor, w: &Arc<CudaNf4Weight>) -> candle_core::Result<Tensor> {
    check_input("nf4 linear input gradient", g.dims(), g.dtype(), w.rows())?;
    g.contiguous()?
        .apply_op1_no_bwd(&Nf4LinearInputGrad { weight: w.clone() })
}

/// `acc [m, out] + x Wᵀ`, added into `acc`'s memory by the GEMM itself (cuBLAS with
/// `beta = 1`), for untracked `acc` and `x` of one dtype on `w`'s device. Returns `acc`.
pub fn linear_add_forward(
    acc: Tensor,
    x: &Tensor,
    w: &Arc<CudaNf4Weight>,
) -> candle_core::Result<Tensor> {
    add_times_weight(acc, x, w, Product::TimesTransposed)
}

/// `acc [m, in] + g W`: [`linear_input_grad`] added into `acc` as [`linear_add_forward`] adds.
pub fn linear_add_input_grad(
    acc: Tensor,
    g: &Tensor,
    w: &Arc<CudaNf4Weight>,
) -> candle_core::Result<Tensor> {
    add_times_weight(acc, g, w, Product::Times)
}

fn add_times_weight(
    acc: Tensor,
    lhs: &Tensor,
    w: &Arc<CudaNf4Weight>,
    product: Product,
) -> candle_core::Result<Tensor> {
    let op = Nf4AddProduct {
        weight: w.clone(),
        product,
    };
    let (inner, n) = product.dims(w.rows(), w.cols());
    let m = check_input(op.name(), lhs.dims(), lhs.dtype(), inner)?;
    if acc.dims() != [m, n] || acc.dtype() != lhs.dtype() {
        candle_core::bail!(
            "{}: expected a {:?} sum of shape [{m}, {n}], got {:?} {:?}",
            op.name(),
            lhs.dtype(),
            acc.dtype(),
            acc.dims()
        );
    }
    if acc.track_op() || lhs.track_op() {
        candle_core::bail!("{}: the tensors must not be tracked by autograd", op.name());
    }
    let acc = acc.contiguous()?;
    acc.inplace_op2(&lhs.contiguous()?, &op)?;
    Ok(acc)
}

/// Which side of the weight a product uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Product {
    /// `x Wᵀ`: forward, `[m, in] -> [m, out]`.
    TimesTransposed,
    /// `g W`: the input gradient, `[m, out] -> [m, in]`.
    Times,
}

impl Product {
    /// (inner dimension, output columns) for a `[rows, cols]` weight.
    fn dims(self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            Self::TimesTransposed => (cols, rows),
            Self::Times => (rows, cols),
        }
    }

    /// The layout of the right-hand factor over the row-major `[rows, cols]` scratch: `Wᵀ` is
    /// the same memory with swapped strides, which cuBLAS reads transposed (no copy).
    fn weight_layout(self, rows: usize, cols: usize) -> Layout {
        match self {
            Self::TimesTransposed => Layout::new(Shape::from((cols, rows)), vec![1, cols], 0),
            Self::Times => Layout::contiguous((rows, cols)),
        }
    }
}

/// Checks `[m, inner]`, f32 or bf16, before any device work.
fn check_input(op: &str, dims: &[usize], dtype: DType, inner: usize) -> candle_core::Result<usize> {
    let m = match dims {
        [m, k] if *k == inner => *m,
        _ => candle_core::bail!("{op}: expected an input of shape [m, {inner}], got {dims:?}"),
    };
    match dtype {
        DType::F32 | DType::BF16 => Ok(m),
        other => candle_core::bail!("{op}: expected f32 or bf16 input, got {other:?}"),
    }
}

/// `lhs · (W or Wᵀ)` with `W` dequantized into a scratch buffer of `lhs`'s dtype that is
/// dropped (freed in stream order) before this returns.
fn times_weight(
    op: &str,
    lhs: &CudaStorage,
    lhs_layout: &Layout,
    w: &CudaNf4Weight,
    product: Product,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (rows, cols) = (w.rows(), w.cols());
    let (inner, n) = product.dims(rows, cols);
    let m = check_input(op, lhs_layout.dims(), lhs.dtype(), inner)?;
    if !lhs_layout.is_contiguous() {
        candle_core::bail!("{op}: the input must be contiguous");
    }
    let dev = lhs.device();
    let out_shape = Shape::from((m, n));
    if m == 0 {
        // Nothing to multiply: skip the dequantization and a zero-sized cuBLAS call.
        return Ok((dev.zeros_impl(&out_shape, lhs.dtype())?, out_shape));
    }
    let scratch = scratch(op, dev, lhs.dtype(), w)?;
    // candle's matmul runs cuBLAS on its stream, after the dequantization in stream order.
    let out = phases::within("base GEMMs", || {
        lhs.matmul(
            &scratch,
            (1, m, n, inner),
            lhs_layout,
            &product.weight_layout(rows, cols),
        )
    })?;
    drop(scratch);
    Ok((out, out_shape))
}

/// `acc += lhs · (W or Wᵀ)` in `acc`'s memory: `W` dequantized into a scratch buffer as
/// [`times_weight`] does, then one cuBLAS call with `beta = 1`.
fn add_times_weight_in_place(
    op: &str,
    (acc, acc_layout): (&mut CudaStorage, &Layout),
    (lhs, lhs_layout): (&CudaStorage, &Layout),
    w: &CudaNf4Weight,
    product: Product,
) -> candle_core::Result<()> {
    let (rows, cols) = (w.rows(), w.cols());
    let weight_layout = product.weight_layout(rows, cols);
    let operands = Operands::of(acc_layout, lhs_layout, &weight_layout)?;
    if operands.is_empty() {
        return Ok(()); // Nothing to add: skip the dequantization.
    }
    // `add_times_weight` checked that `acc` has `lhs`'s dtype.
    let scratch = scratch(op, lhs.device(), lhs.dtype(), w)?;
    phases::within("base GEMMs", || {
        add_in_place(
            (acc, acc_layout),
            (lhs, lhs_layout),
            (&scratch, &weight_layout),
            operands,
        )
    })
}

/// `W` dequantized into a new scratch buffer of `dtype` (f32 or bf16), to be dropped as soon
/// as the product that reads it is queued.
fn scratch(
    op: &str,
    dev: &candle_core::CudaDevice,
    dtype: DType,
    w: &CudaNf4Weight,
) -> candle_core::Result<CudaStorage> {
    phases::within("NF4 dequantization", || match dtype {
        DType::F32 => dequantized::<f32>(dev, w),
        DType::BF16 => dequantized::<bf16>(dev, w),
        other => candle_core::bail!("{op}: unsupported dtype {other:?}"),
    })
}

fn dequantized<T: DequantElement + candle_core::cuda::CudaDType>(
    dev: &candle_core::CudaDevice,
    w: &CudaNf4Weight,
) -> candle_core::Result<CudaStorage> {
    let slice = dequant::dequantize::<T>(dev, w)?;
    Ok(CudaStorage::wrap_cuda_slice(slice, dev.clone()))
}

fn cpu_unsupported(op: &str) -> candle_core::Error {
    candle_core::Error::msg(format!(
        "{op} runs on the CUDA device only (the CPU path is model::linear)"
    ))
}

/// Forward: `x [m, in] -> x Wᵀ [m, out]`.
struct Nf4LinearForward {
    weight: Arc<CudaNf4Weight>,
}

impl CustomOp1 for Nf4LinearForward {
    fn name(&self) -> &'static str {
        "nf4-linear-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cpu_unsupported(self.name()))
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        times_weight(
            self.name(),
            storage,
            layout,
            &self.weight,
            Product::TimesTransposed,
        )
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // W is frozen: only the input gradient, dequantizing W again instead of keeping it.
        linear_input_grad(grad_res, &self.weight).map(Some)
    }
}

/// Backward: `grad_y [m, out] -> grad_y W [m, in]`.
struct Nf4LinearInputGrad {
    weight: Arc<CudaNf4Weight>,
}

impl CustomOp1 for Nf4LinearInputGrad {
    fn name(&self) -> &'static str {
        "nf4-linear-cuda-input-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cpu_unsupported(self.name()))
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        times_weight(self.name(), storage, layout, &self.weight, Product::Times)
    }
}

/// `acc += lhs · (W or Wᵀ)`, in place on `acc`.
struct Nf4AddProduct {
    weight: Arc<CudaNf4Weight>,
    product: Product,
}

impl InplaceOp2 for Nf4AddProduct {
    fn name(&self) -> &'static str {
        match self.product {
            Product::TimesTransposed => "nf4-linear-cuda-add",
            Product::Times => "nf4-linear-cuda-add-input-grad",
        }
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        Err(cpu_unsupported(self.name()))
    }

    fn cuda_fwd(
        &self,
        acc: &mut CudaStorage,
        acc_layout: &Layout,
        lhs: &CudaStorage,
        lhs_layout: &Layout,
    ) -> candle_core::Result<()> {
        add_times_weight_in_place(
            self.name(),
            (acc, acc_layout),
            (lhs, lhs_layout),
            &self.weight,
            self.product,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn transposed_weight_is_candles_own_transpose() {
        // candle's CUDA matmul accepts `x.matmul(&w.t())`; the forward hands it the same
        // layout over the scratch, so cuBLAS reads W transposed instead of a copy.
        let (rows, cols) = (6, 4);
        let w = Tensor::zeros((rows, cols), DType::F32, &Device::Cpu).unwrap();
        let wt = w.t().unwrap();
        let ours = Product::TimesTransposed.weight_layout(rows, cols);
        let theirs = wt.layout();
        assert_eq!(ours.dims(), theirs.dims());
        assert_eq!(ours.stride(), theirs.stride());
        assert_eq!(ours.start_offset(), theirs.start_offset());
        assert_eq!(Product::TimesTransposed.dims(rows, cols), (cols, rows));

        let plain = Product::Times.weight_layout(rows, cols);
        assert_eq!(plain.dims(), w.layout().dims());
        assert_eq!(plain.stride(), w.layout().stride());
        assert_eq!(Product::Times.dims(rows, cols), (rows, cols));
    }

    #[test]
    fn input_checks() {
        assert_eq!(check_input("t", &[5, 64], DType::F32, 64).unwrap(), 5);
        assert_eq!(check_input("t", &[0, 64], DType::BF16, 64).unwrap(), 0);
        for (dims, dtype) in [
            (&[5, 63][..], DType::F32),
            (&[2, 5, 64][..], DType::F32),
            (&[64][..], DType::F32),
            (&[5, 64][..], DType::F16),
            (&[5, 64][..], DType::U8),
        ] {
            assert!(
                check_input("t", dims, dtype, 64).is_err(),
                "{dims:?} {dtype:?}"
            );
        }
    }
}
