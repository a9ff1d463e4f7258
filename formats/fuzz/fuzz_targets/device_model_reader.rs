//! Any bytes: the device model reader must return an error or a model a decoder can step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qdylora_core::infer::{Decoder, DecoderWeights, LinearKind, NoAdapter, NormKind};
use qdylora_formats::AlignedBytes;
use qdylora_formats::device_model::DeviceModelReader;

fuzz_target!(|data: &[u8]| {
    let bytes = AlignedBytes::from_slice(data);
    let Ok(model) = DeviceModelReader::parse(bytes.as_bytes()) else {
        return;
    };
    let cfg = *model.config();
    model.embedding_row(0).unwrap();
    model.lm_head_row(cfg.vocab_size as usize - 1).unwrap();
    assert!(model.embedding_row(cfg.vocab_size as usize).is_err());
    model.final_norm().unwrap();
    for layer in 0..cfg.num_layers as usize {
        model.layer_norm(layer, NormKind::Input).unwrap();
        model.layer_norm(layer, NormKind::PostAttention).unwrap();
        for kind in LinearKind::ALL {
            model.linear(layer, kind).unwrap();
        }
    }
    assert!(
        model
            .linear(cfg.num_layers as usize, LinearKind::Q)
            .is_err()
    );
    let arena_len = cfg.arena_len(2);
    if arena_len < 1 << 20 {
        let mut arena = vec![0.0f32; arena_len];
        let mut decoder = Decoder::new(cfg, 2, &mut arena).unwrap();
        decoder.step(&model, &NoAdapter, 0, 0).unwrap();
    }
});
