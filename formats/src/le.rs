//! Bounds-checked little-endian reads and region arithmetic shared by the readers.
//!
//! Every offset and length in a file is a `u64` read from untrusted bytes; these helpers do the
//! arithmetic checked and turn every failure into a [`FormatError`] naming the field.

use core::cmp::Ordering;

use crate::error::{Field, FormatError};

/// `N` bytes at `at`; the caller has checked that the fixed header is present.
fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = at.checked_add(N).and_then(|end| bytes.get(at..end)) {
        out.copy_from_slice(src);
    }
    out
}

pub(crate) fn u8_at(bytes: &[u8], at: usize) -> u8 {
    bytes.get(at).copied().unwrap_or(0)
}

pub(crate) fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(bytes, at))
}

pub(crate) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(bytes, at))
}

pub(crate) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(bytes, at))
}

pub(crate) fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(array(bytes, at))
}

pub(crate) fn bytes16_at(bytes: &[u8], at: usize) -> [u8; 16] {
    array(bytes, at)
}

/// `value` rounded up to a multiple of `align` (a power of two), checked.
pub(crate) fn align_up(value: u64, align: u64) -> Option<u64> {
    value.checked_next_multiple_of(align)
}

/// A `u64` from the file as a `usize` index into the buffer (fails on 32-bit targets for values
/// past 4 GiB, which no buffer there can hold anyway).
pub(crate) fn to_usize(value: u64, field: Field) -> Result<usize, FormatError> {
    usize::try_from(value).map_err(|_| FormatError::TooLarge {
        field,
        value,
        limit: usize::MAX as u64,
    })
}

/// The bytes `[offset, offset + len)` of `bytes`, or an out-of-bounds error naming the region.
pub(crate) fn region(
    bytes: &[u8],
    field: Field,
    index: u32,
    offset: u64,
    len: u64,
) -> Result<&[u8], FormatError> {
    let out_of_bounds = FormatError::OutOfBounds {
        field,
        index,
        offset,
        len,
    };
    let end = offset.checked_add(len).ok_or(out_of_bounds)?;
    let (start, end) = (
        usize::try_from(offset).map_err(|_| out_of_bounds)?,
        usize::try_from(end).map_err(|_| out_of_bounds)?,
    );
    bytes.get(start..end).ok_or(out_of_bounds)
}

/// The whole header of a file whose fixed part ends at `fixed_len` and stores, at `crc_at`, a
/// CRC-32 of the header without the CRC field and the rest of the fixed part: `header_len` must
/// be at least `min_len`, a multiple of `align`, and present in `bytes`.
pub(crate) fn checked_header(
    bytes: &[u8],
    header_len: u64,
    min_len: usize,
    align: u64,
    crc_at: usize,
    fixed_len: usize,
) -> Result<&[u8], FormatError> {
    if header_len < min_len as u64 || !header_len.is_multiple_of(align) {
        return Err(FormatError::InvalidValue {
            field: Field::HeaderLen,
            value: header_len,
        });
    }
    let header =
        region(bytes, Field::HeaderLen, 0, 0, header_len).map_err(|_| FormatError::Truncated {
            field: Field::HeaderLen,
            needed: header_len,
            available: bytes.len() as u64,
        })?;
    let stored = u32_at(header, crc_at);
    let computed = crc32(&[&header[..crc_at], &header[fixed_len..]]);
    if !checksum_ok(stored, computed) {
        return Err(FormatError::ChecksumMismatch {
            field: Field::HeaderChecksum,
            index: 0,
            stored,
            computed,
        });
    }
    Ok(header)
}

/// CRC-32 (IEEE) of the concatenation of `parts`.
pub(crate) fn crc32(parts: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()
}

/// Whether a stored checksum matches. Fuzz builds (`--cfg fuzzing`, set by cargo-fuzz) accept
/// any checksum, so the fuzzer can reach the checks behind it instead of stopping at the CRC.
pub(crate) fn checksum_ok(stored: u32, computed: u32) -> bool {
    cfg!(fuzzing) || stored == computed
}

/// Compares `name` with the concatenation of `parts`, byte by byte, without building it.
pub(crate) fn cmp_concat(name: &[u8], parts: &[&[u8]]) -> Ordering {
    name.iter().cmp(parts.iter().flat_map(|p| p.iter()))
}

/// The decimal digits of `n` in `buf` (no allocation).
pub(crate) fn decimal(n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    let mut rest = n;
    loop {
        start -= 1;
        buf[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &buf[start..]
}

/// Binary search over `count` sorted entries: `cmp(i)` orders entry `i` against the key.
pub(crate) fn search(count: usize, cmp: impl Fn(usize) -> Ordering) -> Option<usize> {
    let (mut lo, mut hi) = (0usize, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match cmp(mid) {
            Ordering::Less => lo = mid + 1,
            Ordering::Greater => hi = mid,
            Ordering::Equal => return Some(mid),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(1203, &mut buf), b"1203");
    }

    #[test]
    fn concat_compare_and_search() {
        assert_eq!(cmp_concat(b"ab.c", &[b"ab", b".", b"c"]), Ordering::Equal);
        assert_eq!(cmp_concat(b"ab", &[b"ab", b".c"]), Ordering::Less);
        let names = ["a", "b", "d"];
        let find = |key: &str| search(3, |i| names[i].cmp(key));
        assert_eq!(find("b"), Some(1));
        assert_eq!(find("c"), None);
    }
}
