//! Greedy generation, step for step as the host's `qdylora generate` does it, logging what the
//! host comparison needs (`scripts/firmware.sh` and the `firmware_compare` tool parse these
//! lines; change them together):
//!
//! ```text
//! prompt 0 "enc fxigp=" ids [1, 10, 19, 8]
//! prompt 0 step 0 token 23 logits [-1.25, 3.5, ...]
//! prompt 0 generated [23, 11, 2]
//! ```

use qdylora_core::infer::{Decoder, DecoderWeights, LinearDelta, argmax};

use crate::FirmwareError;
use crate::arena::MAX_SEQ;
use crate::assets::Prompt;

/// Most tokens generated per prompt: the host's `--max-new-tokens` default.
pub const MAX_NEW_TOKENS: usize = 16;

/// The tokens a prompt produced (EOS included when reached).
#[derive(Debug, Clone, Copy)]
pub struct Generated {
    tokens: [u32; MAX_NEW_TOKENS],
    len: usize,
}

impl Generated {
    /// The generated ids.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens[..self.len]
    }
}

/// Feeds prompt `index` to a fresh decoder over `arena`, then picks the most likely next token
/// until EOS, [`MAX_NEW_TOKENS`] tokens or [`MAX_SEQ`] positions, logging every step's logits.
pub fn run_prompt<W: DecoderWeights, D: LinearDelta>(
    index: usize,
    prompt: &Prompt,
    eos: u32,
    weights: &W,
    delta: &D,
    arena: &mut [f32],
) -> Result<Generated, FirmwareError> {
    defmt::info!(
        "prompt {=usize} \"{=str}\" ids {=[?]}",
        index,
        prompt.text,
        prompt.ids
    );
    let mut len = prompt.ids.len();
    if len == 0 || len >= MAX_SEQ {
        return Err(FirmwareError::PromptLength {
            len,
            max_seq: MAX_SEQ,
        });
    }
    let mut decoder = Decoder::new(*weights.config(), MAX_SEQ, arena)?;
    for (pos, &token) in prompt.ids[..len - 1].iter().enumerate() {
        decoder.step(weights, delta, token as usize, pos)?;
    }
    let mut logits = decoder.step(weights, delta, prompt.ids[len - 1] as usize, len - 1)?;

    // The host's loop: while fewer than MAX_NEW_TOKENS and the sequence is shorter than the
    // model's positions, append the argmax of the last position's logits; stop after EOS.
    let mut out = Generated {
        tokens: [0; MAX_NEW_TOKENS],
        len: 0,
    };
    loop {
        let next = argmax(logits) as u32;
        defmt::info!(
            "prompt {=usize} step {=usize} token {=u32} logits {=[?]}",
            index,
            out.len,
            next,
            logits
        );
        out.tokens[out.len] = next;
        out.len += 1;
        if next == eos || out.len == MAX_NEW_TOKENS || len + 1 >= MAX_SEQ {
            break;
        }
        logits = decoder.step(weights, delta, next as usize, len)?;
        len += 1;
    }
    defmt::info!("prompt {=usize} generated {=[?]}", index, out.tokens());
    Ok(out)
}
