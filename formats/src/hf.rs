//! HF LLaMA-family checkpoints: `config.json` with `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`; bf16, f16 or f32 tensors.

use std::collections::{BTreeMap, BTreeSet};
use std::format;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use qdylora_core::ElementType;
use qdylora_core::infer::{DecoderConfig, LinearKind};
use serde::Deserialize;
use serde_json::Value;

use crate::error_std::Error;
use crate::{atomic, pyjson, st};

/// The single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// The fields of a LLaMA `config.json` this project uses, after checking that the model is one
/// it can run exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Model width.
    pub hidden_size: u32,
    /// MLP width.
    pub intermediate_size: u32,
    /// Decoder layers.
    pub num_hidden_layers: u32,
    /// Query heads.
    pub num_attention_heads: u32,
    /// Key/value heads (defaults to the query heads).
    pub num_key_value_heads: u32,
    /// Head width (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: u32,
    /// RMSNorm epsilon (HF default 1e-6).
    pub rms_norm_eps: f64,
    /// RoPE base, from `rope_theta` or `rope_parameters.rope_theta` (HF default 10000).
    pub rope_theta: f64,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Whether `lm_head` is the embedding matrix (HF's `LlamaConfig` default is false).
    pub tie_word_embeddings: bool,
    /// Longest sequence the model was configured for (HF default 2048).
    pub max_position_embeddings: u32,
}

/// `config.json` as written, before the checks.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_act: Option<String>,
    hidden_size: u32,
    intermediate_size: u32,
    num_hidden_layers: u32,
    num_attention_heads: u32,
    num_key_value_heads: Option<u32>,
    head_dim: Option<u32>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    vocab_size: u32,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<u32>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

impl LlamaConfig {
    /// Reads and checks a parsed `config.json` (`path` names it in errors).
    pub fn from_json(value: &Value, path: &Path) -> Result<Self, Error> {
        let raw = RawConfig::deserialize(value).map_err(|e| Error::json(path, e))?;
        let unsupported = |what: String| Error::unsupported(path, what);
        if raw.model_type.as_deref() != Some("llama") {
            return Err(unsupported(format!(
                "model_type {:?}: only \"llama\" is supported",
                raw.model_type
            )));
        }
        if let Some(archs) = &raw.architectures
            && !archs.iter().any(|a| a == "LlamaForCausalLM")
        {
            return Err(unsupported(format!(
                "architectures {archs:?}: only LlamaForCausalLM is supported"
            )));
        }
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(unsupported(format!("hidden_act {act:?}: only \"silu\"")));
        }
        for (name, on) in [
            ("attention_bias", raw.attention_bias),
            ("mlp_bias", raw.mlp_bias),
        ] {
            if on == Some(true) {
                return Err(unsupported(format!(
                    "{name} = true (biases are not supported)"
                )));
            }
        }
        if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(
                "rope_scaling is set (only default RoPE)".into(),
            ));
        }
        let rope_theta = match &raw.rope_parameters {
            Some(Value::Object(params)) => {
                match params.get("rope_type").and_then(Value::as_str) {
                    None | Some("default") => {}
                    Some(other) => {
                        return Err(unsupported(format!(
                            "rope_parameters.rope_type {other:?}: only \"default\""
                        )));
                    }
                }
                params
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .or(raw.rope_theta)
            }
            None | Some(Value::Null) => raw.rope_theta,
            Some(other) => {
                return Err(unsupported(format!(
                    "rope_parameters {other}: not an object"
                )));
            }
        }
        .unwrap_or(10000.0);

        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if heads != 0 && raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(unsupported(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {heads}",
                    raw.hidden_size
                )));
            }
        };
        let config = LlamaConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
        };
        for (name, v) in [
            ("rms_norm_eps", config.rms_norm_eps),
            ("rope_theta", config.rope_theta),
        ] {
            if !(v.is_finite() && v > 0.0 && (v as f32).is_finite() && v as f32 > 0.0) {
                return Err(unsupported(format!("{name} = {v}")));
            }
        }
        if u64::from(heads) * u64::from(head_dim) > u64::from(u32::MAX) {
            return Err(unsupported(
                "num_attention_heads * head_dim overflows".into(),
            ));
        }
        config
            .to_decoder_config()
            .validate()
            .map_err(|e| unsupported(format!("inconsistent sizes: {e}")))?;
        Ok(config)
    }

    /// The core's decoder shape.
    pub fn to_decoder_config(&self) -> DecoderConfig {
        DecoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            rope_theta: self.rope_theta as f32,
            rms_norm_eps: self.rms_norm_eps as f32,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }

    /// Every tensor a checkpoint of this model holds, with its shape, in HF names.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.expected_iter().collect()
    }

    /// [`LlamaConfig::expected_tensors`], lazily: the layer count comes from a file, so a
    /// checker walks this and stops at the first tensor that is not there instead of
    /// allocating a list sized by the config.
    fn expected_iter(&self) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
        let cfg = self.to_decoder_config();
        let (vocab, hidden) = (self.vocab_size as usize, self.hidden_size as usize);
        let model_level = [
            Some(("model.embed_tokens.weight".to_string(), vec![vocab, hidden])),
            Some(("model.norm.weight".to_string(), vec![hidden])),
            (!self.tie_word_embeddings)
                .then(|| ("lm_head.weight".to_string(), vec![vocab, hidden])),
        ];
        let layers = (0..self.num_hidden_layers).flat_map(move |layer| {
            let norms = ["input_layernorm", "post_attention_layernorm"]
                .map(|norm| (format!("model.layers.{layer}.{norm}.weight"), vec![hidden]));
            let linears = LinearKind::ALL.map(|kind| {
                let s = kind.shape(&cfg);
                (
                    format!("{}.weight", linear_name(layer, kind)),
                    vec![s.out_features as usize, s.in_features as usize],
                )
            });
            norms.into_iter().chain(linears)
        });
        model_level.into_iter().flatten().chain(layers)
    }
}

/// The module path of a decoder linear: `model.layers.{layer}.self_attn.q_proj`.
pub fn linear_name(layer: u32, kind: LinearKind) -> String {
    format!("model.layers.{layer}.{}", kind.layer_path())
}

/// One tensor of a checkpoint, widened to f32 (exact for f16 and bf16).
#[derive(Debug, Clone, PartialEq)]
pub struct DenseTensor {
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// The dtype it was stored in.
    pub dtype: ElementType,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// A LLaMA checkpoint in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The checked configuration.
    pub config: LlamaConfig,
    /// `config.json` as written (for writing it back).
    pub raw_config: Value,
    /// Every tensor by HF name.
    pub tensors: BTreeMap<String, DenseTensor>,
}

/// Checks that `present` (name → shape) holds exactly the tensors the config's model has, with
/// the right shapes. Tolerated extras: `lm_head.weight` of a tied model and RoPE's
/// `rotary_emb.inv_freq` buffers of old checkpoints. Returns the names of those extras.
pub(crate) fn check_tensor_set<'a>(
    config: &LlamaConfig,
    present: &BTreeMap<&'a str, Vec<usize>>,
    path: &Path,
) -> Result<Vec<&'a str>, Error> {
    // Each expected tensor is looked up as it is generated, so `known` never outgrows `present`.
    let mut known = BTreeSet::new();
    for (name, shape) in config.expected_iter() {
        let found = present
            .get(name.as_str())
            .ok_or_else(|| Error::MissingTensor {
                path: path.into(),
                name: name.clone(),
            })?;
        if *found != shape {
            return Err(Error::Shape {
                path: path.into(),
                name,
                expected: shape,
                actual: found.clone(),
            });
        }
        known.insert(name);
    }
    let mut extras = Vec::new();
    for (&name, shape) in present {
        if known.contains(name) {
            continue;
        }
        let tied_head = name == "lm_head.weight"
            && *shape == [config.vocab_size as usize, config.hidden_size as usize];
        if tied_head || name.ends_with(".rotary_emb.inv_freq") {
            extras.push(name);
        } else {
            return Err(Error::UnexpectedTensor {
                path: path.into(),
                name: name.into(),
            });
        }
    }
    Ok(extras)
}

/// Parses `config.json` bytes.
pub fn parse_config(bytes: &[u8], path: &Path) -> Result<(LlamaConfig, Value), Error> {
    let raw: Value = serde_json::from_slice(bytes).map_err(|e| Error::json(path, e))?;
    Ok((LlamaConfig::from_json(&raw, path)?, raw))
}

/// Parses a checkpoint from bytes: `config.json` and the safetensors files (one, or every shard
/// with the path it came from). Tensor names must be unique across shards.
pub fn parse_checkpoint(
    config_json: &[u8],
    shards: &[(PathBuf, &[u8])],
) -> Result<Checkpoint, Error> {
    let folder = shards
        .first()
        .and_then(|(p, _)| p.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let (config, raw_config) = parse_config(config_json, &folder.join(CONFIG_FILE))?;
    let parsed = shards
        .iter()
        .map(|(path, bytes)| st::parse(bytes, path).map(|s| (path, s)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut present = BTreeMap::new();
    for (path, file) in &parsed {
        for (name, view) in file.iter() {
            if present.insert(name, view.shape().to_vec()).is_some() {
                return Err(Error::Invalid(format!(
                    "{}: tensor `{name}` is stored twice",
                    path.display()
                )));
            }
        }
    }
    let skipped = check_tensor_set(&config, &present, &folder)?;
    let mut tensors = BTreeMap::new();
    for (path, file) in &parsed {
        for (name, view) in file.iter() {
            if skipped.contains(&name) {
                continue;
            }
            let (dtype, data) = st::to_f32(&view, name, path)?;
            tensors.insert(
                name.to_string(),
                DenseTensor {
                    shape: view.shape().to_vec(),
                    dtype,
                    data,
                },
            );
        }
    }
    Ok(Checkpoint {
        config,
        raw_config,
        tensors,
    })
}

/// The safetensors files of a checkpoint folder: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists (each file once; names must be plain file names).
pub(crate) fn read_weight_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, Error> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        let bytes = std::fs::read(&single).map_err(|e| Error::io(&single, e))?;
        return Ok(vec![(single, bytes)]);
    }
    let index_path = dir.join(INDEX_FILE);
    let index_bytes = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index =
        serde_json::from_slice(&index_bytes).map_err(|e| Error::json(&index_path, e))?;
    let files: BTreeSet<&String> = index.weight_map.values().collect();
    let mut out = Vec::new();
    for file in files {
        let plain = Path::new(file)
            .file_name()
            .is_some_and(|n| n == file.as_str());
        if !plain {
            return Err(Error::Invalid(format!(
                "{}: shard `{file}` is not a plain file name",
                index_path.display()
            )));
        }
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        // Every tensor of a shard must be listed for that shard, and the other way round.
        let parsed = st::parse(&bytes, &path)?;
        for name in parsed.names() {
            if index.weight_map.get(name) != Some(file) {
                return Err(Error::UnexpectedTensor {
                    path: path.clone(),
                    name: name.to_string(),
                });
            }
        }
        for (name, _) in index.weight_map.iter().filter(|(_, f)| *f == file) {
            if parsed.tensor(name).is_err() {
                return Err(Error::MissingTensor {
                    path: path.clone(),
                    name: name.clone(),
                });
            }
        }
        out.push((path, bytes));
    }
    Ok(out)
}

/// Loads a checkpoint folder.
pub fn load_checkpoint(dir: &Path) -> Result<Checkpoint, Error> {
    let config_path = dir.join(CONFIG_FILE);
    let config = std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let files = read_weight_files(dir)?;
    let shards: Vec<(PathBuf, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.clone(), b.as_slice()))
        .collect();
    parse_checkpoint(&config, &shards)
}

/// `config.json` text as transformers writes it (`json.dumps(indent=2, sort_keys=True) + "\n"`).
pub(crate) fn config_text(config: &Value) -> Vec<u8> {
    let mut text = pyjson::dumps_pretty(config);
    text.push(b'\n');
    text
}

/// Writes a checkpoint folder (`config.json` + `model.safetensors`) atomically. The config must
/// describe a supported LLaMA and the tensors must be exactly its tensors; values are rounded
/// to each tensor's dtype and must stay finite.
pub fn write_checkpoint(
    dir: &Path,
    config_json: &Value,
    tensors: &[(String, Vec<usize>, ElementType, &[f32])],
) -> Result<(), Error> {
    let config = LlamaConfig::from_json(config_json, &dir.join(CONFIG_FILE))?;
    let present: BTreeMap<&str, Vec<usize>> = tensors
        .iter()
        .map(|(name, shape, _, _)| (name.as_str(), shape.clone()))
        .collect();
    if present.len() != tensors.len() {
        return Err(Error::Invalid("hf: a tensor name appears twice".into()));
    }
    check_tensor_set(&config, &present, dir)?;
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, shape, dtype, values) in tensors {
        check_len(name, shape, values.len())?;
        st::check_representable(name, *dtype, values)?;
        owned.push((
            name.clone(),
            st::Owned::floats(*dtype, shape.clone(), values),
        ));
    }
    let weights = st::serialize(owned, &dir.join(WEIGHTS_FILE))?;
    atomic::write_dir(
        dir,
        &[
            (WEIGHTS_FILE, &weights),
            (CONFIG_FILE, &config_text(config_json)),
        ],
    )
}

/// Checks that `len` values fill `shape`.
pub(crate) fn check_len(name: &str, shape: &[usize], len: usize) -> Result<(), Error> {
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if n == Some(len) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "tensor `{name}`: {len} values do not fill shape {shape:?}"
        )))
    }
}
