//! `--device cpu|cuda` for the commands that can run on a GPU: CPU work computes in f32, GPU
//! work in bf16 (this project's NF4 kernels plus candle's CUDA backend; `cuda` feature only).

use anyhow::Result;
use candle_core::{DType, Device};
use clap::ValueEnum;
use serde::Serialize;

/// Where a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum DeviceArg {
    /// The CPU (f32).
    Cpu,
    /// CUDA device 0 (bf16; needs a binary built with the `cuda` feature).
    Cuda,
}

/// The device and the activations' dtype for `arg`, or a one-line reason it cannot be had.
pub fn open(arg: DeviceArg) -> Result<(Device, DType)> {
    match arg {
        DeviceArg::Cpu => Ok((Device::Cpu, DType::F32)),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda => Ok((crate::gpu::open_candle_device()?, DType::BF16)),
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda => anyhow::bail!(
            "qdylora was built without the cuda feature: build the GPU binary with \
             bench/build-cuda.sh (cargo build --release -p qdylora --features cuda)"
        ),
    }
}

/// A short name for reports.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        other => format!("{:?}", other.location()),
    }
}

/// Peak device memory in bytes since the process started, and what counter it comes from
/// (GPU only).
pub fn peak_bytes(device: &Device) -> Result<Option<(u64, &'static str)>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            use crate::gpu::memory;
            Ok(Some((
                memory::peak_bytes(dev)?,
                memory::counter(dev).describe(),
            )))
        }
        _ => Ok(None),
    }
}
