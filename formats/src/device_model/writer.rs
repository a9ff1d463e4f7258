//! The device model writer (std).

use std::format;
use std::string::String;
use std::vec::Vec;

use qdylora_core::ElementType;
use qdylora_core::dynamic_map::{CODE_LEN, signed_dynamic_map};
use qdylora_core::infer::DecoderConfig;

use super::{
    CODE8_OFFSET, DATA_ALIGN, FIXED_HEADER_LEN, MAGIC, Nf4Parts, TABLE_OFFSET, TensorKind, VERSION,
    encode_config, field, header_len_for, limits,
};
use crate::AlignedBytes;
use crate::encode::to_le_bytes;
use crate::error_std::Error;
use crate::nf4_weight::Nf4Weight;

/// One tensor on its way into the file.
struct Pending<'a> {
    name: &'a str,
    kind: TensorKind,
    ndim: u8,
    dims: [u32; 2],
    blocksize: u32,
    dq_offset: f32,
    data: Vec<u8>,
}

/// Serializes a device model: the config, the NF4 linears (`quantized`, named like
/// `model.layers.0.self_attn.q_proj.weight`) and the dense tensors (embeddings, norms, an untied
/// `lm_head`) stored as `dense_dtype` (F32 or F16, rounded to nearest even).
///
/// The tensors must be exactly those the config's decoder needs; the result is checked by
/// parsing it with [`super::DeviceModelReader`] before it is returned.
pub fn write_device_model(
    config: &DecoderConfig,
    fingerprint: [u8; 16],
    quantized: &[(String, &Nf4Weight)],
    dense: &[(String, Vec<usize>, &[f32])],
    dense_dtype: ElementType,
) -> Result<Vec<u8>, Error> {
    config.validate()?;
    let dense_kind = match dense_dtype {
        ElementType::F32 => TensorKind::F32,
        ElementType::F16 => TensorKind::F16,
        ElementType::Bf16 => {
            return Err(Error::Invalid(
                "device model: dense tensors are stored as f32 or f16, not bf16".into(),
            ));
        }
    };
    let code8 = shared_code8(quantized)?;
    let mut pending = Vec::with_capacity(quantized.len() + dense.len());
    for (name, w) in quantized {
        pending.push(nf4_tensor(name, w)?);
    }
    for (name, shape, values) in dense {
        pending.push(dense_tensor(name, shape, values, dense_dtype, dense_kind)?);
    }
    pending.sort_by(|a, b| a.name.cmp(b.name));
    if let Some(pair) = pending.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(Error::Invalid(format!(
            "device model: tensor `{}` appears twice",
            pair[0].name
        )));
    }

    let too_many = || Error::Invalid("device model: too many tensors or names".into());
    let tensor_count = u32::try_from(pending.len())
        .ok()
        .filter(|&n| n <= limits::MAX_TENSORS)
        .ok_or_else(too_many)?;
    let names_len = u32::try_from(pending.iter().map(|p| p.name.len()).sum::<usize>())
        .ok()
        .filter(|&n| n <= limits::MAX_NAMES_LEN)
        .ok_or_else(too_many)?;
    let header_len = header_len_for(tensor_count, names_len).ok_or_else(too_many)?;

    // Data regions first, so the table can record their offsets.
    let mut offsets = Vec::with_capacity(pending.len());
    let mut end = header_len;
    for p in &pending {
        let start = end.next_multiple_of(DATA_ALIGN);
        offsets.push(start);
        end = start + p.data.len() as u64;
    }
    let file_len = end;

    let mut out = Vec::with_capacity(file_len as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&tensor_count.to_le_bytes());
    out.extend_from_slice(&names_len.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&file_len.to_le_bytes());
    out.extend_from_slice(&fingerprint);
    out.extend_from_slice(&encode_config(config));
    out.resize(FIXED_HEADER_LEN, 0); // reserved, then the header CRC filled in below
    debug_assert_eq!(out.len(), CODE8_OFFSET);
    for c in code8.iter() {
        out.extend_from_slice(&c.to_le_bytes());
    }
    debug_assert_eq!(out.len(), TABLE_OFFSET);
    let mut name_offset = 0u32;
    for (p, &offset) in pending.iter().zip(&offsets) {
        out.extend_from_slice(&name_offset.to_le_bytes());
        out.extend_from_slice(&(p.name.len() as u32).to_le_bytes());
        out.push(p.kind.code());
        out.push(p.ndim);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&p.dims[0].to_le_bytes());
        out.extend_from_slice(&p.dims[1].to_le_bytes());
        out.extend_from_slice(&p.blocksize.to_le_bytes());
        out.extend_from_slice(&p.dq_offset.to_le_bytes());
        out.extend_from_slice(&crate::le::crc32(&[&p.data]).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(p.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0u8; 16]);
        name_offset += p.name.len() as u32;
    }
    for p in &pending {
        out.extend_from_slice(p.name.as_bytes());
    }
    out.resize(header_len as usize, 0);
    let crc = crate::le::crc32(&[&out[..field::HEADER_CRC], &out[FIXED_HEADER_LEN..]]);
    out[field::HEADER_CRC..FIXED_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    for (p, &offset) in pending.iter().zip(&offsets) {
        out.resize(offset as usize, 0);
        out.extend_from_slice(&p.data);
    }

    // Never hand out a file the reader would reject (missing tensors, wrong shapes).
    let aligned = AlignedBytes::from_slice(&out);
    super::DeviceModelReader::parse(aligned.as_bytes())?;
    Ok(out)
}

/// The one `code8` every NF4 tensor must share (the signed dynamic map when there are none).
fn shared_code8(quantized: &[(String, &Nf4Weight)]) -> Result<[f32; CODE_LEN], Error> {
    let Some((_, first)) = quantized.first() else {
        return Ok(signed_dynamic_map());
    };
    let bits = |c: &[f32; CODE_LEN]| c.map(f32::to_bits);
    if let Some((name, _)) = quantized
        .iter()
        .find(|(_, w)| bits(&w.code8) != bits(&first.code8))
    {
        return Err(Error::Invalid(format!(
            "device model: `{name}` uses a different 8-bit absmax code than the other NF4 tensors"
        )));
    }
    Ok(*first.code8)
}

fn nf4_tensor<'a>(name: &'a str, w: &Nf4Weight) -> Result<Pending<'a>, Error> {
    let dim = |d: usize| {
        u32::try_from(d)
            .ok()
            .filter(|&d| d > 0 && d <= limits::MAX_DIM)
            .ok_or_else(|| Error::Invalid(format!("device model: `{name}` has a dimension of {d}")))
    };
    let dims = [dim(w.rows)?, dim(w.cols)?];
    // The core checks blocksize and every length against the shape.
    w.matrix()?;
    let n = w.rows as u64 * w.cols as u64;
    let parts = Nf4Parts::new(n, w.blocksize as u64)
        .ok_or_else(|| Error::Invalid(format!("device model: `{name}` is too large")))?;
    if !w.offset.is_finite() {
        return Err(Error::NonFinite {
            name: name.into(),
            index: 0,
        });
    }
    let mut data = Vec::with_capacity(parts.total as usize);
    data.extend_from_slice(&w.packed);
    data.resize(parts.codes_offset as usize, 0);
    data.extend_from_slice(&w.absmax_codes);
    data.resize(parts.nested_offset as usize, 0);
    for v in &w.nested_absmax {
        data.extend_from_slice(&v.to_le_bytes());
    }
    Ok(Pending {
        name,
        kind: TensorKind::Nf4DoubleQuant,
        ndim: 2,
        dims,
        blocksize: w.blocksize as u32,
        dq_offset: w.offset,
        data,
    })
}

fn dense_tensor<'a>(
    name: &'a str,
    shape: &[usize],
    values: &[f32],
    dtype: ElementType,
    kind: TensorKind,
) -> Result<Pending<'a>, Error> {
    let bad_shape = || Error::Invalid(format!("device model: `{name}` has shape {shape:?}"));
    let dims = match *shape {
        [n] => [n, 1],
        [rows, cols] => [rows, cols],
        _ => return Err(bad_shape()),
    };
    let dims = dims.map(|d| {
        u32::try_from(d)
            .ok()
            .filter(|&d| d > 0 && d <= limits::MAX_DIM)
    });
    let [Some(d0), Some(d1)] = dims else {
        return Err(bad_shape());
    };
    if values.len() as u64 != u64::from(d0) * u64::from(d1) {
        return Err(Error::Invalid(format!(
            "device model: `{name}` has {} values for shape {shape:?}",
            values.len()
        )));
    }
    // Checked after rounding: a finite f32 past f16's range would become an infinity.
    if let Some(index) = values
        .iter()
        .position(|&v| !crate::encode::round_to(dtype, v).is_finite())
    {
        return Err(Error::NonFinite {
            name: name.into(),
            index,
        });
    }
    Ok(Pending {
        name,
        kind,
        ndim: shape.len() as u8,
        dims: [d0, d1],
        blocksize: 0,
        dq_offset: 0.0,
        data: to_le_bytes(dtype, values),
    })
}
