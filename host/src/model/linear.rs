//! The base model's linears: NF4 + double-quant weights that are dequantized on the fly, in the
//! forward pass and again for the input gradient (frozen), or dense f32 weights (the reference
//! path, and the demo's pretraining where they are views of trainable variables).
//!
//! The NF4 path is a candle custom op so that autograd keeps only the packed weight alive between
//! forward and backward: no dequantized copy survives either call (see `kernels::scratch`).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use qdylora_formats::Nf4Weight;

use crate::kernels;
use crate::model::fused::add_product::add_product;
use crate::model::matmul::broadcast_matmul;
use crate::phases;

/// The CPU NF4 kernels dequantize inside the product: one category for both.
const CPU_NF4: &str = "NF4 linears (CPU: dequantization in the product)";

/// A base-model `y = x Wᵀ` with `W: [out, in]`.
#[derive(Debug, Clone)]
pub enum BaseLinear {
    /// NF4 + double-quant, dequantized per call.
    Nf4(Arc<Nf4Weight>),
    /// Dense f32, held as the transposed view `Wᵀ` (`[in, out]`): no copy, and a view of a
    /// variable follows its updates.
    Dense {
        /// `Wᵀ`.
        weight_t: Tensor,
    },
    /// NF4 + double-quant in GPU memory, dequantized per call by this project's CUDA kernel.
    #[cfg(feature = "cuda")]
    Nf4Cuda(Arc<crate::gpu::CudaNf4Weight>),
}

impl BaseLinear {
    /// A dense linear from `W: [out, in]`.
    pub fn dense(weight: &Tensor) -> candle_core::Result<Self> {
        Ok(Self::Dense {
            weight_t: weight.t()?,
        })
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match self {
            Self::Nf4(w) => w.cols,
            Self::Dense { weight_t } => weight_t.dims()[0],
            #[cfg(feature = "cuda")]
            Self::Nf4Cuda(w) => w.cols(),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            Self::Nf4(w) => w.rows,
            Self::Dense { weight_t } => weight_t.dims()[1],
            #[cfg(feature = "cuda")]
            Self::Nf4Cuda(w) => w.rows(),
        }
    }

    /// `x: [..., in] -> [..., out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Nf4(w) => phases::within(CPU_NF4, || {
                on_rows(x, w.cols, w.rows, |x2| {
                    x2.apply_op1(Nf4LinearOp { weight: w.clone() })
                })
            }),
            Self::Dense { weight_t } => {
                phases::within("base GEMMs", || broadcast_matmul(x, weight_t))
            }
            #[cfg(feature = "cuda")]
            Self::Nf4Cuda(w) => on_rows(x, w.cols(), w.rows(), |x2| {
                crate::gpu::nf4_linear::linear_forward(x2, w)
            }),
        }
    }

    /// The input gradient `grad W` of [`BaseLinear::forward`] for `grad: [..., out]`, `[..., in]`
    /// (the weight is frozen: no weight gradient). Records no autograd graph.
    pub fn input_grad(&self, grad: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Nf4(w) => phases::within(CPU_NF4, || {
                on_rows(grad, w.rows, w.cols, |g| nf4_input_grad(g, w))
            }),
            Self::Dense { weight_t } => phases::within("base GEMMs", || {
                broadcast_matmul(grad, &weight_t.detach().t()?)
            }),
            #[cfg(feature = "cuda")]
            Self::Nf4Cuda(w) => on_rows(grad, w.rows(), w.cols(), |g| {
                crate::gpu::nf4_linear::linear_input_grad(g, w)
            }),
        }
    }

    /// `acc + x Wᵀ` for `acc: [..., out]` and `x: [..., in]` over the same rows. Where the
    /// product can add as it writes (cuBLAS with `beta = 1` on the GPU, the dense CPU path) the
    /// sum lands in `acc`'s memory, so `acc` must be a fresh result no other tensor reads (the
    /// written-out backward's); elsewhere it is the product plus `acc`. Records no autograd
    /// graph when it adds in place.
    pub fn add_forward(&self, acc: Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense { weight_t } => {
                phases::within("base GEMMs", || add_product_or_sum(acc, x, weight_t))
            }
            #[cfg(feature = "cuda")]
            Self::Nf4Cuda(w) => in_rows(acc, x, |acc, x| {
                crate::gpu::nf4_linear::linear_add_forward(acc, x, w)
            }),
            _ => acc + self.forward(x)?,
        }
    }

    /// `acc + grad W` for `acc: [..., in]` and `grad: [..., out]`: [`BaseLinear::input_grad`]
    /// added into `acc` as [`BaseLinear::add_forward`] adds. Records no autograd graph.
    pub fn add_input_grad(&self, acc: Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense { weight_t } => phases::within("base GEMMs", || {
                add_product_or_sum(acc, grad, &weight_t.detach().t()?)
            }),
            #[cfg(feature = "cuda")]
            Self::Nf4Cuda(w) => in_rows(acc, grad, |acc, g| {
                crate::gpu::nf4_linear::linear_add_input_grad(acc, g, w)
            }),
            _ => acc + self.input_grad(grad)?,
        }
    }

    /// Bytes this linear keeps resident.
    pub fn resident_bytes(&self) -> usize {
        match self {
            Self::Nf4(w) => w.resident_bytes(),
            Self::Dense { weight_t } => weight_t.elem_count() * weight_t.dtype().size_in_bytes(),
            #[cfg(feature = "cuda")]
            Self::Nf4Cuda(w) => w.resident_bytes(),
        }
    }
}

/// Applies `op`, a product over `[m, cols]` rows, to `x: [..., cols]` flattened to rows, and
/// restores the leading dims around the `rows` outputs (for the input gradient, `cols` is the
/// weight's rows and `rows` its columns).
fn on_rows(
    x: &Tensor,
    cols: usize,
    rows: usize,
    op: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("NF4 linear expects [..., {cols}] input, got a scalar");
    };
    if last != cols {
        candle_core::bail!("NF4 linear expects {cols} input features, got shape {dims:?}");
    }
    let m: usize = lead.iter().product();
    let y = op(&x.reshape((m, cols))?.contiguous()?)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(rows);
    y.reshape(out_dims)
}

/// `acc + lhs · rhs` over `lhs`'s and `acc`'s rows: in `acc`'s memory when none of them is
/// tracked by autograd and they share a dtype ([`add_product`]), else a plain sum.
fn add_product_or_sum(acc: Tensor, lhs: &Tensor, rhs: &Tensor) -> candle_core::Result<Tensor> {
    let untracked = !(acc.track_op() || lhs.track_op() || rhs.track_op());
    let one_dtype = acc.dtype() == lhs.dtype() && lhs.dtype() == rhs.dtype();
    if untracked && one_dtype {
        return in_rows(acc, lhs, |acc, lhs| {
            add_product(acc, &lhs.contiguous()?, rhs)
        });
    }
    acc + broadcast_matmul(lhs, rhs)?
}

/// Applies `op`, which adds a product over `[m, _]` rows into `acc: [m, _]`, to `acc` and
/// `input` flattened to rows (they must list the same rows), keeping `acc`'s shape.
fn in_rows(
    acc: Tensor,
    input: &Tensor,
    op: impl FnOnce(Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (shape, rows) = (acc.shape().clone(), input.dims());
    let (Some((&width, lead)), Some((&out, acc_lead))) =
        (rows.split_last(), shape.dims().split_last())
    else {
        candle_core::bail!("base linear sum: expected [..., features] tensors, got scalars");
    };
    if lead != acc_lead {
        candle_core::bail!(
            "base linear sum: the input {rows:?} and the sum {:?} list different rows",
            shape.dims()
        );
    }
    let m: usize = lead.iter().product();
    let sum = op(acc.reshape((m, out))?, &input.reshape((m, width))?)?;
    sum.reshape(shape)
}

fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 input, got {:?}", storage.dtype());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    Ok(&data[start..end])
}

fn rows_of(op: &str, layout: &Layout, cols: usize) -> candle_core::Result<usize> {
    match layout.dims() {
        [m, c] if *c == cols => Ok(*m),
        dims => candle_core::bail!("{op}: expected [m, {cols}], got {dims:?}"),
    }
}

/// Forward: `x [m, in] -> x Wᵀ [m, out]`.
struct Nf4LinearOp {
    weight: Arc<Nf4Weight>,
}

impl CustomOp1 for Nf4LinearOp {
    fn name(&self) -> &'static str {
        "nf4-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.weight;
        let x = contiguous_f32(self.name(), storage, layout)?;
        let m = rows_of(self.name(), layout, w.cols)?;
        let mut y = vec![0.0f32; m * w.rows];
        kernels::linear_forward(x, m, w, &mut y).map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(y), Shape::from((m, w.rows))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // W is frozen: only the input gradient, dequantizing W again instead of keeping it.
        nf4_input_grad(grad_res, &self.weight).map(Some)
    }
}

/// `grad_y [m, out] -> grad_y W [m, in]`, no autograd graph.
fn nf4_input_grad(grad_y: &Tensor, weight: &Arc<Nf4Weight>) -> candle_core::Result<Tensor> {
    grad_y
        .contiguous()?
        .apply_op1_no_bwd(&Nf4LinearInputGradOp {
            weight: weight.clone(),
        })
}

/// Backward: `grad_y [m, out] -> grad_y W [m, in]`.
struct Nf4LinearInputGradOp {
    weight: Arc<Nf4Weight>,
}

impl CustomOp1 for Nf4LinearInputGradOp {
    fn name(&self) -> &'static str {
        "nf4-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.weight;
        let g = contiguous_f32(self.name(), storage, layout)?;
        let m = rows_of(self.name(), layout, w.rows)?;
        let mut gx = vec![0.0f32; m * w.cols];
        kernels::linear_backward_input(g, m, w, &mut gx).map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(gx), Shape::from((m, w.cols))))
    }
}

/// The dtype every host computation runs in.
pub const COMPUTE_DTYPE: DType = DType::F32;
