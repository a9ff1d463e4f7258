//! The device model container: a small LLaMA-family model for devices, with NF4 + double-quant
//! linears and dense (f32 or f16) embeddings and norms, read in place from flash or memory.
//!
//! Layout (all little-endian; `FORMAT.md` has the full table):
//!
//! * a 128-byte fixed header (magic, version, tensor count, name-area length, header length,
//!   file length, base fingerprint, the decoder config, header CRC-32),
//! * the 256-entry f32 `code8` map shared by every NF4 tensor (1024 bytes),
//! * the tensor table ([`TENSOR_ENTRY_LEN`] bytes per tensor, sorted by name) and the names,
//!   zero-padded to a multiple of 64 bytes,
//! * the tensor data, each tensor's region starting 64-byte aligned, in table order. An NF4
//!   region is the packed codes, the 8-bit absmax codes and the f32 nested absmax, each part
//!   starting 8-byte aligned within the region. Each region has its own CRC-32 in the table.

mod reader;
#[cfg(feature = "std")]
mod writer;

pub use reader::DeviceModelReader;
#[cfg(feature = "std")]
pub use writer::write_device_model;

use qdylora_core::dynamic_map::CODE_LEN;

/// The first eight bytes of a device model.
pub const MAGIC: [u8; 8] = *b"QDLDEVM\0";
/// The format version this crate reads and writes.
pub const VERSION: u16 = 1;
/// Bytes of the fixed header.
pub const FIXED_HEADER_LEN: usize = 128;
/// Offset of the `code8` map.
pub const CODE8_OFFSET: usize = FIXED_HEADER_LEN;
/// Offset of the tensor table.
pub const TABLE_OFFSET: usize = CODE8_OFFSET + 4 * CODE_LEN;
/// Bytes of one tensor table entry.
pub const TENSOR_ENTRY_LEN: usize = 64;
/// Alignment of the header end and of every tensor region.
pub const DATA_ALIGN: u64 = 64;
/// Alignment of the parts inside an NF4 region.
pub const PART_ALIGN: u64 = 8;

/// Limits a reader enforces before trusting a count.
pub mod limits {
    /// Most tensors.
    pub const MAX_TENSORS: u32 = 1 << 16;
    /// Largest name area.
    pub const MAX_NAMES_LEN: u32 = 1 << 24;
    /// Largest dimension of a tensor.
    pub const MAX_DIM: u32 = 1 << 24;
}

/// Byte offsets of the fixed header fields.
pub(crate) mod field {
    pub const VERSION: usize = 8;
    pub const RESERVED0: usize = 10;
    pub const TENSOR_COUNT: usize = 12;
    pub const NAMES_LEN: usize = 16;
    pub const RESERVED1: usize = 20;
    pub const HEADER_LEN: usize = 24;
    pub const FILE_LEN: usize = 32;
    pub const FINGERPRINT: usize = 40;
    pub const CONFIG: usize = 56;
    pub const CONFIG_LEN: usize = 40;
    pub const HEADER_CRC: usize = 124;
}

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// Dense little-endian f32.
    F32,
    /// Dense little-endian f16.
    F16,
    /// NF4 with double-quantized absmax (bitsandbytes layout).
    Nf4DoubleQuant,
}

impl TensorKind {
    #[cfg(feature = "std")]
    pub(crate) fn code(self) -> u8 {
        match self {
            TensorKind::F32 => 0,
            TensorKind::F16 => 1,
            TensorKind::Nf4DoubleQuant => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(TensorKind::F32),
            1 => Some(TensorKind::F16),
            2 => Some(TensorKind::Nf4DoubleQuant),
            _ => None,
        }
    }
}

/// Where the parts of an NF4 region lie, relative to the region start, for `n` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Nf4Parts {
    pub packed_len: u64,
    pub codes_offset: u64,
    pub blocks: u64,
    pub nested_offset: u64,
    pub nested_blocks: u64,
    pub total: u64,
}

impl Nf4Parts {
    pub(crate) fn new(n: u64, blocksize: u64) -> Option<Self> {
        let packed_len = n.div_ceil(2);
        let blocks = n.div_ceil(blocksize);
        let nested_blocks = blocks.div_ceil(qdylora_core::double_quant::NESTED_BLOCKSIZE as u64);
        let codes_offset = crate::le::align_up(packed_len, PART_ALIGN)?;
        let nested_offset = crate::le::align_up(codes_offset.checked_add(blocks)?, PART_ALIGN)?;
        let total = nested_offset.checked_add(nested_blocks.checked_mul(4)?)?;
        Some(Self {
            packed_len,
            codes_offset,
            blocks,
            nested_offset,
            nested_blocks,
            total,
        })
    }
}

/// Header length for `tensors` entries and `names_len` bytes of names.
pub(crate) fn header_len_for(tensors: u32, names_len: u32) -> Option<u64> {
    let end = (TABLE_OFFSET as u64)
        .checked_add(u64::from(tensors).checked_mul(TENSOR_ENTRY_LEN as u64)?)?
        .checked_add(u64::from(names_len))?;
    crate::le::align_up(end, DATA_ALIGN)
}

/// The 40-byte config record.
#[cfg(feature = "std")]
pub(crate) fn encode_config(cfg: &qdylora_core::infer::DecoderConfig) -> [u8; field::CONFIG_LEN] {
    let words = [
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.rope_theta.to_bits(),
        cfg.rms_norm_eps.to_bits(),
        u32::from(cfg.tie_word_embeddings),
    ];
    let mut out = [0u8; field::CONFIG_LEN];
    for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    out
}
