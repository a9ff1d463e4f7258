//! Opening the GPU. cudarc's dynamic loading panics on the first driver call when `libcuda`
//! cannot be opened, so the library is probed with cudarc's own non-panicking check first.
//!
//! Not yet run on a GPU (see the module notes in `gpu`).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaStream};

/// Device 0 with its context, the stream every kernel runs on, and what it is.
pub struct Gpu {
    /// The primary context of device 0.
    pub ctx: Arc<CudaContext>,
    /// The context's default stream (one stream: no cross-stream event tracking).
    pub stream: Arc<CudaStream>,
    /// The device name the driver reports.
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors, for sizing grid-stride launches.
    pub multiprocessors: u32,
}

impl Gpu {
    /// Opens device 0, or says in one line why there is no usable GPU.
    pub fn open() -> Result<Self> {
        // SAFETY: only tries to dlopen the candidate library names; no CUDA call is made.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!(
                "no CUDA driver/GPU: the NVIDIA driver library (libcuda.so.1) could not be loaded"
            );
        }
        let count = CudaContext::device_count()
            .map_err(|e| anyhow::anyhow!("no CUDA driver/GPU: the driver did not start: {e}"))?;
        if count < 1 {
            bail!("no CUDA driver/GPU: the driver reports no CUDA device");
        }
        let ctx = CudaContext::new(0)
            .map_err(|e| anyhow::anyhow!("no CUDA driver/GPU: opening device 0 failed: {e}"))?;
        let name = ctx.name().context("reading the device name")?;
        let compute_capability = ctx
            .compute_capability()
            .context("reading the compute capability")?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .context("reading the multiprocessor count")?;
        let stream = ctx.default_stream();
        Ok(Self {
            ctx,
            stream,
            name,
            compute_capability,
            multiprocessors: u32::try_from(multiprocessors.max(1)).unwrap_or(1),
        })
    }

    /// NVRTC's `--gpu-architecture` for this device, e.g. `compute_90`.
    pub fn nvrtc_arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("compute_{major}{minor}")
    }
}
