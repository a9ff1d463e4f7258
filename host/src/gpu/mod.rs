//! NF4 kernels on an NVIDIA GPU through cudarc: the driver API and NVRTC, both opened with
//! dlopen at run time, so the `cuda` build needs no CUDA toolkit (issue 7, first slice).
//!
//! **Not yet run on a GPU.** This module was written and compiled in a session without one; the
//! `qdylora gpu-dequant` command checks the kernel bit for bit against `qdylora-core` on the CPU
//! and fails when they differ, so its first run on a GPU machine is also its first test.
//!
//! * [`device`]: opens device 0, with an error (never a panic) when the driver library, NVRTC
//!   or a device is missing.
//! * [`dequant`]: NF4 + double-quant dequantization to f32 and bf16, compiled by NVRTC.
//! * [`traffic`]: the bytes a dequantization reads and writes (for effective GB/s).

pub mod dequant;
pub mod device;
pub mod traffic;

pub use dequant::{DeviceNf4Weight, Nf4DequantKernels};
pub use device::Gpu;
pub use traffic::DequantTraffic;
