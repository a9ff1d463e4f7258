//! Fused ops: chains of small tensor ops done in one pass as candle custom ops, each with a CPU
//! implementation (the reference) and a CUDA kernel, and each with its unfused chain kept so
//! that [`Fusions`] can switch it off for a before/after measurement.

mod cpu;
pub mod softmax;
pub mod swiglu;

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

/// Which fused ops the model uses. All on by default; the benchmark switches them off one at a
/// time to measure what each one gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Fusions {
    /// The attention softmax with its scale and causal mask ([`softmax::causal_softmax`]).
    pub softmax: bool,
    /// The MLP's `silu(gate) · up` ([`swiglu::swiglu`]).
    pub swiglu: bool,
}

impl Fusions {
    /// Every fusion on.
    pub const ALL: Self = Self {
        softmax: true,
        swiglu: true,
    };
    /// Every fusion off: the unfused chains.
    pub const NONE: Self = Self {
        softmax: false,
        swiglu: false,
    };
}

impl Default for Fusions {
    fn default() -> Self {
        Self::ALL
    }
}
