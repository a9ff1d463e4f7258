//! The HF LLaMA bridge against the checkpoint transformers 5.17 saved (`data/golden/base`).

mod formats_common;

use std::path::Path;

use formats_common::*;
use half::bf16;
use qdylora_core::ElementType;
use qdylora_formats::{Error, hf};
use serde_json::Value;

#[test]
fn loads_the_golden_base_with_its_config() {
    let ckpt = golden_base();
    let c = &ckpt.config;
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads
        ),
        (96, 200, 3, 6)
    );
    assert_eq!(
        (c.num_key_value_heads, c.head_dim, c.vocab_size),
        (2, 16, 257)
    );
    assert_eq!(
        (c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings),
        (10000.0, 1e-5, true)
    );
    assert_eq!(c.max_position_embeddings, 128);
    assert_eq!(ckpt.tensors.len(), 2 + 3 * 9);
    // Values: bf16 decoded independently of the bridge.
    let raw = raw_tensors(&read(&golden("base/model.safetensors")));
    for (name, t) in &ckpt.tensors {
        assert_eq!(t.dtype, ElementType::Bf16, "{name}");
        let (_, shape, bytes) = &raw[name];
        assert_eq!(&t.shape, shape);
        let want: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        assert_eq!(t.data, want, "{name}");
    }
}

fn tensors_of(ckpt: &hf::Checkpoint) -> Vec<(String, Vec<usize>, ElementType, &[f32])> {
    ckpt.tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone(), t.dtype, t.data.as_slice()))
        .collect()
}

#[test]
fn writing_the_base_back_gives_the_transformers_files_byte_for_byte() {
    let ckpt = golden_base();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("base");
    hf::write_checkpoint(&dir, &ckpt.raw_config, &tensors_of(&ckpt)).unwrap();
    assert!(read(&dir.join("model.safetensors")) == read(&golden("base/model.safetensors")));
    assert_eq!(
        String::from_utf8(read(&dir.join("config.json"))).unwrap(),
        String::from_utf8(read(&golden("base/config.json"))).unwrap()
    );
    // Writing into the existing folder replaces the files and keeps others.
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    hf::write_checkpoint(&dir, &ckpt.raw_config, &tensors_of(&ckpt)).unwrap();
    assert!(dir.join("tokenizer.json").exists());
    assert_eq!(hf::load_checkpoint(&dir).unwrap().tensors, ckpt.tensors);
}

/// Writes `tensors` as shards of at most `per_shard` tensors with an index.
fn write_sharded(
    dir: &Path,
    config: &[u8],
    raw: &[(String, RawTensor)],
    per_shard: usize,
) -> Value {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let mut weight_map = serde_json::Map::new();
    let shards = raw.chunks(per_shard).count();
    for (i, chunk) in raw.chunks(per_shard).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        let views: Vec<_> = chunk
            .iter()
            .map(|(n, (d, s, b))| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(
            dir.join(&file),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        for (n, _) in chunk {
            weight_map.insert(n.clone(), Value::from(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    index
}

#[test]
fn sharded_checkpoints_load_like_the_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    let raw: Vec<_> = raw_tensors(&read(&golden("base/model.safetensors")))
        .into_iter()
        .collect();
    let index = write_sharded(&dir, &read(&golden("base/config.json")), &raw, 10);
    assert_eq!(
        hf::load_checkpoint(&dir).unwrap().tensors,
        golden_base().tensors
    );

    // An index naming a file outside the folder is refused.
    let mut bad = index.clone();
    bad["weight_map"]["model.norm.weight"] = "../model.safetensors".into();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&bad).unwrap(),
    )
    .unwrap();
    assert!(
        matches!(hf::load_checkpoint(&dir), Err(Error::Invalid(ref m)) if m.contains("plain file name"))
    );
    // A tensor listed under the wrong shard.
    let mut bad = index.clone();
    bad["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors".into();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&bad).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        hf::load_checkpoint(&dir),
        Err(Error::UnexpectedTensor { .. } | Error::MissingTensor { .. })
    ));
    // A missing shard file.
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    assert!(matches!(hf::load_checkpoint(&dir), Err(Error::Io { .. })));
}

fn parse_with(
    edit_config: impl FnOnce(&mut Value),
    edit: impl FnOnce(&mut Vec<(String, RawTensor)>),
) -> Result<hf::Checkpoint, Error> {
    let mut config: Value = serde_json::from_slice(&read(&golden("base/config.json"))).unwrap();
    edit_config(&mut config);
    let mut raw: Vec<_> = raw_tensors(&read(&golden("base/model.safetensors")))
        .into_iter()
        .collect();
    edit(&mut raw);
    let views: Vec<_> = raw
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    hf::parse_checkpoint(
        &serde_json::to_vec(&config).unwrap(),
        &[("m/model.safetensors".into(), &bytes)],
    )
}

#[test]
fn bad_configs_and_tensors_get_typed_errors() {
    parse_with(|_| {}, |_| {}).unwrap();
    let unsupported = |r: Result<hf::Checkpoint, Error>, needle: &str| match r {
        Err(Error::Unsupported { what, .. }) => assert!(what.contains(needle), "{what}"),
        other => panic!("expected Unsupported({needle}), got {other:?}"),
    };
    unsupported(
        parse_with(|c| c["model_type"] = "mistral".into(), |_| {}),
        "model_type",
    );
    unsupported(
        parse_with(|c| c["attention_bias"] = true.into(), |_| {}),
        "attention_bias",
    );
    unsupported(
        parse_with(|c| c["mlp_bias"] = true.into(), |_| {}),
        "mlp_bias",
    );
    unsupported(
        parse_with(
            |c| c["rope_parameters"]["rope_type"] = "llama3".into(),
            |_| {},
        ),
        "rope_type",
    );
    unsupported(
        parse_with(
            |c| c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0}),
            |_| {},
        ),
        "rope_scaling",
    );
    unsupported(
        parse_with(|c| c["hidden_act"] = "gelu".into(), |_| {}),
        "hidden_act",
    );
    unsupported(
        parse_with(|c| c["num_key_value_heads"] = 4.into(), |_| {}),
        "inconsistent",
    );
    // Older files: top-level rope_theta, no head_dim, no num_key_value_heads.
    let old = parse_with(
        |c| {
            let m = c.as_object_mut().unwrap();
            m.remove("rope_parameters");
            m.remove("head_dim");
            m.insert("rope_theta".into(), 500000.0.into());
        },
        |_| {},
    )
    .unwrap();
    assert_eq!((old.config.rope_theta, old.config.head_dim), (500000.0, 16));
    assert!(matches!(
        parse_with(|c| c["hidden_size"] = "wide".into(), |_| {}),
        Err(Error::Json { .. })
    ));

    let e = parse_with(
        |_| {},
        |t| t.retain(|(n, _)| n != "model.layers.2.mlp.up_proj.weight"),
    );
    assert!(
        matches!(e, Err(Error::MissingTensor { ref name, .. }) if name == "model.layers.2.mlp.up_proj.weight"),
        "{e:?}"
    );
    let e = parse_with(
        |_| {},
        |t| {
            let n = t
                .iter_mut()
                .find(|(n, _)| n == "model.norm.weight")
                .unwrap();
            n.1.1 = vec![48, 2];
        },
    );
    assert!(
        matches!(e, Err(Error::Shape { ref name, .. }) if name == "model.norm.weight"),
        "{e:?}"
    );
    let e = parse_with(
        |_| {},
        |t| {
            let n = t
                .iter_mut()
                .find(|(n, _)| n == "model.norm.weight")
                .unwrap();
            n.1.2[2..4].copy_from_slice(&bf16::INFINITY.to_le_bytes());
        },
    );
    assert!(
        matches!(e, Err(Error::NonFinite { ref name, index: 1 }) if name == "model.norm.weight"),
        "{e:?}"
    );
    let e = parse_with(
        |_| {},
        |t| {
            let n = t
                .iter_mut()
                .find(|(n, _)| n == "model.norm.weight")
                .unwrap();
            n.1.0 = safetensors::Dtype::I16;
        },
    );
    assert!(matches!(e, Err(Error::DType { .. })), "{e:?}");
    let e = parse_with(
        |_| {},
        |t| {
            t.push((
                "model.layers.0.self_attn.q_proj.bias".into(),
                (safetensors::Dtype::BF16, vec![96], vec![0; 192]),
            ))
        },
    );
    assert!(matches!(e, Err(Error::UnexpectedTensor { .. })), "{e:?}");
    // Old RoPE buffers are tolerated and dropped.
    let ok = parse_with(
        |_| {},
        |t| {
            t.push((
                "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
                (safetensors::Dtype::F32, vec![8], vec![0; 32]),
            ))
        },
    )
    .unwrap();
    assert!(!ok.tensors.keys().any(|k| k.contains("inv_freq")));
    // A config that claims billions of layers: the first missing layer is reported, nothing is
    // allocated by the layer count.
    let e = parse_with(|c| c["num_hidden_layers"] = 4_000_000_000u32.into(), |_| {});
    assert!(
        matches!(e, Err(Error::MissingTensor { ref name, .. }) if name == "model.layers.3.input_layernorm.weight"),
        "{e:?}"
    );
    // A header that claims gigabytes.
    let mut bytes = read(&golden("base/model.safetensors"));
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = hf::parse_checkpoint(
        &read(&golden("base/config.json")),
        &[("m/model.safetensors".into(), &bytes)],
    );
    assert!(matches!(e, Err(Error::SafeTensors { .. })), "{e:?}");
}
