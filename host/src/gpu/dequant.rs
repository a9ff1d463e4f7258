//! NF4 + double-quant dequantization on the GPU: the CUDA C source in `nf4_dequant.cu`,
//! compiled by NVRTC at run time and launched on candle's stream.
//!
//! **Not yet run on a GPU.** The kernel mirrors `qdylora_core::nf4::dequantize` over a
//! `DoubleQuantRef` operation for operation (see the notes at the top of the `.cu` file);
//! `qdylora gpu-dequant` is the check that it does so bit for bit.

use candle_core::CudaDevice;
use candle_core::cuda::WrapErr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, PushKernelArg};
use half::bf16;
use qdylora_core::dynamic_map::CODE_LEN;
use qdylora_core::nf4;

use super::kernels::NF4_DEQUANT;
use super::weight::{self, CudaNf4Weight, grid_for};

/// Elements one thread handles per loop step (`GROUP` in the source).
const GROUP: usize = 8;
/// The kernel's vector accesses: 4-byte loads of packed codes, 16-byte stores of output.
const PACKED_ALIGN: u64 = 4;
const OUT_ALIGN: u64 = 16;

/// An output type of the dequantization kernel.
pub trait DequantElement: DeviceRepr {
    /// The kernel's name in `nf4_dequant.cu`.
    const KERNEL: &'static str;
}

impl DequantElement for f32 {
    const KERNEL: &'static str = "nf4_dq_dequantize_f32";
}

/// Written as the bit patterns `half::bf16::from_f32` gives (round to nearest, ties to even).
impl DequantElement for bf16 {
    const KERNEL: &'static str = "nf4_dq_dequantize_bf16";
}

/// Enqueues the dequantization of `w` into `out` (row-major `[rows, cols]`) on candle's
/// stream. `out` must hold exactly `rows * cols` values.
pub fn dequantize_into<T: DequantElement>(
    dev: &CudaDevice,
    w: &CudaNf4Weight,
    out: &mut CudaSlice<T>,
) -> candle_core::Result<()> {
    let n = w.layout().elements;
    // The kernel writes exactly `n` values: a shorter buffer would be written past its end.
    if out.len() != n {
        candle_core::bail!(
            "dequantization output holds {} values, the weight {n}",
            out.len()
        );
    }
    let ordinal = weight::ordinal(dev);
    if ordinal != w.ordinal() {
        candle_core::bail!(
            "the NF4 weight lives on GPU {}, not on GPU {ordinal}",
            w.ordinal()
        );
    }
    let stream = dev.cuda_stream();
    let input = w.kernel_inputs();
    check_aligned("packed codes", input.packed, &stream, PACKED_ALIGN)?;
    check_aligned("dequantization output", out, &stream, OUT_ALIGN)?;

    let func = NF4_DEQUANT.function(dev, T::KERNEL)?;
    let n64 = n as u64;
    let cfg = grid_for(n.div_ceil(GROUP), input.max_grid);
    let mut args = stream.launch_builder(&func);
    args.arg(input.packed)
        .arg(input.absmax_codes)
        .arg(input.nested_absmax)
        .arg(input.code8)
        .arg(input.nf4_code)
        .arg(&input.offset)
        .arg(&input.log2_blocksize)
        .arg(&n64)
        .arg(out);
    // SAFETY: the argument list matches the kernel signature in nf4_dequant.cu (pointer,
    // pointer, pointer, pointer, pointer, float, u32, u64, pointer). The weight's constructors
    // checked every array length against `n` (`Nf4Layout`), the maps hold CODE_LEN and 16
    // values, `out` holds exactly `n`, and both vector-accessed buffers are aligned.
    unsafe { args.launch(cfg) }.w()?;
    Ok(())
}

/// A new buffer holding `w` dequantized (row-major `[rows, cols]`), enqueued on candle's
/// stream.
pub fn dequantize<T: DequantElement>(
    dev: &CudaDevice,
    w: &CudaNf4Weight,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: the kernel writes every one of the `elements` values before anything on this
    // stream can read them (the grid-stride loop covers every group, and the ragged end).
    let mut out = unsafe { dev.alloc::<T>(w.layout().elements) }?;
    dequantize_into(dev, w, &mut out)?;
    Ok(out)
}

/// Fails unless `buf` starts at a multiple of `align` bytes. Device allocations are aligned
/// far more coarsely; this turns a broken assumption into an error, not a misaligned access.
fn check_aligned<T>(
    what: &str,
    buf: &CudaSlice<T>,
    stream: &CudaStream,
    align: u64,
) -> candle_core::Result<()> {
    let (address, _record) = buf.device_ptr(stream);
    if address % align != 0 {
        candle_core::bail!("{what} at {address:#x} is not {align}-byte aligned");
    }
    Ok(())
}

// The kernel indexes the dynamic map with a u8 and the NF4 table with a nibble.
const _: () = assert!(CODE_LEN == 256 && nf4::CODE.len() == 16);
