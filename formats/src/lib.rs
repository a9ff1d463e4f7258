//! The bytes that move between the trainer, the devices and the tools users already have.
//!
//! * [`bundle`]: the nested adapter bundle, where the rank-`r` adapter is a byte prefix of the file.
//! * [`device_model`]: the device model container (NF4 + double-quant linears, dense vectors).
//! * `hf`, `bnb`, `peft` (feature `std`): safetensors bridges to HF LLaMA checkpoints,
//!   bitsandbytes 4-bit checkpoints as transformers writes them, and PEFT LoRA adapters.
//!
//! The readers are `no_std`, allocation-free and zero-copy: they validate every offset and length
//! against the buffer with checked arithmetic and answer bad input with a [`FormatError`]. The
//! layouts are specified in `formats/FORMAT.md`.
#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod bundle;
pub mod device_model;
mod elem_view;
mod error;
mod le;

pub use elem_view::ElemView;
pub use error::{Field, FormatError, ModelTensor};

#[cfg(feature = "std")]
mod aligned;
#[cfg(feature = "std")]
pub mod atomic;
#[cfg(feature = "std")]
pub mod bnb;
#[cfg(feature = "std")]
mod encode;
#[cfg(feature = "std")]
mod error_std;
#[cfg(feature = "std")]
pub mod fingerprint;
#[cfg(feature = "std")]
pub mod hf;
#[cfg(feature = "std")]
mod nf4_weight;
#[cfg(feature = "std")]
pub mod peft;
#[cfg(feature = "std")]
mod pyjson;
#[cfg(feature = "std")]
mod st;

#[cfg(feature = "std")]
pub use aligned::AlignedBytes;
#[cfg(feature = "std")]
pub use error_std::Error;
#[cfg(feature = "std")]
pub use nf4_weight::Nf4Weight;
