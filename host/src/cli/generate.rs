//! `qdylora generate`: greedy continuations of prompts with the NF4 base and an adapter at a
//! chosen rank: what a device computes, for comparing the two.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{D, Device, Tensor};

use crate::model::load::{self, BaseLinears, ModelSource};
use crate::model::lora::{AdapterCall, RankGrad};
use crate::train::data::TextCodec;

/// Arguments of `qdylora generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base model (HF, quantized to NF4 at load unless --dense; or bitsandbytes 4-bit).
    #[arg(long)]
    pub model: PathBuf,
    /// A nested bundle or a PEFT adapter folder.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Rank (default: the adapter's largest complete rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// tokenizer.json (default: the model folder's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A prompt (repeat for several); BOS is prepended.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Most tokens to generate per prompt (stops at EOS).
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Compute with dense f32 linears instead of NF4 (HF checkpoints only).
    #[arg(long)]
    pub dense: bool,
    /// Print JSON lines with token ids and every step's logits instead of text.
    #[arg(long)]
    pub json: bool,
    /// NF4 blocksize when quantizing an HF checkpoint.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Apply a bundle even if its base-model fingerprint differs.
    #[arg(long)]
    pub ignore_fingerprint: bool,
}

/// One prompt's greedy continuation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// The prompt text.
    pub prompt: String,
    /// BOS + prompt ids.
    pub prompt_ids: Vec<u32>,
    /// Generated ids (EOS included when reached).
    pub tokens: Vec<u32>,
    /// The generated text (special tokens skipped).
    pub text: String,
    /// The logits each generated token was chosen from.
    pub logits: Vec<Vec<f32>>,
}

/// Runs the command.
pub fn run(args: &Args) -> Result<()> {
    let device = Device::Cpu;
    let source = ModelSource::open(&args.model)?;
    let tokenizer = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    let codec = TextCodec::load(&tokenizer)?;
    let linears = if args.dense {
        if matches!(source, ModelSource::Bnb(_)) {
            bail!("--dense needs an HF checkpoint; a bitsandbytes checkpoint is NF4 already");
        }
        BaseLinears::Dense
    } else {
        BaseLinears::Nf4 {
            blocksize: args.blocksize,
        }
    };
    let model = load::build(&source, linears, &device)?;
    let cfg = source.config().to_decoder_config();
    let adapter = match &args.adapter {
        None => None,
        Some(p) if p.is_dir() => Some(load::adapter_from_peft(p, &cfg, &device)?),
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let fp = if args.ignore_fingerprint {
                None
            } else {
                Some(load::base_fingerprint(&source, args.blocksize)?)
            };
            Some(load::adapter_from_bundle(&bytes, &cfg, fp, &device)?)
        }
    };
    let rank = match (&adapter, args.rank) {
        (None, Some(_)) => bail!("--rank needs --adapter"),
        (None, None) => 0,
        (Some(a), r) => {
            let r = r.unwrap_or(a.r_max);
            if r == 0 || r > a.r_max {
                bail!("rank {r} is outside 1..={} for this adapter", a.r_max);
            }
            r
        }
    };
    let call = adapter.as_ref().map(|a| AdapterCall {
        adapter: a,
        rank,
        grad: RankGrad::None,
        dropout: None,
    });
    let max_pos = source.config().max_position_embeddings as usize;
    for prompt in &args.prompt {
        let mut ids = vec![codec.bos];
        ids.extend(codec.encode(prompt)?);
        let prompt_ids = ids.clone();
        let mut tokens = Vec::new();
        let mut logits = Vec::new();
        while tokens.len() < args.max_new_tokens && ids.len() < max_pos {
            let input = Tensor::from_slice(&ids, (1, ids.len()), &device)?;
            let h = model.llama.hidden(&input, call.as_ref())?;
            let last = model
                .llama
                .logits(&h.narrow(1, ids.len() - 1, 1)?)?
                .flatten_all()?;
            let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
            logits.push(last.to_vec1::<f32>()?);
            tokens.push(next);
            ids.push(next);
            if next == codec.eos {
                break;
            }
        }
        let g = Generation {
            prompt: prompt.clone(),
            prompt_ids,
            text: codec.decode(&tokens)?,
            tokens,
            logits,
        };
        if args.json {
            println!("{}", serde_json::to_string(&g)?);
        } else {
            println!("{prompt}{}", g.text);
        }
    }
    Ok(())
}
