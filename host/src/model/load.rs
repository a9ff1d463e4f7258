//! Building a [`Llama`] from what users have: an HF checkpoint (dense, or quantized to NF4 at
//! load) or a bitsandbytes 4-bit checkpoint; and adapters from PEFT folders or nested bundles.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use qdylora_core::infer::{DecoderConfig, LinearKind};
use qdylora_core::rank::Scaling;
use qdylora_formats::bundle::BundleReader;
use qdylora_formats::hf::{self, DenseTensor, LlamaConfig};
use qdylora_formats::{Nf4Weight, bnb, fingerprint, peft};
use rayon::prelude::*;

use super::fused::Fusions;
use super::linear::BaseLinear;
use super::llama::{Layer, Llama};
use super::lora::{Adapter, LoraModule, ModuleKey};

/// A model folder as found on disk.
#[derive(Debug)]
pub enum ModelSource {
    /// `config.json` + safetensors with dense weights.
    Hf(hf::Checkpoint),
    /// A bitsandbytes NF4 double-quant checkpoint.
    Bnb(bnb::Checkpoint),
}

impl ModelSource {
    /// Opens either kind of folder (told apart by `quantization_config` in `config.json`).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        if bnb::is_bnb_checkpoint(dir)? {
            Ok(Self::Bnb(bnb::read_checkpoint(dir)?))
        } else {
            Ok(Self::Hf(hf::load_checkpoint(dir)?))
        }
    }

    /// The checked configuration.
    pub fn config(&self) -> &LlamaConfig {
        match self {
            Self::Hf(c) => &c.config,
            Self::Bnb(c) => &c.config,
        }
    }

    /// `config.json` as written.
    pub fn raw_config(&self) -> &serde_json::Value {
        match self {
            Self::Hf(c) => &c.raw_config,
            Self::Bnb(c) => &c.raw_config,
        }
    }

    fn dense(&self, name: &str) -> Result<&DenseTensor> {
        let tensors = match self {
            Self::Hf(c) => &c.tensors,
            Self::Bnb(c) => &c.dense,
        };
        tensors
            .get(name)
            .with_context(|| format!("checkpoint has no tensor {name}"))
    }
}

/// How the frozen linears of a dense checkpoint are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseLinears {
    /// As dense f32 (the reference path for `logits` on an HF checkpoint).
    Dense,
    /// Quantized to NF4 + double quant with this blocksize (QDyLoRA training).
    Nf4 {
        /// Elements per absmax block.
        blocksize: usize,
    },
}

/// A model ready to run, with the base fingerprint adapters are checked against.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder.
    pub llama: Llama,
    /// The NF4 linears by module path (empty for a dense model).
    pub quantized: BTreeMap<String, Arc<Nf4Weight>>,
}

/// Quantizes every decoder linear of a dense checkpoint (in parallel), as
/// `quantize_4bit(compress_statistics=True)` would.
pub fn quantize_linears(
    ckpt: &hf::Checkpoint,
    blocksize: usize,
) -> Result<BTreeMap<String, Nf4Weight>> {
    let cfg = &ckpt.config;
    let names: Vec<(String, LinearKind)> = (0..cfg.num_hidden_layers)
        .flat_map(|l| LinearKind::ALL.map(|k| (hf::linear_name(l, k), k)))
        .collect();
    names
        .par_iter()
        .map(|(name, _)| {
            let key = format!("{name}.weight");
            let t = ckpt
                .tensors
                .get(&key)
                .with_context(|| format!("checkpoint has no tensor {key}"))?;
            let [rows, cols] = t.shape[..] else {
                bail!("{key} is not a matrix: shape {:?}", t.shape);
            };
            let mut w = Nf4Weight::quantize(rows, cols, &t.data, blocksize)
                .with_context(|| format!("quantizing {key}"))?;
            // Values are the stored ones widened exactly; record the stored dtype.
            w.dtype = t.dtype;
            Ok((name.clone(), w))
        })
        .collect()
}

fn tensor(t: &DenseTensor, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(&t.data, t.shape.as_slice(), device)?)
}

/// Builds the decoder from a checkpoint.
pub fn build(source: &ModelSource, linears: BaseLinears, device: &Device) -> Result<LoadedModel> {
    let cfg = source.config();
    let quantized: BTreeMap<String, Arc<Nf4Weight>> = match (source, linears) {
        (ModelSource::Bnb(c), _) => c
            .quantized
            .iter()
            .map(|(k, w)| (k.clone(), Arc::new(w.clone())))
            .collect(),
        (ModelSource::Hf(c), BaseLinears::Nf4 { blocksize }) => quantize_linears(c, blocksize)?
            .into_iter()
            .map(|(k, w)| (k, Arc::new(w)))
            .collect(),
        (ModelSource::Hf(_), BaseLinears::Dense) => BTreeMap::new(),
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers as usize);
    for l in 0..cfg.num_hidden_layers {
        let linear = |kind: LinearKind| -> Result<BaseLinear> {
            let name = hf::linear_name(l, kind);
            match quantized.get(&name) {
                Some(w) => Ok(BaseLinear::Nf4(w.clone())),
                None => Ok(BaseLinear::dense(&tensor(
                    source.dense(&format!("{name}.weight"))?,
                    device,
                )?)?),
            }
        };
        let norm = |which: &str| -> Result<Tensor> {
            tensor(
                source.dense(&format!("model.layers.{l}.{which}.weight"))?,
                device,
            )
        };
        layers.push(Layer {
            input_norm: norm("input_layernorm")?,
            post_norm: norm("post_attention_layernorm")?,
            linears: [
                linear(LinearKind::Q)?,
                linear(LinearKind::K)?,
                linear(LinearKind::V)?,
                linear(LinearKind::O)?,
                linear(LinearKind::Gate)?,
                linear(LinearKind::Up)?,
                linear(LinearKind::Down)?,
            ],
        });
    }
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(tensor(source.dense("lm_head.weight")?, device)?)
    };
    let llama = Llama {
        config: cfg.to_decoder_config(),
        embed: tensor(source.dense("model.embed_tokens.weight")?, device)?,
        layers,
        final_norm: tensor(source.dense("model.norm.weight")?, device)?,
        lm_head,
        device: device.clone(),
        fusions: Fusions::default(),
    };
    Ok(LoadedModel { llama, quantized })
}

/// The fingerprint of the quantized base: of the NF4 linears as loaded, or (for a dense
/// checkpoint) of the linears quantized with `blocksize`, plus every dense tensor.
pub fn base_fingerprint(source: &ModelSource, blocksize: usize) -> Result<[u8; 16]> {
    let owned;
    let (quantized, dense): (&BTreeMap<String, Nf4Weight>, &BTreeMap<String, DenseTensor>) =
        match source {
            ModelSource::Bnb(c) => (&c.quantized, &c.dense),
            ModelSource::Hf(c) => {
                owned = quantize_linears(c, blocksize)?;
                (&owned, &c.tensors)
            }
        };
    let q: Vec<(&str, &Nf4Weight)> = quantized.iter().map(|(k, w)| (k.as_str(), w)).collect();
    let d: Vec<(&str, &[usize], &[f32])> = dense
        .iter()
        .filter(|(name, _)| !is_linear_weight(name) && !is_redundant_head(source.config(), name))
        .map(|(k, t)| (k.as_str(), t.shape.as_slice(), t.data.as_slice()))
        .collect();
    Ok(fingerprint::model_fingerprint(
        &source.config().to_decoder_config(),
        &q,
        &d,
    ))
}

fn is_linear_weight(name: &str) -> bool {
    name.strip_suffix(".weight")
        .and_then(ModuleKey::parse_hf_path)
        .is_some()
}

fn is_redundant_head(cfg: &LlamaConfig, name: &str) -> bool {
    cfg.tie_word_embeddings && name == "lm_head.weight"
}

/// Checks that an adapter's module fits the model's linear.
fn check_module_shape(
    cfg: &DecoderConfig,
    key: ModuleKey,
    in_f: usize,
    out_f: usize,
) -> Result<()> {
    let want = key.kind.shape(cfg);
    if (want.in_features as usize, want.out_features as usize) != (in_f, out_f) {
        bail!(
            "adapter module {} has shape in={in_f} out={out_f}, the model's linear has in={} out={}",
            key.hf_path(),
            want.in_features,
            want.out_features
        );
    }
    if key.layer >= cfg.num_layers as usize {
        bail!(
            "adapter module {} is beyond the model's {} layers",
            key.hf_path(),
            cfg.num_layers
        );
    }
    Ok(())
}

/// A PEFT adapter as a fixed-rank [`Adapter`] (its rank is its `r_max`).
pub fn adapter_from_peft(dir: &Path, cfg: &DecoderConfig, device: &Device) -> Result<Adapter> {
    let peft = peft::read_adapter(dir)?;
    let mut modules = BTreeMap::new();
    for (path, pair) in &peft.modules {
        let key = ModuleKey::parse_hf_path(path)
            .with_context(|| format!("PEFT module {path} is not a decoder linear"))?;
        check_module_shape(cfg, key, pair.in_features, pair.out_features)?;
        modules.insert(
            key,
            LoraModule::from_vecs(
                pair.in_features,
                pair.out_features,
                pair.rank,
                pair.a.clone(),
                pair.b.clone(),
                device,
            )?,
        );
    }
    Ok(Adapter {
        r_max: peft.config.r as usize,
        alpha: peft.config.lora_alpha,
        scaling: peft.config.scaling(),
        modules,
    })
}

/// A nested bundle as an [`Adapter`] holding its complete ranks; checks the base fingerprint
/// unless `expected_fingerprint` is `None`.
pub fn adapter_from_bundle(
    bytes: &[u8],
    cfg: &DecoderConfig,
    expected_fingerprint: Option<[u8; 16]>,
    device: &Device,
) -> Result<Adapter> {
    let reader = BundleReader::parse(bytes).map_err(|e| anyhow::anyhow!("bundle: {e}"))?;
    if let Some(want) = expected_fingerprint
        && reader.fingerprint() != want
    {
        bail!(
            "the adapter was trained on another base model (fingerprint {} in the bundle, {} for \
             this model); pass --ignore-fingerprint to apply it anyway",
            hex(&reader.fingerprint()),
            hex(&want)
        );
    }
    let r = reader.complete_rank();
    if r == 0 {
        bail!("the bundle holds no complete rank (truncated or corrupted)");
    }
    let mut modules = BTreeMap::new();
    for i in 0..reader.module_count() {
        let info = reader
            .module(i)
            .map_err(|e| anyhow::anyhow!("bundle: {e}"))?;
        let key = ModuleKey::parse_hf_path(info.name)
            .with_context(|| format!("bundle module {} is not a decoder linear", info.name))?;
        let (in_f, out_f) = (info.in_features as usize, info.out_features as usize);
        check_module_shape(cfg, key, in_f, out_f)?;
        let mut a = Vec::with_capacity(r as usize * in_f);
        let mut b = vec![0.0f32; out_f * r as usize];
        for k in 0..r {
            let row = reader
                .a_row(i, k)
                .map_err(|e| anyhow::anyhow!("bundle: {e}"))?;
            a.extend((0..in_f).map(|j| qdylora_core::ElementSource::get(&row, j)));
            let col = reader
                .b_col(i, k)
                .map_err(|e| anyhow::anyhow!("bundle: {e}"))?;
            for o in 0..out_f {
                b[o * r as usize + k as usize] = qdylora_core::ElementSource::get(&col, o);
            }
        }
        modules.insert(
            key,
            LoraModule::from_vecs(in_f, out_f, r as usize, a, b, device)?,
        );
    }
    Ok(Adapter {
        r_max: r as usize,
        alpha: reader.alpha(),
        scaling: match reader.scaling() {
            Scaling::AlphaOverRank => Scaling::AlphaOverRank,
            Scaling::AlphaOverSqrtRank => Scaling::AlphaOverSqrtRank,
        },
        modules,
    })
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
