//! Property tests of the device model and bitsandbytes round trips over random tiny LLaMAs.

use half::f16;
use proptest::prelude::*;
use qdylora_core::ElementType;
use qdylora_core::infer::{DecoderWeights, LinearKind, NormKind};
use qdylora_formats::device_model::{DeviceModelReader, write_device_model};
use qdylora_formats::{AlignedBytes, Nf4Weight, bnb, hf};
use serde_json::{Value, json};

#[derive(Debug)]
struct Tiny {
    config: Value,
    quantized: Vec<(String, Nf4Weight)>,
    dense: Vec<(String, Vec<usize>, Vec<f32>)>,
}

/// The free parameters of a random tiny LLaMA.
#[derive(Debug, Clone)]
struct Spec {
    kv_heads: u32,
    group: u32,
    head_dim: u32,
    inter: u32,
    layers: u32,
    vocab: u32,
    tie: bool,
    blocksize: usize,
    seed: u32,
}

fn tiny(spec: &Spec) -> Tiny {
    let Spec {
        kv_heads,
        group,
        head_dim,
        inter,
        layers,
        vocab,
        tie,
        blocksize,
        seed,
    } = spec.clone();
    let heads = kv_heads * group;
    let config = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": heads * head_dim, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": vocab, "tie_word_embeddings": tie,
    });
    let llama = hf::LlamaConfig::from_json(&config, std::path::Path::new("config.json")).unwrap();
    let mut quantized = Vec::new();
    let mut dense = Vec::new();
    for (i, (name, shape)) in llama.expected_tensors().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|j| {
                ((((j as u32).wrapping_mul(2654435761)) ^ seed ^ (i as u32 * 97)) % 4001) as f32
                    / 2000.0
                    - 1.0
            })
            .collect();
        if name.contains("_proj.") {
            quantized.push((
                name,
                Nf4Weight::quantize::<f32>(shape[0], shape[1], &values, blocksize).unwrap(),
            ));
        } else {
            dense.push((name, shape, values));
        }
    }
    Tiny {
        config,
        quantized,
        dense,
    }
}

fn tiny_strategy() -> impl Strategy<Value = Tiny> {
    (
        1u32..3,
        1u32..3,
        prop::sample::select(vec![2u32, 4, 6]),
        1u32..20,
        1u32..3,
        1u32..40,
        any::<bool>(),
        prop::sample::select(vec![32usize, 64, 128]),
        any::<u32>(),
    )
        .prop_map(
            |(kv_heads, group, head_dim, inter, layers, vocab, tie, blocksize, seed)| {
                tiny(&Spec {
                    kv_heads,
                    group,
                    head_dim,
                    inter,
                    layers,
                    vocab,
                    tie,
                    blocksize,
                    seed,
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn device_model_write_read(t in tiny_strategy(), f16_dense in any::<bool>()) {
        let dtype = if f16_dense { ElementType::F16 } else { ElementType::F32 };
        let llama = hf::LlamaConfig::from_json(&t.config, std::path::Path::new("c")).unwrap();
        let cfg = llama.to_decoder_config();
        let q: Vec<_> = t.quantized.iter().map(|(n, w)| (n.clone(), w)).collect();
        let d: Vec<_> = t.dense.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())).collect();
        let bytes = AlignedBytes::from_slice(&write_device_model(&cfg, [3; 16], &q, &d, dtype).unwrap());
        let r = DeviceModelReader::parse(bytes.as_bytes()).unwrap();
        prop_assert_eq!(*r.config(), cfg);
        for (name, w) in &t.quantized {
            let m = r.nf4(r.find_tensor(name).unwrap()).unwrap();
            let x: Vec<f32> = (0..w.cols).map(|j| j as f32 * 0.1 - 0.3).collect();
            let want = w.matrix().unwrap();
            for row in 0..w.rows {
                prop_assert_eq!(m.row_dot(row, &x).unwrap().to_bits(), want.row_dot(row, &x).unwrap().to_bits());
            }
        }
        for (name, _, values) in &t.dense {
            let got = r.dense(r.find_tensor(name).unwrap()).unwrap().to_f32_vec();
            let want: Vec<f32> = values.iter().map(|&v| if f16_dense { f16::from_f32(v).to_f32() } else { v }).collect();
            prop_assert_eq!(got, want);
        }
        for layer in 0..cfg.num_layers as usize {
            prop_assert!(r.layer_norm(layer, NormKind::Input).is_ok());
            prop_assert!(r.linear(layer, LinearKind::Down).is_ok());
        }
        prop_assert!(r.lm_head_row(cfg.vocab_size as usize - 1).is_ok());
    }

    #[test]
    fn bnb_write_read_write_is_byte_identical(t in tiny_strategy(), dense_bf16 in any::<bool>()) {
        let dtype = if dense_bf16 { ElementType::Bf16 } else { ElementType::F32 };
        let q: Vec<_> = t.quantized.iter().map(|(n, w)| (n.trim_end_matches(".weight").to_string(), w)).collect();
        let d: Vec<_> = t.dense.iter().map(|(n, s, v)| (n.clone(), s.clone(), dtype, v.as_slice())).collect();
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        bnb::write_checkpoint(&a, &t.config, "bfloat16", &q, &d).unwrap();
        let read = bnb::read_checkpoint(&a).unwrap();
        for (name, w) in &q {
            prop_assert_eq!(&read.quantized[name], *w);
        }
        let q2: Vec<_> = read.quantized.iter().map(|(k, w)| (k.clone(), w)).collect();
        let d2: Vec<_> = read.dense.iter().map(|(n, t)| (n.clone(), t.shape.clone(), t.dtype, t.data.as_slice())).collect();
        bnb::write_checkpoint(&b, &read.raw_config, "bfloat16", &q2, &d2).unwrap();
        for file in ["model.safetensors", "config.json"] {
            prop_assert!(std::fs::read(a.join(file)).unwrap() == std::fs::read(b.join(file)).unwrap(), "{} differs", file);
        }
    }
}
