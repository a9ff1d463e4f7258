//! The fused SwiGLU (`swiglu.cu`) on candle's stream: the CUDA side of `model::fused::swiglu`.

use candle_core::{CudaStorage, Layout};

use super::fused::{FusedKernel, Param, Scalar, elementwise_grid, expect_lengths};
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
        let (name, inputs): (_, &[Param]) = match self {
            Self::Forward => ("swiglu_fwd", &[Param::Float; 2]),
            Self::GradGate => ("swiglu_bwd_gate", &[Param::Float; 3]),
            Self::GradUp => ("swiglu_bwd_up", &[Param::Float; 2]),
        };
        FusedKernel {
            source: &SWIGLU,
            name,
            inputs,
            output: Param::Float,
        }
    }
}

/// Runs `pass` over `n` elements of each input (contiguous, one dtype).
pub fn run(
    pass: Pass,
    inputs: &[(&CudaStorage, &Layout)],
    n: usize,
) -> candle_core::Result<CudaStorage> {
    expect_lengths("swiglu", inputs, n)?;
    // SAFETY: each kernel's signature is (inputs..., out, u64 n), its inputs as declared in
    // `Pass::kernel` (checked by `launch`) and `n` long (checked above); it reads and writes
    // exactly `n` values of each (grid-stride loop).
    unsafe {
        pass.kernel()
            .launch(inputs, n, &[Scalar::U64(n as u64)], elementwise_grid(n))
    }
}
