//! PEFT LoRA adapters: `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`).
//!
//! Read as fixed-rank adapters; written from any rank of a nested bundle so that PEFT applies
//! exactly `A[:r]`, `B[:, :r]` with the bundle's scale.

use std::collections::BTreeMap;
use std::format;
use std::path::Path;
use std::string::{String, ToString};
use std::vec::Vec;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::bundle::BundleReader;
use crate::error_std::Error;
use crate::{atomic, pyjson, st};
use qdylora_core::rank::Scaling;

/// The adapter configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// `target_modules`: a list of names or a regular expression.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names (matched as suffixes by PEFT).
    List(Vec<String>),
    /// A regular expression over full module names.
    Regex(String),
}

/// The fields of `adapter_config.json` that matter for applying the adapter, after rejecting
/// every option that would change what the weights mean.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The rank every module has.
    pub r: u32,
    /// LoRA alpha.
    pub lora_alpha: f32,
    /// rsLoRA scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Which modules PEFT adapts.
    pub target_modules: TargetModules,
    /// The base model the adapter was trained on, as PEFT recorded it.
    pub base_model_name_or_path: Option<String>,
    /// Dropout during training (no effect on inference).
    pub lora_dropout: f32,
    /// PEFT's task type (`CAUSAL_LM`).
    pub task_type: Option<String>,
}

impl AdapterConfig {
    /// The scale PEFT applies: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> Scaling {
        if self.use_rslora {
            Scaling::AlphaOverSqrtRank
        } else {
            Scaling::AlphaOverRank
        }
    }

    /// The scale value.
    pub fn scale(&self) -> f32 {
        self.scaling().scale(self.lora_alpha, self.r)
    }
}

#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: u32,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    target_modules: Option<TargetModules>,
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    lora_dropout: f64,
    task_type: Option<String>,
    bias: Option<String>,
}

/// Options that change what the weights mean; each must be absent, null, false or empty.
const MUST_BE_UNSET: [(&str, &str); 13] = [
    ("use_dora", "DoRA adds a magnitude vector"),
    ("rank_pattern", "per-module ranks"),
    ("alpha_pattern", "per-module alphas"),
    ("fan_in_fan_out", "transposed (Conv1D) weights"),
    ("modules_to_save", "fully trained extra modules"),
    ("layer_replication", "replicated layers"),
    ("lora_bias", "a bias on lora_B"),
    ("use_qalora", "QA-LoRA pooling"),
    (
        "target_parameters",
        "LoRA on parameters rather than modules",
    ),
    ("trainable_token_indices", "trainable token embeddings"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("arrow_config", "Arrow routing"),
    ("use_bdlora", "block-diagonal LoRA"),
];

fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

/// Parses and checks `adapter_config.json`.
pub fn parse_config(bytes: &[u8], path: &Path) -> Result<AdapterConfig, Error> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::json(path, e))?;
    let raw = RawConfig::deserialize(&value).map_err(|e| Error::json(path, e))?;
    let unsupported = |what: String| Error::unsupported(path, what);
    if raw.peft_type.as_deref() != Some("LORA") {
        return Err(unsupported(format!(
            "peft_type {:?}: only LORA",
            raw.peft_type
        )));
    }
    for (key, what) in MUST_BE_UNSET {
        if let Some(v) = value.get(key)
            && !is_unset(v)
        {
            return Err(unsupported(format!("{key} = {v} ({what})")));
        }
    }
    if let Some(bias) = raw.bias.as_deref()
        && bias != "none"
    {
        return Err(unsupported(format!("bias {bias:?}: only \"none\"")));
    }
    if raw.r == 0 {
        return Err(unsupported("r = 0".into()));
    }
    let alpha = raw.lora_alpha as f32;
    if !alpha.is_finite() {
        return Err(unsupported(format!("lora_alpha = {}", raw.lora_alpha)));
    }
    Ok(AdapterConfig {
        r: raw.r,
        lora_alpha: alpha,
        use_rslora: raw.use_rslora,
        target_modules: raw
            .target_modules
            .unwrap_or(TargetModules::List(Vec::new())),
        base_model_name_or_path: raw.base_model_name_or_path,
        lora_dropout: raw.lora_dropout as f32,
        task_type: raw.task_type,
    })
}

/// One module's factors.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// `A`: `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `B`: `[out, rank]`, row-major.
    pub b: Vec<f32>,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
    /// The rank.
    pub rank: usize,
}

/// A fixed-rank LoRA adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// The checked configuration.
    pub config: AdapterConfig,
    /// Factors by module path (`model.layers.0.self_attn.q_proj`).
    pub modules: BTreeMap<String, LoraPair>,
}

/// Parses an adapter from the bytes of its two files.
pub fn parse_adapter(config_json: &[u8], weights: &[u8], dir: &Path) -> Result<Adapter, Error> {
    let config = parse_config(config_json, &dir.join(CONFIG_FILE))?;
    let path = dir.join(WEIGHTS_FILE);
    let file = st::parse(weights, &path)?;
    let rank = config.r as usize;
    let mut modules = BTreeMap::new();
    for name in file.names() {
        let module = name
            .strip_prefix(KEY_PREFIX)
            .and_then(|rest| rest.strip_suffix(".lora_A.weight"))
            .filter(|m| !m.is_empty());
        let is_b = name
            .strip_prefix(KEY_PREFIX)
            .is_some_and(|rest| rest.ends_with(".lora_B.weight"));
        let Some(module) = module else {
            if is_b {
                continue; // read with its A below; an orphan B is caught by the count
            }
            return Err(Error::UnexpectedTensor {
                path: path.clone(),
                name: name.to_string(),
            });
        };
        let a_view = st::get(&file, name, &path)?;
        let b_name = format!("{KEY_PREFIX}{module}.lora_B.weight");
        let b_view = st::get(&file, &b_name, &path)?;
        let (&[a_rank, in_features], &[out_features, b_rank]) = (a_view.shape(), b_view.shape())
        else {
            return Err(Error::Shape {
                path: path.clone(),
                name: name.to_string(),
                expected: std::vec![rank, 0],
                actual: a_view.shape().to_vec(),
            });
        };
        let shape_error = |key: &str, want: [usize; 2], actual: &[usize]| Error::Shape {
            path: path.clone(),
            name: key.to_string(),
            expected: want.to_vec(),
            actual: actual.to_vec(),
        };
        if a_rank != rank || in_features == 0 {
            return Err(shape_error(
                name,
                [rank, in_features.max(1)],
                a_view.shape(),
            ));
        }
        if b_rank != rank || out_features == 0 {
            return Err(shape_error(
                &b_name,
                [out_features.max(1), rank],
                b_view.shape(),
            ));
        }
        let (_, a) = st::to_f32(&a_view, name, &path)?;
        let (_, b) = st::to_f32(&b_view, &b_name, &path)?;
        modules.insert(
            module.to_string(),
            LoraPair {
                a,
                b,
                in_features,
                out_features,
                rank,
            },
        );
    }
    // Every key was an A (read with its B) or a B; a B whose A is absent is left over.
    if 2 * modules.len() != file.len() {
        let orphan = file.names().into_iter().find_map(|n| {
            let module = n.strip_prefix(KEY_PREFIX)?.strip_suffix(".lora_B.weight")?;
            (!modules.contains_key(module)).then(|| format!("{KEY_PREFIX}{module}.lora_A.weight"))
        });
        return Err(Error::MissingTensor {
            path,
            name: orphan.unwrap_or_default(),
        });
    }
    if modules.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no LoRA weights",
            path.display()
        )));
    }
    Ok(Adapter { config, modules })
}

/// Reads an adapter folder.
pub fn read_adapter(dir: &Path) -> Result<Adapter, Error> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| Error::io(&path, e))
    };
    parse_adapter(&read(CONFIG_FILE)?, &read(WEIGHTS_FILE)?, dir)
}

/// One module for [`write_adapter`]: `(module path, A [rank, in], B [out, rank], in, out)`.
pub type ModuleFactors<'a> = (String, &'a [f32], &'a [f32], usize, usize);

/// The two files of an adapter (`adapter_config.json`, `adapter_model.safetensors`) as bytes.
pub fn adapter_files(
    base_model_name: &str,
    rank: u32,
    alpha: f32,
    use_rslora: bool,
    modules: &[ModuleFactors<'_>],
) -> Result<(Vec<u8>, Vec<u8>), Error> {
    if rank == 0 || !alpha.is_finite() || modules.is_empty() {
        return Err(Error::Invalid(format!(
            "peft: rank {rank}, alpha {alpha} and {} modules cannot make an adapter",
            modules.len()
        )));
    }
    let r = rank as usize;
    let mut tensors = Vec::with_capacity(2 * modules.len());
    let mut targets: Vec<&str> = Vec::with_capacity(modules.len());
    for (name, a, b, in_features, out_features) in modules {
        if name.is_empty() || *in_features == 0 || *out_features == 0 {
            return Err(Error::Invalid(format!(
                "peft: module `{name}` has an empty name or shape"
            )));
        }
        crate::hf::check_len(name, &[r, *in_features], a.len())?;
        crate::hf::check_len(name, &[*out_features, r], b.len())?;
        if let Some(index) = a.iter().chain(b.iter()).position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                name: name.clone(),
                index,
            });
        }
        tensors.push((
            format!("{KEY_PREFIX}{name}.lora_A.weight"),
            st::Owned::f32s(std::vec![r, *in_features], a),
        ));
        tensors.push((
            format!("{KEY_PREFIX}{name}.lora_B.weight"),
            st::Owned::f32s(std::vec![*out_features, r], b),
        ));
        targets.push(name);
    }
    targets.sort_unstable();
    if targets.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::Invalid("peft: a module appears twice".into()));
    }
    // Full module paths as targets: PEFT matches a target as a name suffix, so a full path
    // adapts exactly that module and no other.
    let config = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": use_rslora
    });
    let weights = st::serialize(tensors, Path::new(WEIGHTS_FILE))?;
    Ok((pyjson::dumps_pretty(&config), weights))
}

/// Writes an adapter folder atomically (weights first, then the config).
pub fn write_adapter(
    dir: &Path,
    base_model_name: &str,
    rank: u32,
    alpha: f32,
    use_rslora: bool,
    modules: &[ModuleFactors<'_>],
) -> Result<(), Error> {
    let (config, weights) = adapter_files(base_model_name, rank, alpha, use_rslora, modules)?;
    atomic::write_dir(dir, &[(WEIGHTS_FILE, &weights), (CONFIG_FILE, &config)])
}

impl Adapter {
    /// Writes this adapter as a PEFT folder.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let modules: Vec<ModuleFactors<'_>> = self
            .modules
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    &p.a[..],
                    &p.b[..],
                    p.in_features,
                    p.out_features,
                )
            })
            .collect();
        write_adapter(
            dir,
            self.config.base_model_name_or_path.as_deref().unwrap_or(""),
            self.config.r,
            self.config.lora_alpha,
            self.config.use_rslora,
            &modules,
        )
    }
}

/// The rank-`r` adapter of a bundle: `A[:r]`, `B[:, :r]` of every module, with `r` and
/// `lora_alpha` (and `use_rslora` for the `alpha / sqrt(r)` rule) set so that PEFT's scale is
/// the bundle's scale at rank `r`.
pub fn from_bundle_rank(bundle: &BundleReader<'_>, r: u32) -> Result<Adapter, Error> {
    let mut modules = BTreeMap::new();
    for i in 0..bundle.module_count() {
        let info = bundle.module(i)?;
        let (a, b) = bundle.factors_at_rank(i, r)?;
        modules.insert(
            info.name.to_string(),
            LoraPair {
                a,
                b,
                in_features: info.in_features as usize,
                out_features: info.out_features as usize,
                rank: r as usize,
            },
        );
    }
    let targets = modules.keys().cloned().collect();
    Ok(Adapter {
        config: AdapterConfig {
            r,
            lora_alpha: bundle.alpha(),
            use_rslora: bundle.scaling() == Scaling::AlphaOverSqrtRank,
            target_modules: TargetModules::List(targets),
            base_model_name_or_path: None,
            lora_dropout: 0.0,
            task_type: Some("CAUSAL_LM".into()),
        },
        modules,
    })
}
