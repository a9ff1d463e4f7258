//! Launching the fused-op kernels on candle's stream. Every one follows one convention, so one
//! launcher serves them all: `name_f32` / `name_bf16` (by the first input's dtype) take the
//! input pointers, then the output pointer, then scalar arguments. Each input is passed as the
//! contiguous values of its layout, in its own dtype (f32, bf16 or u32: token ids ride along
//! with activations); the output is a new buffer of a given dtype and length.
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

/// A kernel from `source` named `name_f32` or `name_bf16` by the first input's dtype.
pub struct FusedKernel {
    /// The compiled source.
    pub source: &'static KernelSource,
    /// The name without its dtype suffix.
    pub name: &'static str,
}

/// The contiguous values of one input, in its dtype.
enum View<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
    U32(CudaView<'a, u32>),
}

/// A new output buffer, in its dtype.
enum Output {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl FusedKernel {
    /// Runs the kernel over contiguous `inputs` into a new output of `out_len` values of
    /// `out_dtype` (f32 or bf16).
    ///
    /// # Safety
    /// The kernel's signature must be `(inputs..., out, scalars...)` with these types, it must
    /// write all `out_len` output values, and read no input past its layout's element count.
    pub unsafe fn launch(
        &self,
        inputs: &[(&CudaStorage, &Layout)],
        out_dtype: DType,
        out_len: usize,
        scalars: &[Scalar],
        cfg: LaunchConfig,
    ) -> candle_core::Result<CudaStorage> {
        let Some((first, _)) = inputs.first() else {
            candle_core::bail!("{}: no inputs", self.name);
        };
        let suffix = match first.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            other => candle_core::bail!("{}: f32 or bf16 tensors, got {other:?}", self.name),
        };
        let views = inputs
            .iter()
            .map(|(storage, layout)| view(self.name, storage, layout))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dev = first.device().clone();
        let func = self
            .source
            .function(&dev, &format!("{}_{suffix}", self.name))?;
        // SAFETY (both allocations): the caller's contract: the kernel writes all `out_len`
        // values before anything on this stream reads them.
        let mut out = match out_dtype {
            DType::F32 => Output::F32(unsafe { dev.alloc::<f32>(out_len) }?),
            DType::BF16 => Output::Bf16(unsafe { dev.alloc::<bf16>(out_len) }?),
            other => candle_core::bail!("{}: no {other:?} output", self.name),
        };
        let stream = dev.cuda_stream();
        let mut args = stream.launch_builder(&func);
        for v in &views {
            match v {
                View::F32(v) => args.arg(v),
                View::Bf16(v) => args.arg(v),
                View::U32(v) => args.arg(v),
            };
        }
        match &mut out {
            Output::F32(o) => args.arg(o),
            Output::Bf16(o) => args.arg(o),
        };
        for s in scalars {
            match s {
                Scalar::U32(v) => args.arg(v),
                Scalar::U64(v) => args.arg(v),
                Scalar::F32(v) => args.arg(v),
            };
        }
        // SAFETY: the caller's contract on the signature and on what the kernel reads and
        // writes; each view is exactly its layout's values.
        unsafe { args.launch(cfg) }.w()?;
        Ok(match out {
            Output::F32(o) => CudaStorage::wrap_cuda_slice(o, dev),
            Output::Bf16(o) => CudaStorage::wrap_cuda_slice(o, dev),
        })
    }
}

/// The contiguous values of `storage` under `layout`.
fn view<'a>(op: &str, storage: &'a CudaStorage, layout: &Layout) -> candle_core::Result<View<'a>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the inputs must be contiguous");
    };
    fn slice<'a, T: CudaDType + DeviceRepr>(
        storage: &'a CudaStorage,
        range: std::ops::Range<usize>,
    ) -> candle_core::Result<CudaView<'a, T>> {
        Ok(storage.as_cuda_slice::<T>()?.slice(range))
    }
    Ok(match storage.dtype() {
        DType::F32 => View::F32(slice(storage, start..end)?),
        DType::BF16 => View::Bf16(slice(storage, start..end)?),
        DType::U32 => View::U32(slice(storage, start..end)?),
        other => candle_core::bail!("{op}: no {other:?} inputs"),
    })
}

/// An error unless every input holds exactly `len` values (for kernels that read `len` of each).
pub fn expect_lengths(
    op: &str,
    inputs: &[(&CudaStorage, &Layout)],
    len: usize,
) -> candle_core::Result<()> {
    for (_, layout) in inputs {
        let n = layout.shape().elem_count();
        if n != len {
            candle_core::bail!("{op}: an input holds {n} values, expected {len}");
        }
    }
    Ok(())
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
