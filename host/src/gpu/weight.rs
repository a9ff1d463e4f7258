//! An NF4 + double-quant weight resident on candle's CUDA device: the arrays of
//! [`Nf4Weight`], uploaded after their lengths are checked, or random ones made on the GPU for
//! speed measurements.
//!
//! Not yet run on a GPU (see the module notes in `gpu`).

use anyhow::{Context, Result, ensure};
use candle_core::CudaDevice;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use qdylora_core::double_quant::nested_block_count;
use qdylora_core::dynamic_map::{CODE_LEN, signed_dynamic_map};
use qdylora_core::nf4;
use qdylora_formats::Nf4Weight;

use super::kernels::FILL_RANDOM;
use crate::kernels::view::WeightView;

/// Threads per block of the grid-stride kernels.
pub(crate) const THREADS: u32 = 256;
/// Resident blocks per multiprocessor a grid-stride launch aims for.
const BLOCKS_PER_SM: u32 = 16;

/// Nested absmax of a random weight: with the signed dynamic map (codes in [-1, 1]) and
/// [`RANDOM_OFFSET`], every block's absmax lies in [0.01, 0.05], about the scale of a LLaMA
/// linear's weights.
const RANDOM_NESTED_ABSMAX: f32 = 0.02;
/// Offset of a random weight (see [`RANDOM_NESTED_ABSMAX`]).
const RANDOM_OFFSET: f32 = 0.03;

/// The array lengths an NF4 + double-quant `[rows, cols]` weight has. Computed from the shape
/// alone, so it sizes the allocations of a random weight as well as an uploaded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nf4Layout {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Values per absmax block.
    pub blocksize: usize,
    /// `rows * cols`.
    pub elements: usize,
    /// Packed code bytes (two codes per byte).
    pub packed_len: usize,
    /// Absmax blocks, one 8-bit code each.
    pub blocks: usize,
    /// Nested absmax values, one f32 per 256 blocks.
    pub nested_len: usize,
}

impl Nf4Layout {
    /// The layout of a non-empty `[rows, cols]` weight in blocks of `blocksize`.
    pub fn new(rows: usize, cols: usize, blocksize: usize) -> Result<Self> {
        nf4::check_blocksize(blocksize).context("NF4 blocksize")?;
        let elements = rows
            .checked_mul(cols)
            .with_context(|| format!("{rows} x {cols} values overflow"))?;
        ensure!(elements > 0, "empty NF4 weight ({rows} x {cols})");
        // The kernels index with 64-bit integers; the limit only matters on 32-bit hosts.
        u64::try_from(elements).context("too many values")?;
        let blocks = nf4::block_count(elements, blocksize);
        Ok(Self {
            rows,
            cols,
            blocksize,
            elements,
            packed_len: nf4::packed_len(elements),
            blocks,
            nested_len: nested_block_count(blocks),
        })
    }

    /// The layout of `w`, after the CPU kernels' own check that every array's length fits its
    /// shape ([`WeightView`]): the GPU kernels trust those lengths.
    pub fn of_checked(w: &Nf4Weight) -> Result<Self> {
        WeightView::new(w).context("NF4 weight")?;
        Self::new(w.rows, w.cols, w.blocksize)
    }

    /// Bytes a weight of this layout keeps on the GPU: the codes, the absmax codes, the
    /// nested absmax, the 256-entry dynamic map and the 16-entry NF4 table.
    pub fn resident_bytes(&self) -> usize {
        self.packed_len + self.blocks + (self.nested_len + CODE_LEN + nf4::CODE.len()) * 4
    }
}

/// An NF4 + double-quant `[rows, cols]` weight on the GPU. Cheap to share (`Arc`); frozen.
pub struct CudaNf4Weight {
    layout: Nf4Layout,
    offset: f32,
    packed: CudaSlice<u8>,
    absmax_codes: CudaSlice<u8>,
    nested_absmax: CudaSlice<f32>,
    code8: CudaSlice<f32>,
    nf4_code: CudaSlice<f32>,
    max_grid: u32,
    ordinal: usize,
}

impl std::fmt::Debug for CudaNf4Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaNf4Weight")
            .field("layout", &self.layout)
            .field("offset", &self.offset)
            .field("ordinal", &self.ordinal)
            .finish_non_exhaustive()
    }
}

impl CudaNf4Weight {
    /// Checks `w`'s array lengths against its shape and uploads it on candle's stream.
    pub fn upload(dev: &CudaDevice, w: &Nf4Weight) -> Result<Self> {
        let layout = Nf4Layout::of_checked(w)?;
        let stream = dev.cuda_stream();
        Ok(Self {
            layout,
            offset: w.offset,
            packed: stream
                .clone_htod(&w.packed)
                .context("uploading packed codes")?,
            absmax_codes: stream
                .clone_htod(&w.absmax_codes)
                .context("uploading absmax codes")?,
            nested_absmax: stream
                .clone_htod(&w.nested_absmax)
                .context("uploading nested absmax")?,
            code8: stream
                .clone_htod(&w.code8[..])
                .context("uploading the dynamic map")?,
            nf4_code: upload_nf4_table(dev)?,
            max_grid: max_grid(dev)?,
            ordinal: ordinal(dev),
        })
    }

    /// A random weight for speed measurements, made on the GPU (no host copy of the codes):
    /// seeded random packed codes and absmax codes, the signed dynamic map and a constant
    /// nested absmax. Every value is finite, about ±0.05 at most; none is meaningful.
    pub fn random(
        dev: &CudaDevice,
        rows: usize,
        cols: usize,
        blocksize: usize,
        seed: u64,
    ) -> Result<Self> {
        let layout = Nf4Layout::new(rows, cols, blocksize)?;
        let stream = dev.cuda_stream();
        let max_grid = max_grid(dev)?;
        let mut packed = stream
            .alloc_zeros::<u8>(layout.packed_len)
            .context("allocating packed codes")?;
        fill_random(dev, &mut packed, seed, max_grid).context("random packed codes")?;
        let mut absmax_codes = stream
            .alloc_zeros::<u8>(layout.blocks)
            .context("allocating absmax codes")?;
        // Another seed, so the absmax codes are not the first bytes of the packed codes.
        fill_random(dev, &mut absmax_codes, !seed, max_grid).context("random absmax codes")?;
        Ok(Self {
            layout,
            offset: RANDOM_OFFSET,
            packed,
            absmax_codes,
            nested_absmax: stream
                .clone_htod(&vec![RANDOM_NESTED_ABSMAX; layout.nested_len])
                .context("uploading nested absmax")?,
            code8: stream
                .clone_htod(&signed_dynamic_map()[..])
                .context("uploading the dynamic map")?,
            nf4_code: upload_nf4_table(dev)?,
            max_grid,
            ordinal: ordinal(dev),
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.layout.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.layout.cols
    }

    /// The GPU (device ordinal) the arrays live on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The shape and array lengths.
    pub fn layout(&self) -> &Nf4Layout {
        &self.layout
    }

    /// Bytes this weight keeps on the GPU.
    pub fn resident_bytes(&self) -> usize {
        self.layout.resident_bytes()
    }

    /// The arrays in the order the dequantization kernels take them.
    pub(crate) fn kernel_inputs(&self) -> KernelInputs<'_> {
        KernelInputs {
            packed: &self.packed,
            absmax_codes: &self.absmax_codes,
            nested_absmax: &self.nested_absmax,
            code8: &self.code8,
            nf4_code: &self.nf4_code,
            offset: self.offset,
            log2_blocksize: self.layout.blocksize.trailing_zeros(),
            max_grid: self.max_grid,
        }
    }
}

/// Borrowed device arrays and scalars of a [`CudaNf4Weight`], for a kernel launch.
pub(crate) struct KernelInputs<'a> {
    pub packed: &'a CudaSlice<u8>,
    pub absmax_codes: &'a CudaSlice<u8>,
    pub nested_absmax: &'a CudaSlice<f32>,
    pub code8: &'a CudaSlice<f32>,
    pub nf4_code: &'a CudaSlice<f32>,
    pub offset: f32,
    pub log2_blocksize: u32,
    pub max_grid: u32,
}

/// The device ordinal of candle's CUDA device.
pub(crate) fn ordinal(dev: &CudaDevice) -> usize {
    dev.cuda_stream().context().ordinal()
}

/// The core's NF4 table, so the kernel multiplies by exactly the CPU's f32 values.
fn upload_nf4_table(dev: &CudaDevice) -> Result<CudaSlice<f32>> {
    dev.cuda_stream()
        .clone_htod(&nf4::CODE[..])
        .context("uploading the NF4 table")
}

/// The largest grid a grid-stride launch uses on `dev`: more blocks would only refill the
/// kernels' shared tables more often.
fn max_grid(dev: &CudaDevice) -> Result<u32> {
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .context("reading the multiprocessor count")?;
    Ok(u32::try_from(sms.max(1))
        .unwrap_or(1)
        .saturating_mul(BLOCKS_PER_SM))
}

/// The grid for `items` grid-stride work items of one thread each, at most `max_grid` blocks.
pub(crate) fn grid_for(items: usize, max_grid: u32) -> LaunchConfig {
    let blocks = items.div_ceil(THREADS as usize);
    let grid = u32::try_from(blocks)
        .unwrap_or(u32::MAX)
        .clamp(1, max_grid.max(1));
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Overwrites every byte of `out` with seeded pseudo-random bytes (`fill_random.cu`).
fn fill_random(dev: &CudaDevice, out: &mut CudaSlice<u8>, seed: u64, max_grid: u32) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let func = FILL_RANDOM.function(dev, "fill_random_u8")?;
    let cfg = grid_for(out.len(), max_grid);
    let n = out.len() as u64;
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(&func);
    args.arg(out).arg(&n).arg(&seed);
    // SAFETY: the arguments match `fill_random_u8(u8*, u64, u64)`, and the kernel writes only
    // indices below `n`, the length of `out`.
    unsafe { args.launch(cfg) }.context("launching fill_random_u8")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_mlp_layout() {
        // 11008 x 4096 = 45,088,768 values in blocks of 64.
        let l = Nf4Layout::new(11008, 4096, 64).unwrap();
        assert_eq!(l.elements, 45_088_768);
        assert_eq!(l.packed_len, 22_544_384);
        assert_eq!(l.blocks, 704_512);
        assert_eq!(l.nested_len, 2_752);
        // codes + absmax codes + (nested + map + NF4 table) f32s.
        assert_eq!(
            l.resident_bytes(),
            22_544_384 + 704_512 + (2_752 + 256 + 16) * 4
        );
    }

    #[test]
    fn ragged_layout_rounds_up() {
        // 3 x 43 = 129 values: 65 packed bytes, 3 blocks of 64, 1 nested value.
        let l = Nf4Layout::new(3, 43, 64).unwrap();
        assert_eq!((l.packed_len, l.blocks, l.nested_len), (65, 3, 1));
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Nf4Layout::new(usize::MAX, 3, 64).is_err());
        assert!(Nf4Layout::new(0, 4096, 64).is_err());
        assert!(Nf4Layout::new(4, 4096, 48).is_err());
        assert!(Nf4Layout::new(4, 4096, 0).is_err());
    }

    #[test]
    fn check_matches_a_quantized_weight_and_rejects_tampering() {
        let data: Vec<f32> = (0..3 * 700)
            .map(|i| ((i % 37) as f32 - 18.0) * 0.01)
            .collect();
        let w = Nf4Weight::quantize(3, 700, &data, 64).unwrap();
        let layout = Nf4Layout::of_checked(&w).unwrap();
        assert_eq!(layout, Nf4Layout::new(3, 700, 64).unwrap());
        assert_eq!(layout.packed_len, w.packed.len());
        assert_eq!(layout.blocks, w.absmax_codes.len());
        assert_eq!(layout.nested_len, w.nested_absmax.len());

        let error = |w: &Nf4Weight| format!("{:#}", Nf4Layout::of_checked(w).unwrap_err());
        let mut short = w.clone();
        short.packed.pop();
        assert!(error(&short).contains("Packed"), "{}", error(&short));
        let mut long = w.clone();
        long.absmax_codes.push(0);
        assert!(error(&long).contains("Absmax"), "{}", error(&long));
        let mut nested = w;
        nested.nested_absmax.clear();
        assert!(
            error(&nested).contains("NestedAbsmax"),
            "{}",
            error(&nested)
        );
    }

    #[test]
    fn grid_is_capped_and_never_empty() {
        assert_eq!(grid_for(1, 2112).grid_dim, (1, 1, 1));
        assert_eq!(grid_for(257, 2112).grid_dim, (2, 1, 1));
        assert_eq!(grid_for(usize::MAX, 2112).grid_dim, (2112, 1, 1));
        assert_eq!(grid_for(10, 0).grid_dim, (1, 1, 1));
    }
}
