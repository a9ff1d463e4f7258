//! The bundle writer (std).

use std::format;
use std::string::String;
use std::vec::Vec;

use qdylora_core::ElementType;
use qdylora_core::rank::{AdapterShape, ModuleShape, Scaling};

use super::{
    FIXED_HEADER_LEN, MAGIC, VERSION, crc_table_offset, dtype_code, field, header_len_for, layout,
    limits, scaling_code,
};
use crate::encode::extend_le;
use crate::error_std::Error;

/// The adapter-wide fields of a bundle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BundleMeta {
    /// The largest rank stored.
    pub r_max: u32,
    /// LoRA alpha.
    pub alpha: f32,
    /// Element type `A` and `B` are stored in (values are rounded to nearest even).
    pub dtype: ElementType,
    /// How the scale depends on the rank.
    pub scaling: Scaling,
    /// Fingerprint of the base model ([`crate::fingerprint::model_fingerprint`]).
    pub fingerprint: [u8; 16],
}

/// One adapted linear's full-rank factors.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleTensors {
    /// Module path (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// Input width (columns of `A`).
    pub in_features: u32,
    /// Output width (rows of `B`).
    pub out_features: u32,
    /// `A`: `[r_max, in]`, row-major.
    pub a: Vec<f32>,
    /// `B`: `[out, r_max]`, row-major.
    pub b: Vec<f32>,
}

/// Serializes a bundle. Modules are stored sorted by name (the reader binary-searches them);
/// every value must be finite. The result parses with [`super::BundleReader`] at rank `r_max`.
pub fn write_bundle(meta: &BundleMeta, modules: &[ModuleTensors]) -> Result<Vec<u8>, Error> {
    check(meta, modules)?;
    let mut order: Vec<&ModuleTensors> = modules.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(pair) = order.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(Error::Invalid(format!(
            "bundle: module `{}` appears twice",
            pair[0].name
        )));
    }

    let names_len = order.iter().map(|m| m.name.len()).sum::<usize>();
    let names_len = u32::try_from(names_len)
        .ok()
        .filter(|&n| n <= limits::MAX_NAMES_LEN)
        .ok_or_else(|| Error::Invalid(format!("bundle: {names_len} bytes of names")))?;
    let module_count = order.len() as u32;
    let header_len = header_len_for(module_count, names_len, meta.r_max)
        .filter(|&h| h <= u64::from(u32::MAX))
        .ok_or_else(|| Error::Invalid("bundle: header too large".into()))?;
    let shapes: Vec<ModuleShape> = order
        .iter()
        .map(|m| ModuleShape {
            in_features: m.in_features,
            out_features: m.out_features,
        })
        .collect();
    let shape = AdapterShape {
        modules: &shapes,
        r_max: meta.r_max,
        alpha: meta.alpha,
        dtype: meta.dtype,
        scaling: meta.scaling,
    };
    shape.validate()?;
    let slice_len = shape.slice_bytes(layout(header_len))?;
    let file_len = shape.prefix_bytes(layout(header_len), meta.r_max)?;
    let file_len = usize::try_from(file_len)
        .map_err(|_| Error::Invalid(format!("bundle: {file_len} bytes")))?;

    let mut out = Vec::with_capacity(file_len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(dtype_code(meta.dtype));
    out.push(scaling_code(meta.scaling));
    out.extend_from_slice(&(header_len as u32).to_le_bytes());
    out.extend_from_slice(&meta.r_max.to_le_bytes());
    out.extend_from_slice(&module_count.to_le_bytes());
    out.extend_from_slice(&meta.alpha.to_le_bytes());
    out.extend_from_slice(&names_len.to_le_bytes());
    out.extend_from_slice(&slice_len.to_le_bytes());
    out.extend_from_slice(&meta.fingerprint);
    out.extend_from_slice(&0u32.to_le_bytes()); // reserved
    out.extend_from_slice(&0u32.to_le_bytes()); // header CRC, filled in below
    debug_assert_eq!(out.len(), FIXED_HEADER_LEN);

    let size = meta.dtype.size_bytes() as u64;
    let (mut name_offset, mut slice_offset) = (0u32, 0u64);
    for m in &order {
        out.extend_from_slice(&name_offset.to_le_bytes());
        out.extend_from_slice(&(m.name.len() as u32).to_le_bytes());
        out.extend_from_slice(&m.in_features.to_le_bytes());
        out.extend_from_slice(&m.out_features.to_le_bytes());
        out.extend_from_slice(&slice_offset.to_le_bytes());
        name_offset += m.name.len() as u32;
        slice_offset += (u64::from(m.in_features) + u64::from(m.out_features)) * size;
    }
    for m in &order {
        out.extend_from_slice(m.name.as_bytes());
    }
    let crc_table = crc_table_offset(module_count, names_len) as usize;
    out.resize(crc_table + 4 * meta.r_max as usize, 0); // slice CRCs, filled in below
    out.resize(header_len as usize, 0);

    let r_max = meta.r_max as usize;
    for k in 0..r_max {
        let start = out.len();
        for m in &order {
            let (inf, outf) = (m.in_features as usize, m.out_features as usize);
            extend_le(
                &mut out,
                meta.dtype,
                m.a[k * inf..(k + 1) * inf].iter().copied(),
            );
            extend_le(&mut out, meta.dtype, (0..outf).map(|j| m.b[j * r_max + k]));
        }
        out.resize(start + slice_len as usize, 0);
        let crc = crate::le::crc32(&[&out[start..]]);
        out[crc_table + 4 * k..crc_table + 4 * k + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let header_crc = crate::le::crc32(&[
        &out[..field::HEADER_CRC],
        &out[FIXED_HEADER_LEN..header_len as usize],
    ]);
    out[field::HEADER_CRC..FIXED_HEADER_LEN].copy_from_slice(&header_crc.to_le_bytes());
    debug_assert_eq!(out.len(), file_len);
    Ok(out)
}

/// Rejects arguments that cannot make a valid bundle, naming the module at fault.
fn check(meta: &BundleMeta, modules: &[ModuleTensors]) -> Result<(), Error> {
    if meta.r_max == 0 || meta.r_max > limits::MAX_RANK {
        return Err(Error::Invalid(format!(
            "bundle: r_max {} is outside 1..={}",
            meta.r_max,
            limits::MAX_RANK
        )));
    }
    if !meta.alpha.is_finite() {
        return Err(Error::Invalid(format!(
            "bundle: alpha {} is not finite",
            meta.alpha
        )));
    }
    if modules.is_empty() || modules.len() > limits::MAX_MODULES as usize {
        return Err(Error::Invalid(format!(
            "bundle: {} modules (1..={} allowed)",
            modules.len(),
            limits::MAX_MODULES
        )));
    }
    let r_max = meta.r_max as usize;
    for m in modules {
        if m.name.is_empty() {
            return Err(Error::Invalid("bundle: a module has an empty name".into()));
        }
        for dim in [m.in_features, m.out_features] {
            if dim == 0 || dim > limits::MAX_FEATURES {
                return Err(Error::Invalid(format!(
                    "bundle: module `{}` has a dimension of {dim} (1..={} allowed)",
                    m.name,
                    limits::MAX_FEATURES
                )));
            }
        }
        let (inf, outf) = (m.in_features as usize, m.out_features as usize);
        if m.a.len() != r_max * inf || m.b.len() != outf * r_max {
            return Err(Error::Invalid(format!(
                "bundle: module `{}`: A has {} values and B {}, expected {} ([r_max, in]) and {} ([out, r_max])",
                m.name,
                m.a.len(),
                m.b.len(),
                r_max * inf,
                outf * r_max
            )));
        }
        if let Some(index) = m.a.iter().chain(&m.b).position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                name: m.name.clone(),
                index,
            });
        }
    }
    Ok(())
}
