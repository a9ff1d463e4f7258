//! A zero-copy view of little-endian elements in a file.

use qdylora_core::{ElementSource, ElementType};

use crate::error::{Field, FormatError};

/// Little-endian elements of one [`ElementType`] over borrowed bytes (a row of an adapter, a norm
/// weight). Decodes on access, so it needs no alignment; [`ElemView::as_f32_slice`] hands out
/// a plain `&[f32]` when the data is f32 and aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElemView<'a> {
    bytes: &'a [u8],
    dtype: ElementType,
}

impl<'a> ElemView<'a> {
    /// A view of `bytes` as elements of `dtype`; the length must be a whole number of elements.
    pub fn new(bytes: &'a [u8], dtype: ElementType) -> Result<Self, FormatError> {
        if !bytes.len().is_multiple_of(dtype.size_bytes()) {
            return Err(FormatError::InvalidValue {
                field: Field::TensorData,
                value: bytes.len() as u64,
            });
        }
        Ok(Self { bytes, dtype })
    }

    /// The element type.
    pub fn dtype(&self) -> ElementType {
        self.dtype
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The elements as `&[f32]` when they are f32 and the bytes are 4-byte aligned in memory
    /// (on a little-endian target).
    pub fn as_f32_slice(&self) -> Option<&'a [f32]> {
        if self.dtype != ElementType::F32 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(self.bytes).ok()
    }

    /// Copies the elements out as f32.
    #[cfg(feature = "std")]
    pub fn to_f32_vec(&self) -> std::vec::Vec<f32> {
        (0..ElementSource::len(self)).map(|i| self.get(i)).collect()
    }
}

impl ElementSource for ElemView<'_> {
    fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size_bytes()
    }

    fn get(&self, i: usize) -> f32 {
        let size = self.dtype.size_bytes();
        match i
            .checked_mul(size)
            .and_then(|start| self.bytes.get(start..start.checked_add(size)?))
        {
            Some(b) => self.dtype.decode_le(b),
            None => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_type() {
        let bytes = [0x00, 0x3c, 0x00, 0xc0]; // f16 1.0, -2.0
        let v = ElemView::new(&bytes, ElementType::F16).unwrap();
        assert_eq!((v.len(), v.get(0), v.get(1), v.get(2)), (2, 1.0, -2.0, 0.0));
        assert!(v.as_f32_slice().is_none());
        assert!(ElemView::new(&bytes[..3], ElementType::F16).is_err());
        let bf = ElemView::new(&[0x80, 0x3f], ElementType::Bf16).unwrap();
        assert_eq!(bf.get(0), 1.0);
    }
}
