use core::fmt;

/// Which caller-provided buffer an [`Error::BufferLength`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[allow(missing_docs)]
pub enum Buffer {
    Input,
    Packed,
    Absmax,
    AbsmaxCodes,
    NestedAbsmax,
    Output,
    Scratch,
    Weights,
}

/// Everything that can go wrong in the core. Small and `Copy` so firmware can log it.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Error {
    /// bitsandbytes accepts blocksizes 32, 64, ..., 4096 (powers of two).
    InvalidBlockSize {
        /// The blocksize asked for.
        blocksize: usize,
    },
    /// A buffer does not have the length the operation needs.
    BufferLength {
        /// Which buffer.
        buffer: Buffer,
        /// The length needed (elements or bytes of that buffer's type).
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// The input holds an infinity or NaN at this flat index; NF4 cannot represent it.
    NonFinite {
        /// Flat index of the first offending value.
        index: usize,
    },
    /// A rank outside `1..=r_max`.
    RankOutOfRange {
        /// The rank asked for.
        rank: u32,
        /// The largest rank the adapter has.
        r_max: u32,
    },
    /// Even rank 1 does not fit the byte budget.
    BudgetTooSmall {
        /// The budget in bytes.
        budget: u64,
        /// Bytes a rank-1 prefix needs.
        rank_one_bytes: u64,
    },
    /// A size computation overflowed `u64`/`usize` (an absurd shape).
    SizeOverflow,
    /// A dimension is zero or the shapes of two operands disagree.
    Shape {
        /// What was expected.
        expected: usize,
        /// What was found.
        actual: usize,
    },
    /// An adapter description without modules or with `r_max == 0`.
    EmptyAdapter,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::InvalidBlockSize { blocksize } => write!(
                f,
                "invalid blocksize {blocksize}: must be a power of two from 32 to 4096"
            ),
            Error::BufferLength {
                buffer,
                expected,
                actual,
            } => write!(
                f,
                "{buffer:?} buffer has length {actual}, the operation needs {expected}"
            ),
            Error::NonFinite { index } => write!(
                f,
                "non-finite value (inf or NaN) at flat index {index}; NF4 cannot represent it"
            ),
            Error::RankOutOfRange { rank, r_max } => {
                write!(f, "rank {rank} is outside 1..={r_max}")
            }
            Error::BudgetTooSmall {
                budget,
                rank_one_bytes,
            } => write!(
                f,
                "a budget of {budget} bytes is below the {rank_one_bytes} bytes that rank 1 needs"
            ),
            Error::SizeOverflow => write!(f, "size computation overflowed"),
            Error::Shape { expected, actual } => {
                write!(f, "shape mismatch: expected {expected}, found {actual}")
            }
            Error::EmptyAdapter => write!(f, "adapter has no modules or r_max is 0"),
        }
    }
}

impl core::error::Error for Error {}

/// Checks a buffer length, naming the buffer in the error.
pub(crate) fn check_len(buffer: Buffer, expected: usize, actual: usize) -> Result<(), Error> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::BufferLength {
            buffer,
            expected,
            actual,
        })
    }
}
