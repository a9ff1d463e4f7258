//! The QDyLoRA training loop: per optimizer step one rank `b ~ U{1..r_max}` for the whole model
//! (shared by every micro-batch of the step), forward at rank `b` with scale `alpha / b`, masked
//! cross-entropy, gradient clipping and a masked AdamW update; atomic checkpoints that resume
//! to exactly the losses of an uninterrupted run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use qdylora_core::ElementType;
use qdylora_core::infer::LinearKind;
use qdylora_core::rank::Scaling;
use qdylora_formats::atomic;
use qdylora_formats::bundle::{BundleMeta, ModuleTensors, write_bundle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use super::data::{Batch, DataCursor, Dataset, Example};
use super::eval::{eval_loss, masked_cross_entropy};
use super::optim::{AdamWConfig, MaskedAdamW, Schedule, clip_factor, grad_norm, scale_grads};
use super::recompute;
use crate::model::llama::Llama;
use crate::model::lora::{Adapter, AdapterCall, Dropout, LoraModule, ModuleKey, RankGrad};
use crate::phases;

/// How ranks are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankMode {
    /// DyLoRA frozen mode: rank `b` sampled per step, only row/column `b` learns.
    Frozen,
    /// DyLoRA non-frozen: rank `b` sampled per step, rows/columns `1..=b` learn.
    Full,
    /// Plain (Q)LoRA at this rank: every row learns every step.
    Fixed(usize),
}

/// Element type the adapter weights are kept in (the optimizer math is f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum AdapterDtype {
    /// f32 weights.
    F32,
    /// bf16 weights (re-rounded after every update).
    Bf16,
}

impl AdapterDtype {
    fn dtype(self) -> DType {
        match self {
            AdapterDtype::F32 => DType::F32,
            AdapterDtype::Bf16 => DType::BF16,
        }
    }

    /// The element type exports use.
    pub fn element_type(self) -> ElementType {
        match self {
            AdapterDtype::F32 => ElementType::F32,
            AdapterDtype::Bf16 => ElementType::Bf16,
        }
    }
}

/// Everything that defines a run (stored in every checkpoint; a resume must match it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Largest rank (the adapter's size).
    pub r_max: usize,
    /// LoRA alpha.
    pub alpha: f32,
    /// Dropout on the adapter input.
    pub dropout: f32,
    /// Adapted linears (stored by their short names).
    #[serde(with = "short_names")]
    pub targets: Vec<LinearKind>,
    /// Rank sampling mode.
    pub mode: RankMode,
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// AdamW hyperparameters.
    pub adamw: AdamWConfig,
    /// Gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// Seed of every random choice (init, data order, ranks, dropout).
    pub seed: u64,
    /// Adapter weight dtype.
    pub adapter_dtype: AdapterDtype,
}

impl TrainConfig {
    /// The adapter's stored rank count.
    pub fn adapter_rank(&self) -> usize {
        match self.mode {
            RankMode::Fixed(r) => r,
            _ => self.r_max,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based step number.
    pub step: u64,
    /// Mean loss over the step's scored tokens.
    pub loss: f64,
    /// The rank trained.
    pub rank: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed (all positions of all micro-batches).
    pub tokens: usize,
    /// Seconds the step took.
    pub seconds: f64,
}

/// Independent, reproducible streams derived from the run seed and a step: the rank sampler
/// and dropout are functions of `(seed, step)`, so their state is the step counter.
fn stream(seed: u64, step: u64, purpose: u64) -> StdRng {
    let mut z = seed
        ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ purpose.wrapping_mul(0xd1b5_4a32_d192_ed03);
    // splitmix64 finalizer: neighbouring (step, purpose) pairs give unrelated seeds.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

const PURPOSE_RANK: u64 = 1;
const PURPOSE_DROPOUT: u64 = 2;
const PURPOSE_INIT: u64 = 3;
/// With recomputation each (micro-batch, layer) draws dropout masks from its own stream,
/// `PURPOSE_LAYER_DROPOUT + (micro_batch << 16) + layer`, so a recomputed layer sees its masks again.
const PURPOSE_LAYER_DROPOUT: u64 = 1 << 32;

/// A run in progress.
pub struct Trainer<'m> {
    model: &'m Llama,
    /// The adapter being trained.
    pub adapter: Adapter,
    optim: MaskedAdamW,
    /// The run's definition.
    pub config: TrainConfig,
    /// Optimizer steps done.
    pub step: u64,
    cursor: DataCursor,
    fingerprint: [u8; 16],
    /// Recompute each decoder layer's activations in the backward pass instead of keeping them
    /// (gradient checkpointing, see `recompute`). Off by default: same gradients, less memory,
    /// about one more forward pass of compute.
    pub recompute: bool,
    /// With `recompute` and the written-out layer backward: the last this many layers keep
    /// their activations from the forward pass instead of recomputing them (0: recompute all).
    /// 1 by default: the last layer's backward would rebuild its tape right after the loss, so
    /// keeping it costs about no peak memory.
    pub keep_layers: usize,
}

impl<'m> Trainer<'m> {
    /// A fresh run: A Kaiming-uniform, B zero, on every target linear of every layer.
    pub fn new(model: &'m Llama, config: TrainConfig, fingerprint: [u8; 16]) -> Result<Self> {
        let cfg = &model.config;
        let r = config.adapter_rank();
        if r == 0 {
            bail!("the rank must be at least 1");
        }
        if config.targets.is_empty() {
            bail!("no target modules");
        }
        let mut rng = stream(config.seed, 0, PURPOSE_INIT);
        let mut modules = BTreeMap::new();
        for layer in 0..cfg.num_layers as usize {
            for &kind in &config.targets {
                let shape = kind.shape(cfg);
                let (i, o) = (shape.in_features as usize, shape.out_features as usize);
                if r > i.min(o) {
                    bail!(
                        "r_max {r} is larger than the {} dimensions (in {i}, out {o}); a rank above \
                         min(in, out) adds nothing",
                        kind.short_name()
                    );
                }
                modules.insert(
                    ModuleKey { layer, kind },
                    LoraModule::init(i, o, r, &mut rng, &model.device)?,
                );
            }
        }
        let adapter = Adapter {
            r_max: r,
            alpha: config.alpha,
            scaling: Scaling::AlphaOverRank,
            modules,
        };
        let mut optim = MaskedAdamW::new(config.adamw, &param_list(&adapter))?;
        optim.one_launch = model.fusions.adamw_multi;
        Ok(Self {
            model,
            adapter,
            optim,
            config,
            step: 0,
            cursor: DataCursor {
                epoch: 0,
                position: 0,
            },
            fingerprint,
            recompute: false,
            keep_layers: 1,
        })
    }

    /// The rank trained at 0-based step `step`.
    pub fn rank_for_step(&self, step: u64) -> usize {
        match self.config.mode {
            RankMode::Fixed(r) => r,
            RankMode::Frozen | RankMode::Full => {
                stream(self.config.seed, step, PURPOSE_RANK).random_range(1..=self.config.r_max)
            }
        }
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn train_step(&mut self, data: &Dataset) -> Result<StepReport> {
        let started = Instant::now();
        let c = &self.config;
        let rank = self.rank_for_step(self.step);
        let grad_rule = match c.mode {
            RankMode::Frozen => RankGrad::Last,
            RankMode::Full | RankMode::Fixed(_) => RankGrad::All,
        };
        let rows = grad_rule.learning_rows(rank);
        let batches: Vec<Batch> = (0..c.grad_accum)
            .map(|_| {
                let idx = self
                    .cursor
                    .next_batch(c.seed, data.train.len(), c.batch_size);
                let refs: Vec<&Example> = idx.iter().map(|&i| &data.train[i]).collect();
                Batch::new(&refs, 0)
            })
            .collect();
        let scored: usize = batches.iter().map(Batch::scored_tokens).sum();
        if scored == 0 {
            bail!("step {}: no token to score in the batch", self.step + 1);
        }
        let dropout = Dropout {
            p: c.dropout,
            rng: RefCell::new(stream(c.seed, self.step, PURPOSE_DROPOUT)),
        };
        let vars = self.adapter.vars();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        for (micro, batch) in batches.iter().enumerate() {
            let call = AdapterCall {
                adapter: &self.adapter,
                rank,
                grad: grad_rule,
                dropout: (c.dropout > 0.0).then_some(&dropout),
            };
            let ids = Tensor::from_slice(&batch.ids, (batch.rows, batch.cols), &self.model.device)?;
            // Weight each micro-batch by its share of the step's scored tokens.
            let weight = batch.scored_tokens() as f64 / scored as f64;
            let (sum, new_grads) = if self.recompute {
                let (seed, step, p) = (c.seed, self.step, c.dropout);
                let layer_dropout = |layer: usize| {
                    let purpose = PURPOSE_LAYER_DROPOUT + ((micro as u64) << 16) + layer as u64;
                    (p > 0.0).then(|| Dropout {
                        p,
                        rng: RefCell::new(stream(seed, step, purpose)),
                    })
                };
                let out = recompute::loss_and_grads(
                    self.model,
                    &ids,
                    batch,
                    &call,
                    &layer_dropout,
                    weight,
                    &vars,
                    self.keep_layers,
                )?;
                (out.loss_sum, out.grads)
            } else {
                let logits = self.model.forward(&ids, Some(&call))?;
                let (mean, sum) = masked_cross_entropy(&logits, batch, self.model)?;
                let store = (mean * weight)?.backward()?;
                let grads = vars.iter().map(|v| store.get(v.as_tensor()).cloned());
                phases::mark("forward and backward")?;
                (sum, grads.collect())
            };
            if !sum.is_finite() {
                bail!(
                    "the loss became non-finite at step {} (rank {rank}); stopping. The last good \
                     checkpoint is kept; lower the learning rate or check the data",
                    self.step + 1
                );
            }
            loss_sum += sum;
            tokens += batch.rows * batch.cols;
            for (g, new) in grads.iter_mut().zip(new_grads) {
                if let Some(new) = new {
                    recompute::accumulate(g, new)?;
                }
            }
            phases::mark("gradient accumulation")?;
        }
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let grad_norm = grad_norm(&grads)?;
        phases::mark("gradient norm")?;
        if !grad_norm.is_finite() {
            bail!(
                "the gradient became non-finite at step {} (rank {rank}); stopping. The last good \
                 checkpoint is kept",
                self.step + 1
            );
        }
        let lr = c.schedule.lr_at(self.step);
        let clip = clip_factor(grad_norm, c.max_grad_norm);
        let round_to = c.adapter_dtype.dtype();
        if self.model.fusions.adamw {
            self.optim
                .step_fused(&vars, &grads, rows, lr, round_to, clip)?;
        } else {
            if let Some(scale) = clip {
                scale_grads(&mut grads, scale)?;
            }
            self.optim.step(&vars, &grads, rows, lr, round_to)?;
        }
        phases::mark("optimizer")?;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss: loss_sum / scored as f64,
            rank,
            lr,
            grad_norm,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Held-out loss at rank `r`.
    pub fn eval_loss(&self, data: &Dataset, r: usize, batch: usize) -> Result<f64> {
        let call = AdapterCall {
            adapter: &self.adapter,
            rank: r,
            grad: RankGrad::None,
            dropout: None,
        };
        Ok(eval_loss(self.model, Some(&call), &data.eval, batch, 0)?)
    }

    /// Writes the full training state atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let push = |tensors: &mut Vec<(String, Vec<usize>, Vec<u8>)>,
                    name: String,
                    t: &Tensor|
         -> Result<()> {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            tensors.push((
                name,
                t.dims().to_vec(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
            Ok(())
        };
        for (key, m) in &self.adapter.modules {
            push(
                &mut tensors,
                format!("adapter.{}.A", key.hf_path()),
                m.a.as_tensor(),
            )?;
            push(
                &mut tensors,
                format!("adapter.{}.B", key.hf_path()),
                m.b.as_tensor(),
            )?;
        }
        for (i, s) in self.optim.states.iter().enumerate() {
            push(&mut tensors, format!("optim.{i:04}.m"), &s.m)?;
            push(&mut tensors, format!("optim.{i:04}.v"), &s.v)?;
        }
        let meta = CheckpointMeta {
            format: CHECKPOINT_FORMAT.into(),
            step: self.step,
            cursor: self.cursor,
            rank_steps: self.optim.states.iter().map(|s| s.steps.clone()).collect(),
            config: self.config.clone(),
            fingerprint: crate::model::load::hex(&self.fingerprint),
        };
        let views = tensors
            .iter()
            .map(|(n, shape, bytes)| {
                Ok((
                    n.clone(),
                    TensorView::new(Dtype::F32, shape.clone(), bytes)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut md = std::collections::HashMap::new();
        md.insert("qdylora".to_string(), serde_json::to_string(&meta)?);
        let bytes = safetensors::serialize(views, Some(md))?;
        atomic::write_file(path, &bytes)?;
        Ok(())
    }

    /// Resumes from a checkpoint written by [`Trainer::save_checkpoint`]; the configuration and
    /// the base model must be the ones it was written with.
    pub fn resume(
        model: &'m Llama,
        config: TrainConfig,
        fingerprint: [u8; 16],
        path: &Path,
    ) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{} is not a checkpoint", path.display()))?;
        let meta: CheckpointMeta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("qdylora"))
            .context("checkpoint has no qdylora metadata")
            .and_then(|s| Ok(serde_json::from_str(s)?))?;
        if meta.format != CHECKPOINT_FORMAT {
            bail!(
                "{}: unknown checkpoint format {}",
                path.display(),
                meta.format
            );
        }
        if meta.config != config {
            bail!(
                "{} was written by a run with other settings; resume with the same arguments \
                 (checkpoint: {:?})",
                path.display(),
                meta.config
            );
        }
        if meta.fingerprint != crate::model::load::hex(&fingerprint) {
            bail!("{} was trained on another base model", path.display());
        }
        let st = SafeTensors::deserialize(&bytes)?;
        let mut t = Self::new(model, config, fingerprint)?;
        let load = |name: &str, like: &Tensor| -> Result<Tensor> {
            let view = st
                .tensor(name)
                .with_context(|| format!("checkpoint lacks {name}"))?;
            if view.shape() != like.dims() || view.dtype() != Dtype::F32 {
                bail!("checkpoint tensor {name} has shape {:?}", view.shape());
            }
            let v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            Ok(Tensor::from_vec(v, like.dims(), like.device())?)
        };
        for (key, m) in &t.adapter.modules {
            m.a.set(&load(
                &format!("adapter.{}.A", key.hf_path()),
                m.a.as_tensor(),
            )?)?;
            m.b.set(&load(
                &format!("adapter.{}.B", key.hf_path()),
                m.b.as_tensor(),
            )?)?;
        }
        if meta.rank_steps.len() != t.optim.states.len() {
            bail!("checkpoint optimizer state does not match the adapter");
        }
        for (i, (s, steps)) in t.optim.states.iter_mut().zip(meta.rank_steps).enumerate() {
            s.m = load(&format!("optim.{i:04}.m"), &s.m)?;
            s.v = load(&format!("optim.{i:04}.v"), &s.v)?;
            if steps.len() != s.steps.len() {
                bail!("checkpoint rank counts do not match the adapter");
            }
            s.steps = steps;
        }
        t.step = meta.step;
        t.cursor = meta.cursor;
        Ok(t)
    }

    /// The adapter as a nested bundle (rank r = byte prefix).
    pub fn bundle_bytes(&self, dtype: ElementType) -> Result<Vec<u8>> {
        adapter_bundle(&self.adapter, dtype, self.fingerprint)
    }
}

/// An adapter as a nested bundle.
pub fn adapter_bundle(
    adapter: &Adapter,
    dtype: ElementType,
    fingerprint: [u8; 16],
) -> Result<Vec<u8>> {
    let modules = adapter
        .modules
        .iter()
        .map(|(key, m)| {
            let (a, b) = m.to_vecs()?;
            Ok(ModuleTensors {
                name: key.hf_path(),
                in_features: m.in_features as u32,
                out_features: m.out_features as u32,
                a,
                b,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = BundleMeta {
        r_max: adapter.r_max as u32,
        alpha: adapter.alpha,
        dtype,
        scaling: adapter.scaling,
        fingerprint,
    };
    Ok(write_bundle(&meta, &modules)?)
}

/// `(var, rank dimension)` in the adapter's stable order: A (ranks on rows), B (on columns).
fn param_list(adapter: &Adapter) -> Vec<(&candle_core::Var, usize)> {
    adapter
        .vars()
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v, i % 2))
        .collect()
}

/// `LinearKind`s as their PEFT short names (`q_proj`, ...).
mod short_names {
    use qdylora_core::infer::LinearKind;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(kinds: &[LinearKind], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(kinds.iter().map(|k| k.short_name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LinearKind>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| {
                LinearKind::from_short_name(n)
                    .ok_or_else(|| D::Error::custom(format!("unknown module {n}")))
            })
            .collect()
    }
}

const CHECKPOINT_FORMAT: &str = "qdylora-train-checkpoint-v1";

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointMeta {
    format: String,
    step: u64,
    cursor: DataCursor,
    rank_steps: Vec<Vec<u64>>,
    config: TrainConfig,
    fingerprint: String,
}

/// Where a run keeps its files.
#[derive(Debug, Clone)]
pub struct RunFiles {
    /// The folder.
    pub dir: PathBuf,
}

impl RunFiles {
    /// Training state, replaced atomically.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    /// One JSON line per step.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    /// The final adapter as a nested bundle.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("adapter.qdyl")
    }
}

/// Keeps the metrics log consistent with a resumed step: drops lines after it.
pub fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|line| serde_json::from_str::<StepReport>(line).is_ok_and(|r| r.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    atomic::write_file(path, kept.as_bytes())?;
    Ok(())
}

/// Appends one step to the metrics log.
pub fn append_metrics(path: &Path, report: &StepReport) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(report)?)?;
    Ok(())
}
