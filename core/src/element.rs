use half::{bf16, f16};

/// The element types adapters and dequantized weights come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ElementType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of a binary32).
    Bf16,
}

impl ElementType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            ElementType::F32 => 4,
            ElementType::F16 | ElementType::Bf16 => 2,
        }
    }

    /// Decodes one little-endian element from exactly `size_bytes()` bytes (missing bytes read as 0).
    pub fn decode_le(self, bytes: &[u8]) -> f32 {
        let b = |i: usize| bytes.get(i).copied().unwrap_or(0);
        match self {
            ElementType::F32 => f32::from_le_bytes([b(0), b(1), b(2), b(3)]),
            ElementType::F16 => f16::from_le_bytes([b(0), b(1)]).to_f32(),
            ElementType::Bf16 => bf16::from_le_bytes([b(0), b(1)]).to_f32(),
        }
    }
}

/// A scalar that converts to and from f32: the input and output types of the quantizers.
pub trait Element: Copy {
    /// The matching [`ElementType`].
    const TYPE: ElementType;
    /// Exact widening (f16 and bf16 convert exactly).
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even narrowing, as CUDA's `__float2half_rn` / `__float2bfloat16`.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const TYPE: ElementType = ElementType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const TYPE: ElementType = ElementType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const TYPE: ElementType = ElementType::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Read access to a run of elements stored in any [`ElementType`], without copying them.
///
/// Implemented for plain slices and by the file readers for little-endian byte views, so the
/// kernels run directly on adapter bytes in flash.
pub trait ElementSource {
    /// Number of elements.
    fn len(&self) -> usize;
    /// Element `i` as f32; `i` must be below `len()` (out-of-range reads return 0.0).
    fn get(&self, i: usize) -> f32;
    /// True when there are no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Element> ElementSource for [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
    fn get(&self, i: usize) -> f32 {
        <[T]>::get(self, i).map_or(0.0, |v| v.to_f32())
    }
}

impl<S: ElementSource + ?Sized> ElementSource for &S {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, i: usize) -> f32 {
        (**self).get(i)
    }
}
