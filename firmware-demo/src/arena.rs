//! The decoder's working memory: one static f32 arena (activations and the key/value cache),
//! sized at compile time for the embedded model at [`MAX_SEQ`] positions and handed out once.

use core::sync::atomic::{AtomicBool, Ordering};

use qdylora_core::infer::DecoderConfig;

use crate::assets::u32_le_at;

/// Positions the decoder holds (prompt and generated tokens together); the demo's base model
/// has `max_position_embeddings` 32 as well.
pub const MAX_SEQ: usize = 32;

/// Offset of the decoder config in the device model header (`formats/FORMAT.md`).
const CONFIG_AT: usize = 56;

/// `DecoderConfig::arena_len(max_seq)` for the config in a device model header. Only the sizes
/// matter here; the reader validates the whole header at run time, and the firmware checks that
/// the model it parsed fits this arena.
const fn arena_len_of(model: &[u8], max_seq: usize) -> usize {
    let cfg = DecoderConfig {
        vocab_size: u32_le_at(model, CONFIG_AT),
        hidden_size: u32_le_at(model, CONFIG_AT + 4),
        intermediate_size: u32_le_at(model, CONFIG_AT + 8),
        num_layers: u32_le_at(model, CONFIG_AT + 12),
        num_heads: u32_le_at(model, CONFIG_AT + 16),
        num_kv_heads: u32_le_at(model, CONFIG_AT + 20),
        head_dim: u32_le_at(model, CONFIG_AT + 24),
        rope_theta: 0.0,
        rms_norm_eps: 0.0,
        tie_word_embeddings: false,
    };
    cfg.arena_len(max_seq)
}

/// f32 elements of the arena.
pub const LEN: usize = arena_len_of(include_bytes!("../assets/model.qdm"), MAX_SEQ);

static mut ARENA: [f32; LEN] = [0.0; LEN];
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The arena, on the first call only (`None` afterwards).
pub fn take() -> Option<&'static mut [f32]> {
    if TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: TAKEN lets this line run at most once, so this is the only reference to ARENA
    // that ever exists.
    #[allow(unsafe_code)]
    let arena = unsafe { &mut *core::ptr::addr_of_mut!(ARENA) };
    Some(arena)
}
