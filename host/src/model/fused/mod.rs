//! Fused ops: chains of small tensor ops done in one pass as candle custom ops, each with a CPU
//! implementation (the reference) and a CUDA kernel, and each with its unfused chain kept so
//! that [`Fusions`] can switch it off for a before/after measurement.

pub mod add_product;
mod cpu;
pub mod cross_entropy;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;
#[cfg(test)]
pub(crate) mod test_support;

use candle_core::{Layout, Shape};

/// The one shape all of a fused op's inputs have (CPU and CUDA alike); an error naming `op`
/// when they differ.
fn common_shape<'a>(op: &str, layouts: &[&'a Layout]) -> candle_core::Result<&'a Shape> {
    let first = layouts[0].shape();
    if layouts.iter().any(|l| l.shape() != first) {
        let shapes: Vec<_> = layouts.iter().map(|l| l.dims()).collect();
        candle_core::bail!("{op}: the inputs' shapes differ: {shapes:?}");
    }
    Ok(first)
}

/// `[2, dims...]`: the shape of an op's two outputs of `shape` written into one buffer (the
/// op's caller splits it with `get(0)`, `get(1)`: views, no copy). candle's custom ops return
/// one tensor; a kernel that makes two writes both in one pass this way.
fn stacked(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(shape.dims());
    Shape::from(dims)
}

/// Which fused ops the model uses. All on by default; the benchmark switches them off one at a
/// time to measure what each one gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Fusions {
    /// The attention softmax with its scale and causal mask ([`softmax::causal_softmax`]).
    pub softmax: bool,
    /// The MLP's `silu(gate) · up` ([`swiglu::swiglu`]).
    pub swiglu: bool,
    /// RMSNorm's statistics, scaling and weight ([`rms_norm::rms_norm`]).
    pub rms_norm: bool,
    /// The rotary position embedding of queries and keys ([`rope::rope`]).
    pub rope: bool,
    /// In the written-out layer backward, RoPE splitting q and k into heads as it rotates them
    /// (and merging their gradients back as it rotates those): one pass each instead of a copy
    /// and a rotation ([`rope::rope_split_heads`]). No effect without `layer_backward`.
    pub rope_heads: bool,
    /// In the written-out layer backward, each residual sum that an RMSNorm reads next (or
    /// whose gradient meets the norm's) fused into the norm's pass: the attention block's
    /// output sum and the MLP's input norm in one kernel ([`rms_norm::residual_rms_norm`]),
    /// and each block's input gradient as the norm's gradient plus the residual's in one
    /// ([`rms_norm::rms_norm_backward_add`]). No effect without `layer_backward`.
    pub residual_norm: bool,
    /// In the written-out layer backward, SwiGLU's two gradients from one pass over its
    /// inputs ([`swiglu::swiglu_backward`]) instead of one pass each. No effect without
    /// `layer_backward` (autograd's backward of [`swiglu::swiglu`] always takes the one pass).
    pub swiglu_grads: bool,
    /// The loss's log-softmax and target pick over the vocabulary
    /// ([`cross_entropy::cross_entropy`]).
    pub cross_entropy: bool,
    /// The LoRA path's scale applied to the rank-wide product `A x` instead of the output-wide
    /// `B A x` ([`crate::model::lora::LoraModule::delta`]): the same sum, one pass over
    /// `[tokens, out]` less forward and backward. A reordering, not a kernel.
    pub lora_scale: bool,
    /// The decoder layer's backward written out ([`crate::model::backward`]) instead of
    /// candle's autograd, in training with recomputation. It needs the fused ops above, so
    /// switching any of them off also means autograd.
    pub layer_backward: bool,
    /// In the written-out layer backward, the LoRA path's products added into an existing sum
    /// by the product itself ([`add_product::add_product`]: cuBLAS with beta = 1 on a GPU)
    /// instead of a separate sum: into the base results when `base_add` is off, else into the
    /// input gradient of a linear that shares its input with one before it. No effect without
    /// `layer_backward`.
    pub lora_add: bool,
    /// In the written-out layer backward, each adapted linear's adapter term written first and
    /// the base product added into it by its GEMM (cuBLAS with beta = 1 on a GPU, where the
    /// compute-bound product's epilogue reads the sum instead of a memory-bound pass reading and
    /// writing the base's output again); the input gradients of the linears that share an input
    /// added into one sum the same way. No effect without `layer_backward`.
    pub base_add: bool,
    /// In the written-out layer backward, the adapters of the linears that read one input
    /// (q, k, v; gate, up) multiply it by their stacked `A`s in one product, and their
    /// input-gradient terms come from one product over the stacked ranks: the shared input
    /// read once instead of once per linear, and one input-gradient term written instead of
    /// one written and others added. Only without dropout (each module draws its own mask).
    /// No effect without `layer_backward`.
    pub lora_stack: bool,
    /// In the written-out layer backward, the causal attention in query chunks that multiply
    /// and keep only the keys they see (`crate::model::backward`'s `attention`): about 5/8 of
    /// the whole score matrix's products and traffic at 4 chunks. No effect without
    /// `layer_backward`.
    pub causal_chunks: bool,
    /// The optimizer's masked AdamW as three in-place ops per adapter matrix on the trained
    /// ranks ([`crate::train::adamw_fused`]) instead of ~55 candle ops. The same values.
    pub adamw: bool,
    /// With `adamw` on a GPU, every adapter matrix's update in one kernel launch that reads
    /// the matrices from a table ([`crate::train::adamw_fused::update_all`]) instead of three
    /// launches per matrix. The same values.
    pub adamw_multi: bool,
}

impl Fusions {
    /// Every fusion on.
    pub const ALL: Self = Self {
        softmax: true,
        swiglu: true,
        rms_norm: true,
        rope: true,
        rope_heads: true,
        residual_norm: true,
        swiglu_grads: true,
        cross_entropy: true,
        lora_scale: true,
        layer_backward: true,
        lora_add: true,
        base_add: true,
        lora_stack: true,
        causal_chunks: true,
        adamw: true,
        adamw_multi: true,
    };
    /// Every fusion off: the unfused chains.
    pub const NONE: Self = Self {
        softmax: false,
        swiglu: false,
        rms_norm: false,
        rope: false,
        rope_heads: false,
        residual_norm: false,
        swiglu_grads: false,
        cross_entropy: false,
        lora_scale: false,
        layer_backward: false,
        lora_add: false,
        base_add: false,
        lora_stack: false,
        causal_chunks: false,
        adamw: false,
        adamw_multi: false,
    };
}

impl Default for Fusions {
    fn default() -> Self {
        Self::ALL
    }
}
