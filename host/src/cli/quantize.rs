//! `qdylora quantize`: an HF checkpoint in, a bitsandbytes NF4 double-quant checkpoint out, with
//! exactly the keys and JSON transformers writes, so transformers + bitsandbytes load it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use qdylora_core::ElementType;
use qdylora_core::infer::LinearKind;
use qdylora_formats::{Nf4Weight, bnb, hf};
use rayon::prelude::*;

use super::progress;
use crate::model::lora::ModuleKey;

/// Arguments of `qdylora quantize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// HF checkpoint folder (config.json + model.safetensors or sharded).
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder (written atomically; must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// NF4 blocksize.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// `bnb_4bit_compute_dtype` recorded in the config.
    #[arg(long, value_enum, default_value_t = Dtype::Bfloat16)]
    pub compute_dtype: Dtype,
    /// dtype of the unquantized tensors and of the quant state (default: as stored).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
}

/// A torch dtype name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// torch.float32
    Float32,
    /// torch.bfloat16
    Bfloat16,
    /// torch.float16
    Float16,
}

impl Dtype {
    fn element_type(self) -> ElementType {
        match self {
            Dtype::Float32 => ElementType::F32,
            Dtype::Bfloat16 => ElementType::Bf16,
            Dtype::Float16 => ElementType::F16,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Float16 => "float16",
        }
    }
}

/// Runs the command.
pub fn run(args: &Args) -> Result<()> {
    if args.out.exists() {
        bail!(
            "{} already exists; choose a new output folder",
            args.out.display()
        );
    }
    if bnb::is_bnb_checkpoint(&args.model)? {
        bail!(
            "{} is already a bitsandbytes 4-bit checkpoint",
            args.model.display()
        );
    }
    let ckpt = hf::load_checkpoint(&args.model)?;
    let layers = ckpt.config.num_hidden_layers;
    let names: Vec<String> = (0..layers)
        .flat_map(|l| LinearKind::ALL.map(|k| hf::linear_name(l, k)))
        .collect();
    let pb = progress::bar(names.len() as u64, "quantize");
    let quantized: Vec<(String, Nf4Weight)> = names
        .par_iter()
        .map(|name| {
            let key = format!("{name}.weight");
            let t = &ckpt.tensors[&key];
            let mut w = Nf4Weight::quantize(t.shape[0], t.shape[1], &t.data, args.blocksize)
                .with_context(|| format!("quantizing {key}"))?;
            w.dtype = args.dtype.map_or(t.dtype, Dtype::element_type);
            pb.inc(1);
            Ok((name.clone(), w))
        })
        .collect::<Result<_>>()?;
    pb.finish();

    let dense: Vec<(String, Vec<usize>, ElementType, &[f32])> = ckpt
        .tensors
        .iter()
        .filter(|(name, _)| {
            let linear = name
                .strip_suffix(".weight")
                .and_then(ModuleKey::parse_hf_path)
                .is_some();
            let tied_head = ckpt.config.tie_word_embeddings && *name == "lm_head.weight";
            !linear && !tied_head
        })
        .map(|(name, t)| {
            let dtype = args.dtype.map_or(t.dtype, Dtype::element_type);
            (name.clone(), t.shape.clone(), dtype, t.data.as_slice())
        })
        .collect();
    let refs: Vec<(String, &Nf4Weight)> = quantized.iter().map(|(n, w)| (n.clone(), w)).collect();
    let mut config = ckpt.raw_config.clone();
    if let Some(d) = args.dtype {
        config["dtype"] = d.torch_name().into();
    }
    bnb::write_checkpoint(
        &args.out,
        &config,
        args.compute_dtype.torch_name(),
        &refs,
        &dense,
    )?;
    let packed: usize = quantized.iter().map(|(_, w)| w.resident_bytes()).sum();
    eprintln!(
        "wrote {} ({} NF4 linears, {:.1} MiB quantized)",
        args.out.display(),
        quantized.len(),
        packed as f64 / (1 << 20) as f64
    );
    Ok(())
}
