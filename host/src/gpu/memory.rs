//! GPU memory figures for the benchmark's "peak GPU memory".
//!
//! Not yet run on a GPU (see the module notes in `gpu`).
//!
//! **How candle's memory is allocated.** Every candle CUDA buffer, and every buffer of this
//! module's weights and scratch, comes from cudarc's `CudaStream::alloc`, which calls
//! `cuMemAllocAsync` on the stream when the device supports memory pools
//! (`CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED`, true on an H100) and `cuMemAlloc` otherwise.
//! Dropping the buffer calls `cuMemFreeAsync` (or `cuMemFree`). `cuMemAllocAsync` takes the
//! memory from the device's current memory pool, by default its default pool.
//!
//! **What is measured** ([`Counter::Pool`]): the pool's `CU_MEMPOOL_ATTR_USED_MEM_CURRENT`
//! and `..._USED_MEM_HIGH`, the bytes of live allocations and their high-water mark since the
//! last [`reset_peak`]. This is the counterpart of PyTorch's `torch.cuda.memory_allocated()`
//! and `max_memory_allocated()` (what the peer reports): both count live buffers and leave out
//! the CUDA context, loaded modules and memory a caching allocator or pool holds without
//! handing it out (PyTorch's `max_memory_reserved()`, the pool's `RESERVED_MEM_HIGH`). Two
//! differences remain: PyTorch rounds each block up to 512 bytes and gives cuBLAS its
//! workspace from its allocator (counted), while cuBLAS under cudarc allocates its own
//! workspace, outside the pool as far as the cuBLAS documentation says (not counted here; MiBs
//! to tens of MiBs per handle). To be confirmed on the GPU against `cuMemGetInfo`.
//!
//! **Fallback** ([`Counter::DeviceWide`], a device without memory pools): `cuMemGetInfo`'s
//! total minus free: the whole device's use, including the context, cached memory and other
//! processes, and no high-water mark: [`peak_bytes`] then returns the current use. Neither is
//! comparable with the peer's figure; the benchmark prints which counter it read.

use std::ffi::c_void;

use anyhow::{Context, Result};
use candle_core::CudaDevice;
use cudarc::driver::result;
use cudarc::driver::sys::{CUmemPool_attribute, CUmemoryPool};

/// Which counter the figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// The stream-ordered allocator's memory pool: live allocations only, with a peak.
    Pool,
    /// `cuMemGetInfo`: everything on the device, no peak.
    DeviceWide,
}

impl Counter {
    /// A short description for benchmark output.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Pool => "memory-pool bytes in use (like torch.cuda.max_memory_allocated)",
            Self::DeviceWide => "device-wide bytes in use (cuMemGetInfo; not a peak)",
        }
    }
}

/// The counter [`used_bytes`] and [`peak_bytes`] read on `dev`.
pub fn counter(dev: &CudaDevice) -> Counter {
    if dev.cuda_stream().context().has_async_alloc() {
        Counter::Pool
    } else {
        Counter::DeviceWide
    }
}

/// Bytes in use now, after the stream's pending work (and frees) has finished.
pub fn used_bytes(dev: &CudaDevice) -> Result<u64> {
    match current_pool(dev)? {
        Some(pool) => pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT),
        None => device_wide_used(dev),
    }
}

/// The most bytes in use at once since the last [`reset_peak`] (or the start), after the
/// stream's pending work has finished. With [`Counter::DeviceWide`], the current use.
pub fn peak_bytes(dev: &CudaDevice) -> Result<u64> {
    match current_pool(dev)? {
        Some(pool) => pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH),
        None => device_wide_used(dev),
    }
}

/// Restarts the high-water mark from the current use (a no-op with [`Counter::DeviceWide`]).
pub fn reset_peak(dev: &CudaDevice) -> Result<()> {
    if let Some(pool) = current_pool(dev)? {
        // The driver accepts only 0 here, and resets the mark to the current use.
        set_pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
            .context("resetting the memory pool's high-water mark")?;
    }
    Ok(())
}

/// Lets the pool keep freed memory instead of returning it to the driver at every
/// synchronization (the default release threshold is 0), as PyTorch's caching allocator does:
/// later allocations of the same sizes are then served from the pool. Changes what the device
/// reserves, not the used-bytes figures. [`Gpu::open`](super::Gpu::open) calls it.
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    if let Some(pool) = current_pool(dev)? {
        let attr = CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        set_pool_attribute(pool, attr, u64::MAX)
            .context("setting the memory pool's release threshold")?;
    }
    Ok(())
}

/// Sets one of the pool's 64-bit attributes (`USED_MEM_HIGH`, `RELEASE_THRESHOLD`).
fn set_pool_attribute(
    pool: CUmemoryPool,
    attr: CUmemPool_attribute,
    mut value: u64,
) -> std::result::Result<(), result::DriverError> {
    // SAFETY: `pool` is a live pool from `current_pool`; both attributes this is called with
    // take a cuuint64_t, which `value` is.
    unsafe {
        result::mem_pool::set_attribute(pool, attr, (&mut value as *mut u64).cast::<c_void>())
    }
}

/// The pool `cuMemAllocAsync` draws from on `dev`, after waiting for the stream (so frees
/// already enqueued are counted), or `None` when cudarc allocates without pools.
fn current_pool(dev: &CudaDevice) -> Result<Option<CUmemoryPool>> {
    let stream = dev.cuda_stream();
    stream
        .synchronize()
        .context("waiting for the GPU before reading memory")?;
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    ctx.bind_to_thread().context("binding the CUDA context")?;
    // SAFETY: `cu_device` comes from a live context; the call only reads the device's pool.
    let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }
        .context("reading the device's memory pool")?;
    Ok(Some(pool))
}

fn pool_attribute(pool: CUmemoryPool, attribute: CUmemPool_attribute) -> Result<u64> {
    let mut value: u64 = 0;
    // SAFETY: `pool` is the device's current pool; the used/reserved attributes are
    // cuuint64_t, which `value` is.
    unsafe {
        result::mem_pool::get_attribute(pool, attribute, (&mut value as *mut u64).cast::<c_void>())
    }
    .with_context(|| format!("reading the memory pool's {attribute:?}"))?;
    Ok(value)
}

fn device_wide_used(dev: &CudaDevice) -> Result<u64> {
    let (free, total) = dev
        .cuda_stream()
        .context()
        .mem_get_info()
        .context("reading the device's free memory")?;
    Ok(total.saturating_sub(free) as u64)
}

/// Bytes as GiB (2^30), the unit PyTorch's figures are usually quoted in.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gib_is_binary() {
        assert_eq!(gib(1 << 30), 1.0);
        // The peer's 12.59 GiB.
        assert!((gib(13_518_374_584) - 12.59).abs() < 0.005);
    }
}
