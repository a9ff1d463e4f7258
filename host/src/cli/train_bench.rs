//! `qdylora train-bench`: training throughput and peak memory of QDyLoRA steps on a model with
//! random NF4 weights built on the target device (no download). `bench/gpu.sh train` runs it on
//! a GPU next to the PEFT + bitsandbytes peer; on the CPU it runs small shapes.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::ValueEnum;
use qdylora_core::infer::{DecoderConfig, LinearKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::device::{DeviceArg, describe, open, peak_bytes};
use crate::model::fused::Fusions;
use crate::model::llama::Llama;
use crate::model::place::{BF16_LOSS_TOLERANCE, place, random_nf4_llama};
use crate::phases::{self, Breakdown, PhaseTime};
use crate::train::data::{Dataset, Example};
use crate::train::optim::{AdamWConfig, Schedule, ScheduleKind};
use crate::train::trainer::{AdapterDtype, RankMode, TrainConfig, Trainer};

/// Model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum BenchShape {
    /// LLaMA-7B: hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000.
    Llama7b,
    /// A small LLaMA for the CPU: hidden 64, MLP 176, 2 layers, 4 heads, vocab 256.
    Tiny,
}

impl BenchShape {
    fn config(self) -> DecoderConfig {
        let (vocab, hidden, inter, layers, heads) = match self {
            BenchShape::Llama7b => (32_000, 4096, 11_008, 32, 32),
            BenchShape::Tiny => (256, 64, 176, 2, 4),
        };
        DecoderConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: hidden / heads,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
        }
    }
}

/// Arguments of `qdylora train-bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Model shape (random weights).
    #[arg(long, value_enum, default_value = "tiny")]
    pub shape: BenchShape,
    /// Use only this many decoder layers of the shape (for quick runs).
    #[arg(long)]
    pub layers: Option<u32>,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// Largest rank; every step samples b in 1..=r_max (frozen mode) on all seven linears.
    #[arg(long, default_value_t = 64)]
    pub r_max: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// NF4 blocksize.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Steps before timing starts.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// Keep every layer's activations instead of recomputing them in the backward pass.
    #[arg(long)]
    pub no_recompute: bool,
    /// With recomputation: the last N layers keep their activations from the forward pass
    /// instead of running it again (see `train --keep-layers`).
    #[arg(long, default_value_t = 1)]
    pub keep_layers: usize,
    /// Adapter weights' dtype (the optimizer math is f32 either way).
    #[arg(long, value_enum, default_value = "bf16")]
    pub adapter_dtype: AdapterDtype,
    /// Fused ops to switch off, to measure each one before and after (comma-separated;
    /// `all` for every one).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub unfuse: Vec<FusionArg>,
    /// GPU only: keep cudarc's per-buffer event tracking on (it is switched off when the GPU is
    /// opened, see `gpu::device::set_event_tracking`), to measure what it costs.
    #[arg(long)]
    pub cudarc_event_tracking: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Correctness check: make the weights on the host, and train the same steps on the CPU in
    /// f32 too; fail when a step's loss differs by more than `BF16_LOSS_TOLERANCE`.
    #[arg(long)]
    pub check_against_cpu: bool,
    /// Seed for weights, data and rank sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A fused op `--unfuse` can switch off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FusionArg {
    /// Every fused op.
    All,
    /// The attention softmax with its scale and causal mask.
    Softmax,
    /// The MLP's `silu(gate) · up`.
    Swiglu,
    /// RMSNorm.
    RmsNorm,
    /// The rotary position embedding.
    Rope,
    /// In the written-out layer backward, RoPE splitting and merging the heads as it rotates
    /// (a copy, then the rotation, instead).
    RopeHeads,
    /// In the written-out layer backward, the residual sums next to the RMSNorms fused into
    /// the norms' kernels, forward and backward (separate sums instead).
    ResidualNorm,
    /// In the written-out layer backward, SwiGLU's two gradients in one pass (one pass each
    /// instead).
    SwigluGrads,
    /// The loss's log-softmax over the vocabulary.
    CrossEntropy,
    /// The LoRA path's scale on the rank-wide product (a reordering, not a kernel).
    LoraScale,
    /// The decoder layer's written-out backward (candle's autograd instead). Switching off
    /// another fused op also switches this off: compare those rows with this one.
    LayerBackward,
    /// In the written-out layer backward, the LoRA products added into an existing sum by the
    /// product itself (cuBLAS beta = 1) rather than by a separate sum.
    LoraAdd,
    /// In the written-out layer backward, the base products added by their GEMMs (cuBLAS
    /// beta = 1) into the adapter's terms and into the input gradient of the linears that
    /// share an input, rather than the adapter's terms and separate sums added to them.
    BaseAdd,
    /// In the written-out layer backward, the adapters of linears that share an input (q, k,
    /// v; gate, up) run their products one by one rather than stacked.
    LoraStack,
    /// In the written-out layer backward, the causal attention in query chunks that skip the
    /// masked keys (the whole score matrix instead).
    CausalChunks,
    /// The optimizer's fused in-place AdamW (the candle-op update instead).
    Adamw,
    /// On a GPU, the fused AdamW's one launch for every matrix (three launches per matrix
    /// instead).
    AdamwMulti,
}

/// Every fusion except those named.
fn fusions_without(off: &[FusionArg]) -> Fusions {
    let mut fusions = Fusions::ALL;
    for name in off {
        match name {
            FusionArg::All => fusions = Fusions::NONE,
            FusionArg::Softmax => fusions.softmax = false,
            FusionArg::Swiglu => fusions.swiglu = false,
            FusionArg::RmsNorm => fusions.rms_norm = false,
            FusionArg::Rope => fusions.rope = false,
            FusionArg::RopeHeads => fusions.rope_heads = false,
            FusionArg::ResidualNorm => fusions.residual_norm = false,
            FusionArg::SwigluGrads => fusions.swiglu_grads = false,
            FusionArg::CrossEntropy => fusions.cross_entropy = false,
            FusionArg::LoraScale => fusions.lora_scale = false,
            FusionArg::LayerBackward => fusions.layer_backward = false,
            FusionArg::LoraAdd => fusions.lora_add = false,
            FusionArg::BaseAdd => fusions.base_add = false,
            FusionArg::LoraStack => fusions.lora_stack = false,
            FusionArg::CausalChunks => fusions.causal_chunks = false,
            FusionArg::Adamw => fusions.adamw = false,
            FusionArg::AdamwMulti => fusions.adamw_multi = false,
        }
    }
    fusions
}

/// What one benchmark run measured.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Where it ran.
    pub device: String,
    /// Shape preset.
    pub shape: BenchShape,
    /// Decoder layers used.
    pub layers: u32,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Largest rank.
    pub r_max: usize,
    /// Activations' dtype.
    pub dtype: String,
    /// Which fused ops ran.
    pub fusions: Fusions,
    /// GPU only: whether cudarc's event tracking was on (`--cudarc-event-tracking`).
    pub event_tracking: Option<bool>,
    /// Per-layer activation recomputation.
    pub recompute: bool,
    /// Layers at the end that kept their activations instead (written-out backward only).
    pub keep_layers: usize,
    /// How the layers' backward ran: `written-out` (`model::backward`, with recomputation and
    /// every fused op on) or `autograd`.
    pub backward: &'static str,
    /// Timed steps.
    pub steps: usize,
    /// Tokens per second over the timed steps (all positions, as the peer counts).
    pub tokens_per_s: f64,
    /// Mean seconds per timed step.
    pub step_s: f64,
    /// Ranks sampled in the timed steps.
    pub ranks: Vec<usize>,
    /// Loss of the last step.
    pub loss: f64,
    /// Every step's loss, warm-up included.
    pub losses: Vec<f64>,
    /// With `--check-against-cpu`: the CPU f32 run's losses, and the largest relative difference.
    pub cpu_losses: Option<Vec<f64>>,
    /// Largest `|loss - cpu_loss| / cpu_loss` over the steps.
    pub max_loss_rel_diff: Option<f64>,
    /// Bytes the frozen model keeps resident, in GiB.
    pub weights_gib: f64,
    /// Peak device memory over the whole run, in GiB (GPU only).
    pub peak_gib: Option<f64>,
    /// What the peak counts (GPU only).
    pub memory_counter: Option<&'static str>,
    /// Seconds to build the random model.
    pub build_s: f64,
    /// The rank of the step measured phase by phase, after the timed ones (`None` if it
    /// failed; the timed figures stand).
    pub phase_step_rank: Option<usize>,
    /// That step's wall time per phase, waiting for the device at each (`phases`).
    pub phases: Vec<PhaseTime>,
    /// The rank of the step after it, measured inside the layers too.
    pub detail_step_rank: Option<usize>,
    /// That step's time per category of work inside the layers (NF4 dequantization, base
    /// GEMMs, LoRA path, attention core), then the rest of its forward and backward passes.
    pub detail: Vec<PhaseTime>,
}

/// Runs the command.
pub fn run(args: &Args) -> Result<()> {
    let report = bench(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} {:?} ({} layers), batch {} x seq {}, r_max {}, {} activations, recompute {} \
             (last {} kept), {} backward, {:?}",
            report.device,
            report.shape,
            report.layers,
            report.batch,
            report.seq,
            report.r_max,
            report.dtype,
            report.recompute,
            report.keep_layers,
            report.backward,
            report.fusions
        );
        println!(
            "{:.0} tokens/s ({:.3} s/step over {} steps, ranks {:?}), loss {:.3}",
            report.tokens_per_s, report.step_s, report.steps, report.ranks, report.loss
        );
        if let (Some(cpu), Some(diff)) = (&report.cpu_losses, report.max_loss_rel_diff) {
            println!(
                "losses   {:?}\ncpu f32  {cpu:?}\nlargest relative difference {diff:.5}",
                report.losses
            );
        }
        let list = |times: &[PhaseTime]| -> String {
            let items: Vec<String> = times
                .iter()
                .map(|p| format!("{} {:.1} ms", p.phase, p.seconds * 1e3))
                .collect();
            items.join(", ")
        };
        if let Some(rank) = report.phase_step_rank {
            println!(
                "one more step (rank {rank}), waiting for the device at each phase: {}",
                list(&report.phases)
            );
        }
        if let Some(rank) = report.detail_step_rank {
            println!(
                "and one (rank {rank}) waiting around each kind of work: {}",
                list(&report.detail)
            );
        }
        if let Some(on) = report.event_tracking {
            println!("cudarc event tracking {}", if on { "on" } else { "off" });
        }
        match report.peak_gib {
            Some(p) => println!(
                "peak GPU memory {p:.2} GiB (weights {:.2}; {})",
                report.weights_gib,
                report.memory_counter.unwrap_or("?")
            ),
            None => println!("weights {:.2} MiB", report.weights_gib * 1024.0),
        }
    }
    if let Some(diff) = report.max_loss_rel_diff
        && (diff.is_nan() || diff > BF16_LOSS_TOLERANCE)
    {
        bail!(
            "the {} run's losses differ from the CPU f32 run's by up to {diff:.4} (relative; \
             tolerance {BF16_LOSS_TOLERANCE})",
            report.device
        );
    }
    Ok(())
}

/// Applies `--cudarc-event-tracking` before anything is allocated; `None` on the CPU.
fn event_tracking(device: &Device, keep: bool) -> Result<Option<bool>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            // Gpu::open switched it off; only turning it back on is left to do.
            if keep {
                crate::gpu::device::set_event_tracking(cuda, true);
            }
            Ok(Some(keep))
        }
        _ if keep => bail!("--cudarc-event-tracking is for --device cuda"),
        _ => Ok(None),
    }
}

/// Builds the model, trains `warmup + steps` steps, times the last `steps`.
pub fn bench(args: &Args) -> Result<BenchReport> {
    if args.steps == 0 || args.batch == 0 || args.seq == 0 {
        bail!("--steps, --batch and --seq must be at least 1");
    }
    let (device, dtype) = open(args.device)?;
    let event_tracking = event_tracking(&device, args.cudarc_event_tracking)?;
    let mut config = args.shape.config();
    if let Some(layers) = args.layers {
        if layers == 0 || layers > config.num_layers {
            bail!(
                "--layers must be 1..={} for {:?}",
                config.num_layers,
                args.shape
            );
        }
        config.num_layers = layers;
    }
    let started = Instant::now();
    // With the CPU check, the weights are made on the host so the reference trains the same model.
    let host = args
        .check_against_cpu
        .then(|| random_nf4_llama(config, &Device::Cpu, DType::F32, args.blocksize, args.seed))
        .transpose()?;
    let mut model = match &host {
        Some(host) => place(host, &device, dtype)?,
        None => random_nf4_llama(config, &device, dtype, args.blocksize, args.seed)
            .context("building the random model")?,
    };
    model.fusions = fusions_without(&args.unfuse);
    device.synchronize()?;
    let build_s = started.elapsed().as_secs_f64();

    let data = random_tokens(&config, args);
    let train_config = train_config(args);
    let mut trainer = Trainer::new(&model, train_config.clone(), [0; 16])?;
    trainer.recompute = !args.no_recompute;
    trainer.keep_layers = args.keep_layers;
    let mut losses = Vec::with_capacity(args.warmup + args.steps);
    for _ in 0..args.warmup {
        losses.push(trainer.train_step(&data)?.loss);
    }
    device.synchronize()?;
    let timed = Instant::now();
    let mut ranks = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let report = trainer.train_step(&data)?;
        ranks.push(report.rank);
        losses.push(report.loss);
    }
    device.synchronize()?;
    let seconds = timed.elapsed().as_secs_f64();
    let peak = peak_bytes(&device)?;
    // Two more steps, untimed above: one waiting for the device at each phase of the step,
    // one also around each category of work inside the layers (`phases`). Their losses are not
    // among `losses` (the CPU check compares those), and a failure costs only their breakdown.
    let mut breakdown =
        |detailed: bool| match phases::measure(&device, detailed, || trainer.train_step(&data)) {
            Ok((step, found)) => Some((step.rank, found)),
            Err(e) => {
                eprintln!("warning: the step measured phase by phase failed: {e:#}");
                None
            }
        };
    let phases = breakdown(false);
    let detail = breakdown(true).map(|(rank, found)| (rank, within_layers(&found)));

    let cpu_losses = host
        .map(|host| cpu_reference_losses(&host, train_config, &data, losses.len()))
        .transpose()?;
    let max_loss_rel_diff = cpu_losses.as_ref().map(|cpu| {
        cpu.iter()
            .zip(&losses)
            .map(|(c, l)| (l - c).abs() / c.abs())
            .fold(
                0.0,
                |a: f64, d| if d.is_nan() { f64::NAN } else { a.max(d) },
            )
    });
    let tokens = (args.batch * args.seq * args.steps) as f64;
    // Only the written-out layer backward keeps layers' activations (`train::recompute`).
    let written_out = trainer.recompute && model.has_layer_backward();
    Ok(BenchReport {
        device: describe(&device),
        shape: args.shape,
        layers: config.num_layers,
        batch: args.batch,
        seq: args.seq,
        r_max: args.r_max,
        dtype: format!("{dtype:?}").to_lowercase(),
        fusions: model.fusions,
        event_tracking,
        recompute: trainer.recompute,
        keep_layers: match written_out {
            true => trainer.keep_layers.min(config.num_layers as usize),
            false => 0,
        },
        backward: match written_out {
            true => "written-out",
            false => "autograd",
        },
        steps: args.steps,
        tokens_per_s: tokens / seconds,
        step_s: seconds / args.steps as f64,
        ranks,
        loss: losses.last().copied().unwrap_or(f64::NAN),
        losses,
        cpu_losses,
        max_loss_rel_diff,
        weights_gib: model.resident_bytes() as f64 / GIB,
        peak_gib: peak.map(|(b, _)| b as f64 / GIB),
        memory_counter: peak.map(|(_, counter)| counter),
        build_s,
        phase_step_rank: phases.as_ref().map(|(rank, _)| *rank),
        phases: phases.map(|(_, found)| found.phases).unwrap_or_default(),
        detail_step_rank: detail.as_ref().map(|(rank, _)| *rank),
        detail: detail.map(|(_, detail)| detail).unwrap_or_default(),
    })
}

/// The categories a detailed step found inside its layers, and the rest of its forward and
/// backward passes (norms, RoPE, SwiGLU, sums, copies; and the LM head where autograd runs it
/// with the layers) as one more entry.
fn within_layers(found: &Breakdown) -> Vec<PhaseTime> {
    let passes: f64 = found
        .phases
        .iter()
        .filter(|p| ["forward", "layers backward", "forward and backward"].contains(&p.phase))
        .map(|p| p.seconds)
        .sum();
    let inside: f64 = found.within.iter().map(|p| p.seconds).sum();
    let mut detail = found.within.clone();
    detail.push(PhaseTime {
        phase: "the rest of the forward and backward passes",
        seconds: (passes - inside).max(0.0),
    });
    detail
}

fn cpu_reference_losses(
    model: &Llama,
    config: TrainConfig,
    data: &Dataset,
    steps: usize,
) -> Result<Vec<f64>> {
    let mut trainer = Trainer::new(model, config, [0; 16])?;
    (0..steps)
        .map(|_| Ok(trainer.train_step(data)?.loss))
        .collect()
}

/// QDyLoRA frozen mode on all seven linears, the peer's optimizer settings (lr 2e-4 constant,
/// clipping at 0.3), no dropout.
fn train_config(args: &Args) -> TrainConfig {
    TrainConfig {
        r_max: args.r_max,
        alpha: args.alpha,
        dropout: 0.0,
        targets: LinearKind::ALL.to_vec(),
        mode: RankMode::Frozen,
        steps: (args.warmup + args.steps) as u64,
        batch_size: args.batch,
        grad_accum: 1,
        schedule: Schedule {
            lr: 2e-4,
            warmup_steps: 0,
            kind: ScheduleKind::Constant,
            total_steps: (args.warmup + args.steps) as u64,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: 0.3,
        seed: args.seed,
        adapter_dtype: args.adapter_dtype,
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// `batch` random sequences of `seq + 1` tokens (inputs and shifted targets of length `seq`),
/// every position scored, as the peer's `labels=input_ids`.
fn random_tokens(config: &DecoderConfig, args: &Args) -> Dataset {
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let train = (0..args.batch)
        .map(|_| Example {
            ids: (0..=args.seq)
                .map(|_| rng.random_range(0..config.vocab_size))
                .collect(),
            prompt_len: 0,
            answer: Vec::new(),
        })
        .collect();
    Dataset {
        train,
        eval: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fusions switched off, by field name.
    fn off(fusions: Fusions) -> Vec<String> {
        let serde_json::Value::Object(fields) = serde_json::to_value(fusions).unwrap() else {
            panic!("Fusions serializes to an object");
        };
        let off = fields
            .into_iter()
            .filter(|(_, on)| on == &serde_json::Value::Bool(false));
        off.map(|(name, _)| name).collect()
    }

    /// Each `--unfuse` name switches off one fusion of its own, and `all` every one: a fusion
    /// added without a name would have no "before" row in `bench/gpu.sh train`.
    #[test]
    fn each_unfuse_name_switches_off_its_own_fusion() {
        let mut seen = Vec::new();
        for &name in FusionArg::value_variants() {
            let switched = off(fusions_without(&[name]));
            if name == FusionArg::All {
                assert_eq!(switched, off(Fusions::NONE));
                continue;
            }
            assert_eq!(
                switched.len(),
                1,
                "--unfuse {name:?} switched off {switched:?}"
            );
            assert!(
                !seen.contains(&switched[0]),
                "{name:?}: {switched:?} named twice"
            );
            seen.push(switched[0].clone());
        }
        seen.sort();
        let mut every = off(Fusions::NONE);
        every.sort();
        assert_eq!(seen, every, "a fusion has no --unfuse name");
    }
}
