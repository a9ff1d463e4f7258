//! Fault injection for the embedded adapter bundle, chosen by cargo feature, evaluated at compile
//! time: `damaged-bundle` flips one byte in the middle of the last rank slice the budget affords,
//! `truncated-bundle` cuts the file one byte short of that slice's end. Both leave the header
//! intact and break exactly the rank the firmware would load, the case a reader could mistake for
//! a smaller, valid adapter. Without either feature the bundle is embedded as it is.
//!
//! The damaged slice is located from the raw header fields (`formats/FORMAT.md`), deliberately
//! not through the reader and budget code under test.

use crate::assets::u32_le_at;
use crate::budget;

/// Offsets of the bundle header fields used here.
const HEADER_LEN_AT: usize = 12;
const R_MAX_AT: usize = 16;
const SLICE_LEN_AT: usize = 32;

/// One past the last byte of the largest rank prefix within the budget, and the slice length.
const fn budget_prefix(bundle: &[u8]) -> (usize, usize) {
    let header_len = u32_le_at(bundle, HEADER_LEN_AT) as usize;
    let r_max = u32_le_at(bundle, R_MAX_AT) as usize;
    // slice_len is a u64; the embedded file is far below 4 GiB, so its high half is zero.
    let slice_len = u32_le_at(bundle, SLICE_LEN_AT) as usize;
    let mut rank = (budget::BYTES - header_len) / slice_len;
    if rank > r_max {
        rank = r_max;
    }
    assert!(
        rank >= 1,
        "the budget affords no rank of the embedded bundle"
    );
    (header_len + rank * slice_len, slice_len)
}

/// The bundle as embedded: with `damaged-bundle`, one bit flipped in the middle of the last slice
/// the budget affords (in the `A`/`B` data, covered by that slice's CRC).
pub const fn damage_bundle<const N: usize>(mut bundle: [u8; N]) -> [u8; N] {
    if cfg!(feature = "damaged-bundle") {
        let (end, slice_len) = budget_prefix(&bundle);
        bundle[end - slice_len / 2] ^= 0x10;
    }
    bundle
}

/// The bundle's length as stored: with `truncated-bundle`, one byte short of the last slice the
/// budget affords.
pub const fn bundle_file_len(bundle: &[u8]) -> usize {
    if cfg!(feature = "truncated-bundle") {
        budget_prefix(bundle).0 - 1
    } else {
        bundle.len()
    }
}
