//! bitsandbytes NF4 double-quant checkpoints, with exactly the keys, dtypes, shapes and JSON that
//! transformers writes for `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
//! bnb_4bit_use_double_quant=True)`.
//!
//! For a quantized linear `P` (`model.layers.0.self_attn.q_proj`) the file holds `P.weight` (u8
//! `[ceil(n/2), 1]`), `P.weight.absmax` (u8 `[blocks]`), `P.weight.quant_map` (16 f32, the NF4
//! code), `P.weight.nested_absmax` (f32), `P.weight.nested_quant_map` (256 f32) and
//! `P.weight.quant_state.bitsandbytes__nf4` (the u8 bytes of a JSON object).

use std::boxed::Box;
use std::collections::BTreeMap;
use std::format;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use qdylora_core::double_quant::{NESTED_BLOCKSIZE, nested_block_count};
use qdylora_core::dynamic_map::CODE_LEN;
use qdylora_core::{ElementType, nf4};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error_std::Error;
use crate::hf::{self, CONFIG_FILE, DenseTensor, LlamaConfig, WEIGHTS_FILE};
use crate::nf4_weight::Nf4Weight;
use crate::{atomic, pyjson, st};

const QUANT_STATE_SUFFIX: &str = ".weight.quant_state.bitsandbytes__nf4";

/// A bitsandbytes 4-bit checkpoint in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The checked model configuration.
    pub config: LlamaConfig,
    /// `config.json` as written, `quantization_config` included.
    pub raw_config: Value,
    /// The NF4 linears by module path (`model.layers.0.self_attn.q_proj`).
    pub quantized: BTreeMap<String, Nf4Weight>,
    /// Everything else (embeddings, norms, an untied `lm_head`) by tensor name.
    pub dense: BTreeMap<String, DenseTensor>,
}

/// Whether a parsed `config.json` describes a bitsandbytes 4-bit checkpoint.
pub fn is_bnb_config(config: &Value) -> bool {
    let q = &config["quantization_config"];
    q["quant_method"] == "bitsandbytes" && q["load_in_4bit"] == true
}

/// Whether the folder's `config.json` describes a bitsandbytes 4-bit checkpoint.
pub fn is_bnb_checkpoint(dir: &Path) -> Result<bool, Error> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let config: Value = serde_json::from_slice(&bytes).map_err(|e| Error::json(&path, e))?;
    Ok(is_bnb_config(&config))
}

/// Checks `quantization_config`: bitsandbytes, 4-bit, NF4, double quant, u8 storage.
fn check_quantization_config(config: &Value, path: &Path) -> Result<(), Error> {
    let q = &config["quantization_config"];
    let expect = |key: &str, want: Value, why: &str| {
        let found = &q[key];
        if *found == want {
            Ok(())
        } else {
            Err(Error::unsupported(
                path,
                format!("quantization_config.{key} is {found}: {why}"),
            ))
        }
    };
    expect(
        "quant_method",
        json!("bitsandbytes"),
        "not a bitsandbytes checkpoint",
    )?;
    expect(
        "load_in_4bit",
        json!(true),
        "only 4-bit checkpoints are supported",
    )?;
    expect("bnb_4bit_quant_type", json!("nf4"), "only nf4 is supported")?;
    expect(
        "bnb_4bit_use_double_quant",
        json!(true),
        "only double-quantized (compress_statistics) checkpoints are supported",
    )?;
    if !q["bnb_4bit_quant_storage"].is_null() {
        expect(
            "bnb_4bit_quant_storage",
            json!("uint8"),
            "only uint8 storage is supported",
        )?;
    }
    Ok(())
}

/// The quant state JSON as bitsandbytes writes it.
#[derive(Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_dtype: Option<String>,
    nested_offset: Option<f64>,
}

fn dtype_name(dtype: ElementType) -> &'static str {
    match dtype {
        ElementType::F32 => "float32",
        ElementType::F16 => "float16",
        ElementType::Bf16 => "bfloat16",
    }
}

fn dtype_from_name(name: &str) -> Option<ElementType> {
    match name {
        "float32" => Some(ElementType::F32),
        "float16" => Some(ElementType::F16),
        "bfloat16" => Some(ElementType::Bf16),
        _ => None,
    }
}

/// The `quant_state.bitsandbytes__nf4` bytes for a weight: Python's `json.dumps` of bitsandbytes'
/// `as_dict(packed=True)` (", " and ": " separators, Python float repr for the offset).
pub fn quant_state_json(w: &Nf4Weight) -> Vec<u8> {
    format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}, {}], \
         \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}}}",
        w.blocksize,
        dtype_name(w.dtype),
        w.rows,
        w.cols,
        pyjson::float_repr(f64::from(w.offset)),
    )
    .into_bytes()
}

/// Reads one quantized linear `prefix` (module path) from a parsed file.
fn read_quantized(
    file: &safetensors::SafeTensors<'_>,
    prefix: &str,
    path: &Path,
) -> Result<Nf4Weight, Error> {
    let key = |suffix: &str| format!("{prefix}.weight{suffix}");
    let state_key = key(".quant_state.bitsandbytes__nf4");
    let state_view = st::get(file, &state_key, path)?;
    st::expect_dtype(&state_view, &state_key, safetensors::Dtype::U8, path)?;
    let state: QuantState = serde_json::from_slice(state_view.data()).map_err(|e| Error::Json {
        path: path.join(&state_key),
        source: e,
    })?;
    let unsupported = |what: String| Error::unsupported(path, format!("{state_key}: {what}"));
    if state.quant_type != "nf4" {
        return Err(unsupported(format!(
            "quant_type {:?}: only nf4",
            state.quant_type
        )));
    }
    nf4::check_blocksize(state.blocksize)?;
    let dtype = dtype_from_name(&state.dtype)
        .ok_or_else(|| unsupported(format!("dtype {:?}", state.dtype)))?;
    let [rows, cols] = state.shape[..] else {
        return Err(unsupported(format!("shape {:?} is not 2-D", state.shape)));
    };
    let n = rows
        .checked_mul(cols)
        .filter(|&n| n > 0)
        .ok_or_else(|| unsupported(format!("shape {:?}", state.shape)))?;
    let (Some(nested_blocksize), Some(nested_dtype), Some(offset)) = (
        state.nested_blocksize,
        &state.nested_dtype,
        state.nested_offset,
    ) else {
        return Err(unsupported(
            "not double-quantized (no nested_* fields); only compress_statistics=True is supported"
                .into(),
        ));
    };
    if nested_blocksize != NESTED_BLOCKSIZE || nested_dtype != "float32" {
        return Err(unsupported(format!(
            "nested_blocksize {nested_blocksize} / nested_dtype {nested_dtype:?}: only 256 / float32"
        )));
    }
    let offset = offset as f32;
    if !offset.is_finite() {
        return Err(unsupported("nested_offset is not finite".into()));
    }

    let blocks = nf4::block_count(n, state.blocksize);
    let nested_blocks = nested_block_count(blocks);
    let u8_tensor = |suffix: &str, shape: &[usize]| -> Result<Vec<u8>, Error> {
        let name = key(suffix);
        let view = st::get(file, &name, path)?;
        st::expect_dtype(&view, &name, safetensors::Dtype::U8, path)?;
        st::expect_shape(&view, &name, shape, path)?;
        Ok(view.data().to_vec())
    };
    let f32_tensor = |suffix: &str, len: usize| -> Result<Vec<f32>, Error> {
        let name = key(suffix);
        let view = st::get(file, &name, path)?;
        st::expect_shape(&view, &name, &[len], path)?;
        let values = st::f32_exact(&view, &name, path)?;
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { name, index });
        }
        Ok(values)
    };
    let packed = u8_tensor("", &[nf4::packed_len(n), 1])?;
    let absmax_codes = u8_tensor(".absmax", &[blocks])?;
    let quant_map = f32_tensor(".quant_map", 16)?;
    if quant_map
        .iter()
        .zip(nf4::CODE)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(unsupported(
            "quant_map is not the NF4 code (only nf4 is supported)".into(),
        ));
    }
    let nested_absmax = f32_tensor(".nested_absmax", nested_blocks)?;
    let code8_values = f32_tensor(".nested_quant_map", CODE_LEN)?;
    let mut code8 = Box::new([0.0f32; CODE_LEN]);
    code8.copy_from_slice(&code8_values);
    Ok(Nf4Weight {
        rows,
        cols,
        blocksize: state.blocksize,
        packed,
        absmax_codes,
        nested_absmax,
        offset,
        code8,
        dtype,
    })
}

/// Parses a checkpoint from bytes: `config.json` and its safetensors files (with their paths).
pub fn parse_checkpoint(
    config_json: &[u8],
    shards: &[(PathBuf, &[u8])],
) -> Result<Checkpoint, Error> {
    let folder = shards
        .first()
        .and_then(|(p, _)| p.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let config_path = folder.join(CONFIG_FILE);
    let (config, raw_config) = hf::parse_config(config_json, &config_path)?;
    check_quantization_config(&raw_config, &config_path)?;

    let mut quantized = BTreeMap::new();
    let mut dense = BTreeMap::new();
    let mut present: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (path, bytes) in shards {
        let file = st::parse(bytes, path)?;
        let prefixes: Vec<&str> = file
            .names()
            .into_iter()
            .filter_map(|n| n.strip_suffix(QUANT_STATE_SUFFIX))
            .collect();
        for prefix in &prefixes {
            let w = read_quantized(&file, prefix, path)?;
            present.insert(format!("{prefix}.weight"), vec![w.rows, w.cols]);
            if quantized.insert(prefix.to_string(), w).is_some() {
                return Err(Error::Invalid(format!(
                    "{}: `{prefix}` is stored twice",
                    path.display()
                )));
            }
        }
        for (name, view) in file.iter() {
            let belongs_to_quantized = prefixes.iter().any(|p| {
                name.strip_prefix(p)
                    .is_some_and(|rest| rest == ".weight" || rest.starts_with(".weight."))
            });
            if belongs_to_quantized {
                check_quantized_key(name, path)?;
                continue;
            }
            if name.contains(".quant_state.") || name.ends_with(".absmax") {
                return Err(Error::unsupported(
                    path,
                    format!("tensor `{name}`: only nf4 double-quant linears are supported"),
                ));
            }
            let (dtype, data) = st::to_f32(&view, name, path)?;
            if present
                .insert(name.to_string(), view.shape().to_vec())
                .is_some()
            {
                return Err(Error::Invalid(format!(
                    "{}: `{name}` is stored twice",
                    path.display()
                )));
            }
            dense.insert(
                name.to_string(),
                DenseTensor {
                    shape: view.shape().to_vec(),
                    dtype,
                    data,
                },
            );
        }
    }
    let present_ref: BTreeMap<&str, Vec<usize>> = present
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    for extra in hf::check_tensor_set(&config, &present_ref, &folder)? {
        dense.remove(extra);
    }
    check_quantized_names(quantized.keys().map(String::as_str), &folder)?;
    Ok(Checkpoint {
        config,
        raw_config,
        quantized,
        dense,
    })
}

/// Only the decoder linears are quantized (embeddings, norms and `lm_head` stay dense).
fn check_quantized_names<'a>(
    mut names: impl Iterator<Item = &'a str>,
    path: &Path,
) -> Result<(), Error> {
    match names.find(|n| !n.contains(".self_attn.") && !n.contains(".mlp.")) {
        Some(name) => Err(Error::unsupported(
            path,
            format!("`{name}` is quantized; only the decoder linears may be"),
        )),
        None => Ok(()),
    }
}

/// A key under a quantized linear must be one of the six bitsandbytes writes.
fn check_quantized_key(name: &str, path: &Path) -> Result<(), Error> {
    const SUFFIXES: [&str; 6] = [
        ".weight",
        ".weight.absmax",
        ".weight.quant_map",
        ".weight.nested_absmax",
        ".weight.nested_quant_map",
        QUANT_STATE_SUFFIX,
    ];
    if SUFFIXES.iter().any(|s| name.ends_with(s)) {
        Ok(())
    } else {
        Err(Error::UnexpectedTensor {
            path: path.into(),
            name: name.into(),
        })
    }
}

/// Reads a checkpoint folder (single file or sharded).
pub fn read_checkpoint(dir: &Path) -> Result<Checkpoint, Error> {
    let config_path = dir.join(CONFIG_FILE);
    let config = std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let files = hf::read_weight_files(dir)?;
    let shards: Vec<(PathBuf, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.clone(), b.as_slice()))
        .collect();
    parse_checkpoint(&config, &shards)
}

/// The `quantization_config` transformers writes for NF4 double quant.
fn quantization_config(compute_dtype: &str) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// The two files of a checkpoint (`model.safetensors`, `config.json`) as bytes.
pub fn checkpoint_files(
    config_json: &Value,
    compute_dtype: &str,
    quantized: &[(String, &Nf4Weight)],
    dense: &[(String, Vec<usize>, ElementType, &[f32])],
) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let config_path = Path::new(CONFIG_FILE);
    if dtype_from_name(compute_dtype).is_none() {
        return Err(Error::Invalid(format!(
            "bnb: compute dtype {compute_dtype:?} is not float32, float16 or bfloat16"
        )));
    }
    let mut config = config_json.clone();
    let Some(map) = config.as_object_mut() else {
        return Err(Error::Invalid("bnb: config.json must be an object".into()));
    };
    map.insert(
        "quantization_config".into(),
        quantization_config(compute_dtype),
    );
    let llama = LlamaConfig::from_json(&config, config_path)?;

    // Every tensor by its `.weight` name and `[out, in]` / stored shape, for the model check.
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut tensors = Vec::new();
    for (prefix, w) in quantized {
        w.matrix()?; // shape, blocksize and lengths agree
        let name = |suffix: &str| format!("{prefix}.weight{suffix}");
        let n = w.rows * w.cols;
        let state = quant_state_json(w);
        tensors.extend([
            (
                name(""),
                st::Owned::u8s(vec![nf4::packed_len(n), 1], w.packed.clone()),
            ),
            (
                name(".absmax"),
                st::Owned::u8s(vec![w.absmax_codes.len()], w.absmax_codes.clone()),
            ),
            (name(".quant_map"), st::Owned::f32s(vec![16], &nf4::CODE)),
            (
                name(".nested_absmax"),
                st::Owned::f32s(vec![w.nested_absmax.len()], &w.nested_absmax),
            ),
            (
                name(".nested_quant_map"),
                st::Owned::f32s(vec![CODE_LEN], &w.code8[..]),
            ),
            (
                name(".quant_state.bitsandbytes__nf4"),
                st::Owned::u8s(vec![state.len()], state),
            ),
        ]);
        if shapes.insert(name(""), vec![w.rows, w.cols]).is_some() {
            return Err(Error::Invalid(format!(
                "bnb: module `{prefix}` appears twice"
            )));
        }
    }
    check_quantized_names(quantized.iter().map(|(p, _)| p.as_str()), Path::new(""))?;
    for (name, shape, dtype, values) in dense {
        hf::check_len(name, shape, values.len())?;
        st::check_representable(name, *dtype, values)?;
        if shapes.insert(name.clone(), shape.clone()).is_some() {
            return Err(Error::Invalid(format!(
                "bnb: tensor `{name}` appears twice"
            )));
        }
        tensors.push((
            name.clone(),
            st::Owned::floats(*dtype, shape.clone(), values),
        ));
    }
    let shapes_ref: BTreeMap<&str, Vec<usize>> = shapes
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    hf::check_tensor_set(&llama, &shapes_ref, Path::new(""))?;
    let weights = st::serialize(tensors, Path::new(WEIGHTS_FILE))?;
    Ok((weights, hf::config_text(&config)))
}

/// Writes a checkpoint folder atomically: `config_json` gains the `quantization_config`
/// transformers writes (with `bnb_4bit_compute_dtype = compute_dtype`), the quantized linears
/// (`quantized`, by module path) their six tensors, and `dense` the rest (embeddings, norms).
pub fn write_checkpoint(
    dir: &Path,
    config_json: &Value,
    compute_dtype: &str,
    quantized: &[(String, &Nf4Weight)],
    dense: &[(String, Vec<usize>, ElementType, &[f32])],
) -> Result<(), Error> {
    let (weights, config) = checkpoint_files(config_json, compute_dtype, quantized, dense)?;
    atomic::write_dir(dir, &[(WEIGHTS_FILE, &weights), (CONFIG_FILE, &config)])
}
