//! The fused SwiGLU (`swiglu.cu`) on candle's stream: the CUDA side of `model::fused::swiglu`.

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, Layout};

use super::fused::{FusedKernel, Scalar, elementwise_grid, expect_lengths};
use super::kernels::SWIGLU;

/// Which kernel: the forward product or one of the two gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// `(gate, up) -> silu(gate) · up`.
    Forward,
    /// `(gate, up, grad) -> d gate`.
    GradGate,
    /// `(gate, grad) -> d up`.
    GradUp,
}

impl Pass {
    const fn kernel(self) -> FusedKernel {
        let name = match self {
            Self::Forward => "swiglu_fwd",
            Self::GradGate => "swiglu_bwd_gate",
            Self::GradUp => "swiglu_bwd_up",
        };
        FusedKernel {
            source: &SWIGLU,
            name,
        }
    }

    /// How many inputs the kernel takes.
    pub const fn inputs(self) -> usize {
        match self {
            Self::Forward | Self::GradUp => 2,
            Self::GradGate => 3,
        }
    }
}

/// Runs `pass` over `n` elements of each input (contiguous, one dtype).
pub fn run(
    pass: Pass,
    inputs: &[(&CudaStorage, &Layout)],
    n: usize,
) -> candle_core::Result<CudaStorage> {
    if inputs.len() != pass.inputs() {
        candle_core::bail!(
            "swiglu {pass:?}: {} inputs, expected {}",
            inputs.len(),
            pass.inputs()
        );
    }
    expect_lengths("swiglu", inputs, n)?;
    // SAFETY: each kernel's signature is (inputs..., out, u64 n) with the input count and
    // lengths checked above; it reads and writes exactly `n` values of each (grid-stride loop).
    unsafe {
        pass.kernel().launch(
            inputs,
            inputs[0].0.dtype(),
            n,
            &[Scalar::U64(n as u64)],
            elementwise_grid(n),
        )
    }
}
