//! f32 values to little-endian bytes of an element type (round to nearest even).

use half::{bf16, f16};
use qdylora_core::ElementType;
use std::vec::Vec;

/// Appends `values` to `out` as little-endian `dtype` elements.
pub(crate) fn extend_le(
    out: &mut Vec<u8>,
    dtype: ElementType,
    values: impl IntoIterator<Item = f32>,
) {
    for v in values {
        match dtype {
            ElementType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            ElementType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            ElementType::Bf16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }
}

/// `values` as little-endian `dtype` bytes.
pub(crate) fn to_le_bytes(dtype: ElementType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size_bytes());
    extend_le(&mut out, dtype, values.iter().copied());
    out
}

/// `v` rounded to `dtype` and back: what a reader gets for a written value.
pub(crate) fn round_to(dtype: ElementType, v: f32) -> f32 {
    match dtype {
        ElementType::F32 => v,
        ElementType::F16 => f16::from_f32(v).to_f32(),
        ElementType::Bf16 => bf16::from_f32(v).to_f32(),
    }
}
