//! Logits against references computed by transformers, bitsandbytes and PEFT themselves
//! (`tests/data/golden/make_golden.py`): ‖ours − ref‖ / ‖ref‖ < 1e-4.

mod common;
use common::relative_error;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qdylora::cli::logits::read_input_ids;
use qdylora::model::load::{self, BaseLinears, ModelSource};
use qdylora::model::lora::{AdapterCall, RankGrad};
use qdylora::model::place::place;
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
    logits_in(model_dir, adapter, DType::F32)
}

/// The logits with activations in `dtype`, placed as the `logits` command places the model on
/// its device (on the CPU here).
fn logits_in(model_dir: &str, adapter: bool, dtype: DType) -> Vec<f32> {
    let device = Device::Cpu;
    let source = ModelSource::open(&golden().join(model_dir)).unwrap();
    let built = load::build(&source, BaseLinears::Dense, &device).unwrap();
    let model = place(&built.llama, &device, dtype).unwrap();
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
    let out = model.forward(&ids, call.as_ref()).unwrap();
    assert_eq!(out.dtype(), dtype);
    let out = out.to_dtype(DType::F32).unwrap();
    out.flatten_all().unwrap().to_vec1().unwrap()
}

/// `bench/gpu.sh check` compares the GPU's bf16 logits with transformers' f32 ones (issue 7:
/// within 1e-2). The same bf16 placement on the CPU (same ops, the CPU's own rounding) shows
/// the margin before a GPU run. Measured here: the base 6.35e-3; with the golden adapter (made
/// with `init_lora_weights=False`: random B at scale 2, which amplifies the rounding) 1.05e-2
/// with the adapter computed as PEFT does (f32, one rounding of the sum; 1.29e-2 in bf16). So
/// the adapter case sits at 1e-2 by bf16's own precision, which is why the GPU check also
/// measures transformers + PEFT in bf16 on the same GPU. The bounds here are the measured
/// values with a little room: a regression in the bf16 path fails them.
#[test]
fn bf16_activations_are_as_accurate_as_measured() {
    let cases = [
        (false, "base_f32", 7e-3),
        (true, "base_f32_plus_adapter", 1.1e-2),
    ];
    for (adapter, name, bound) in cases {
        let err = relative_error(&logits_in("base", adapter, DType::BF16), &reference(name));
        eprintln!("bf16 against {name}: relative error {err:.2e}");
        assert!(
            err < bound,
            "{name}: relative error {err:e} (bound {bound:e})"
        );
        assert!(err > 1e-4, "{name}: {err:e} is f32's accuracy, not bf16's");
    }
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
