//! The bitsandbytes bridge against the checkpoint transformers 5.17 + bitsandbytes 0.50.2 wrote
//! (`data/golden/bnb_nf4_dq`, from `data/golden/base` loaded in f32 with NF4 double quant).

mod formats_common;

use formats_common::*;
use qdylora_core::ElementType;
use qdylora_core::nf4;
use qdylora_formats::{Error, bnb};
use serde_json::Value;

const QUANT_SUFFIXES: [&str; 6] = [
    ".weight",
    ".weight.absmax",
    ".weight.quant_map",
    ".weight.nested_absmax",
    ".weight.nested_quant_map",
    ".weight.quant_state.bitsandbytes__nf4",
];

#[test]
fn reads_the_transformers_checkpoint_and_matches_core_quantization_bit_for_bit() {
    let ckpt = bnb::read_checkpoint(&golden("bnb_nf4_dq")).unwrap();
    let base = golden_base();
    assert_eq!(ckpt.config, base.config);
    assert_eq!(ckpt.quantized.len(), 21);
    // Dense tensors: f32 in the file, exactly the bf16 base values.
    assert_eq!(ckpt.dense.len(), 8);
    for (name, t) in &ckpt.dense {
        assert_eq!(t.dtype, ElementType::F32, "{name}");
        assert_eq!(t.data, base.tensors[name].data, "{name}");
    }
    // Quantizing the base with the core gives the very bytes bitsandbytes stored.
    let ours = quantize_base(&base);
    for (module, theirs) in &ckpt.quantized {
        let mine = &ours[module];
        assert_eq!(
            theirs.dtype,
            ElementType::F32,
            "{module}: quant_state dtype"
        );
        assert_eq!(
            (theirs.rows, theirs.cols, theirs.blocksize),
            (mine.rows, mine.cols, 64)
        );
        assert_eq!(theirs.packed, mine.packed, "{module}: packed codes");
        assert_eq!(
            theirs.absmax_codes, mine.absmax_codes,
            "{module}: absmax codes"
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&theirs.nested_absmax),
            bits(&mine.nested_absmax),
            "{module}"
        );
        assert_eq!(
            theirs.offset.to_bits(),
            mine.offset.to_bits(),
            "{module}: offset"
        );
        assert_eq!(
            bits(&theirs.code8[..]),
            bits(&mine.code8[..]),
            "{module}: code8"
        );
    }
}

#[test]
fn dequantized_checkpoint_weights_stay_within_the_nf4_error_bound_of_the_base() {
    let ckpt = bnb::read_checkpoint(&golden("bnb_nf4_dq")).unwrap();
    let base = golden_base();
    for (module, w) in &ckpt.quantized {
        let deq = w.dequantize_f32().unwrap();
        let orig = &base.tensors[&format!("{module}.weight")].data;
        // Per block: |w - deq| <= absmax * (largest half gap of the NF4 code) + the 8-bit
        // absmax error, which is below 1% of the block's absmax for these tensors.
        let max_half_gap = nf4::CODE
            .windows(2)
            .map(|p| (p[1] - p[0]) / 2.0)
            .fold(0.0, f32::max);
        for (block, (o, d)) in orig.chunks(64).zip(deq.chunks(64)).enumerate() {
            let absmax = o.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in o.iter().zip(d) {
                assert!(
                    (a - b).abs() <= absmax * (max_half_gap + 0.01),
                    "{module} block {block}: {a} vs {b} (absmax {absmax})"
                );
            }
        }
    }
}

fn write_from_golden_base(dir: &std::path::Path) {
    let base = golden_base();
    let quantized = quantize_base(&base);
    let dense = dense_of(&base);
    // transformers loaded the base with dtype=float32 and records that in config.json.
    let mut config = base.raw_config.clone();
    config["dtype"] = Value::from("float32");
    let q: Vec<(String, &qdylora_formats::Nf4Weight)> =
        quantized.iter().map(|(k, w)| (k.clone(), w)).collect();
    let d: Vec<(String, Vec<usize>, ElementType, &[f32])> = dense
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), ElementType::F32, v.as_slice()))
        .collect();
    bnb::write_checkpoint(dir, &config, "float32", &q, &d).unwrap();
}

#[test]
fn writing_from_the_base_reproduces_the_transformers_checkpoint_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bnb");
    write_from_golden_base(&dir);

    let ours = read(&dir.join("model.safetensors"));
    let theirs = read(&golden("bnb_nf4_dq/model.safetensors"));
    let (ours_t, theirs_t) = (raw_tensors(&ours), raw_tensors(&theirs));
    assert_eq!(
        ours_t.keys().collect::<Vec<_>>(),
        theirs_t.keys().collect::<Vec<_>>()
    );
    for (name, t) in &theirs_t {
        assert_eq!(&ours_t[name], t, "{name}");
    }
    // Every key of each quantized linear is there, with the quant_state JSON bytes identical.
    for layer in 0..3 {
        for kind in qdylora_core::infer::LinearKind::ALL {
            let module = qdylora_formats::hf::linear_name(layer, kind);
            for suffix in QUANT_SUFFIXES {
                assert!(theirs_t.contains_key(&format!("{module}{suffix}")));
            }
        }
    }
    // The whole file, header and tensor order included.
    assert!(
        ours == theirs,
        "model.safetensors differs from the transformers file"
    );
    // config.json as transformers writes it (sorted keys, indent 2, Python floats, newline).
    let config = String::from_utf8(read(&dir.join("config.json"))).unwrap();
    let golden_config = String::from_utf8(read(&golden("bnb_nf4_dq/config.json"))).unwrap();
    assert_eq!(config, golden_config);
}

#[test]
fn read_write_read_write_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = bnb::read_checkpoint(&golden("bnb_nf4_dq")).unwrap();
    let write = |dir: &std::path::Path, ckpt: &bnb::Checkpoint| {
        let q: Vec<_> = ckpt.quantized.iter().map(|(k, w)| (k.clone(), w)).collect();
        let d: Vec<_> = ckpt
            .dense
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone(), t.dtype, t.data.as_slice()))
            .collect();
        let compute = ckpt.raw_config["quantization_config"]["bnb_4bit_compute_dtype"]
            .as_str()
            .unwrap()
            .to_string();
        bnb::write_checkpoint(dir, &ckpt.raw_config, &compute, &q, &d).unwrap();
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write(&a, &ckpt);
    let again = bnb::read_checkpoint(&a).unwrap();
    assert_eq!(again.quantized, ckpt.quantized);
    assert_eq!(again.dense, ckpt.dense);
    write(&b, &again);
    for file in ["model.safetensors", "config.json"] {
        assert!(read(&a.join(file)) == read(&b.join(file)), "{file} differs");
    }
    // And the first write already equals the transformers file.
    assert!(read(&a.join("model.safetensors")) == read(&golden("bnb_nf4_dq/model.safetensors")));
}

#[test]
fn detects_bnb_checkpoints() {
    assert!(bnb::is_bnb_checkpoint(&golden("bnb_nf4_dq")).unwrap());
    assert!(!bnb::is_bnb_checkpoint(&golden("base")).unwrap());
}

/// The golden checkpoint's files, with a change applied to the config and/or the tensors.
fn mutated(
    edit_config: impl FnOnce(&mut Value),
    edit_tensors: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> Result<bnb::Checkpoint, Error> {
    let mut config: Value =
        serde_json::from_slice(&read(&golden("bnb_nf4_dq/config.json"))).unwrap();
    edit_config(&mut config);
    let mut tensors: Vec<_> = raw_tensors(&read(&golden("bnb_nf4_dq/model.safetensors")))
        .into_iter()
        .map(|(n, (d, s, b))| (n, d, s, b))
        .collect();
    edit_tensors(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let weights = safetensors::serialize(views, None).unwrap();
    let path = std::path::PathBuf::from("mutated/model.safetensors");
    bnb::parse_checkpoint(&serde_json::to_vec(&config).unwrap(), &[(path, &weights)])
}

const Q: &str = "model.layers.1.self_attn.q_proj.weight";

#[test]
fn rejects_each_kind_of_bad_checkpoint_with_a_typed_error() {
    // Untouched, it parses.
    mutated(|_| {}, |_| {}).unwrap();

    let e = mutated(
        |c| c["quantization_config"]["bnb_4bit_quant_type"] = "fp4".into(),
        |_| {},
    );
    assert!(
        matches!(e, Err(Error::Unsupported { ref what, .. }) if what.contains("nf4")),
        "{e:?}"
    );
    let e = mutated(
        |c| c["quantization_config"]["bnb_4bit_use_double_quant"] = false.into(),
        |_| {},
    );
    assert!(matches!(e, Err(Error::Unsupported { .. })), "{e:?}");

    let e = mutated(|_| {}, |t| t.retain(|(n, ..)| n != &format!("{Q}.absmax")));
    assert!(
        matches!(e, Err(Error::MissingTensor { ref name, .. }) if name.ends_with("q_proj.weight.absmax")),
        "{e:?}"
    );

    // quant_map that is not the NF4 code (an FP4 checkpoint would have one).
    let e = mutated(
        |_| {},
        |t| {
            let qm = t
                .iter_mut()
                .find(|(n, ..)| n == &format!("{Q}.quant_map"))
                .unwrap();
            qm.3[0..4].copy_from_slice(&0.5f32.to_le_bytes());
        },
    );
    assert!(
        matches!(e, Err(Error::Unsupported { ref what, .. }) if what.contains("only nf4")),
        "{e:?}"
    );

    // absmax with the wrong number of blocks.
    let e = mutated(
        |_| {},
        |t| {
            let a = t
                .iter_mut()
                .find(|(n, ..)| n == &format!("{Q}.absmax"))
                .unwrap();
            a.3.pop();
            a.2 = vec![a.3.len()];
        },
    );
    assert!(
        matches!(e, Err(Error::Shape { ref name, .. }) if name.ends_with(".absmax")),
        "{e:?}"
    );

    // absmax stored as f32 (not double-quantized) is a dtype error.
    let e = mutated(
        |_| {},
        |t| {
            let a = t
                .iter_mut()
                .find(|(n, ..)| n == &format!("{Q}.absmax"))
                .unwrap();
            a.1 = safetensors::Dtype::F32;
            a.3 = vec![0u8; 4 * a.3.len()];
        },
    );
    assert!(matches!(e, Err(Error::DType { .. })), "{e:?}");

    // A quant state whose shape disagrees with the config.
    let e = mutated(
        |_| {},
        |t| {
            let s = t
                .iter_mut()
                .find(|(n, ..)| n.starts_with(Q) && n.ends_with("__nf4"))
                .unwrap();
            let text = String::from_utf8(s.3.clone())
                .unwrap()
                .replace("[96, 96]", "[48, 192]");
            s.3 = text.into_bytes();
            s.2 = vec![s.3.len()];
        },
    );
    assert!(
        matches!(e, Err(Error::Shape { ref name, .. }) if name == Q),
        "{e:?}"
    );

    // A quant state that is not JSON.
    let e = mutated(
        |_| {},
        |t| {
            let s = t
                .iter_mut()
                .find(|(n, ..)| n.starts_with(Q) && n.ends_with("__nf4"))
                .unwrap();
            s.3[0] = b'!';
        },
    );
    assert!(matches!(e, Err(Error::Json { .. })), "{e:?}");

    // Non-double-quant quant state.
    let e = mutated(
        |_| {},
        |t| {
            let s = t
                .iter_mut()
                .find(|(n, ..)| n.starts_with(Q) && n.ends_with("__nf4"))
                .unwrap();
            let text = String::from_utf8(s.3.clone()).unwrap();
            let cut = text.find(", \"nested_blocksize\"").unwrap();
            s.3 = format!("{}}}", &text[..cut]).into_bytes();
            s.2 = vec![s.3.len()];
        },
    );
    assert!(
        matches!(e, Err(Error::Unsupported { ref what, .. }) if what.contains("double")),
        "{e:?}"
    );

    // A non-finite dense value names the tensor.
    let e = mutated(
        |_| {},
        |t| {
            let n = t
                .iter_mut()
                .find(|(n, ..)| n == "model.norm.weight")
                .unwrap();
            n.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        },
    );
    assert!(
        matches!(e, Err(Error::NonFinite { ref name, index: 2 }) if name == "model.norm.weight"),
        "{e:?}"
    );

    // An unknown tensor is not silently dropped.
    let e = mutated(
        |_| {},
        |t| {
            t.push((
                "model.layers.0.self_attn.q_proj.bias".into(),
                safetensors::Dtype::F32,
                vec![1],
                vec![0; 4],
            ))
        },
    );
    assert!(matches!(e, Err(Error::UnexpectedTensor { .. })), "{e:?}");

    // Truncated safetensors bytes.
    let weights = read(&golden("bnb_nf4_dq/model.safetensors"));
    let config = read(&golden("bnb_nf4_dq/config.json"));
    let cut = &weights[..weights.len() - 1];
    let e = bnb::parse_checkpoint(&config, &[("x/model.safetensors".into(), cut)]);
    assert!(matches!(e, Err(Error::SafeTensors { .. })), "{e:?}");
}
