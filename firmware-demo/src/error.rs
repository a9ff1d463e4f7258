/// Why a firmware run failed; logged with defmt before exiting with [`crate::exit::ERROR`].
#[derive(Debug, Clone, Copy, PartialEq, defmt::Format)]
pub enum FirmwareError {
    /// The core rejected its input (bad lengths, shapes, ranks...).
    Core(qdylora_core::Error),
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
}

impl From<qdylora_core::Error> for FirmwareError {
    fn from(err: qdylora_core::Error) -> Self {
        FirmwareError::Core(err)
    }
}
