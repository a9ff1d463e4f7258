use qdylora_formats::FormatError;

/// Why a firmware run failed; logged with defmt before exiting with [`crate::exit::ERROR`].
#[derive(Debug, Clone, Copy, PartialEq, defmt::Format)]
pub enum FirmwareError {
    /// The core rejected its input (bad lengths, shapes, ranks...).
    Core(qdylora_core::Error),
    /// A file reader rejected an embedded file (the message names the field at fault).
    Format(FormatFault),
    /// A numerical check of the self-check exceeded its bound.
    CheckFailed {
        /// What was checked.
        check: &'static str,
        /// The largest error seen.
        error: f32,
        /// The bound it had to stay within.
        bound: f32,
    },
    /// The adapter RAM buffer was asked for twice.
    AdapterRamTaken,
    /// The decoder arena was asked for twice.
    ArenaTaken,
    /// The adapter was trained on another base model than the one embedded.
    FingerprintMismatch {
        /// The device model's fingerprint.
        model: [u8; 16],
        /// The base fingerprint the bundle records.
        bundle: [u8; 16],
    },
    /// The stored bundle ends before the rank the budget affords is complete.
    BundleTruncated {
        /// The rank the budget affords.
        rank: u32,
        /// Bytes of that rank's prefix.
        needed: usize,
        /// Bytes of the stored file.
        available: usize,
    },
    /// A slice of the rank the budget affords failed its checksum in the copy in RAM.
    BundleDamaged {
        /// The rank the budget affords.
        rank: u32,
        /// How many leading ranks of the copy are intact.
        intact: u32,
    },
    /// The rank found from the header alone differs from the reader's `rank_for_budget`.
    RankDisagreement {
        /// The largest rank whose `prefix_len` fits the budget.
        header: u32,
        /// `rank_for_budget` over the copied prefix.
        reader: u32,
    },
    /// The model needs a larger decoder arena than the firmware reserves.
    ArenaTooSmall {
        /// f32 elements the model needs at the firmware's sequence length.
        needed: usize,
        /// f32 elements reserved.
        capacity: usize,
    },
    /// A prompt is empty or leaves no position to generate into.
    PromptLength {
        /// Tokens in the prompt (BOS included).
        len: usize,
        /// Positions the decoder holds.
        max_seq: usize,
    },
}

impl From<qdylora_core::Error> for FirmwareError {
    fn from(err: qdylora_core::Error) -> Self {
        FirmwareError::Core(err)
    }
}

impl From<FormatError> for FirmwareError {
    fn from(err: FormatError) -> Self {
        FirmwareError::Format(FormatFault(err))
    }
}

/// A reader error, logged through its `Display` text (qdylora-formats has no defmt support).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FormatFault(pub FormatError);

impl defmt::Format for FormatFault {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{}", defmt::Display2Format(&self.0));
    }
}
