//! NF4 + double-quant dequantization on the GPU: the CUDA C source in `nf4_dequant.cu`,
//! compiled by NVRTC at run time, launched through cudarc.
//!
//! **Not yet run on a GPU.** The kernel mirrors `qdylora_core::nf4::dequantize` over a
//! `DoubleQuantRef` operation for operation (see the notes at the top of the `.cu` file);
//! `qdylora gpu-dequant` is the check that it does so bit for bit.

use anyhow::{Context, Result, bail, ensure};
use cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use qdylora_core::double_quant::nested_block_count;
use qdylora_core::dynamic_map::CODE_LEN;
use qdylora_core::nf4;
use qdylora_formats::Nf4Weight;

use super::Gpu;

/// The kernel source (both output types).
pub const SOURCE: &str = include_str!("nf4_dequant.cu");

const F32_KERNEL: &str = "nf4_dq_dequantize_f32";
const BF16_KERNEL: &str = "nf4_dq_dequantize_bf16";

/// Elements one thread handles per loop step (`GROUP` in the source).
const GROUP: usize = 8;
/// Threads per block.
const THREADS: u32 = 256;
/// Resident blocks per multiprocessor the grid-stride launch aims for; more blocks would only
/// refill the shared tables more often.
const BLOCKS_PER_SM: u32 = 16;

/// Compiles the kernel source to PTX for `arch` (e.g. `compute_90`). Needs NVRTC, not a GPU.
pub fn compile_ptx(arch: &str) -> Result<Ptx> {
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!(
            "NVRTC (libnvrtc.so.13) could not be loaded: add the CUDA 13 library folder to \
             LD_LIBRARY_PATH (e.g. /usr/local/cuda/lib64)"
        );
    }
    let opts = CompileOptions {
        // The core rounds after every multiply and add; no contraction, no flushing.
        fmad: Some(false),
        ftz: Some(false),
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some("nf4_dequant.cu".into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| match e {
        CompileError::CompileError { nvrtc, log, .. } => anyhow::anyhow!(
            "NVRTC failed to compile the NF4 kernel ({nvrtc:?}): {}",
            log.to_string_lossy()
        ),
        other => anyhow::anyhow!("NVRTC failed: {other}"),
    })
}

/// An [`Nf4Weight`] copied to the GPU: the same arrays, checked for consistent lengths.
pub struct DeviceNf4Weight {
    elements: usize,
    log2_blocksize: u32,
    offset: f32,
    packed: CudaSlice<u8>,
    absmax_codes: CudaSlice<u8>,
    nested_absmax: CudaSlice<f32>,
    code8: CudaSlice<f32>,
}

impl DeviceNf4Weight {
    /// Checks the weight's array lengths (the kernel trusts them) and uploads it.
    pub fn upload(gpu: &Gpu, w: &Nf4Weight) -> Result<Self> {
        nf4::check_blocksize(w.blocksize).context("NF4 blocksize")?;
        let elements = w
            .rows
            .checked_mul(w.cols)
            .context("rows x cols overflows")?;
        let blocks = nf4::block_count(elements, w.blocksize);
        ensure!(
            w.packed.len() == nf4::packed_len(elements),
            "packed codes: {} bytes for {elements} values",
            w.packed.len()
        );
        ensure!(
            w.absmax_codes.len() == blocks,
            "absmax codes: {} for {blocks} blocks",
            w.absmax_codes.len()
        );
        ensure!(
            w.nested_absmax.len() == nested_block_count(blocks),
            "nested absmax: {} for {blocks} blocks",
            w.nested_absmax.len()
        );
        let s = &gpu.stream;
        Ok(Self {
            elements,
            log2_blocksize: w.blocksize.trailing_zeros(),
            offset: w.offset,
            packed: s.clone_htod(&w.packed).context("uploading packed codes")?,
            absmax_codes: s
                .clone_htod(&w.absmax_codes)
                .context("uploading absmax codes")?,
            nested_absmax: s
                .clone_htod(&w.nested_absmax)
                .context("uploading nested absmax")?,
            code8: s
                .clone_htod(&w.code8[..])
                .context("uploading the dynamic map")?,
        })
    }

    /// Number of values (`rows * cols`).
    pub fn len(&self) -> usize {
        self.elements
    }

    /// True for a weight with no values.
    pub fn is_empty(&self) -> bool {
        self.elements == 0
    }
}

/// The compiled kernels for both output types, and the NF4 table they read.
pub struct Nf4DequantKernels {
    f32_fn: CudaFunction,
    bf16_fn: CudaFunction,
    nf4_code: CudaSlice<f32>,
    max_grid: u32,
}

impl Nf4DequantKernels {
    /// Compiles the source with NVRTC for this device and loads both kernels.
    pub fn compile(gpu: &Gpu) -> Result<Self> {
        let ptx = compile_ptx(&gpu.nvrtc_arch())?;
        let module = gpu
            .ctx
            .load_module(ptx)
            .context("loading the NF4 kernel module")?;
        let load = |name| {
            module
                .load_function(name)
                .with_context(|| format!("loading kernel {name}"))
        };
        Ok(Self {
            f32_fn: load(F32_KERNEL)?,
            bf16_fn: load(BF16_KERNEL)?,
            // The table is uploaded from the core, so the kernel multiplies by the same f32s.
            nf4_code: gpu
                .stream
                .clone_htod(&nf4::CODE[..])
                .context("uploading the NF4 table")?,
            max_grid: gpu.multiprocessors.saturating_mul(BLOCKS_PER_SM),
        })
    }

    /// Enqueues the dequantization of `w` into `out` (f32), asynchronously on the stream.
    pub fn dequantize_f32(
        &self,
        gpu: &Gpu,
        w: &DeviceNf4Weight,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch(gpu, &self.f32_fn, w, out)
    }

    /// Enqueues the dequantization of `w` into `out` as bf16 bit patterns (`half::bf16::to_bits`).
    pub fn dequantize_bf16(
        &self,
        gpu: &Gpu,
        w: &DeviceNf4Weight,
        out: &mut CudaSlice<u16>,
    ) -> Result<()> {
        self.launch(gpu, &self.bf16_fn, w, out)
    }

    fn launch<T: DeviceRepr>(
        &self,
        gpu: &Gpu,
        func: &CudaFunction,
        w: &DeviceNf4Weight,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        // The kernel writes exactly `n` values: a shorter buffer would be written past its end.
        ensure!(
            out.len() == w.elements,
            "output holds {} values, the weight {}",
            out.len(),
            w.elements
        );
        if w.elements == 0 {
            return Ok(());
        }
        let n = w.elements as u64;
        let blocks_needed = w.elements.div_ceil(GROUP).div_ceil(THREADS as usize);
        let grid = u32::try_from(blocks_needed)
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_grid.max(1));
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = gpu.stream.launch_builder(func);
        args.arg(&w.packed)
            .arg(&w.absmax_codes)
            .arg(&w.nested_absmax)
            .arg(&w.code8)
            .arg(&self.nf4_code)
            .arg(&w.offset)
            .arg(&w.log2_blocksize)
            .arg(&n)
            .arg(out);
        // SAFETY: the argument list matches the kernel signature in nf4_dequant.cu (pointer,
        // pointer, pointer, pointer, pointer, float, u32, u64, pointer); `upload` checked every
        // input length against `n`, `out` holds exactly `n` values, and the map holds CODE_LEN.
        unsafe { args.launch(cfg) }.context("launching the NF4 kernel")?;
        Ok(())
    }
}

// The kernel indexes the dynamic map with a u8 and the NF4 table with a nibble.
const _: () = assert!(CODE_LEN == 256 && nf4::CODE.len() == 16);

#[cfg(test)]
mod tests {
    use half::bf16;

    /// The kernel's `bf16_bits_rne`, line for line in Rust. The CUDA copy only runs on a GPU;
    /// this checks the algorithm it transcribes against `half`, which the CPU path uses.
    fn bf16_bits_rne(value: f32) -> u16 {
        let x = value.to_bits();
        if (x & 0x7fff_ffff) > 0x7f80_0000 {
            return ((x >> 16) | 0x0040) as u16;
        }
        if (x & 0x8000) != 0 && (x & 0x1_7fff) != 0 {
            return ((x >> 16) + 1) as u16;
        }
        (x >> 16) as u16
    }

    #[test]
    fn bf16_rounding_matches_half() {
        // Every upper half, with the lower halves where rounding decides: zero, just below,
        // exactly at and just above one half, the maximum, and two arbitrary ones.
        for hi in 0..=0xffffu32 {
            for lo in [0, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1234, 0xc0de] {
                let v = f32::from_bits((hi << 16) | lo);
                assert_eq!(
                    bf16_bits_rne(v),
                    bf16::from_f32(v).to_bits(),
                    "bits {:#010x}",
                    v.to_bits()
                );
            }
        }
    }
}
