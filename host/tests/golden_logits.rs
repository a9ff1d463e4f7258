//! Logits against references computed by transformers, bitsandbytes and PEFT themselves
//! (`tests/data/golden/make_golden.py`): ‖ours − ref‖ / ‖ref‖ < 1e-4.

mod common;
use common::relative_error;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use qdylora::cli::logits::read_input_ids;
use qdylora::model::load::{self, BaseLinears, ModelSource};
use qdylora::model::lora::{AdapterCall, RankGrad};
use safetensors::SafeTensors;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden")
}

fn reference(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(golden().join("ref_logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.shape(), [3, 11, 257]);
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn logits(model_dir: &str, adapter: bool) -> Vec<f32> {
    let device = Device::Cpu;
    let source = ModelSource::open(&golden().join(model_dir)).unwrap();
    let model = load::build(&source, BaseLinears::Dense, &device).unwrap();
    let cfg = source.config().to_decoder_config();
    let adapter = adapter
        .then(|| load::adapter_from_peft(&golden().join("adapter_r8"), &cfg, &device).unwrap());
    let call = adapter.as_ref().map(|a| AdapterCall {
        adapter: a,
        rank: a.r_max,
        grad: RankGrad::None,
        dropout: None,
    });
    let (b, t, ids) = read_input_ids(&golden().join("input_ids.safetensors"), 257).unwrap();
    let ids = Tensor::from_vec(ids, (b, t), &device).unwrap();
    let out = model.llama.forward(&ids, call.as_ref()).unwrap();
    out.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn hf_checkpoint_matches_transformers() {
    let err = relative_error(&logits("base", false), &reference("base_f32"));
    eprintln!("relative error {err:.2e}");
    assert!(err < 1e-4, "relative error {err:e}");
}

#[test]
fn hf_checkpoint_with_peft_adapter_matches_peft() {
    let err = relative_error(&logits("base", true), &reference("base_f32_plus_adapter"));
    eprintln!("relative error {err:.2e}");
    assert!(err < 1e-4, "relative error {err:e}");
}

#[test]
fn bnb_checkpoint_matches_transformers_bitsandbytes() {
    let err = relative_error(
        &logits("bnb_nf4_dq", false),
        &reference("bnb_nf4_dq_f32compute"),
    );
    eprintln!("relative error {err:.2e}");
    assert!(err < 1e-4, "relative error {err:e}");
}

#[test]
fn bnb_checkpoint_with_peft_adapter_matches_peft() {
    let err = relative_error(
        &logits("bnb_nf4_dq", true),
        &reference("bnb_nf4_dq_plus_adapter"),
    );
    eprintln!("relative error {err:.2e}");
    assert!(err < 1e-4, "relative error {err:e}");
}

#[test]
fn the_four_references_differ_from_each_other() {
    // Guards the comparisons above: quantization and the adapter both move the logits by far
    // more than the tolerance, so matching the wrong reference would fail.
    let base = reference("base_f32");
    for other in ["base_f32_plus_adapter", "bnb_nf4_dq_f32compute"] {
        assert!(relative_error(&reference(other), &base) > 1e-3, "{other}");
    }
}
