//! Any bytes, split into a JSON config and a safetensors file: the HF, bitsandbytes and PEFT
//! parsers must return an error or a checkpoint, never panic.
//!
//! Input layout: byte 0 picks the bridge (0 HF, 1 bnb, 2 PEFT), bytes 1..5 are the config's
//! length (u32 LE), then the config, then the safetensors bytes.
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use qdylora_formats::{bnb, hf, peft};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Some(len) = rest
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    else {
        return;
    };
    let rest = &rest[4..];
    let Some((config, weights)) = rest.split_at_checked((len as usize).min(rest.len())) else {
        return;
    };
    let shard = [(PathBuf::from("fuzz/model.safetensors"), weights)];
    match which % 3 {
        0 => {
            if let Ok(ckpt) = hf::parse_checkpoint(config, &shard) {
                assert!(!ckpt.tensors.is_empty());
            }
        }
        1 => {
            if let Ok(ckpt) = bnb::parse_checkpoint(config, &shard) {
                for w in ckpt.quantized.values() {
                    w.matrix().unwrap();
                    let _ = w.dequantize_f32().unwrap();
                }
            }
        }
        _ => {
            if let Ok(adapter) = peft::parse_adapter(config, weights, Path::new("fuzz")) {
                for pair in adapter.modules.values() {
                    assert_eq!(pair.a.len(), pair.rank * pair.in_features);
                }
            }
        }
    }
});
