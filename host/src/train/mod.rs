//! Training: data, loss and evaluation, the masked optimizer, the DyLoRA loop and its driver.
pub mod adamw_fused;
pub mod data;
pub mod eval;
pub mod optim;
pub mod recompute;
pub mod run;
pub mod trainer;
