//! NF4 kernels on an NVIDIA GPU, on candle's CUDA device (issue 7): the project's CUDA C
//! compiled by NVRTC at run time and launched through cudarc on candle's context and stream,
//! next to candle's own kernels and cuBLAS.
//!
//! **Not yet run on a GPU.** This module was written and compiled in sessions without one; the
//! `qdylora gpu-dequant` command checks the dequantization kernel bit for bit against
//! `qdylora-core` on the CPU, and the NF4 linear (forward and input gradient) against a CPU
//! product, and fails when they differ, so its first run on a GPU machine is also their first
//! test.
//!
//! * [`device`]: opens device 0 through candle, with one error line (never a panic) when the
//!   driver has no usable GPU.
//! * [`kernels`]: the CUDA C sources, compiled once per process and loaded into candle.
//! * [`weight`]: an NF4 + double-quant weight on the GPU, uploaded or random.
//! * [`dequant`]: NF4 + double-quant dequantization to f32 and bf16.
//! * [`nf4_linear`]: the frozen linear `x Wᵀ` as a candle op, dequantizing into scratch for the
//!   forward pass and again for the input gradient.
//! * [`causal_softmax`]: the fused attention softmax (scale, causal mask, f32 statistics),
//!   forward and backward; the CUDA side of `model::fused::softmax`.
//! * [`fused`]: the one launcher of the fused-op kernels (inputs, output, scalars).
//! * [`swiglu`]: the fused SwiGLU, forward and backward; the CUDA side of
//!   `model::fused::swiglu`.
//! * [`rms_norm`]: the fused RMSNorm, forward and the input gradient; the CUDA side of
//!   `model::fused::rms_norm`.
//! * [`rope`]: the fused rotary position embedding (the backward is the inverse rotation);
//!   the CUDA side of `model::fused::rope`.
//! * [`cross_entropy`]: the fused cross-entropy of the loss, forward and backward; the CUDA
//!   side of `model::fused::cross_entropy`.
//! * [`add_product`]: `acc += lhs · rhs` by cuBLAS with beta = 1; the CUDA side of
//!   `model::fused::add_product` (the LoRA path's sums in the written-out layer backward).
//! * [`adamw`]: the masked AdamW update of an adapter matrix, or of every matrix of the step in
//!   one launch, in place; the CUDA side of `train::adamw_fused`.
//! * [`memory`]: bytes in use and their peak, for the benchmark.
//! * [`traffic`]: the bytes a dequantization reads and writes (for effective GB/s).

pub mod adamw;
pub mod add_product;
pub mod causal_softmax;
pub mod cross_entropy;
pub mod dequant;
pub mod device;
pub mod fused;
pub mod kernels;
pub mod memory;
pub mod nf4_linear;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
pub mod traffic;
pub mod weight;

pub use dequant::{DequantElement, dequantize, dequantize_into};
pub use device::{Gpu, open_candle_device};
pub use nf4_linear::linear_forward;
pub use traffic::DequantTraffic;
pub use weight::{CudaNf4Weight, Nf4Layout};
