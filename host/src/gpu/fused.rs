//! Launching the fused-op kernels on candle's stream. Every one follows one convention, so one
//! launcher serves them all: `name_f32` / `name_bf16` take the input pointers, then the output
//! pointer, then scalar arguments; all tensors share one dtype and the output has `len` values.
//!
//! **Not yet run on a GPU.** `host/tests/cuda_kernels_emulated.rs` runs the kernel sources on
//! CPU threads under an emulation of the CUDA thread model.

use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::kernels::KernelSource;

/// A scalar kernel argument, after the pointers.
#[derive(Debug, Clone, Copy)]
pub enum Scalar {
    /// `u32`.
    U32(u32),
    /// `unsigned long long`.
    U64(u64),
    /// `float`.
    F32(f32),
}

/// A kernel from `source` named `name_f32` or `name_bf16` by the inputs' dtype.
pub struct FusedKernel {
    /// The compiled source.
    pub source: &'static KernelSource,
    /// The name without its dtype suffix.
    pub name: &'static str,
}

impl FusedKernel {
    /// Runs the kernel over contiguous `inputs` (all of one dtype, each holding `len` values)
    /// into a new output of `len` values in the same dtype.
    ///
    /// # Safety
    /// The kernel's signature must be `(inputs..., out, scalars...)` with these types, it must
    /// write all `len` output values, and read no input past the lengths given here.
    pub unsafe fn launch(
        &self,
        inputs: &[(&CudaStorage, &Layout)],
        len: usize,
        scalars: &[Scalar],
        cfg: LaunchConfig,
    ) -> candle_core::Result<CudaStorage> {
        let Some((first, _)) = inputs.first() else {
            candle_core::bail!("{}: no inputs", self.name);
        };
        // SAFETY: passed on from this function's contract.
        unsafe {
            match first.dtype() {
                DType::F32 => self.typed::<f32>("f32", inputs, len, scalars, cfg),
                DType::BF16 => self.typed::<bf16>("bf16", inputs, len, scalars, cfg),
                other => candle_core::bail!("{}: f32 or bf16 tensors, got {other:?}", self.name),
            }
        }
    }

    unsafe fn typed<T: CudaDType + DeviceRepr>(
        &self,
        suffix: &str,
        inputs: &[(&CudaStorage, &Layout)],
        len: usize,
        scalars: &[Scalar],
        cfg: LaunchConfig,
    ) -> candle_core::Result<CudaStorage> {
        let views = inputs
            .iter()
            .map(|(storage, layout)| view::<T>(self.name, storage, layout, len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dev = inputs[0].0.device().clone();
        let func = self
            .source
            .function(&dev, &format!("{}_{suffix}", self.name))?;
        // SAFETY: the caller's contract: the kernel writes all `len` values before anything
        // on this stream reads them.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(len) }?;
        let stream = dev.cuda_stream();
        let mut args = stream.launch_builder(&func);
        for v in &views {
            args.arg(v);
        }
        args.arg(&mut out);
        for s in scalars {
            match s {
                Scalar::U32(v) => args.arg(v),
                Scalar::U64(v) => args.arg(v),
                Scalar::F32(v) => args.arg(v),
            };
        }
        // SAFETY: the caller's contract on the signature and the lengths; every view holds
        // exactly `len` values (checked in `view`).
        unsafe { args.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// The contiguous `len` values of `storage` under `layout`, as `T`.
fn view<'a, T: CudaDType>(
    op: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
    len: usize,
) -> candle_core::Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the inputs must be contiguous");
    };
    if end - start != len {
        candle_core::bail!(
            "{op}: an input holds {} values, expected {len}",
            end - start
        );
    }
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// Threads per block of the elementwise kernels.
const ELEMENTWISE_THREADS: u32 = 256;

/// A grid-stride launch over `n` elements (at most 65,535 blocks: the loop covers the rest).
pub fn elementwise_grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, 65_535);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows per block of the row kernels (one warp per row).
const ROWS_PER_BLOCK: usize = 4;

/// One warp per row, four rows per block; `rows` must fit a `u32`.
pub fn warp_per_row_grid(op: &str, rows: usize) -> candle_core::Result<(u32, LaunchConfig)> {
    let too_many = || candle_core::Error::msg(format!("{op}: {rows} rows is too many"));
    let rows32 = u32::try_from(rows).map_err(|_| too_many())?;
    let blocks = u32::try_from(rows.div_ceil(ROWS_PER_BLOCK)).map_err(|_| too_many())?;
    let cfg = LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((rows32, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids() {
        let (rows, cfg) = warp_per_row_grid("t", 9).unwrap();
        assert_eq!(rows, 9);
        assert_eq!(cfg.grid_dim, (3, 1, 1));
        assert_eq!(cfg.block_dim, (128, 1, 1));
        assert!(warp_per_row_grid("t", 1 << 40).is_err());
        assert_eq!(elementwise_grid(0).grid_dim, (1, 1, 1));
        assert_eq!(elementwise_grid(257).grid_dim, (2, 1, 1));
        assert_eq!(elementwise_grid(1 << 40).grid_dim, (65_535, 1, 1));
    }
}
