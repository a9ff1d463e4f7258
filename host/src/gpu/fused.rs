//! Launching the fused-op kernels on candle's stream. Every one follows one convention, so one
//! launcher serves them all: `name_f32` / `name_bf16` take the input pointers, then the output
//! pointer, then scalar arguments. Each kernel declares its pointers' types ([`Param`]): the
//! activations' float type, which picks the suffix, or a fixed f32 or u32 (token ids and
//! per-row losses ride along with bf16 activations). The launcher checks the inputs against
//! that declaration, so a wrong dtype is an error, never a misread buffer.
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

/// The type of a kernel's pointer parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// The kernel's float type: `float` in `name_f32`, bf16 bits in `name_bf16`.
    Float,
    /// Always `float`.
    F32,
    /// Always `u32`.
    U32,
}

impl Param {
    /// The dtype this parameter takes when the kernel's float type is `float`.
    fn dtype(self, float: DType) -> DType {
        match self {
            Self::Float => float,
            Self::F32 => DType::F32,
            Self::U32 => DType::U32,
        }
    }
}

/// A kernel from `source` named `name_f32` or `name_bf16` by its float type, with its pointer
/// parameters' types.
pub struct FusedKernel {
    /// The compiled source.
    pub source: &'static KernelSource,
    /// The name without its dtype suffix.
    pub name: &'static str,
    /// The inputs' types, in order (at least one [`Param::Float`]).
    pub inputs: &'static [Param],
    /// The output's type.
    pub output: Param,
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
    /// The kernel's float type for inputs of `dtypes`, or an error unless they are what
    /// [`FusedKernel::inputs`] declares (one float type, f32 or bf16, for every `Float`).
    fn float_type(&self, dtypes: &[DType]) -> candle_core::Result<DType> {
        let float = self
            .inputs
            .iter()
            .zip(dtypes)
            .find(|(p, _)| **p == Param::Float)
            .map(|(_, d)| *d);
        let matches = |float: DType| {
            dtypes.len() == self.inputs.len()
                && self
                    .inputs
                    .iter()
                    .zip(dtypes)
                    .all(|(p, d)| p.dtype(float) == *d)
        };
        match float {
            Some(float @ (DType::F32 | DType::BF16)) if matches(float) => Ok(float),
            _ => candle_core::bail!(
                "{}: inputs {dtypes:?} do not fit the kernel's {:?} (Float: f32 or bf16)",
                self.name,
                self.inputs
            ),
        }
    }

    /// Runs the kernel over contiguous `inputs` (checked against [`FusedKernel::inputs`]) into
    /// a new output of `out_len` values.
    ///
    /// # Safety
    /// The kernel's signature must be `(inputs..., out, scalars...)` with the declared pointer
    /// types and these scalars, it must write all `out_len` output values, and read no input
    /// past its layout's element count.
    pub unsafe fn launch(
        &self,
        inputs: &[(&CudaStorage, &Layout)],
        out_len: usize,
        scalars: &[Scalar],
        cfg: LaunchConfig,
    ) -> candle_core::Result<CudaStorage> {
        let dtypes: Vec<DType> = inputs.iter().map(|(s, _)| s.dtype()).collect();
        let float = self.float_type(&dtypes)?;
        let suffix = if float == DType::F32 { "f32" } else { "bf16" };
        let views = inputs
            .iter()
            .map(|(storage, layout)| view(self.name, storage, layout))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dev = inputs[0].0.device().clone();
        let func = self
            .source
            .function(&dev, &format!("{}_{suffix}", self.name))?;
        // SAFETY (both allocations): the caller's contract: the kernel writes all `out_len`
        // values before anything on this stream reads them.
        let mut out = match self.output.dtype(float) {
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

    #[test]
    fn inputs_must_match_the_declared_parameters() {
        use DType::{BF16, F16, F32, U32};
        let kernel = FusedKernel {
            source: &super::super::kernels::CROSS_ENTROPY,
            name: "k",
            inputs: &[Param::Float, Param::U32, Param::F32],
            output: Param::Float,
        };
        assert_eq!(kernel.float_type(&[BF16, U32, F32]).unwrap(), BF16);
        assert_eq!(kernel.float_type(&[F32, U32, F32]).unwrap(), F32);
        for bad in [
            &[BF16, U32, BF16][..], // the fixed f32 given bf16
            &[BF16, F32, F32],      // u32 ids given floats
            &[F16, U32, F32],       // no f16 kernels
            &[BF16, U32],           // one input short
            &[BF16, U32, F32, F32], // one too many
        ] {
            assert!(kernel.float_type(bad).is_err(), "{bad:?}");
        }
        let same = FusedKernel {
            inputs: &[Param::Float, Param::Float],
            ..kernel
        };
        assert!(
            same.float_type(&[F32, BF16]).is_err(),
            "one float type per launch"
        );
    }
}
