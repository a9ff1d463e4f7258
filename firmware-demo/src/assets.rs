//! The files the firmware embeds in flash, made from a host demo run by
//! `scripts/firmware-assets.sh` (see the README): the device model container, the nested adapter
//! bundle and the task prompts.

use crate::fault_injection;

/// File bytes at an 8-byte aligned address: the readers hand out `&[f32]` views of them in
/// place (the device model needs 4; 8 matches the adapter RAM).
#[repr(C, align(8))]
struct Aligned<const N: usize>([u8; N]);

/// `include_bytes!` at an aligned address.
macro_rules! include_aligned {
    ($path:literal) => {{
        static FILE: Aligned<{ include_bytes!($path).len() }> = Aligned(*include_bytes!($path));
        &FILE.0
    }};
}

/// The device model container (`model.qdm`): the demo's base in NF4 + double quant.
pub fn model_file() -> &'static [u8] {
    include_aligned!("../assets/model.qdm")
}

const BUNDLE_LEN: usize = include_bytes!("../assets/adapter.qdyl").len();
static BUNDLE: Aligned<BUNDLE_LEN> = Aligned(fault_injection::damage_bundle(*include_bytes!(
    "../assets/adapter.qdyl"
)));
const BUNDLE_FILE_LEN: usize =
    fault_injection::bundle_file_len(include_bytes!("../assets/adapter.qdyl"));
const _: () = assert!(BUNDLE_FILE_LEN <= BUNDLE_LEN);

/// The nested adapter bundle (`adapter.qdyl`, f32, every rank of the demo's QDyLoRA run), as the
/// device stores it: damaged or cut short with the fault-injection features.
pub fn bundle_file() -> &'static [u8] {
    &BUNDLE.0[..BUNDLE_FILE_LEN]
}

/// The little-endian `u32` at byte `at` of an embedded file's header, for sizes fixed at compile
/// time (the readers validate the headers at run time).
pub(crate) const fn u32_le_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// A task prompt: its text and token ids (BOS first), from the host's tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct Prompt {
    /// The prompt as the host's `qdylora generate --prompt` takes it.
    pub text: &'static str,
    /// BOS + the prompt's token ids.
    pub ids: &'static [u32],
}

// `PROMPTS` and `EOS`, written by scripts/firmware-assets.sh.
include!("../assets/prompts.rs");
