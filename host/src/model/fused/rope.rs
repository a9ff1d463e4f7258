//! The rotary position embedding as one op, in the half-split layout: for `x: [..., t, d]`
//! and tables `cos, sin: [t, d/2]` (one dtype), each row at position `p` pairs its two halves
//! `(x1, x2)` and rotates them, `(x1·cos - x2·sin, x2·cos + x1·sin)`, math in f32.
//!
//! Unfused, the forward is seven passes (two narrows, four products, a difference, a sum, a
//! concatenation, each rounding in bf16) and the backward as many; fused, one. A rotation's
//! gradient is the inverse rotation, which is the same op with `sin` negated (exact in any
//! float type), so the backward is the forward kernel with a sign. The CPU loop below is the
//! reference the CUDA kernel (`gpu/rope.cu`) mirrors formula for formula: with no
//! transcendental inside, they agree bit for bit.
//!
//! The written-out layer backward also rotates while it moves rows between a linear's output
//! order `[b, t, heads, d]` and the attention's `[b, heads, t, d]`
//! ([`rope_split_heads`], [`rope_backward_merge_heads`]): the copy that splits or merges the
//! heads is then the rotation's own read and write, not a pass of its own.

use candle_core::{CpuStorage, CustomOp3, D, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{Element, cpu_inputs, each_dtype};

/// `x: [..., t, d]` rotated by `cos, sin: [t, d/2]` (constants: they get no gradient).
/// Differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    check_shapes(x.dims(), cos.dims(), sin.dims())?;
    if x.dtype() != cos.dtype() || x.dtype() != sin.dtype() {
        candle_core::bail!(
            "rope: x is {:?}, the tables {:?} and {:?}",
            x.dtype(),
            cos.dtype(),
            sin.dtype()
        );
    }
    if cos.track_op() || sin.track_op() {
        candle_core::bail!("rope: the cos/sin tables must be constants, not tracked tensors");
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope::in_place_order(Direction::Forward),
    )
}

/// The gradient of [`rope`] with respect to `x`: `grad` (any float dtype, rounded to the
/// tables') rotated back by the same angles. Records no autograd graph.
pub fn rope_backward(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    check_shapes(grad.dims(), cos.dims(), sin.dims())?;
    rotate_no_grad(grad, cos, sin, Direction::Inverse)
}

fn rotate_no_grad(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    direction: Direction,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?.to_dtype(cos.dtype())?;
    let op = Rope::in_place_order(direction);
    x.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)
}

/// A linear's output `y: [b, t, heads · d]` split into heads and rotated: `[b, heads, t, d]`,
/// the same values as [`rope`] of the split heads, in one pass. Records no autograd graph (for
/// the written-out layer backward, whose gradient is [`rope_backward_merge_heads`]).
pub fn rope_split_heads(
    y: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, t, width) = y.dims3()?;
    if heads == 0 || !width.is_multiple_of(heads) {
        candle_core::bail!("rope: {width} features are not {heads} heads");
    }
    let y = y.contiguous()?.reshape((b, t, heads, width / heads))?;
    let op = Rope {
        direction: Direction::Forward,
        input: RowOrder::Tokens,
        output: RowOrder::Heads,
    };
    y.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)
}

/// The gradient of [`rope_split_heads`]: `grad: [b, heads, t, d]` (rounded to the tables'
/// dtype) rotated back and its heads merged, `[b, t, heads · d]`, in one pass.
pub fn rope_backward_merge_heads(
    grad: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, heads, t, d) = grad.dims4()?;
    let grad = grad.contiguous()?.to_dtype(cos.dtype())?;
    let op = Rope {
        direction: Direction::Inverse,
        input: RowOrder::Heads,
        output: RowOrder::Tokens,
    };
    let merged = grad.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)?;
    merged.reshape((b, t, heads * d))
}

/// The chain [`rope`] replaces (kept for the before/after measurement).
pub fn rope_unfused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[&r1, &r2], D::Minus1)
}

/// `(t, d)` of `x: [..., t, d]` when the tables are `[t, d/2]` and `d` is even and non-zero.
fn check_shapes(x: &[usize], cos: &[usize], sin: &[usize]) -> candle_core::Result<(usize, usize)> {
    if let ([.., t, d], &[ct, half]) = (x, cos)
        && cos == sin
        && *d > 0
        && d % 2 == 0
        && ct == *t
        && half == d / 2
    {
        return Ok((*t, *d));
    }
    candle_core::bail!(
        "rope: x {x:?} needs [..., t, d] with tables [t, d/2], got {cos:?} and {sin:?}"
    )
}

/// Which way to rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// By `+angle` (the forward pass).
    Forward,
    /// By `-angle`: the forward's gradient.
    Inverse,
}

impl Direction {
    /// The factor on `sin`.
    pub fn sign(self) -> f32 {
        match self {
            Self::Forward => 1.0,
            Self::Inverse => -1.0,
        }
    }
}

/// The order of a tensor's rows of `d` values: how its `b`, `heads` and `t` indices nest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOrder {
    /// `[b, heads, t, d]`: the attention's order (and any `[..., t, d]`, as one head).
    Heads,
    /// `[b, t, heads, d]`: a linear's output `[b, t, heads · d]`.
    Tokens,
}

/// Where the rows of a rotation come from and go: `t` positions, `heads` heads, and the input's
/// and output's row orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    /// Positions (the tables' rows).
    pub t: usize,
    /// Heads per batch row (1 when both orders are the same: then any leading dims).
    pub heads: usize,
    /// The input's row order.
    pub input: RowOrder,
    /// The output's row order.
    pub output: RowOrder,
}

impl Rows {
    /// Rows of `[..., t, d]` rotated where they are.
    pub fn in_place_order(t: usize) -> Self {
        Self {
            t,
            heads: 1,
            input: RowOrder::Heads,
            output: RowOrder::Heads,
        }
    }

    /// The orders as `rope.cu`'s `orders` argument: bit 0 the input in the tokens order, bit 1
    /// the output.
    pub fn order_bits(&self) -> u32 {
        u32::from(self.input == RowOrder::Tokens)
            | (u32::from(self.output == RowOrder::Tokens) << 1)
    }

    /// For output row `row`: the input row it rotates and its position (as `rope.cu`).
    pub fn source(&self, row: usize) -> (usize, usize) {
        let (t, heads) = (self.t, self.heads);
        let b = row / (t * heads);
        let (head, p) = match self.output {
            RowOrder::Heads => ((row / t) % heads, row % t),
            RowOrder::Tokens => (row % heads, (row / heads) % t),
        };
        let input = match self.input {
            RowOrder::Heads => (b * heads + head) * t + p,
            RowOrder::Tokens => (b * t + p) * heads + head,
        };
        (input, p)
    }
}

/// Rotates whole rows of `d` values: output row `r` is input row `rows.source(r)`, at that
/// position of the tables.
pub fn rotate_rows<T: Element>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    out: &mut [T],
    rows: Rows,
    sign: f32,
) {
    let half = cos.len() / rows.t;
    out.par_chunks_mut(2 * half)
        .enumerate()
        .for_each(|(row, o)| {
            let (source, p) = rows.source(row);
            let x = &x[source * 2 * half..(source + 1) * 2 * half];
            let p = p * half;
            let (o1, o2) = o.split_at_mut(half);
            let (x1, x2) = x.split_at(half);
            for j in 0..half {
                let (c, s) = (cos[p + j].widen(), sign * sin[p + j].widen());
                let (a, b) = (x1[j].widen(), x2[j].widen());
                o1[j] = T::narrow(a * c - b * s);
                o2[j] = T::narrow(b * c + a * s);
            }
        });
}

/// `(x or grad, cos, sin) -> rotated`, the rows moved from the `input` order to the `output`
/// order.
struct Rope {
    direction: Direction,
    input: RowOrder,
    output: RowOrder,
}

impl Rope {
    /// Rows rotated where they are.
    fn in_place_order(direction: Direction) -> Self {
        Self {
            direction,
            input: RowOrder::Heads,
            output: RowOrder::Heads,
        }
    }

    /// The rows and output shape for `x`'s dims and the tables' (`[t, d/2]` each).
    fn rows(
        &self,
        x: &[usize],
        cos: &[usize],
        sin: &[usize],
    ) -> candle_core::Result<(Rows, Shape)> {
        if self.input == self.output {
            let (t, _) = check_shapes(x, cos, sin)?;
            return Ok((Rows::in_place_order(t), Shape::from(x)));
        }
        // [b, s1, s2, d] -> [b, s2, s1, d]: positions are s1 going to the heads order.
        let &[b, s1, s2, d] = x else {
            candle_core::bail!("rope: moving rows between orders needs [b, ., ., d], got {x:?}");
        };
        let (t, heads) = match self.input {
            RowOrder::Tokens => (s1, s2),
            RowOrder::Heads => (s2, s1),
        };
        check_shapes(&[t, d], cos, sin)?;
        let rows = Rows {
            t,
            heads,
            input: self.input,
            output: self.output,
        };
        Ok((rows, Shape::from((b, s2, s1, d))))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, shape) = self.rows(l1.dims(), l2.dims(), l3.dims())?;
        let inputs = cpu_inputs(self.name(), &[(s1, l1), (s2, l2), (s3, l3)])?;
        let sign = self.direction.sign();
        let out = each_dtype!(inputs, |v, out| rotate_rows(
            v[0], v[1], v[2], &mut out, rows, sign
        ));
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, shape) = self.rows(l1.dims(), l2.dims(), l3.dims())?;
        let d = shape.dims().last().copied().unwrap_or_default();
        let tables = [(s2, l2), (s3, l3)];
        let out = crate::gpu::rope::rotate((s1, l1), tables, rows, d, self.direction)?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.input != self.output {
            candle_core::bail!("rope: the ops that move rows between orders record no graph");
        }
        let inverse = match self.direction {
            Direction::Forward => Direction::Inverse,
            Direction::Inverse => Direction::Forward,
        };
        let dx = rotate_no_grad(grad, cos, sin, inverse)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bf16_exact, scaled_diff, weighted_sum_grads};
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Tables of real angles `p · f_j`, as the model makes them.
    fn tables(t: usize, half: usize, dtype: DType) -> (Tensor, Tensor) {
        let angles: Vec<f32> = (0..t)
            .flat_map(|p| (0..half).map(move |j| p as f32 / 10f32.powf(j as f32 / half as f32)))
            .collect();
        let make = |f: fn(f32) -> f32| {
            let v: Vec<f32> = angles.iter().map(|a| f(*a)).collect();
            Tensor::from_vec(v, (t, half), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        (make(f32::cos), make(f32::sin))
    }

    /// Output and d x through `Σ out · weights`.
    fn run(dtype: DType, fused: bool) -> [Tensor; 2] {
        let dims = [2, 3, 7, 10];
        let x = Var::from_tensor(&bf16_exact(&dims, 1, 3.0, dtype)).unwrap();
        let (cos, sin) = tables(7, 5, dtype);
        let weights = bf16_exact(&dims, 3, 1.0, dtype);
        let out = match fused {
            true => rope(x.as_tensor(), &cos, &sin).unwrap(),
            false => rope_unfused(x.as_tensor(), &cos, &sin).unwrap(),
        };
        assert_eq!(out.dtype(), dtype);
        let [dx] = weighted_sum_grads(&out, &weights, [&x]);
        [out, dx]
    }

    #[test]
    fn matches_the_unfused_chain_in_f32() {
        let (fused, plain) = (run(DType::F32, true), run(DType::F32, false));
        for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
            let d = scaled_diff(a, b);
            assert!(d < 1e-6, "output/grad {i}: {d}");
        }
    }

    #[test]
    fn in_bf16_it_is_nearer_the_f32_values_than_the_chain() {
        // The reference has f32 tables: rounding them and the output to bf16 costs up to about
        // two bf16 steps (2^-8 each, relative); the chain rounds every product on top.
        let reference = run(DType::F32, false);
        let (fused, plain) = (run(DType::BF16, true), run(DType::BF16, false));
        for i in 0..2 {
            let ours = scaled_diff(&fused[i], &reference[i]);
            let theirs = scaled_diff(&plain[i], &reference[i]);
            assert!(
                ours < 8e-3 && ours <= theirs,
                "{i}: {ours} vs chain {theirs}"
            );
        }
    }

    #[test]
    fn the_backward_undoes_the_rotation() {
        // A rotation is orthogonal: rotating back recovers x (to f32 rounding), which is what
        // makes the inverse the gradient.
        let x = bf16_exact(&[3, 4, 8], 5, 2.0, DType::F32);
        let (cos, sin) = tables(4, 4, DType::F32);
        let there = rope(&x, &cos, &sin).unwrap();
        let back = rope_backward(&there, &cos, &sin).unwrap();
        assert!(scaled_diff(&back, &x) < 1e-6);
        assert!(scaled_diff(&there, &x) > 0.1, "the tables rotate something");
    }

    /// Splitting a linear's output into heads while rotating gives `rope` of the split heads,
    /// and the merging backward gives the merged `rope_backward`, bit for bit.
    #[test]
    fn splitting_and_merging_heads_is_the_same_rotation() {
        let (b, t, heads, d) = (2, 5, 3, 8);
        for dtype in [DType::F32, DType::BF16] {
            let (cos, sin) = tables(t, d / 2, dtype);
            let y = bf16_exact(&[b, t, heads * d], 7, 3.0, dtype);
            let split = y
                .reshape((b, t, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let want = rope(&split, &cos, &sin).unwrap();
            let ours = rope_split_heads(&y, heads, &cos, &sin).unwrap();
            assert_eq!(ours.dims(), want.dims());
            assert_eq!(scaled_diff(&ours, &want), 0.0, "{dtype:?} split");
            assert!(!ours.track_op());

            let grad = bf16_exact(&[b, heads, t, d], 8, 2.0, dtype);
            let want = rope_backward(&grad, &cos, &sin)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, heads * d))
                .unwrap();
            let ours = rope_backward_merge_heads(&grad, &cos, &sin).unwrap();
            assert_eq!(ours.dims(), want.dims());
            assert_eq!(scaled_diff(&ours, &want), 0.0, "{dtype:?} merge");
        }
        // Features that are not whole heads.
        let (cos, sin) = tables(t, d / 2, DType::F32);
        let y = bf16_exact(&[b, t, heads * d + 1], 7, 3.0, DType::F32);
        assert!(rope_split_heads(&y, heads, &cos, &sin).is_err());
        assert!(rope_split_heads(&y, 0, &cos, &sin).is_err());
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let x = bf16_exact(&[2, 4, 8], 0, 1.0, DType::F32);
        let (cos, sin) = tables(4, 4, DType::F32);
        assert!(rope(&x, &cos, &sin).is_ok());
        let (c3, s3) = tables(3, 4, DType::F32);
        assert!(rope(&x, &c3, &s3).is_err());
        let (c5, s5) = tables(4, 5, DType::F32);
        assert!(rope(&x, &c5, &s5).is_err());
        assert!(rope(&x, &cos, &s3).is_err());
        let odd = bf16_exact(&[2, 4, 7], 0, 1.0, DType::F32);
        assert!(rope(&odd, &cos, &sin).is_err());
        let (cb, sb) = tables(4, 4, DType::BF16);
        assert!(rope(&x, &cb, &sb).is_err());
        let tracked = Var::from_tensor(&cos).unwrap();
        assert!(rope(&x, tracked.as_tensor(), &sin).is_err());
    }
}
