//! The GPU training path's pieces that run on the CPU: per-layer activation recomputation gives
//! the steps of plain backpropagation, and bf16 activations (the GPU's dtype, with f32 norms,
//! softmax and loss) follow the f32 run's loss curve. On the golden tiny LLaMA, NF4 at load.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use qdylora::demo::tokenizer;
use qdylora::model::linear::BaseLinear;
use qdylora::model::llama::{Layer, Llama};
use qdylora::model::load::{self, BaseLinears, ModelSource};
use qdylora::model::place::{BF16_LOSS_TOLERANCE, place};
use qdylora::train::data::{Dataset, Record, Template, TextCodec};
use qdylora::train::optim::{AdamWConfig, Schedule, ScheduleKind};
use qdylora::train::trainer::{AdapterDtype, RankMode, TrainConfig, Trainer};
use qdylora_core::infer::LinearKind;
use qdylora_formats::Nf4Weight;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden")
}

fn nf4_model() -> Llama {
    let source = ModelSource::open(&golden().join("base")).unwrap();
    load::build(&source, BaseLinears::Nf4 { blocksize: 64 }, &Device::Cpu)
        .unwrap()
        .llama
}

fn dataset() -> Dataset {
    let codec = TextCodec::new(tokenizer::build().unwrap()).unwrap();
    let records: Vec<Record> = (0..48)
        .map(|i| Record::Instruction {
            instruction: "rev".into(),
            input: format!("{}", 20_000 + i * 53),
            output: format!("{}", 20_000 + i * 53).chars().rev().collect(),
        })
        .collect();
    Dataset::build(&codec, &records, Template::Compact, 32, 0.1, 5).unwrap()
}

fn config(mode: RankMode, steps: u64) -> TrainConfig {
    TrainConfig {
        r_max: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: LinearKind::ALL.to_vec(),
        mode,
        steps,
        batch_size: 4,
        grad_accum: 2,
        schedule: Schedule {
            lr: 1e-2,
            warmup_steps: 1,
            total_steps: steps,
            kind: ScheduleKind::Constant,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: 1.0,
        seed: 21,
        adapter_dtype: AdapterDtype::F32,
    }
}

/// Losses of `steps` steps and the adapter's parameters afterwards, flattened.
fn run(model: &Llama, mode: RankMode, steps: u64, recompute: bool) -> (Vec<f64>, Vec<f32>) {
    let data = dataset();
    let mut t = Trainer::new(model, config(mode, steps), [0; 16]).unwrap();
    t.recompute = recompute;
    let losses = (0..steps)
        .map(|_| t.train_step(&data).unwrap().loss)
        .collect();
    let mut params = Vec::new();
    for m in t.adapter.modules.values() {
        let (a, b) = m.to_vecs().unwrap();
        params.extend(a);
        params.extend(b);
    }
    (losses, params)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Recomputation's backward, by the written-out layer backward (the default) and by autograd,
/// against plain backpropagation through the whole model.
#[test]
fn recomputed_layers_give_the_same_steps_as_plain_backprop() {
    let mut model = nf4_model();
    for written_out in [true, false] {
        model.fusions.layer_backward = written_out;
        assert_eq!(model.has_layer_backward(), written_out);
        for mode in [RankMode::Frozen, RankMode::Full] {
            let case = format!("{mode:?}, written-out backward {written_out}");
            let (plain_losses, plain_params) = run(&model, mode, 4, false);
            let (re_losses, re_params) = run(&model, mode, 4, true);
            for (p, r) in plain_losses.iter().zip(&re_losses) {
                assert!((p - r).abs() <= 1e-5 * p.abs(), "{case}: loss {p} vs {r}");
            }
            // The updates moved the parameters (so equality below says something).
            let (_, initial) = run(&model, mode, 0, false);
            assert!(max_abs_diff(&initial, &plain_params) > 1e-3);
            let diff = max_abs_diff(&plain_params, &re_params);
            assert!(diff < 1e-5, "{case}: parameters differ by {diff}");
        }
    }
}

/// The NF4 model with each linear replaced by its dequantized dense weight: the values a GPU
/// multiplies after dequantizing into scratch.
fn dequantized(model: &Llama) -> Llama {
    let dense = |lin: &BaseLinear| match lin {
        BaseLinear::Nf4(w) => {
            let w: &Arc<Nf4Weight> = w;
            let t = Tensor::from_vec(w.dequantize_f32().unwrap(), (w.rows, w.cols), &Device::Cpu)
                .unwrap();
            BaseLinear::dense(&t).unwrap()
        }
        other => other.clone(),
    };
    Llama {
        config: model.config,
        embed: model.embed.clone(),
        layers: model
            .layers
            .iter()
            .map(|l| Layer {
                input_norm: l.input_norm.clone(),
                post_norm: l.post_norm.clone(),
                linears: l.linears.clone().map(|lin| dense(&lin)),
            })
            .collect(),
        final_norm: model.final_norm.clone(),
        lm_head: model.lm_head.clone(),
        device: Device::Cpu,
        fusions: model.fusions,
    }
}

#[test]
fn bf16_activations_follow_the_f32_loss_curve() {
    let model = nf4_model();
    let bf16 = place(&dequantized(&model), &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(bf16.dtype(), DType::BF16);
    let steps = 8;
    let (f32_losses, _) = run(&model, RankMode::Frozen, steps, false);
    let (bf16_losses, _) = run(&bf16, RankMode::Frozen, steps, true);
    assert!(
        f32_losses.last().unwrap() < f32_losses.first().unwrap(),
        "the f32 run does not learn: {f32_losses:?}"
    );
    let mut largest = 0.0f64;
    for (step, (a, b)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
        let rel = (a - b).abs() / a.abs();
        largest = largest.max(rel);
        assert!(
            rel < BF16_LOSS_TOLERANCE,
            "step {step}: f32 loss {a}, bf16 loss {b} ({rel:.4} apart)"
        );
    }
    eprintln!("bf16 vs f32, largest relative loss difference over {steps} steps: {largest:.5}");
    // bf16 is not silently f32: the curves are close, not identical.
    assert!(f32_losses.iter().zip(&bf16_losses).any(|(a, b)| a != b));
}

#[test]
fn the_cpu_nf4_kernels_refuse_bf16_activations() {
    let err = place(&nf4_model(), &Device::Cpu, DType::BF16).unwrap_err();
    assert!(format!("{err:#}").contains("f32"), "{err:#}");
}

/// The fused in-place AdamW (`train::adamw_fused`) against the candle-op update, through the
/// trainer: frozen DyLoRA (one rank per step, ranks revisited) and full mode (ranks trained
/// unequally often, so some matrices fall back), plain backpropagation, clipping on. The same
/// losses and adapter bit for bit.
#[test]
fn the_fused_optimizer_trains_exactly_as_the_candle_ops() {
    let fused = nf4_model();
    let mut unfused = nf4_model();
    unfused.fusions.adamw = false;
    for mode in [RankMode::Frozen, RankMode::Full] {
        let (losses, params) = run(&fused, mode, 12, false);
        let (want_losses, want_params) = run(&unfused, mode, 12, false);
        assert_eq!(losses, want_losses, "{mode:?}: losses");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&params), bits(&want_params), "{mode:?}: adapter");
    }
}
