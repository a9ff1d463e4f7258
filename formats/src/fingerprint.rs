//! The base-model fingerprint that adapters and device models carry, so an adapter is never
//! applied to the wrong base silently.
//!
//! It is XXH3-128 over a canonical encoding of what determines the quantized model's outputs,
//! independent of how the dense tensors happen to be stored:
//!
//! * a domain tag and version (`qdylora-model-fingerprint-v1`),
//! * every [`DecoderConfig`] field (f32 fields by bit pattern),
//! * every tensor given, sorted by name: its name and shape, then
//!   - for an NF4 tensor: blocksize, packed codes, absmax codes, nested absmax, offset and the
//!     256-entry code (all floats by bit pattern), but not the pre-quantization dtype;
//!   - for a dense tensor: its values as f32 bit patterns, so the same values stored as bf16,
//!     f16 or f32 give the same fingerprint.
//!
//! Callers pass the tensors the model has (a tied model has no `lm_head`). Not a cryptographic
//! hash: it guards against mistakes, not against an adversary.

use std::vec::Vec;

use qdylora_core::infer::DecoderConfig;
use xxhash_rust::xxh3::Xxh3;

use crate::nf4_weight::Nf4Weight;

const DOMAIN: &[u8] = b"qdylora-model-fingerprint-v1";

enum Tensor<'a> {
    Nf4(&'a Nf4Weight),
    Dense(&'a [usize], &'a [f32]),
}

/// The fingerprint of a (quantized) base model.
pub fn model_fingerprint(
    config: &DecoderConfig,
    quantized: &[(&str, &Nf4Weight)],
    dense: &[(&str, &[usize], &[f32])],
) -> [u8; 16] {
    let mut h = Xxh3::new();
    h.update(DOMAIN);
    for word in [
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.rope_theta.to_bits(),
        config.rms_norm_eps.to_bits(),
        u32::from(config.tie_word_embeddings),
    ] {
        h.update(&word.to_le_bytes());
    }
    let mut tensors: Vec<(&str, Tensor<'_>)> = quantized
        .iter()
        .map(|&(name, w)| (name, Tensor::Nf4(w)))
        .chain(
            dense
                .iter()
                .map(|&(name, shape, v)| (name, Tensor::Dense(shape, v))),
        )
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    h.update(&(tensors.len() as u64).to_le_bytes());
    for (name, tensor) in tensors {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        match tensor {
            Tensor::Nf4(w) => {
                h.update(&[1]);
                for v in [
                    w.rows,
                    w.cols,
                    w.blocksize,
                    w.packed.len(),
                    w.absmax_codes.len(),
                ] {
                    h.update(&(v as u64).to_le_bytes());
                }
                h.update(&w.packed);
                h.update(&w.absmax_codes);
                update_f32s(&mut h, &w.nested_absmax);
                h.update(&w.offset.to_le_bytes());
                update_f32s(&mut h, &w.code8[..]);
            }
            Tensor::Dense(shape, values) => {
                h.update(&[0]);
                h.update(&(shape.len() as u64).to_le_bytes());
                for &d in shape {
                    h.update(&(d as u64).to_le_bytes());
                }
                h.update(&(values.len() as u64).to_le_bytes());
                update_f32s(&mut h, values);
            }
        }
    }
    h.digest128().to_le_bytes()
}

fn update_f32s(h: &mut Xxh3, values: &[f32]) {
    let mut buf = Vec::with_capacity(4 * 1024);
    for chunk in values.chunks(1024) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&buf);
    }
}
