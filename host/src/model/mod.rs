//! The model: frozen (NF4 or dense) linears, LoRA/DyLoRA adapters, the LLaMA decoder, loading.
pub mod fused;
pub mod linear;
pub mod llama;
pub mod load;
pub mod lora;
pub mod place;
