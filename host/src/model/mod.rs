//! The model: frozen (NF4 or dense) linears, LoRA/DyLoRA adapters, the LLaMA decoder and its
//! written-out layer backward, loading.
pub mod backward;
pub mod fused;
pub mod linear;
pub mod llama;
pub mod load;
pub mod lora;
pub mod matmul;
pub mod place;
