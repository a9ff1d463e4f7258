//! The embedded-default demo: a small base model pretrained on generated text, quantized to NF4,
//! fine-tuned with QDyLoRA and plain QLoRA baselines, swept over ranks and exported for devices.
pub mod pretrain;
pub mod task;
pub mod tokenizer;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use qdylora_core::infer::{DecoderConfig, LinearKind};
use qdylora_formats::bundle::BundleReader;
use qdylora_formats::{atomic, peft};

use crate::cli::export::{budget_ranks, human_bytes, print_budget_table, write_device_container};
use crate::cli::quantize::{self, Dtype};
use crate::model::load::{self, BaseLinears, LoadedModel, ModelSource};
use crate::model::lora::Adapter;
use crate::plot::{Series, rank_plot};
use crate::sweep::{RankPoint, recommend, sweep};
use crate::train::data::{Dataset, Template, TextCodec};
use crate::train::optim::{AdamWConfig, Schedule, ScheduleKind};
use crate::train::run::{RunOptions, run};
use crate::train::trainer::{
    AdapterDtype, RankMode, RunFiles, TrainConfig, Trainer, adapter_bundle,
};

/// The demo's base model shape: small enough to pretrain on a laptop CPU in minutes, LLaMA in
/// every structural detail (GQA with 4 query and 2 key/value heads, SwiGLU, RoPE, tied head).
pub fn base_config() -> DecoderConfig {
    DecoderConfig {
        vocab_size: tokenizer::vocab_size() as u32,
        hidden_size: 128,
        intermediate_size: 344,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
    }
}

/// `config.json` for the base, as transformers writes a LLaMA config.
pub fn base_config_json(cfg: &DecoderConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": 32,
        "rms_norm_eps": shortest_f64(cfg.rms_norm_eps),
        "rope_theta": shortest_f64(cfg.rope_theta),
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "dtype": "bfloat16",
    })
}

/// The f64 whose shortest decimal form is the f32's (1e-5, not 9.999999747378752e-6).
fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// Sizes and lengths of a demo run.
#[derive(Debug, Clone)]
pub struct DemoSettings {
    /// Seed of everything.
    pub seed: u64,
    /// Pretraining steps when the base must be built.
    pub pretrain_steps: u64,
    /// Steps of each QLoRA baseline run.
    pub train_steps: u64,
    /// Steps of the QDyLoRA run: `r_max` times a baseline's by default, so each rank's row and
    /// column get as many updates as a baseline's do (frozen mode trains one rank per step).
    pub qdylora_steps: u64,
    /// Examples per step.
    pub batch_size: usize,
    /// QDyLoRA's largest rank (and the QLoRA baseline's rank).
    pub r_max: usize,
    /// Fixed-rank QLoRA baselines.
    pub small_ranks: Vec<usize>,
    /// Fine-tuning examples.
    pub train_examples: usize,
    /// Held-out examples.
    pub eval_examples: usize,
    /// Learning rate of the adapters.
    pub lr: f64,
}

impl Default for DemoSettings {
    fn default() -> Self {
        Self {
            seed: 7,
            pretrain_steps: 1500,
            train_steps: 150,
            qdylora_steps: 16 * 150,
            batch_size: 32,
            r_max: 16,
            small_ranks: vec![2, 4],
            train_examples: 4000,
            eval_examples: 256,
            lr: 5e-3,
        }
    }
}

/// Builds (pretrains) the demo base into `dir`: config.json, model.safetensors (bf16),
/// tokenizer.json. Returns the final pretraining loss.
pub fn build_base(dir: &Path, settings: &DemoSettings) -> Result<f64> {
    let device = Device::Cpu;
    let cfg = base_config();
    let tok = tokenizer::build()?;
    let codec = TextCodec::new(tok.clone())?;
    let corpus = task::pretraining_corpus(settings.seed, 24_000);
    let data = Dataset::build(&codec, &corpus, Template::Compact, 32, 0.0, settings.seed)?;
    let (params, loss) = pretrain::pretrain(
        &cfg,
        &data,
        &pretrain::PretrainConfig {
            steps: settings.pretrain_steps,
            batch_size: settings.batch_size,
            lr: 3e-3,
            seed: settings.seed,
        },
        &device,
    )?;
    params.save_hf(dir, &base_config_json(&cfg))?;
    tokenizer::save(&tok, dir)?;
    Ok(loss)
}

/// One row of the demo's comparison.
#[derive(Debug, Clone, Copy)]
pub struct ComparisonRow {
    /// The rank.
    pub rank: usize,
    /// QDyLoRA evaluated at this rank.
    pub qdylora: RankPoint,
    /// QLoRA trained at r_max, truncated to this rank.
    pub qlora_truncated: RankPoint,
    /// QLoRA trained at exactly this rank, when that baseline was run.
    pub qlora_fixed: Option<RankPoint>,
}

fn em(p: &RankPoint) -> f64 {
    100.0 * p.exact_match.unwrap_or(0.0)
}

/// Prints the comparison table.
pub fn print_comparison(rows: &[ComparisonRow], r_max: usize) {
    println!();
    println!("exact match (%) and held-out loss on the held-out words, by rank:");
    println!(
        "{:>5} | {:>17} | {:>26} | {:>24}",
        "rank",
        "QDyLoRA (1 run)",
        format!("QLoRA r={r_max} truncated"),
        "QLoRA trained at rank"
    );
    for r in rows {
        let fixed = r.qlora_fixed.map_or("-".to_string(), |p| {
            format!("{:5.1}%  loss {:.3}", em(&p), p.eval_loss)
        });
        println!(
            "{:>5} | {:5.1}%  loss {:.3} | {:14.1}%  loss {:.3} | {:>24}",
            r.rank,
            em(&r.qdylora),
            r.qdylora.eval_loss,
            em(&r.qlora_truncated),
            r.qlora_truncated.eval_loss,
            fixed
        );
    }
}

struct Run {
    name: String,
    adapter: Adapter,
    seconds: f64,
}

fn train_one(
    model: &LoadedModel,
    fingerprint: [u8; 16],
    data: &Dataset,
    mode: RankMode,
    name: &str,
    out: &Path,
    s: &DemoSettings,
) -> Result<Run> {
    let started = Instant::now();
    let steps = if mode == RankMode::Frozen {
        s.qdylora_steps
    } else {
        s.train_steps
    };
    let config = TrainConfig {
        r_max: s.r_max,
        alpha: 16.0,
        dropout: 0.0,
        targets: LinearKind::ALL.to_vec(),
        mode,
        steps,
        batch_size: s.batch_size,
        grad_accum: 1,
        schedule: Schedule {
            lr: s.lr,
            warmup_steps: steps / 20,
            total_steps: steps,
            kind: ScheduleKind::Constant,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: 1.0,
        seed: s.seed,
        adapter_dtype: AdapterDtype::F32,
    };
    let mut trainer = Trainer::new(&model.llama, config, fingerprint)?;
    let files = RunFiles {
        dir: out.join(name),
    };
    let _ = std::fs::remove_file(files.metrics());
    let summary = run(
        &mut trainer,
        data,
        &files,
        &RunOptions {
            checkpoint_every: 0,
            eval_every: 0,
            eval_batch: 128,
            label: format!("{name:>10}"),
            progress: true,
        },
    )?;
    let bundle = trainer.bundle_bytes(qdylora_core::ElementType::F32)?;
    atomic::write_file(&files.bundle(), &bundle)?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{name:>10}: {} steps in {seconds:.0} s ({:.0} tokens/s), train loss {:.3}, held-out loss {:.3}",
        summary.steps, summary.tokens_per_second, summary.final_train_loss, summary.eval_loss
    );
    Ok(Run {
        name: name.to_string(),
        adapter: trainer.adapter,
        seconds,
    })
}

/// The whole story; returns the comparison rows.
pub fn run_demo(
    out: &Path,
    base_dir: &Path,
    settings: &DemoSettings,
) -> Result<Vec<ComparisonRow>> {
    let started = Instant::now();
    let device = Device::Cpu;
    std::fs::create_dir_all(out)?;

    // 1. The base model, without a download.
    if !base_dir.join("model.safetensors").exists() {
        println!(
            "1. pretraining the base model on generated text ({} steps; cached in {})",
            settings.pretrain_steps,
            base_dir.display()
        );
        let loss = build_base(base_dir, settings)?;
        println!("   pretraining loss {loss:.3}");
    } else {
        println!(
            "1. base model: {} (pretrained on generated text by this project)",
            base_dir.display()
        );
    }

    // 2. NF4 + double quant, written as a bitsandbytes checkpoint and loaded back from it.
    let nf4_dir = out.join("base-nf4");
    if nf4_dir.exists() {
        std::fs::remove_dir_all(&nf4_dir)?;
    }
    quantize::run(&quantize::Args {
        model: base_dir.to_path_buf(),
        out: nf4_dir.clone(),
        blocksize: 64,
        compute_dtype: Dtype::Float32,
        dtype: None,
    })?;
    let source = ModelSource::open(&nf4_dir)?;
    let model = load::build(&source, BaseLinears::Nf4 { blocksize: 64 }, &device)?;
    let dense = ModelSource::open(base_dir)?;
    let dense_bytes = load::build(&dense, BaseLinears::Dense, &device)?
        .llama
        .resident_bytes();
    println!(
        "2. quantized to NF4 + double quant: {} resident (f32: {})",
        human_bytes(model.llama.resident_bytes() as u64),
        human_bytes(dense_bytes as u64)
    );
    let fingerprint = load::base_fingerprint(&source, 64)?;

    // 3-4. The task, QDyLoRA and the QLoRA baselines.
    let codec = TextCodec::load(&base_dir.join("tokenizer.json"))?;
    let (train_records, eval_records) = task::finetune_task(
        settings.seed,
        settings.train_examples,
        settings.eval_examples,
    );
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir)?;
    atomic::write_file(
        &data_dir.join("train.jsonl"),
        task::to_jsonl(&train_records).as_bytes(),
    )?;
    atomic::write_file(
        &data_dir.join("eval.jsonl"),
        task::to_jsonl(&eval_records).as_bytes(),
    )?;
    let data = Dataset::with_eval(&codec, &train_records, &eval_records, Template::Compact, 32)?;
    println!(
        "3. task: the secret position-dependent cipher `enc` on {}-letter words ({} train, {} held-out words; {})",
        task::WORD_LEN,
        data.train.len(),
        data.eval.len(),
        data_dir.display()
    );
    let r_max = settings.r_max;
    println!(
        "   QDyLoRA, frozen mode, r_max {r_max}: one run of {} steps serves every rank (each \
         rank's row and column train in about {} of them)",
        settings.qdylora_steps,
        settings.qdylora_steps / r_max as u64
    );
    let mut runs = vec![train_one(
        &model,
        fingerprint,
        &data,
        RankMode::Frozen,
        "qdylora",
        out,
        settings,
    )?];
    println!(
        "4. baselines: plain QLoRA, one run of {} steps per rank, at r={r_max} and at small ranks",
        settings.train_steps
    );
    runs.push(train_one(
        &model,
        fingerprint,
        &data,
        RankMode::Fixed(r_max),
        &format!("qlora-r{r_max}"),
        out,
        settings,
    )?);
    // Baselines below r_max only: r_max's run is the one above.
    let small_ranks: BTreeSet<usize> = settings
        .small_ranks
        .iter()
        .copied()
        .filter(|&r| (1..r_max).contains(&r))
        .collect();
    for &r in &small_ranks {
        runs.push(train_one(
            &model,
            fingerprint,
            &data,
            RankMode::Fixed(r),
            &format!("qlora-r{r}"),
            out,
            settings,
        )?);
    }

    // 5. Sweep.
    let mut ranks: Vec<usize> = (1..=r_max).filter(|r| *r <= 4 || r % 2 == 0).collect();
    ranks.dedup();
    let pb = crate::cli::progress::bar((2 * ranks.len() + small_ranks.len()) as u64, "sweep");
    let sweep_of = |run: &Run, ranks: &[usize]| {
        sweep(
            &model.llama,
            &run.adapter,
            ranks,
            &data.eval,
            codec.eos,
            128,
            |_| pb.inc(1),
        )
    };
    let qdy = sweep_of(&runs[0], &ranks)?;
    let trunc = sweep_of(&runs[1], &ranks)?;
    let mut fixed = Vec::new();
    for run in &runs[2..] {
        fixed.extend(sweep_of(run, &[run.adapter.r_max])?);
    }
    fixed.push(*trunc.last().context("empty sweep")?);
    pb.finish_and_clear();
    let rows: Vec<ComparisonRow> = ranks
        .iter()
        .enumerate()
        .map(|(i, &rank)| ComparisonRow {
            rank,
            qdylora: qdy[i],
            qlora_truncated: trunc[i],
            qlora_fixed: fixed.iter().find(|p| p.rank == rank).copied(),
        })
        .collect();
    println!("5. rank sweep");
    print_comparison(&rows, r_max);
    if let Some(r) = recommend(&qdy, 0.01) {
        println!(
            "   recommended QDyLoRA rank: {} (best), {} (smallest within 1 point of the best)",
            r.best, r.smallest_within
        );
    }
    crate::sweep::write_csv(&out.join("sweep-qdylora.csv"), &qdy)?;
    let series = |label: &str, pts: &[RankPoint]| Series {
        label: label.to_string(),
        points: pts.iter().map(|p| (p.rank as f64, em(p))).collect(),
    };
    rank_plot(
        &out.join("sweep.svg"),
        "exact match vs rank (held-out words)",
        "exact match (%)",
        &[
            series("QDyLoRA (one run)", &qdy),
            series(&format!("QLoRA r={r_max} truncated"), &trunc),
            series("QLoRA trained at the rank", &fixed),
        ],
    )?;

    // 6. Export.
    let export_dir = out.join("export");
    std::fs::create_dir_all(&export_dir)?;
    let bundle = adapter_bundle(
        &runs[0].adapter,
        qdylora_core::ElementType::F32,
        fingerprint,
    )?;
    atomic::write_file(&export_dir.join("adapter.qdyl"), &bundle)?;
    let reader = BundleReader::parse(&bundle).map_err(|e| anyhow::anyhow!("bundle: {e}"))?;
    let peft_ranks = BTreeSet::from([4.min(r_max), r_max]);
    for &r in &peft_ranks {
        peft::from_bundle_rank(&reader, r as u32)?.write(&export_dir.join(format!("peft-r{r}")))?;
    }
    let peft_dirs: Vec<String> = peft_ranks.iter().map(|r| format!("peft-r{r}/")).collect();
    write_device_container(
        &export_dir.join("model.qdm"),
        &source,
        64,
        qdylora_core::ElementType::F32,
    )?;
    println!(
        "6. exported {}: adapter.qdyl ({} bytes, rank r = first {}+r*{} bytes), {}, model.qdm ({} bytes)",
        export_dir.display(),
        bundle.len(),
        reader.header_len(),
        reader.slice_len(),
        peft_dirs.join(", "),
        std::fs::metadata(export_dir.join("model.qdm"))?.len()
    );
    let budgets = [64u64 << 10, 256 << 10, 1 << 20];
    print_budget_table(&reader, &budget_ranks(&reader, &budgets))?;
    let per_run: Vec<String> = runs
        .iter()
        .map(|r| format!("{} {:.0} s", r.name, r.seconds))
        .collect();
    println!(
        "done in {:.0} s (training: {}); plot: {}",
        started.elapsed().as_secs_f64(),
        per_run.join(", "),
        out.join("sweep.svg").display()
    );
    Ok(rows)
}

/// Where the demo keeps its base model unless told otherwise: the one this project ships.
pub fn default_base_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-base")
}
