//! Writes the seed corpora of the fuzz targets (`formats/fuzz/seeds/<target>/`) from valid
//! files made by this crate's writers for a tiny LLaMA: a bundle and its rank prefixes, a device
//! model, and HF / bitsandbytes / PEFT checkpoints in the bridge target's input layout.
//!
//! `cargo run -p qdylora-formats --example fuzz_seeds`

use std::path::Path;

use qdylora_core::ElementType;
use qdylora_core::infer::LinearKind;
use qdylora_core::rank::Scaling;
use qdylora_formats::bundle::{BundleMeta, BundleReader, ModuleTensors, write_bundle};
use qdylora_formats::{Nf4Weight, bnb, device_model, hf, peft};
use serde_json::json;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1001) as f32 / 500.0 - 1.0)
        .collect()
}

/// `[which, config_len u32 LE, config, safetensors]`, the bridge target's input.
fn bridge_input(which: u8, config: &[u8], weights: &[u8]) -> Vec<u8> {
    let mut out = vec![which];
    out.extend_from_slice(&(config.len() as u32).to_le_bytes());
    out.extend_from_slice(config);
    out.extend_from_slice(weights);
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)
    };

    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "vocab_size": 16, "tie_word_embeddings": true, "max_position_embeddings": 32,
        "attention_bias": false, "mlp_bias": false
    });
    let llama = hf::LlamaConfig::from_json(&config, Path::new("config.json"))?;
    let cfg = llama.to_decoder_config();

    let mut dense = Vec::new();
    let mut quantized = Vec::new();
    for (i, (name, shape)) in llama.expected_tensors().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let v = values(n, i as u32);
        if name.contains("_proj.") {
            let w = Nf4Weight::quantize::<f32>(shape[0], shape[1], &v, 64)?;
            quantized.push((name, w));
        } else {
            dense.push((name, shape, v));
        }
    }

    // Device model.
    let q: Vec<(String, &Nf4Weight)> = quantized.iter().map(|(n, w)| (n.clone(), w)).collect();
    let d: Vec<(String, Vec<usize>, &[f32])> = dense
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    for (dtype, name) in [
        (ElementType::F32, "tiny_f32.bin"),
        (ElementType::F16, "tiny_f16.bin"),
    ] {
        let bytes = device_model::write_device_model(&cfg, [1; 16], &q, &d, dtype)?;
        write("device_model_reader", name, &bytes)?;
    }

    // Bundle over the seven linears, r_max 3, each dtype; plus a rank-1 prefix.
    let modules: Vec<ModuleTensors> = LinearKind::ALL
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            let s = kind.shape(&cfg);
            ModuleTensors {
                name: hf::linear_name(0, kind),
                in_features: s.in_features,
                out_features: s.out_features,
                a: values(3 * s.in_features as usize, i as u32),
                b: values(3 * s.out_features as usize, 100 + i as u32),
            }
        })
        .collect();
    for (dtype, name) in [
        (ElementType::F32, "f32"),
        (ElementType::F16, "f16"),
        (ElementType::Bf16, "bf16"),
    ] {
        let meta = BundleMeta {
            r_max: 3,
            alpha: 8.0,
            dtype,
            scaling: Scaling::AlphaOverRank,
            fingerprint: [2; 16],
        };
        let bytes = write_bundle(&meta, &modules)?;
        write("bundle_reader", &format!("r3_{name}.bin"), &bytes)?;
        let prefix = BundleReader::parse(&bytes)?.prefix_len(1)?;
        write("bundle_reader", &format!("r1_{name}.bin"), &bytes[..prefix])?;
    }

    // Bridges: HF (bf16), bitsandbytes, PEFT.
    let tmp = std::env::temp_dir().join(format!("qdylora-fuzz-seeds-{}", std::process::id()));
    let all: Vec<(String, Vec<usize>, ElementType, Vec<f32>)> = quantized
        .iter()
        .map(|(n, w)| {
            (
                n.clone(),
                vec![w.rows, w.cols],
                ElementType::Bf16,
                w.dequantize_f32().unwrap(),
            )
        })
        .chain(
            dense
                .iter()
                .map(|(n, s, v)| (n.clone(), s.clone(), ElementType::Bf16, v.clone())),
        )
        .collect();
    let all_ref: Vec<_> = all
        .iter()
        .map(|(n, s, t, v)| (n.clone(), s.clone(), *t, v.as_slice()))
        .collect();
    hf::write_checkpoint(&tmp.join("hf"), &config, &all_ref)?;
    let read = |p: &str| std::fs::read(tmp.join(p));
    write(
        "safetensors_bridge",
        "hf.bin",
        &bridge_input(0, &read("hf/config.json")?, &read("hf/model.safetensors")?),
    )?;

    let qm: Vec<(String, &Nf4Weight)> = quantized
        .iter()
        .map(|(n, w)| (n.trim_end_matches(".weight").to_string(), w))
        .collect();
    let dd: Vec<_> = dense
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), ElementType::F32, v.as_slice()))
        .collect();
    let (weights, bnb_config) = bnb::checkpoint_files(&config, "float32", &qm, &dd)?;
    write(
        "safetensors_bridge",
        "bnb.bin",
        &bridge_input(1, &bnb_config, &weights),
    )?;

    let bundle = write_bundle(
        &BundleMeta {
            r_max: 3,
            alpha: 8.0,
            dtype: ElementType::F32,
            scaling: Scaling::AlphaOverSqrtRank,
            fingerprint: [0; 16],
        },
        &modules,
    )?;
    let adapter = peft::from_bundle_rank(&BundleReader::parse(&bundle)?, 2)?;
    adapter.write(&tmp.join("peft"))?;
    write(
        "safetensors_bridge",
        "peft.bin",
        &bridge_input(
            2,
            &read("peft/adapter_config.json")?,
            &read("peft/adapter_model.safetensors")?,
        ),
    )?;
    std::fs::remove_dir_all(&tmp)?;
    println!("seeds written to {}", root.display());
    Ok(())
}
