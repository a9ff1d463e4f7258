//! The readers' error type: small, `Copy` and allocation-free so firmware can log it, and
//! specific enough to say which field or byte offset of a file is at fault.

use core::fmt;

use qdylora_core::infer::{LinearKind, NormKind};

/// Which part of a file an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Field {
    Magic,
    Version,
    HeaderLen,
    HeaderChecksum,
    ElementType,
    Scaling,
    RMax,
    Alpha,
    ModuleCount,
    NamesLen,
    SliceLen,
    Reserved,
    ModuleTable,
    ModuleName,
    ModuleShape,
    ModuleOffset,
    Slice,
    Config,
    TensorCount,
    TensorTable,
    TensorName,
    TensorKind,
    TensorShape,
    TensorData,
    TensorChecksum,
    Blocksize,
    Code8,
    FileLen,
}

/// A tensor of a decoder, as the device model names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelTensor {
    /// `model.embed_tokens.weight`
    Embedding,
    /// `model.norm.weight`
    FinalNorm,
    /// `lm_head.weight`
    LmHead,
    /// `model.layers.N.{input,post_attention}_layernorm.weight`
    Norm(NormKind),
    /// `model.layers.N.{self_attn,mlp}.*_proj.weight`
    Linear(LinearKind),
}

/// Everything a reader can reject. Each variant names the field and, where there is one, the byte
/// offset or index at fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FormatError {
    /// The buffer ends before `field` does.
    Truncated {
        /// The part that is cut.
        field: Field,
        /// Bytes the buffer needs to hold it.
        needed: u64,
        /// Bytes the buffer has.
        available: u64,
    },
    /// The first eight bytes are not this format's magic.
    BadMagic,
    /// A format version this reader does not know.
    UnsupportedVersion {
        /// The version in the file.
        found: u16,
        /// The version this reader reads.
        supported: u16,
    },
    /// A field holds a value outside its allowed set (an unknown code, zero, a non-finite float,
    /// a length that disagrees with the rest of the header).
    InvalidValue {
        /// The field.
        field: Field,
        /// Its value (floats as their bit pattern).
        value: u64,
    },
    /// A count or size above the limit this format sets (see `FORMAT.md`).
    TooLarge {
        /// The field.
        field: Field,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A region does not lie inside the part of the file it must lie in.
    OutOfBounds {
        /// The region.
        field: Field,
        /// Index of the entry (module, tensor) it belongs to.
        index: u32,
        /// Its start.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// A region starts before the previous one ended (regions must be in file order, disjoint).
    Overlap {
        /// The region.
        field: Field,
        /// Index of the entry.
        index: u32,
        /// Its start.
        offset: u64,
    },
    /// A region is not aligned as the format requires.
    Misaligned {
        /// The region.
        field: Field,
        /// Its start.
        offset: u64,
        /// The alignment required.
        align: u32,
    },
    /// A name is not UTF-8, empty, or out of order (tables are sorted by name, no duplicates).
    BadName {
        /// Which table.
        field: Field,
        /// Index of the entry.
        index: u32,
    },
    /// A checksum over a region does not match.
    ChecksumMismatch {
        /// The region.
        field: Field,
        /// Index of the entry (0 for the header).
        index: u32,
        /// The checksum stored in the file.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// The buffer continues past the end the header declares.
    TrailingBytes {
        /// Where the file should end.
        expected_len: u64,
        /// The buffer's length.
        actual_len: u64,
    },
    /// The buffer's address is not aligned enough for zero-copy f32 views.
    BufferMisaligned {
        /// The alignment needed.
        align: u32,
    },
    /// A rank outside `1..=complete_rank`.
    RankUnavailable {
        /// The rank asked for.
        rank: u32,
        /// The largest complete rank of this buffer.
        complete_rank: u32,
    },
    /// A module or tensor index past the end of its table.
    IndexOutOfRange {
        /// Which table.
        field: Field,
        /// The index asked for.
        index: u32,
        /// Entries in the table.
        count: u32,
    },
    /// A tensor the model needs is absent, or present with the wrong kind or shape.
    ModelTensor {
        /// Which tensor.
        tensor: ModelTensor,
        /// Its decoder layer (0 for model-level tensors).
        layer: u32,
        /// `TensorName`: absent; `TensorKind` or `TensorShape`: present but wrong.
        problem: Field,
    },
    /// The file holds tensors the model does not use (the table must be exactly the model).
    UnexpectedTensors {
        /// Tensors in the file.
        found: u32,
        /// Tensors the model has.
        expected: u32,
    },
    /// An error from the core (shape checks, rank math).
    Core(qdylora_core::Error),
}

impl From<qdylora_core::Error> for FormatError {
    fn from(e: qdylora_core::Error) -> Self {
        FormatError::Core(e)
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FormatError::Truncated {
                field,
                needed,
                available,
            } => write!(
                f,
                "truncated: {field:?} needs {needed} bytes, the buffer has {available}"
            ),
            FormatError::BadMagic => write!(f, "not this file format (wrong magic bytes)"),
            FormatError::UnsupportedVersion { found, supported } => write!(
                f,
                "format version {found} is not supported (this reader reads version {supported})"
            ),
            FormatError::InvalidValue { field, value } => {
                write!(f, "invalid {field:?}: {value:#x}")
            }
            FormatError::TooLarge {
                field,
                value,
                limit,
            } => write!(f, "{field:?} of {value} exceeds the limit of {limit}"),
            FormatError::OutOfBounds {
                field,
                index,
                offset,
                len,
            } => write!(
                f,
                "{field:?} #{index} at offset {offset} (+{len} bytes) lies outside its region"
            ),
            FormatError::Overlap {
                field,
                index,
                offset,
            } => write!(
                f,
                "{field:?} #{index} at offset {offset} overlaps the region before it"
            ),
            FormatError::Misaligned {
                field,
                offset,
                align,
            } => write!(
                f,
                "{field:?} at offset {offset} is not {align}-byte aligned"
            ),
            FormatError::BadName { field, index } => write!(
                f,
                "{field:?} #{index}: name is empty, not UTF-8, or not in strictly ascending order"
            ),
            FormatError::ChecksumMismatch {
                field,
                index,
                stored,
                computed,
            } => write!(
                f,
                "checksum mismatch in {field:?} #{index}: stored {stored:#010x}, computed {computed:#010x}"
            ),
            FormatError::TrailingBytes {
                expected_len,
                actual_len,
            } => write!(
                f,
                "{actual_len} bytes where the file ends at {expected_len}: trailing bytes"
            ),
            FormatError::BufferMisaligned { align } => write!(
                f,
                "the buffer's address is not {align}-byte aligned (needed for zero-copy f32 data)"
            ),
            FormatError::RankUnavailable {
                rank,
                complete_rank,
            } => write!(
                f,
                "rank {rank} is not available: the buffer holds ranks 1..={complete_rank}"
            ),
            FormatError::IndexOutOfRange {
                field,
                index,
                count,
            } => write!(f, "{field:?} index {index} is past the {count} entries"),
            FormatError::ModelTensor {
                tensor,
                layer,
                problem,
            } => match problem {
                Field::TensorName => write!(f, "tensor {tensor:?} of layer {layer} is missing"),
                _ => write!(
                    f,
                    "tensor {tensor:?} of layer {layer} has the wrong {problem:?}"
                ),
            },
            FormatError::UnexpectedTensors { found, expected } => write!(
                f,
                "the file has {found} tensors where the model has {expected}"
            ),
            FormatError::Core(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for FormatError {}
