//! Helpers shared by the `formats_*` tests: golden paths, the golden base quantized with the
//! core, and independent readers of safetensors files (through the `safetensors` crate only).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qdylora_core::infer::LinearKind;
use qdylora_formats::Nf4Weight;
use qdylora_formats::hf;
use safetensors::SafeTensors;

/// A tensor's dtype, shape and raw bytes.
pub type RawTensor = (safetensors::Dtype, Vec<usize>, Vec<u8>);

pub fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/golden")
        .join(rel)
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Raw bytes, dtype and shape of every tensor in a safetensors file.
pub fn raw_tensors(bytes: &[u8]) -> BTreeMap<String, RawTensor> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.iter()
        .map(|(name, v)| {
            (
                name.to_string(),
                (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect()
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The golden HF base (bf16), loaded through our HF bridge.
pub fn golden_base() -> hf::Checkpoint {
    hf::load_checkpoint(&golden("base")).unwrap()
}

/// The base's decoder linears quantized by the core as transformers does when it loads the
/// model in f32 (`dtype=torch.float32`): bf16 values widened exactly to f32, blocksize 64.
pub fn quantize_base(base: &hf::Checkpoint) -> BTreeMap<String, Nf4Weight> {
    let mut out = BTreeMap::new();
    for layer in 0..base.config.num_hidden_layers {
        for kind in LinearKind::ALL {
            let module = hf::linear_name(layer, kind);
            let t = &base.tensors[&format!("{module}.weight")];
            let w = Nf4Weight::quantize::<f32>(t.shape[0], t.shape[1], &t.data, 64).unwrap();
            out.insert(module, w);
        }
    }
    out
}

/// The base's unquantized tensors (embeddings and norms), as `(name, shape, values)`.
pub fn dense_of(base: &hf::Checkpoint) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    base.tensors
        .iter()
        .filter(|(name, _)| !name.contains("_proj."))
        .map(|(name, t)| (name.clone(), t.shape.clone(), t.data.clone()))
        .collect()
}
