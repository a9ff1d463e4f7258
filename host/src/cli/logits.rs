//! `qdylora logits`: token ids in, f32 logits out, for an HF or bitsandbytes checkpoint with an
//! optional PEFT adapter or nested bundle at a chosen rank. The reference path users compare
//! against transformers, bitsandbytes and PEFT.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use qdylora_formats::atomic;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::device::{DeviceArg, open};
use crate::model::load::{self, BaseLinears, ModelSource};
use crate::model::lora::{Adapter, AdapterCall, RankGrad};
use crate::model::place::place;

/// Arguments of `qdylora logits`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// HF checkpoint (computed in f32 from its weights) or bitsandbytes 4-bit checkpoint (f32
    /// compute on the dequantized weights).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder or a nested bundle file.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Rank to apply (required with a bundle; at most the PEFT adapter's r).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Apply a bundle even if its base-model fingerprint differs from this model's.
    #[arg(long)]
    pub ignore_fingerprint: bool,
    /// safetensors file with an int64 tensor `input_ids` [B, T].
    #[arg(long)]
    pub input_ids: PathBuf,
    /// Output safetensors file with an f32 tensor `logits` [B, T, V] (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Where to compute: the CPU in f32, or a GPU in bf16 (`cuda` builds).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

/// Reads `input_ids` ([B, T] int64) and checks every id against the vocabulary.
pub fn read_input_ids(path: &Path, vocab: usize) -> Result<(usize, usize, Vec<u32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let t = st
        .tensor("input_ids")
        .with_context(|| format!("{} has no tensor `input_ids`", path.display()))?;
    if t.dtype() != Dtype::I64 {
        bail!("input_ids must be int64, found {:?}", t.dtype());
    }
    let [b, n] = t.shape()[..] else {
        bail!("input_ids must be [B, T], found shape {:?}", t.shape());
    };
    if b == 0 || n == 0 {
        bail!("input_ids is empty (shape [{b}, {n}])");
    }
    let ids = t
        .data()
        .chunks_exact(8)
        .map(|c| {
            let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
            u32::try_from(v)
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .with_context(|| format!("token id {v} is outside the vocabulary 0..{vocab}"))
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok((b, n, ids))
}

/// Loads the adapter named on the command line and checks the rank.
fn load_adapter(
    args: &Args,
    source: &ModelSource,
    device: &Device,
) -> Result<Option<(Adapter, usize)>> {
    let Some(path) = &args.adapter else {
        if args.rank.is_some() {
            bail!("--rank needs --adapter");
        }
        return Ok(None);
    };
    let cfg = source.config().to_decoder_config();
    let (adapter, default_rank) = if path.is_dir() {
        let a = load::adapter_from_peft(path, &cfg, device)?;
        let r = a.r_max;
        (a, Some(r))
    } else {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let fingerprint = if args.ignore_fingerprint {
            None
        } else {
            Some(load::base_fingerprint(source, 64)?)
        };
        (
            load::adapter_from_bundle(&bytes, &cfg, fingerprint, device)?,
            None,
        )
    };
    let rank = match (args.rank, default_rank) {
        (Some(r), _) => r,
        (None, Some(r)) => r,
        (None, None) => bail!(
            "--rank is required with a nested bundle (it holds ranks 1..={})",
            adapter.r_max
        ),
    };
    if rank == 0 || rank > adapter.r_max {
        bail!(
            "rank {rank} is outside 1..={} for this adapter",
            adapter.r_max
        );
    }
    Ok(Some((adapter, rank)))
}

/// Runs the command.
pub fn run(args: &Args) -> Result<()> {
    let (device, dtype) = open(args.device)?;
    let source = ModelSource::open(&args.model)?;
    let vocab = source.config().vocab_size as usize;
    let (b, t, ids) = read_input_ids(&args.input_ids, vocab)?;
    let max_pos = source.config().max_position_embeddings as usize;
    if t > max_pos {
        eprintln!("warning: {t} tokens exceed max_position_embeddings {max_pos}");
    }
    let adapter = load_adapter(args, &source, &device)?;
    let model = load::build(&source, BaseLinears::Dense, &Device::Cpu)?;
    let model = place(&model.llama, &device, dtype)?;
    let call = adapter.as_ref().map(|(a, r)| AdapterCall {
        adapter: a,
        rank: *r,
        grad: RankGrad::None,
        dropout: None,
    });
    let ids = Tensor::from_vec(ids, (b, t), &device)?;
    let logits = model.forward(&ids, call.as_ref())?;
    write_logits(&args.out, &logits)
}

/// Writes `logits` as an f32 safetensors file, atomically.
pub fn write_logits(path: &Path, logits: &Tensor) -> Result<()> {
    let shape = logits.dims().to_vec();
    let values: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "logit {i} is not finite; refusing to write {}",
            path.display()
        );
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, shape, &bytes)?;
    let file = safetensors::serialize([("logits", view)], None)?;
    atomic::write_file(path, &file)?;
    Ok(())
}
