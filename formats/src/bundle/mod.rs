//! The nested adapter bundle: one file holding a DyLoRA adapter for every rank `1..=r_max`, laid
//! out rank slice by rank slice so that the rank-`r` adapter is exactly the first
//! `header_len + r * slice_len` bytes.
//!
//! Layout (all little-endian; `FORMAT.md` has the full table):
//!
//! * a 64-byte fixed header (magic, version, element type, scaling, header length, `r_max`,
//!   module count, alpha, name-area length, slice length, base fingerprint, header CRC-32),
//! * the module table (`MODULE_ENTRY_LEN` bytes per module, sorted by name), the names, and one
//!   CRC-32 per rank slice, zero-padded to a multiple of 64 bytes,
//! * slice `k` (`k = 0..r_max`): for each module in table order, row `k` of `A` (`in` elements)
//!   then column `k` of `B` (`out` elements), zero-padded to a multiple of 64 bytes.
//!
//! The sizes come from [`qdylora_core::rank::PrefixSizes`] with [`layout`], for the writer and
//! the reader alike.

mod reader;
mod view;
#[cfg(feature = "std")]
mod writer;

pub use reader::{BundleReader, ModuleInfo};
pub use view::RankView;
#[cfg(feature = "std")]
pub use writer::{BundleMeta, ModuleTensors, write_bundle};

use qdylora_core::ElementType;
use qdylora_core::rank::{PrefixLayout, Scaling};

/// The first eight bytes of a bundle.
pub const MAGIC: [u8; 8] = *b"QDLBNDL\0";
/// The format version this crate reads and writes.
pub const VERSION: u16 = 1;
/// Every slice (and so the header) is padded to a multiple of this many bytes.
pub const SLICE_ALIGN: u64 = 64;
/// Bytes of the fixed header.
pub const FIXED_HEADER_LEN: usize = 64;
/// Bytes of one module table entry.
pub const MODULE_ENTRY_LEN: usize = 24;

/// Limits a reader enforces before trusting a count (no allocation depends on them; they turn
/// absurd headers into a clear error).
pub mod limits {
    /// Largest `r_max`.
    pub const MAX_RANK: u32 = 1 << 16;
    /// Most modules.
    pub const MAX_MODULES: u32 = 1 << 20;
    /// Largest `in` or `out` of a module.
    pub const MAX_FEATURES: u32 = 1 << 24;
    /// Largest name area.
    pub const MAX_NAMES_LEN: u32 = 1 << 26;
}

/// Byte offsets of the fixed header fields.
pub(crate) mod field {
    pub const VERSION: usize = 8;
    pub const DTYPE: usize = 10;
    pub const SCALING: usize = 11;
    pub const HEADER_LEN: usize = 12;
    pub const R_MAX: usize = 16;
    pub const MODULE_COUNT: usize = 20;
    pub const ALPHA: usize = 24;
    pub const NAMES_LEN: usize = 28;
    pub const SLICE_LEN: usize = 32;
    pub const FINGERPRINT: usize = 40;
    pub const RESERVED: usize = 56;
    pub const HEADER_CRC: usize = 60;
}

/// The prefix layout of a bundle whose header is `header_len` bytes.
pub fn layout(header_len: u64) -> PrefixLayout {
    PrefixLayout {
        header_bytes: header_len,
        slice_align: SLICE_ALIGN,
    }
}

/// Header length for a table of `modules` entries, `names_len` bytes of names and `r_max` slice
/// checksums: `align64(align4(64 + 24 * modules + names_len) + 4 * r_max)`.
pub fn header_len_for(modules: u32, names_len: u32, r_max: u32) -> Option<u64> {
    let table = (MODULE_ENTRY_LEN as u64).checked_mul(u64::from(modules))?;
    let names_end = (FIXED_HEADER_LEN as u64)
        .checked_add(table)?
        .checked_add(u64::from(names_len))?;
    let crcs_end = crate::le::align_up(names_end, 4)?.checked_add(4 * u64::from(r_max))?;
    crate::le::align_up(crcs_end, SLICE_ALIGN)
}

/// Offset of the slice checksum table within the header.
pub(crate) fn crc_table_offset(modules: u32, names_len: u32) -> u64 {
    let names_end = FIXED_HEADER_LEN as u64
        + MODULE_ENTRY_LEN as u64 * u64::from(modules)
        + u64::from(names_len);
    names_end.next_multiple_of(4)
}

#[cfg(feature = "std")]
pub(crate) fn dtype_code(dtype: ElementType) -> u8 {
    match dtype {
        ElementType::F32 => 0,
        ElementType::F16 => 1,
        ElementType::Bf16 => 2,
    }
}

pub(crate) fn dtype_from_code(code: u8) -> Option<ElementType> {
    match code {
        0 => Some(ElementType::F32),
        1 => Some(ElementType::F16),
        2 => Some(ElementType::Bf16),
        _ => None,
    }
}

#[cfg(feature = "std")]
pub(crate) fn scaling_code(scaling: Scaling) -> u8 {
    match scaling {
        Scaling::AlphaOverRank => 0,
        Scaling::AlphaOverSqrtRank => 1,
    }
}

pub(crate) fn scaling_from_code(code: u8) -> Option<Scaling> {
    match code {
        0 => Some(Scaling::AlphaOverRank),
        1 => Some(Scaling::AlphaOverSqrtRank),
        _ => None,
    }
}
