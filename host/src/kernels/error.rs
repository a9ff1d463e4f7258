//! The one error type of the host kernels.

use thiserror::Error;

/// Everything the host kernels can reject. No kernel panics on bad input; it returns one of these.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KernelError {
    /// The weight's own buffers disagree with its shape or blocksize.
    #[error("inconsistent NF4 weight: {0}")]
    Weight(#[from] qdylora_core::Error),
    /// A caller buffer does not have the length the operation needs.
    #[error("{buffer} has {actual} elements, the operation needs {expected}")]
    Length {
        /// Which argument.
        buffer: &'static str,
        /// The length needed.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// A row range that is empty-reversed or reaches past the last row.
    #[error("row range {start}..{end} is not within 0..{rows}")]
    RowRange {
        /// First row asked for.
        start: usize,
        /// One past the last row asked for.
        end: usize,
        /// Rows the weight has.
        rows: usize,
    },
    /// A buffer size computed from the arguments overflows `usize`.
    #[error("size of {what} overflows usize")]
    SizeOverflow {
        /// What was being sized.
        what: &'static str,
    },
    /// The caller forced an instruction set this CPU does not have.
    #[error("instruction set {0:?} is not available on this CPU")]
    UnsupportedIsa(crate::kernels::Isa),
}

/// Checks a caller buffer's length.
pub(crate) fn check_len(
    buffer: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), KernelError> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::Length {
            buffer,
            expected,
            actual,
        })
    }
}

/// `a * b`, or a typed error naming what was being sized.
pub(crate) fn mul(a: usize, b: usize, what: &'static str) -> Result<usize, KernelError> {
    a.checked_mul(b).ok_or(KernelError::SizeOverflow { what })
}
