//! The QDyLoRA trainer: quantize → train → sweep → export, on candle (CPU by default).
pub mod cli;
pub mod demo;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod phases;
pub mod plot;
pub mod sweep;
pub mod train;
