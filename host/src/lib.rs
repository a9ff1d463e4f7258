//! The QDyLoRA trainer: quantize → train → sweep → export, on candle (CPU by default).
pub mod kernels;
