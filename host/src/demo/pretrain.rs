//! Pretraining the demo's small base model from scratch on generated text (every weight
//! trainable), then saving it as an ordinary HF LLaMA checkpoint. This is how the demo gets a
//! base model without a download; the result is cached.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use qdylora_core::ElementType;
use qdylora_core::infer::{DecoderConfig, LinearKind};
use qdylora_formats::hf;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use crate::cli::progress;
use crate::model::fused::Fusions;
use crate::model::linear::BaseLinear;
use crate::model::llama::{Layer, Llama};
use crate::train::data::{Batch, DataCursor, Dataset, Example};
use crate::train::eval::masked_cross_entropy;
use crate::train::optim::{AdamWConfig, MaskedAdamW, Schedule, ScheduleKind, clip_grad_norm};

/// Every tensor of the model by HF name, as trainable variables.
pub struct DenseParams {
    vars: BTreeMap<String, Var>,
}

impl DenseParams {
    /// HF's LLaMA initialization: weights ~ N(0, 0.02), norms 1.
    pub fn init(cfg: &DecoderConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut vars = BTreeMap::new();
        for (name, shape) in tensor_shapes(cfg) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            vars.insert(
                name,
                Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?,
            );
        }
        Ok(Self { vars })
    }

    fn get(&self, name: &str) -> Result<&Var> {
        self.vars
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no parameter {name}"))
    }

    /// A decoder whose tensors are views of the variables (updates show through).
    pub fn llama(&self, cfg: &DecoderConfig, device: &Device) -> Result<Llama> {
        let mut layers = Vec::new();
        for l in 0..cfg.num_layers {
            let lin = |k: LinearKind| -> Result<BaseLinear> {
                Ok(BaseLinear::dense(
                    self.get(&format!("{}.weight", hf::linear_name(l, k)))?
                        .as_tensor(),
                )?)
            };
            let norm = |w: &str| -> Result<Tensor> {
                Ok(self
                    .get(&format!("model.layers.{l}.{w}.weight"))?
                    .as_tensor()
                    .clone())
            };
            layers.push(Layer {
                input_norm: norm("input_layernorm")?,
                post_norm: norm("post_attention_layernorm")?,
                linears: [
                    lin(LinearKind::Q)?,
                    lin(LinearKind::K)?,
                    lin(LinearKind::V)?,
                    lin(LinearKind::O)?,
                    lin(LinearKind::Gate)?,
                    lin(LinearKind::Up)?,
                    lin(LinearKind::Down)?,
                ],
            });
        }
        Ok(Llama {
            config: *cfg,
            embed: self.get("model.embed_tokens.weight")?.as_tensor().clone(),
            layers,
            final_norm: self.get("model.norm.weight")?.as_tensor().clone(),
            lm_head: None,
            device: device.clone(),
            fusions: Fusions::default(),
        })
    }

    /// Writes the parameters as an HF checkpoint (bf16, as most published checkpoints are).
    pub fn save_hf(&self, dir: &Path, config_json: &serde_json::Value) -> Result<()> {
        let values: Vec<(String, Vec<usize>, Vec<f32>)> = self
            .vars
            .iter()
            .map(|(n, v)| {
                Ok((
                    n.clone(),
                    v.dims().to_vec(),
                    v.as_tensor().flatten_all()?.to_vec1()?,
                ))
            })
            .collect::<Result<_>>()?;
        let tensors: Vec<(String, Vec<usize>, ElementType, &[f32])> = values
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), ElementType::Bf16, v.as_slice()))
            .collect();
        hf::write_checkpoint(dir, config_json, &tensors)?;
        Ok(())
    }
}

/// Names and shapes of a tied-embedding LLaMA's tensors.
fn tensor_shapes(cfg: &DecoderConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size as usize;
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size as usize, h],
        ),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    for l in 0..cfg.num_layers {
        for w in ["input_layernorm", "post_attention_layernorm"] {
            out.push((format!("model.layers.{l}.{w}.weight"), vec![h]));
        }
        for k in LinearKind::ALL {
            let s = k.shape(cfg);
            out.push((
                format!("{}.weight", hf::linear_name(l, k)),
                vec![s.out_features as usize, s.in_features as usize],
            ));
        }
    }
    out
}

/// Pretraining settings.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate (cosine after warmup).
    pub lr: f64,
    /// Seed.
    pub seed: u64,
}

/// Trains every weight of a fresh model on `data` and returns the parameters; the last
/// element is the final mean loss over the last 10% of steps.
pub fn pretrain(
    cfg: &DecoderConfig,
    data: &Dataset,
    pc: &PretrainConfig,
    device: &Device,
) -> Result<(DenseParams, f64)> {
    let params = DenseParams::init(cfg, pc.seed, device)?;
    let model = params.llama(cfg, device)?;
    let vars: Vec<&Var> = params.vars.values().collect();
    let list: Vec<(&Var, usize)> = vars.iter().map(|v| (*v, 0)).collect();
    let adamw = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut opt = MaskedAdamW::new(adamw, &list)?;
    let schedule = Schedule {
        lr: pc.lr,
        warmup_steps: (pc.steps / 20).max(1),
        total_steps: pc.steps,
        kind: ScheduleKind::Cosine,
    };
    let mut cursor = DataCursor {
        epoch: 0,
        position: 0,
    };
    let pb = progress::train_bar(pc.steps, "pretrain");
    let mut tail = Vec::new();
    for step in 0..pc.steps {
        let idx = cursor.next_batch(pc.seed, data.train.len(), pc.batch_size);
        let refs: Vec<&Example> = idx.iter().map(|&i| &data.train[i]).collect();
        let batch = Batch::new(&refs, 0);
        let ids = Tensor::from_slice(&batch.ids, (batch.rows, batch.cols), device)?;
        let logits = model.forward(&ids, None)?;
        let (loss, sum) = masked_cross_entropy(&logits, &batch, &model)?;
        let loss_value = sum / batch.scored_tokens().max(1) as f64;
        if !loss_value.is_finite() {
            anyhow::bail!("pretraining loss became non-finite at step {}", step + 1);
        }
        let store = loss.backward()?;
        let mut grads: Vec<Tensor> = vars
            .iter()
            .map(|v| {
                store
                    .get(v.as_tensor())
                    .cloned()
                    .map_or_else(|| v.as_tensor().zeros_like(), Ok)
            })
            .collect::<candle_core::Result<_>>()?;
        clip_grad_norm(&mut grads, 1.0)?;
        opt.step_all(&vars, &grads, schedule.lr_at(step))?;
        pb.set_message(format!("pretrain loss {loss_value:.3}"));
        pb.inc(1);
        if step >= pc.steps - pc.steps.div_ceil(10) {
            tail.push(loss_value);
        }
    }
    pb.finish_and_clear();
    let final_loss = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    Ok((params, final_loss))
}
