//! The fused SwiGLU (`swiglu.cu`) on candle's stream: the CUDA side of `model::fused::swiglu`.

use candle_core::{CudaStorage, Layout};

use super::fused::{FusedKernel, Param, Scalar, elementwise_grid, expect_lengths};
use super::kernels::SWIGLU;

/// Which kernel: the forward product, both gradients in one pass, or one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// `(gate, up) -> silu(gate) · up`.
    Forward,
    /// `(gate, up, grad) -> d gate`.
    GradGate,
    /// `(gate, grad) -> d up`.
    GradUp,
    /// `(gate, up, grad) -> [d gate, d up]`, one output of twice the inputs' length.
    Grads,
}

impl Pass {
    const fn kernel(self) -> FusedKernel {
        let (name, inputs): (_, &[Param]) = match self {
            Self::Forward => ("swiglu_fwd", &[Param::Float; 2]),
            Self::GradGate => ("swiglu_bwd_gate", &[Param::Float; 3]),
            Self::GradUp => ("swiglu_bwd_up", &[Param::Float; 2]),
            Self::Grads => ("swiglu_bwd", &[Param::Float; 3]),
        };
        FusedKernel {
            source: &SWIGLU,
            name,
            inputs,
            output: Param::Float,
        }
    }
}

/// Runs `pass` over `n` elements of each input (contiguous, one dtype): `n` outputs, `2 n` for
/// [`Pass::Grads`].
pub fn run(
    pass: Pass,
    inputs: &[(&CudaStorage, &Layout)],
    n: usize,
) -> candle_core::Result<CudaStorage> {
    expect_lengths("swiglu", inputs, n)?;
    let out_len = match pass {
        Pass::Grads => n * 2,
        _ => n,
    };
    // SAFETY: each kernel's signature is (inputs..., out, u64 n), its inputs as declared in
    // `Pass::kernel` (checked by `launch`) and `n` long (checked above); it reads `n` values of
    // each input and writes all `out_len` of the output (grid-stride loop over `n`, writing
    // `i` and, for both gradients, `n + i`).
    unsafe {
        pass.kernel().launch(
            inputs,
            out_len,
            &[Scalar::U64(n as u64)],
            elementwise_grid(n),
        )
    }
}
