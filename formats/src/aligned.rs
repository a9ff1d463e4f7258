//! An owned byte buffer whose address is 8-byte aligned, for the zero-copy readers.

use std::path::Path;
use std::vec::Vec;

use crate::error_std::Error;

/// Bytes stored in `u64` words, so `as_bytes()` is 8-byte aligned (a plain `Vec<u8>` promises
/// only 1). The device model reader hands out `&[f32]` views and needs at least 4.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    /// A copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut words = std::vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self {
            words,
            len: bytes.len(),
        }
    }

    /// Reads a whole file.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(Self::from_slice(&bytes))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}
