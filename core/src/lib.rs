//! QDyLoRA core: the parts every other crate and the firmware stand on.
//!
//! * [`nf4`]: the 4-bit NormalFloat code, blockwise quantization and nibble packing, bit-exact with
//!   bitsandbytes' CUDA `quantize_4bit(quant_type="nf4")`.
//! * [`dynamic_map`] and [`double_quant`]: the 8-bit compression of the absmax constants
//!   (`compress_statistics=True`).
//! * [`rank`]: the nested-rank rules of DyLoRA adapters: slicing, scale, prefix bytes and budgets.
//! * [`kernels`]: small f32-accumulating kernels for devices (NF4 matvec, rank-r LoRA).
//! * [`infer`]: one decoder step of a LLaMA-family model over borrowed weights, with static scratch.
//!
//! `#![no_std]` and no `alloc`: every output goes into a caller-provided buffer and every
//! reachable failure is an [`Error`], never a panic.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod double_quant;
pub mod dynamic_map;
mod element;
mod error;
pub mod infer;
pub mod kernels;
pub mod nf4;
pub mod rank;

pub use element::{Element, ElementSource, ElementType};
pub use error::{Buffer, Error};
