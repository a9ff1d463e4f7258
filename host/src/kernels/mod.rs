//! Host kernels for NF4 weights: SIMD (AVX2 + FMA, detected at run time) where the CPU has it,
//! portable Rust otherwise, parallel with rayon.
//!
//! * [`dequantize_rows`], [`dequantize_into`]: bit-identical to the core's reference
//!   dequantization.
//! * [`matvec`]: the fused NF4 matrix-vector product; it never materializes the weight.
//! * [`linear_forward`], [`linear_backward_input`]: the frozen linear for a batch, dequantizing
//!   tile by tile into counted scratch ([`live_dequantized_bytes`], [`peak_dequantized_bytes`]).
//!
//! No f32 copy of the weight or of its absmax is kept between calls: the absmax is rebuilt from
//! its 8-bit code per block as the kernels go.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod dequant;
mod error;
mod isa;
mod linear;
mod matvec;
mod scalar;
mod scratch;
#[cfg(test)]
mod testutil;
pub(crate) mod view;

pub use dequant::{
    DequantElement, dequantize_into, dequantize_into_with, dequantize_rows, dequantize_rows_with,
};
pub use error::KernelError;
pub use isa::Isa;
pub use linear::{MAX_TILE_BYTES, linear_backward_input, linear_forward};
pub use matvec::{matvec, matvec_with};
pub use scratch::{
    DequantScratch, live_dequantized_bytes, peak_dequantized_bytes, reset_peak_dequantized_bytes,
};
