//! The PEFT bridge against the adapter PEFT 0.21 saved (`data/golden/adapter_r8`).

mod formats_common;

use formats_common::*;
use qdylora_core::ElementType;
use qdylora_core::rank::Scaling;
use qdylora_formats::Error;
use qdylora_formats::bundle::{BundleMeta, BundleReader, ModuleTensors, write_bundle};
use qdylora_formats::peft::{self, TargetModules};
use serde_json::Value;

#[test]
fn reads_the_golden_adapter() {
    let adapter = peft::read_adapter(&golden("adapter_r8")).unwrap();
    let c = &adapter.config;
    assert_eq!(
        (c.r, c.lora_alpha, c.use_rslora, c.scale()),
        (8, 16.0, false, 2.0)
    );
    assert_eq!(c.base_model_name_or_path.as_deref(), Some("base"));
    let TargetModules::List(targets) = &c.target_modules else {
        panic!("list expected")
    };
    assert_eq!(targets.len(), 7);
    assert_eq!(adapter.modules.len(), 21);
    let raw = raw_tensors(&read(&golden("adapter_r8/adapter_model.safetensors")));
    for layer in 0..3 {
        for (path, inf, outf) in [
            ("self_attn.q_proj", 96, 96),
            ("self_attn.k_proj", 96, 32),
            ("self_attn.v_proj", 96, 32),
            ("self_attn.o_proj", 96, 96),
            ("mlp.gate_proj", 96, 200),
            ("mlp.up_proj", 96, 200),
            ("mlp.down_proj", 200, 96),
        ] {
            let name = format!("model.layers.{layer}.{path}");
            let p = &adapter.modules[&name];
            assert_eq!(
                (p.rank, p.in_features, p.out_features),
                (8, inf, outf),
                "{name}"
            );
            let key = |f: &str| format!("base_model.model.{name}.{f}.weight");
            assert_eq!(p.a, f32s(&raw[&key("lora_A")].2), "{name} A");
            assert_eq!(p.b, f32s(&raw[&key("lora_B")].2), "{name} B");
            assert!(
                p.b.iter().any(|&v| v != 0.0),
                "init_lora_weights=False gives a non-zero B"
            );
        }
    }
}

#[test]
fn write_then_read_round_trips() {
    let adapter = peft::read_adapter(&golden("adapter_r8")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    adapter.write(&tmp.path().join("a")).unwrap();
    let again = peft::read_adapter(&tmp.path().join("a")).unwrap();
    assert_eq!(again.modules, adapter.modules);
    assert_eq!((again.config.r, again.config.lora_alpha), (8, 16.0));
    // The keys, dtypes and shapes are PEFT's.
    let ours = raw_tensors(&read(&tmp.path().join("a/adapter_model.safetensors")));
    let theirs = raw_tensors(&read(&golden("adapter_r8/adapter_model.safetensors")));
    assert_eq!(ours, theirs);
}

#[test]
fn rslora_bundles_export_with_use_rslora() {
    let m = ModuleTensors {
        name: "model.layers.0.self_attn.v_proj".into(),
        in_features: 4,
        out_features: 2,
        a: (0..16).map(|i| i as f32).collect(),
        b: (0..8).map(|i| -(i as f32)).collect(),
    };
    let meta = BundleMeta {
        r_max: 4,
        alpha: 8.0,
        dtype: ElementType::F32,
        scaling: Scaling::AlphaOverSqrtRank,
        fingerprint: [0; 16],
    };
    let bytes = write_bundle(&meta, &[m]).unwrap();
    let reader = BundleReader::parse(&bytes).unwrap();
    let adapter = peft::from_bundle_rank(&reader, 4).unwrap();
    assert!(adapter.config.use_rslora);
    assert_eq!(adapter.config.scale(), reader.at_rank(4).unwrap().scale());
    assert_eq!(adapter.config.scale(), 4.0);
    let p = &adapter.modules["model.layers.0.self_attn.v_proj"];
    assert_eq!(p.a, (0..16).map(|i| i as f32).collect::<Vec<_>>());
    let tmp = tempfile::tempdir().unwrap();
    adapter.write(tmp.path()).unwrap();
    let config: Value =
        serde_json::from_slice(&read(&tmp.path().join("adapter_config.json"))).unwrap();
    assert_eq!(
        (
            config["use_rslora"].as_bool(),
            config["r"].as_u64(),
            config["lora_alpha"].as_f64()
        ),
        (Some(true), Some(4), Some(8.0))
    );
    assert!(matches!(
        peft::from_bundle_rank(&reader, 5),
        Err(Error::Format(_))
    ));
}

fn parse_with(
    edit_config: impl FnOnce(&mut Value),
    edit: impl FnOnce(&mut Vec<(String, RawTensor)>),
) -> Result<peft::Adapter, Error> {
    let mut config: Value =
        serde_json::from_slice(&read(&golden("adapter_r8/adapter_config.json"))).unwrap();
    edit_config(&mut config);
    let mut raw: Vec<_> = raw_tensors(&read(&golden("adapter_r8/adapter_model.safetensors")))
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
    peft::parse_adapter(
        &serde_json::to_vec(&config).unwrap(),
        &bytes,
        std::path::Path::new("a"),
    )
}

#[test]
fn unsupported_options_and_bad_tensors_get_typed_errors() {
    parse_with(|_| {}, |_| {}).unwrap();
    let unsupported = |r: Result<peft::Adapter, Error>, needle: &str| match r {
        Err(Error::Unsupported { what, .. }) => assert!(what.contains(needle), "{what}"),
        other => panic!("expected Unsupported({needle}), got {other:?}"),
    };
    unsupported(
        parse_with(|c| c["use_dora"] = true.into(), |_| {}),
        "use_dora",
    );
    unsupported(
        parse_with(
            |c| c["rank_pattern"] = serde_json::json!({"q_proj": 4}),
            |_| {},
        ),
        "rank_pattern",
    );
    unsupported(
        parse_with(
            |c| c["alpha_pattern"] = serde_json::json!({"q_proj": 4}),
            |_| {},
        ),
        "alpha_pattern",
    );
    unsupported(parse_with(|c| c["bias"] = "all".into(), |_| {}), "bias");
    unsupported(
        parse_with(|c| c["peft_type"] = "IA3".into(), |_| {}),
        "peft_type",
    );
    unsupported(
        parse_with(|c| c["fan_in_fan_out"] = true.into(), |_| {}),
        "fan_in_fan_out",
    );
    unsupported(
        parse_with(
            |c| c["modules_to_save"] = serde_json::json!(["lm_head"]),
            |_| {},
        ),
        "modules_to_save",
    );
    unsupported(
        parse_with(|c| c["lora_bias"] = true.into(), |_| {}),
        "lora_bias",
    );
    // rsLoRA is supported.
    let rs = parse_with(|c| c["use_rslora"] = true.into(), |_| {}).unwrap();
    assert_eq!(rs.config.scale(), 16.0 / 8f32.sqrt());

    let b_key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    let a_key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight";
    let e = parse_with(|_| {}, |t| t.retain(|(n, _)| n != b_key));
    assert!(
        matches!(e, Err(Error::MissingTensor { ref name, .. }) if name == b_key),
        "{e:?}"
    );
    let e = parse_with(|_| {}, |t| t.retain(|(n, _)| n != a_key));
    assert!(
        matches!(e, Err(Error::MissingTensor { ref name, .. }) if name == a_key),
        "{e:?}"
    );
    let e = parse_with(|c| c["r"] = 4.into(), |_| {});
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    let e = parse_with(
        |_| {},
        |t| {
            t.push((
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
                (safetensors::Dtype::F32, vec![96], vec![0; 384]),
            ))
        },
    );
    assert!(matches!(e, Err(Error::UnexpectedTensor { .. })), "{e:?}");
    let e = parse_with(
        |_| {},
        |t| {
            let a = t.iter_mut().find(|(n, _)| n == a_key).unwrap();
            a.1.2[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        },
    );
    assert!(matches!(e, Err(Error::NonFinite { index: 0, .. })), "{e:?}");
    let e = parse_with(|c| c["r"] = "eight".into(), |_| {});
    assert!(matches!(e, Err(Error::Json { .. })), "{e:?}");
}
