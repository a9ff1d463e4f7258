//! The device model container: built from the transformers-written bitsandbytes checkpoint, read
//! back zero-copy, stepped by the core decoder against transformers + bitsandbytes logits, and
//! fed every bad-input class.

mod formats_common;

use formats_common::*;
use half::f16;
use qdylora_core::ElementSource;
use qdylora_core::ElementType;
use qdylora_core::infer::{
    Decoder, DecoderConfig, DecoderWeights, LinearKind, NoAdapter, NormKind,
};
use qdylora_formats::device_model::{self, DeviceModelReader, write_device_model};
use qdylora_formats::fingerprint::model_fingerprint;
use qdylora_formats::{AlignedBytes, Error, Field, FormatError, ModelTensor, Nf4Weight, bnb};

struct Model {
    config: DecoderConfig,
    quantized: Vec<(String, Nf4Weight)>,
    dense: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn golden_bnb_model() -> Model {
    let ckpt = bnb::read_checkpoint(&golden("bnb_nf4_dq")).unwrap();
    Model {
        config: ckpt.config.to_decoder_config(),
        quantized: ckpt
            .quantized
            .into_iter()
            .map(|(k, w)| (format!("{k}.weight"), w))
            .collect(),
        dense: ckpt
            .dense
            .into_iter()
            .map(|(k, t)| (k, t.shape, t.data))
            .collect(),
    }
}

fn write(m: &Model, dtype: ElementType) -> Result<Vec<u8>, Error> {
    let q: Vec<(String, &Nf4Weight)> = m.quantized.iter().map(|(n, w)| (n.clone(), w)).collect();
    let d: Vec<(String, Vec<usize>, &[f32])> = m
        .dense
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    write_device_model(&m.config, [9; 16], &q, &d, dtype)
}

#[test]
fn round_trips_the_golden_model() {
    let m = golden_bnb_model();
    for dtype in [ElementType::F32, ElementType::F16] {
        let bytes = AlignedBytes::from_slice(&write(&m, dtype).unwrap());
        let r = DeviceModelReader::parse(bytes.as_bytes()).unwrap();
        assert_eq!(*r.config(), m.config);
        assert_eq!(r.fingerprint(), [9; 16]);
        assert_eq!(r.tensor_count(), 2 + 9 * 3);
        for (name, w) in &m.quantized {
            let i = r.find_tensor(name).unwrap();
            let (rows, cols) = (w.rows, w.cols);
            let got = r.nf4(i).unwrap();
            let want = w.matrix().unwrap();
            let x: Vec<f32> = (0..cols).map(|j| (j as f32 * 0.37).sin()).collect();
            for row in 0..rows {
                assert_eq!(
                    got.row_dot(row, &x).unwrap().to_bits(),
                    want.row_dot(row, &x).unwrap().to_bits(),
                    "{name}"
                );
            }
        }
        for (name, _, values) in &m.dense {
            let got = r.dense(r.find_tensor(name).unwrap()).unwrap();
            let want: Vec<f32> = match dtype {
                ElementType::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
                _ => values.clone(),
            };
            assert_eq!(got.to_f32_vec(), want, "{name}");
            if dtype == ElementType::F32 {
                assert!(
                    got.as_f32_slice().is_some(),
                    "aligned f32 data is handed out zero-copy"
                );
            }
        }
        // The decoder view: tied lm_head is the embedding.
        assert_eq!(
            r.lm_head_row(5).unwrap().to_f32_vec(),
            r.embedding_row(5).unwrap().to_f32_vec()
        );
        assert_eq!(r.layer_norm(2, NormKind::PostAttention).unwrap().len(), 96);
        assert!(r.linear(3, LinearKind::Q).is_err());
        assert!(r.embedding_row(257).is_err());
    }
}

/// Greedy-free check: the core decoder stepping over the device model gives the logits that
/// transformers + bitsandbytes computed for the same checkpoint (f32 compute).
#[test]
fn decoder_over_the_device_model_matches_transformers_bnb_logits() {
    let m = golden_bnb_model();
    let bytes = AlignedBytes::from_slice(&write(&m, ElementType::F32).unwrap());
    let model = DeviceModelReader::parse(bytes.as_bytes()).unwrap();
    let ids = raw_tensors(&read(&golden("input_ids.safetensors")));
    let ids: Vec<i64> = ids["input_ids"]
        .2
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let refs = raw_tensors(&read(&golden("ref_logits.safetensors")));
    let want = f32s(&refs["bnb_nf4_dq_f32compute"].2);
    let (seqs, len, vocab) = (3, 11, 257);
    let mut worst = 0.0f32;
    for s in 0..seqs {
        let mut arena = vec![0.0f32; m.config.arena_len(len)];
        let mut decoder = Decoder::new(m.config, len, &mut arena).unwrap();
        for p in 0..len {
            let logits = decoder
                .step(&model, &NoAdapter, ids[s * len + p] as usize, p)
                .unwrap();
            let reference = &want[(s * len + p) * vocab..][..vocab];
            for (a, b) in logits.iter().zip(reference) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    eprintln!("max |logit diff| {worst:e}, max |logit| {scale}");
    assert!(
        worst <= 1e-5 * scale.max(1.0),
        "max |logit diff| {worst} (logits up to {scale})"
    );
}

#[test]
fn fingerprint_ignores_storage_dtype_and_sees_every_value() {
    let base = golden_base();
    let quantized = quantize_base(&base);
    let dense = dense_of(&base);
    let cfg = base.config.to_decoder_config();
    let fp = |dense: &[(String, Vec<usize>, Vec<f32>)],
              quantized: &std::collections::BTreeMap<String, Nf4Weight>| {
        let q: Vec<(&str, &Nf4Weight)> = quantized.iter().map(|(n, w)| (n.as_str(), w)).collect();
        let d: Vec<(&str, &[usize], &[f32])> = dense
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
            .collect();
        model_fingerprint(&cfg, &q, &d)
    };
    let reference = fp(&dense, &quantized);
    // The bitsandbytes checkpoint (dense in f32, NF4 from bitsandbytes) is the same model.
    let ckpt = bnb::read_checkpoint(&golden("bnb_nf4_dq")).unwrap();
    let bnb_dense: Vec<_> = ckpt
        .dense
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone(), t.data.clone()))
        .collect();
    assert_eq!(fp(&bnb_dense, &ckpt.quantized), reference);
    // Any change is seen.
    let mut changed = dense.clone();
    changed[0].2[3] += 1.0 / 128.0;
    assert_ne!(fp(&changed, &quantized), reference);
    let mut requant = quantized.clone();
    requant.values_mut().next().unwrap().packed[0] ^= 1;
    assert_ne!(fp(&dense, &requant), reference);
}

/// Rewrites the header CRC after a patch so the checks behind it are reached.
fn reseal(bytes: &mut [u8]) {
    let header_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..124]);
    h.update(&bytes[128..header_len]);
    let crc = h.finalize();
    bytes[124..128].copy_from_slice(&crc.to_le_bytes());
}

fn parse(bytes: &[u8]) -> Result<(), FormatError> {
    DeviceModelReader::parse(AlignedBytes::from_slice(bytes).as_bytes()).map(|_| ())
}

#[test]
fn bad_files_get_typed_errors() {
    let m = golden_bnb_model();
    let good = write(&m, ElementType::F32).unwrap();
    parse(&good).unwrap();
    let table = device_model::TABLE_OFFSET;
    let entry = |i: usize| table + 64 * i;
    let patched = |at: usize, patch: &[u8], seal: bool| {
        let mut b = good.clone();
        b[at..at + patch.len()].copy_from_slice(patch);
        if seal {
            reseal(&mut b);
        }
        parse(&b)
    };

    assert_eq!(patched(0, b"XXXXXXXX", false), Err(FormatError::BadMagic));
    assert_eq!(
        patched(8, &7u16.to_le_bytes(), false),
        Err(FormatError::UnsupportedVersion {
            found: 7,
            supported: 1
        })
    );
    assert!(matches!(
        patched(40, &[1], false),
        Err(FormatError::ChecksumMismatch {
            field: Field::HeaderChecksum,
            ..
        })
    ));
    // Truncated anywhere, or with bytes appended.
    for cut in [0, 7, 100, 1000, good.len() / 2, good.len() - 1] {
        assert!(
            matches!(parse(&good[..cut]), Err(FormatError::Truncated { .. })),
            "cut {cut}"
        );
    }
    let mut long = good.clone();
    long.extend_from_slice(&[0; 64]);
    assert!(matches!(
        parse(&long),
        Err(FormatError::TrailingBytes { .. })
    ));
    // A header length that claims gigabytes.
    assert!(matches!(
        patched(24, &(1u64 << 40).to_le_bytes(), false),
        Err(FormatError::Truncated {
            field: Field::HeaderLen,
            ..
        })
    ));
    assert!(matches!(
        patched(16, &u32::MAX.to_le_bytes(), true),
        Err(FormatError::TooLarge {
            field: Field::NamesLen,
            ..
        })
    ));
    assert!(matches!(
        patched(12, &u32::MAX.to_le_bytes(), true),
        Err(FormatError::TooLarge {
            field: Field::TensorCount,
            ..
        })
    ));
    // Config: zero heads.
    assert!(matches!(
        patched(56 + 16, &0u32.to_le_bytes(), true),
        Err(FormatError::Core(_))
    ));
    // A flipped bit in tensor data.
    let data_start =
        u64::from_le_bytes(good[entry(5) + 32..entry(5) + 40].try_into().unwrap()) as usize;
    let mut flipped = good.clone();
    flipped[data_start + 3] ^= 0x10;
    assert!(matches!(
        parse(&flipped),
        Err(FormatError::ChecksumMismatch {
            field: Field::TensorChecksum,
            index: 5,
            ..
        })
    ));
    // Regions: overlapping the previous one, misaligned, of the wrong length, past the end.
    let offset_of =
        |i: usize| u64::from_le_bytes(good[entry(i) + 32..entry(i) + 40].try_into().unwrap());
    assert!(matches!(
        patched(entry(6) + 32, &offset_of(5).to_le_bytes(), true),
        Err(FormatError::Overlap {
            field: Field::TensorData,
            index: 6,
            ..
        })
    ));
    assert!(matches!(
        patched(entry(6) + 32, &(offset_of(6) + 8).to_le_bytes(), true),
        Err(FormatError::Misaligned { .. })
    ));
    assert!(matches!(
        patched(entry(6) + 40, &1u64.to_le_bytes(), true),
        Err(FormatError::InvalidValue {
            field: Field::TensorData,
            ..
        })
    ));
    let mut short = good[..good.len() - 64].to_vec();
    let new_len = short.len() as u64;
    short[32..40].copy_from_slice(&new_len.to_le_bytes());
    reseal(&mut short);
    assert!(matches!(
        parse(&short),
        Err(FormatError::OutOfBounds {
            field: Field::TensorData,
            ..
        })
    ));
    // Kind, shape and blocksize of an entry.
    assert!(matches!(
        patched(entry(0) + 8, &[9], true),
        Err(FormatError::InvalidValue {
            field: Field::TensorKind,
            value: 9
        })
    ));
    assert!(matches!(
        patched(entry(0) + 12, &0u32.to_le_bytes(), true),
        Err(FormatError::InvalidValue {
            field: Field::TensorShape,
            ..
        })
    ));
    let nf4_entry = (0..29).find(|&i| good[entry(i) + 8] == 2).unwrap();
    assert!(matches!(
        patched(entry(nf4_entry) + 20, &48u32.to_le_bytes(), true),
        Err(FormatError::InvalidValue {
            field: Field::Blocksize,
            value: 48
        })
    ));
    // Names: not sorted, not UTF-8.
    let names = table + 64 * 29;
    assert!(matches!(
        patched(names, b"z", true),
        Err(FormatError::BadName {
            field: Field::TensorName,
            index: 1
        })
    ));
    assert!(matches!(
        patched(names + 1, &[0xC0], true),
        Err(FormatError::BadName {
            field: Field::TensorName,
            index: 0
        })
    ));
    // A buffer at an odd address.
    let aligned = AlignedBytes::from_slice(&[&[0u8][..], &good].concat());
    assert_eq!(
        DeviceModelReader::parse(&aligned.as_bytes()[1..]).map(|_| ()),
        Err(FormatError::BufferMisaligned { align: 4 })
    );
}

#[test]
fn the_writer_refuses_incomplete_or_inconsistent_models() {
    let mut m = golden_bnb_model();
    m.dense
        .retain(|(n, ..)| n != "model.layers.1.input_layernorm.weight");
    let e = write(&m, ElementType::F32);
    assert!(
        matches!(
            e,
            Err(Error::Format(FormatError::ModelTensor {
                tensor: ModelTensor::Norm(NormKind::Input),
                layer: 1,
                problem: Field::TensorName
            }))
        ),
        "{e:?}"
    );

    let mut m = golden_bnb_model();
    m.dense.push(("extra.weight".into(), vec![4], vec![0.0; 4]));
    assert!(matches!(
        write(&m, ElementType::F32),
        Err(Error::Format(FormatError::UnexpectedTensors {
            found: 30,
            expected: 29
        }))
    ));

    let mut m = golden_bnb_model();
    let (name, shape, values) = m
        .dense
        .iter()
        .find(|(n, ..)| n == "model.norm.weight")
        .cloned()
        .unwrap();
    m.dense.retain(|(n, ..)| n != "model.norm.weight");
    m.dense.push((name, vec![shape[0] / 2, 2], values));
    assert!(matches!(
        write(&m, ElementType::F32),
        Err(Error::Format(FormatError::ModelTensor {
            tensor: ModelTensor::FinalNorm,
            problem: Field::TensorShape,
            ..
        }))
    ));

    let mut m = golden_bnb_model();
    m.dense[0].2[0] = 1e6; // beyond f16
    assert!(matches!(
        write(&m, ElementType::F16),
        Err(Error::NonFinite { index: 0, .. })
    ));
    assert!(matches!(
        write(&golden_bnb_model(), ElementType::Bf16),
        Err(Error::Invalid(_))
    ));

    let mut m = golden_bnb_model();
    m.quantized[0].1.code8[3] += 0.5;
    assert!(
        matches!(write(&m, ElementType::F32), Err(Error::Invalid(ref msg)) if msg.contains("8-bit absmax code"))
    );
}
