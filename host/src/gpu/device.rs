//! Opening the GPU as candle's CUDA device, which this module's kernels share (one context,
//! one stream).
//!
//! The `cuda` binary links `libcuda.so.1`, so it only starts where the NVIDIA driver library
//! is installed; a machine with the driver but no usable GPU gets one error line from
//! [`Gpu::open`] (the driver's own reason), never a panic.
//!
//! Not yet run on a GPU (see the module notes in `gpu`).

use anyhow::{Context, Result, bail};
use candle_core::{CudaDevice, Device};
use cudarc::driver::{CudaContext, DriverError};

use super::memory;

/// Device 0 as candle's CUDA device, and what it is.
pub struct Gpu {
    /// candle's handle (`Device::Cuda`), for creating tensors.
    pub device: Device,
    /// The same device, for this module's kernels and weights.
    pub cuda: CudaDevice,
    /// The device name the driver reports.
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
}

impl Gpu {
    /// Opens device 0, or says in one line why there is no usable GPU. Also lets the memory
    /// pool keep freed memory ([`memory::keep_freed_memory`]) and switches off cudarc's event
    /// tracking ([`set_event_tracking`]).
    pub fn open() -> Result<Self> {
        // cuInit fails with the driver's reason (e.g. CUDA_ERROR_NO_DEVICE) when there is
        // nothing to open; asking for the count first keeps that message short.
        let count = CudaContext::device_count()
            .map_err(|e| anyhow::anyhow!("no usable CUDA GPU: {}", describe(&e)))?;
        if count < 1 {
            bail!("no usable CUDA GPU: the driver reports no CUDA device");
        }
        let device = Device::new_cuda(0)
            .map_err(|e| anyhow::anyhow!("no usable CUDA GPU: opening device 0 failed: {e}"))?;
        let cuda = match &device {
            Device::Cuda(cuda) => cuda.clone(),
            _ => bail!("candle returned a non-CUDA device for new_cuda(0)"),
        };
        // Keep freed memory in the pool between steps, as PyTorch's caching allocator does,
        // instead of unmapping it at every synchronization (the pool's default).
        memory::keep_freed_memory(&cuda)?;
        set_event_tracking(&cuda, false);
        let ctx = cuda.cuda_stream().context().clone();
        let name = ctx.name().context("reading the device name")?;
        let compute_capability = ctx
            .compute_capability()
            .context("reading the compute capability")?;
        Ok(Self {
            device,
            cuda,
            name,
            compute_capability,
        })
    }
}

/// Switches cudarc's per-buffer event tracking on or off for the buffers made from now on.
///
/// Why off: with tracking on (cudarc's default) every buffer cudarc allocates gets two CUDA
/// events when it is made (`cuEventCreate`), destroyed when it is freed: four driver calls per
/// buffer, thousands of buffers per training step. They would order work between streams, and
/// cudarc only uses them once a context has a second stream (`new_stream`; cudarc's
/// `is_managing_stream_synchronization`). candle 0.11's `Device::new_cuda` runs everything on
/// the per-thread default stream of the thread that issues it, and this process issues all
/// GPU work from one thread: candle's kernels, its cuBLAS handle (`add_product` uses the same
/// handle) and this module's NVRTC kernels, launched on `cuda_stream()`. Stream order already
/// orders them. `train-bench --cudarc-event-tracking` keeps it on, to measure the difference.
pub fn set_event_tracking(cuda: &CudaDevice, on: bool) {
    // SAFETY: turning tracking off is unsafe in cudarc because work on different streams would
    // then be unordered; every launch and copy of this process goes to one stream from one
    // thread (see above), so stream order is the only order needed. Buffers made before the
    // switch keep their events, which cudarc 0.19 ignores once tracking is off.
    unsafe {
        match on {
            true => cuda.cuda_stream().context().enable_event_tracking(),
            false => cuda.disable_event_tracking(),
        }
    }
}

/// The driver's name and text for an error, e.g. `CUDA_ERROR_NO_DEVICE (no CUDA-capable
/// device is detected)`.
fn describe(e: &DriverError) -> String {
    match e.error_string() {
        Ok(text) => format!("{:?} ({})", e.0, text.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// Opens device 0 (as [`Gpu::open`]) and returns candle's handle to it.
pub fn open_candle_device() -> Result<Device> {
    Ok(Gpu::open()?.device)
}
