//! `qdylora train`: QDyLoRA (or plain QLoRA with `--fixed-rank`) on an NF4 + double-quant base.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use qdylora_core::infer::LinearKind;

use super::device::{DeviceArg, open};
use crate::model::load::{self, BaseLinears, ModelSource};
use crate::model::place::place;
use crate::train::data::{BadLines, Dataset, Template, TextCodec, read_jsonl};
use crate::train::optim::{AdamWConfig, Schedule, ScheduleKind};
use crate::train::run::{RunOptions, run};
use crate::train::trainer::{
    AdapterDtype, RankMode, RunFiles, TrainConfig, Trainer, truncate_metrics,
};

/// DyLoRA rank training mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Only the sampled rank's row of A and column of B learn (the DyLoRA default).
    Frozen,
    /// Every rank up to the sampled one learns.
    Full,
}

/// Arguments of `qdylora train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base model: an HF checkpoint (quantized to NF4 + double quant at load) or a bitsandbytes
    /// 4-bit checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data, JSONL: {"instruction", "input"?, "output"} or {"text"} per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out data (default: a split of --data).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Fraction of --data held out when there is no --eval-data.
    #[arg(long, default_value_t = 0.05)]
    pub eval_fraction: f64,
    /// tokenizer.json (default: the model folder's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output folder: checkpoint, metrics.jsonl, adapter.qdyl.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Largest rank.
    #[arg(long, default_value_t = 64)]
    pub r_max: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f32,
    /// Adapted linears (comma-separated short names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub target_modules: Vec<String>,
    /// DyLoRA mode.
    #[arg(long, value_enum, default_value_t = Mode::Frozen)]
    pub mode: Mode,
    /// Plain QLoRA at this fixed rank instead of DyLoRA (the baseline).
    #[arg(long)]
    pub fixed_rank: Option<usize>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (all use the step's rank).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Warmup steps (linear from 0).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Schedule after warmup.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Constant)]
    pub schedule: ScheduleKind,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 0.3)]
    pub max_grad_norm: f64,
    /// Adapter weight dtype.
    #[arg(long, value_enum, default_value_t = AdapterDtype::F32)]
    pub adapter_dtype: AdapterDtype,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompt template for instruction data.
    #[arg(long, value_enum, default_value_t = Template::Alpaca)]
    pub template: Template,
    /// Longest sequence in tokens (default: the model's max_position_embeddings); longer ones are
    /// truncated with a warning.
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// What to do with a JSONL line that is not a valid record.
    #[arg(long, value_enum, default_value_t = BadLines::Stop)]
    pub bad_lines: BadLines,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Held-out loss every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// NF4 blocksize when quantizing an HF checkpoint.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Where to train: the CPU (f32) or a GPU (bf16 activations, `cuda` builds).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping them
    /// (gradient checkpointing: same gradients, less memory, about a third more compute).
    #[arg(long)]
    pub recompute: bool,
    /// With `--recompute`: the last N layers keep their activations from the forward pass
    /// instead of running it again. The last layer's cost about no peak memory (its backward
    /// would rebuild them right after the loss); each further layer adds its activations to the
    /// peak. 0 recomputes every layer.
    #[arg(long, default_value_t = 1)]
    pub keep_layers: usize,
}

/// Parses `--target-modules`.
pub fn parse_targets(names: &[String]) -> Result<Vec<LinearKind>> {
    let mut kinds = Vec::new();
    for n in names {
        let k = LinearKind::from_short_name(n.trim()).with_context(|| {
            format!("unknown target module {n:?} (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj)")
        })?;
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if kinds.is_empty() {
        bail!("--target-modules is empty");
    }
    Ok(kinds)
}

/// Runs the command.
pub fn run_command(args: &Args) -> Result<()> {
    let (device, dtype) = open(args.device)?;
    let source = ModelSource::open(&args.model)?;
    let tokenizer = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    if !tokenizer.exists() {
        bail!("no tokenizer at {}; pass --tokenizer", tokenizer.display());
    }
    let codec = TextCodec::load(&tokenizer)?;
    if codec.vocab_size() > source.config().vocab_size as usize {
        bail!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            codec.vocab_size(),
            source.config().vocab_size
        );
    }
    let max_len = args
        .max_seq_len
        .unwrap_or(source.config().max_position_embeddings as usize);
    let records = read_jsonl(&args.data, args.bad_lines)?;
    let data = match &args.eval_data {
        Some(p) => Dataset::with_eval(
            &codec,
            &records,
            &read_jsonl(p, args.bad_lines)?,
            args.template,
            max_len,
        )?,
        None => Dataset::build(
            &codec,
            &records,
            args.template,
            max_len,
            args.eval_fraction,
            args.seed,
        )?,
    };
    let mode = match (args.fixed_rank, args.mode) {
        (Some(r), _) => RankMode::Fixed(r),
        (None, Mode::Frozen) => RankMode::Frozen,
        (None, Mode::Full) => RankMode::Full,
    };
    let config = TrainConfig {
        r_max: args.r_max,
        alpha: args.alpha,
        dropout: args.dropout,
        targets: parse_targets(&args.target_modules)?,
        mode,
        steps: args.steps,
        batch_size: args.batch_size.max(1),
        grad_accum: args.grad_accum.max(1),
        schedule: Schedule {
            lr: args.lr,
            warmup_steps: args.warmup_steps,
            total_steps: args.steps,
            kind: args.schedule,
        },
        adamw: AdamWConfig {
            weight_decay: args.weight_decay,
            ..AdamWConfig::default()
        },
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        adapter_dtype: args.adapter_dtype,
    };
    if !(0.0..1.0).contains(&config.dropout) {
        bail!("--dropout must be in [0, 1)");
    }
    let base = BaseLinears::Nf4 {
        blocksize: args.blocksize,
    };
    // Quantized on the host, then uploaded as packed NF4 when the device is a GPU.
    let model = place(
        &load::build(&source, base, &Device::Cpu)?.llama,
        &device,
        dtype,
    )?;
    let fingerprint = load::base_fingerprint(&source, args.blocksize)?;
    let files = RunFiles {
        dir: args.out.clone(),
    };
    let mut trainer = if args.resume {
        let t = Trainer::resume(&model, config, fingerprint, &files.checkpoint())?;
        truncate_metrics(&files.metrics(), t.step)?;
        eprintln!("resuming at step {} of {}", t.step, t.config.steps);
        t
    } else {
        if files.checkpoint().exists() {
            bail!(
                "{} already holds a run; pass --resume to continue it or choose another --out",
                args.out.display()
            );
        }
        // A run killed before its first checkpoint leaves log lines nothing can resume from.
        truncate_metrics(&files.metrics(), 0)?;
        Trainer::new(&model, config, fingerprint)?
    };
    trainer.recompute = args.recompute;
    trainer.keep_layers = args.keep_layers;
    eprintln!(
        "training {} parameters ({} examples, {} held out)",
        trainer.adapter.parameter_count(),
        data.train.len(),
        data.eval.len()
    );
    let summary = run(
        &mut trainer,
        &data,
        &files,
        &RunOptions {
            checkpoint_every: args.checkpoint_every,
            eval_every: args.eval_every,
            eval_batch: 32,
            label: "train".into(),
            progress: true,
        },
    )?;
    let bundle = trainer.bundle_bytes(args.adapter_dtype.element_type())?;
    qdylora_formats::atomic::write_file(&files.bundle(), &bundle)?;
    eprintln!(
        "done: {} steps, train loss {:.4}, held-out loss {:.4} at rank {}, {:.0} tokens/s; adapter: {}",
        summary.steps,
        summary.final_train_loss,
        summary.eval_loss,
        trainer.adapter.r_max,
        summary.tokens_per_second,
        files.bundle().display()
    );
    Ok(())
}
