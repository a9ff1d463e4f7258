//! The nested adapter bundle: round trips, truncation at every byte, bit flips, the rank-r view
//! against the PEFT export and the original tensors, and every bad-header class.

mod formats_common;

use half::{bf16, f16};
use proptest::prelude::*;
use qdylora_core::ElementType;
use qdylora_core::infer::{LinearDelta, LinearKind};
use qdylora_core::rank::Scaling;
use qdylora_formats::bundle::{self, BundleMeta, BundleReader, ModuleTensors, write_bundle};
use qdylora_formats::{Field, FormatError, peft};

/// What a reader must give back for `v` stored as `dtype`.
fn rounded(dtype: ElementType, v: f32) -> f32 {
    match dtype {
        ElementType::F32 => v,
        ElementType::F16 => f16::from_f32(v).to_f32(),
        ElementType::Bf16 => bf16::from_f32(v).to_f32(),
    }
}

fn module(name: &str, in_features: u32, out_features: u32, r_max: u32, seed: u32) -> ModuleTensors {
    let value =
        |i: usize| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0;
    ModuleTensors {
        name: name.into(),
        in_features,
        out_features,
        a: (0..(r_max * in_features) as usize).map(value).collect(),
        b: (0..(out_features * r_max) as usize)
            .map(|i| value(i + 7))
            .collect(),
    }
}

fn meta(r_max: u32, dtype: ElementType) -> BundleMeta {
    BundleMeta {
        r_max,
        alpha: 16.0,
        dtype,
        scaling: Scaling::AlphaOverRank,
        fingerprint: [7; 16],
    }
}

/// A small bundle: two decoder linears of layer 0 and one of layer 10, r_max 3, f16.
fn small() -> (BundleMeta, Vec<ModuleTensors>, Vec<u8>) {
    let meta = meta(3, ElementType::F16);
    let modules = vec![
        module("model.layers.0.self_attn.q_proj", 5, 3, 3, 1),
        module("model.layers.10.mlp.down_proj", 4, 5, 3, 2),
        module("model.layers.0.mlp.up_proj", 5, 6, 3, 3),
    ];
    let bytes = write_bundle(&meta, &modules).unwrap();
    (meta, modules, bytes)
}

fn check_against(
    reader: &BundleReader<'_>,
    modules: &[ModuleTensors],
    dtype: ElementType,
    ranks: u32,
) {
    assert_eq!(reader.module_count(), modules.len());
    for m in modules {
        let i = reader.find_module(&m.name).unwrap();
        let info = reader.module(i).unwrap();
        assert_eq!(
            (info.name, info.in_features, info.out_features),
            (m.name.as_str(), m.in_features, m.out_features)
        );
        let (inf, outf, r_max) = (
            m.in_features as usize,
            m.out_features as usize,
            reader.r_max() as usize,
        );
        for k in 0..ranks {
            let a = reader.a_row(i, k).unwrap().to_f32_vec();
            let b = reader.b_col(i, k).unwrap().to_f32_vec();
            let k = k as usize;
            let want_a: Vec<f32> = m.a[k * inf..(k + 1) * inf]
                .iter()
                .map(|&v| rounded(dtype, v))
                .collect();
            let want_b: Vec<f32> = (0..outf)
                .map(|j| rounded(dtype, m.b[j * r_max + k]))
                .collect();
            assert_eq!(a, want_a, "{} A row {k}", m.name);
            assert_eq!(b, want_b, "{} B col {k}", m.name);
        }
    }
}

#[test]
fn small_bundle_round_trips_and_is_sized_by_core_math() {
    let (meta, modules, bytes) = small();
    let r = BundleReader::parse(&bytes).unwrap();
    assert_eq!(
        (r.r_max(), r.alpha(), r.dtype(), r.scaling()),
        (3, 16.0, ElementType::F16, Scaling::AlphaOverRank)
    );
    assert_eq!(r.fingerprint(), meta.fingerprint);
    assert_eq!(r.complete_rank(), 3);
    // Slice = sum(in + out) * 2 bytes = (8 + 9 + 11) * 2 = 56, padded to 64.
    assert_eq!(r.slice_len(), 64);
    assert_eq!(r.header_len() % 64, 0);
    assert_eq!(bytes.len(), r.header_len() + 3 * 64);
    assert_eq!(r.prefix_len(2).unwrap(), r.header_len() + 128);
    // Sorted by name: layers.0.mlp < layers.0.self_attn < layers.10.
    let names: Vec<_> = (0..3).map(|i| r.module(i).unwrap().name).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.mlp.up_proj",
            "model.layers.0.self_attn.q_proj",
            "model.layers.10.mlp.down_proj"
        ]
    );
    assert_eq!(r.find_module("model.layers.1.mlp.up_proj"), None);
    check_against(&r, &modules, ElementType::F16, 3);
    // Budgets: by prefix size, capped by what is present.
    assert_eq!(
        r.rank_for_budget(r.prefix_len(2).unwrap() as u64).unwrap(),
        2
    );
    assert_eq!(r.rank_for_budget(u64::MAX).unwrap(), 3);
    assert!(matches!(
        r.rank_for_budget(10),
        Err(FormatError::Core(
            qdylora_core::Error::BudgetTooSmall { .. }
        ))
    ));
    // The header alone tells a device how much to read.
    assert_eq!(
        BundleReader::header_len_of(&bytes[..64]).unwrap(),
        r.header_len()
    );
    let header_only = BundleReader::parse(&bytes[..r.header_len()]).unwrap();
    assert_eq!(header_only.complete_rank(), 0);
    assert_eq!(header_only.prefix_len(3).unwrap(), bytes.len());
    assert!(matches!(
        header_only.at_rank(1),
        Err(FormatError::RankUnavailable {
            rank: 1,
            complete_rank: 0
        })
    ));
    assert!(matches!(
        r.a_row(0, 3),
        Err(FormatError::RankUnavailable {
            rank: 4,
            complete_rank: 3
        })
    ));
    assert!(matches!(
        r.module(3),
        Err(FormatError::IndexOutOfRange { .. })
    ));
}

#[test]
fn truncation_at_every_byte_gives_the_whole_slices_before_the_cut() {
    let (_, modules, bytes) = small();
    let full = BundleReader::parse(&bytes).unwrap();
    let (header, slice) = (full.header_len(), full.slice_len());
    for cut in 0..=bytes.len() {
        let result = BundleReader::parse(&bytes[..cut]);
        if cut < header {
            let err = result.expect_err("a cut header must not parse");
            assert!(
                matches!(err, FormatError::Truncated { .. }),
                "cut {cut}: {err:?}"
            );
        } else {
            let r = result.unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            let want = ((cut - header) / slice) as u32;
            assert_eq!(r.complete_rank(), want, "cut at {cut}");
            check_against(&r, &modules, ElementType::F16, want);
        }
    }
}

#[test]
fn a_flipped_bit_in_a_slice_lowers_the_complete_rank_and_in_the_header_is_an_error() {
    let (_, _, bytes) = small();
    let full = BundleReader::parse(&bytes).unwrap();
    let (header, slice) = (full.header_len(), full.slice_len());
    for byte in 0..bytes.len() {
        for bit in [0u8, 3, 7] {
            let mut bad = bytes.clone();
            bad[byte] ^= 1 << bit;
            let result = BundleReader::parse(&bad);
            if byte < header {
                assert!(
                    result.is_err(),
                    "flip at header byte {byte} bit {bit} was accepted"
                );
            } else {
                let r = result.unwrap();
                assert_eq!(
                    r.complete_rank(),
                    ((byte - header) / slice) as u32,
                    "flip at {byte}"
                );
            }
        }
    }
}

#[test]
fn header_errors_are_typed() {
    let (_, _, bytes) = small();
    let header = BundleReader::parse(&bytes).unwrap().header_len();
    let with = |at: usize, patch: &[u8]| {
        let mut b = bytes.clone();
        b[at..at + patch.len()].copy_from_slice(patch);
        BundleReader::parse(&b).map(|_| ())
    };
    // Recomputes the header CRC, so the field checks behind it are reached.
    let with_crc = |at: usize, patch: &[u8]| {
        let mut b = bytes.clone();
        b[at..at + patch.len()].copy_from_slice(patch);
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..60]);
        h.update(&b[64..header]);
        let crc = h.finalize();
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        BundleReader::parse(&b).map(|_| ())
    };
    assert_eq!(with(0, b"NOTABNDL"), Err(FormatError::BadMagic));
    assert_eq!(
        BundleReader::parse(&bytes[..5]).map(|_| ()),
        Err(FormatError::Truncated {
            field: Field::Magic,
            needed: 8,
            available: 5
        })
    );
    assert_eq!(
        with(8, &2u16.to_le_bytes()),
        Err(FormatError::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    );
    // A header length that claims gigabytes: the buffer is too short, nothing is allocated.
    assert!(matches!(
        with(12, &0xC000_0000u32.to_le_bytes()),
        Err(FormatError::Truncated {
            field: Field::HeaderLen,
            needed: 0xC000_0000,
            ..
        })
    ));
    assert!(matches!(
        with(12, &100u32.to_le_bytes()),
        Err(FormatError::InvalidValue {
            field: Field::HeaderLen,
            ..
        })
    ));
    assert!(matches!(
        with(40, &[0xAA]),
        Err(FormatError::ChecksumMismatch {
            field: Field::HeaderChecksum,
            ..
        })
    ));
    assert!(matches!(
        with_crc(10, &[9]),
        Err(FormatError::InvalidValue {
            field: Field::ElementType,
            value: 9
        })
    ));
    assert!(matches!(
        with_crc(11, &[5]),
        Err(FormatError::InvalidValue {
            field: Field::Scaling,
            value: 5
        })
    ));
    assert!(matches!(
        with_crc(16, &0u32.to_le_bytes()),
        Err(FormatError::InvalidValue {
            field: Field::RMax,
            ..
        })
    ));
    assert!(matches!(
        with_crc(16, &u32::MAX.to_le_bytes()),
        Err(FormatError::TooLarge {
            field: Field::RMax,
            ..
        })
    ));
    assert!(matches!(
        with_crc(20, &u32::MAX.to_le_bytes()),
        Err(FormatError::TooLarge {
            field: Field::ModuleCount,
            ..
        })
    ));
    assert!(matches!(
        with_crc(24, &f32::NAN.to_le_bytes()),
        Err(FormatError::InvalidValue {
            field: Field::Alpha,
            ..
        })
    ));
    // Counts that disagree with the header length.
    assert!(matches!(
        with_crc(16, &100u32.to_le_bytes()),
        Err(FormatError::InvalidValue {
            field: Field::HeaderLen,
            ..
        })
    ));
    assert!(matches!(
        with_crc(28, &1u32.to_le_bytes()),
        Err(FormatError::InvalidValue {
            field: Field::HeaderLen,
            ..
        })
    ));
    assert!(matches!(
        with_crc(32, &128u64.to_le_bytes()),
        Err(FormatError::InvalidValue {
            field: Field::SliceLen,
            value: 128
        })
    ));
    // Module table: a name offset that overlaps the previous name, shapes, slice offsets.
    let entry = |i: usize| 64 + 24 * i;
    assert!(matches!(
        with_crc(entry(1), &0u32.to_le_bytes()),
        Err(FormatError::Overlap {
            field: Field::ModuleName,
            index: 1,
            ..
        })
    ));
    assert!(matches!(
        with_crc(entry(1) + 8, &0u32.to_le_bytes()),
        Err(FormatError::InvalidValue {
            field: Field::ModuleShape,
            ..
        })
    ));
    assert!(matches!(
        with_crc(entry(2) + 16, &8u64.to_le_bytes()),
        Err(FormatError::InvalidValue {
            field: Field::ModuleOffset,
            value: 8
        })
    ));
    // A name length reaching past the name area.
    assert!(matches!(
        with_crc(entry(2) + 4, &1000u32.to_le_bytes()),
        Err(FormatError::OutOfBounds {
            field: Field::ModuleName,
            index: 2,
            ..
        })
    ));
    // Names out of order, and not UTF-8.
    let names = 64 + 24 * 3;
    assert!(matches!(
        with_crc(names, b"z"),
        Err(FormatError::BadName {
            field: Field::ModuleName,
            index: 1
        })
    ));
    assert!(matches!(
        with_crc(names + 3, &[0xFF]),
        Err(FormatError::BadName {
            field: Field::ModuleName,
            index: 0
        })
    ));
    // Bytes after the last slice.
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        BundleReader::parse(&long),
        Err(FormatError::TrailingBytes { .. })
    ));
}

#[test]
fn the_rank_view_equals_the_peft_export_equals_the_original_slices() {
    let (meta, modules, bytes) = small();
    let reader = BundleReader::parse(&bytes).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for r in 1..=3u32 {
        // PEFT export written and read back through files.
        let adapter = peft::from_bundle_rank(&reader, r).unwrap();
        let dir = tmp.path().join(format!("r{r}"));
        adapter.write(&dir).unwrap();
        let read = peft::read_adapter(&dir).unwrap();
        assert_eq!(read.config.r, r);
        assert_eq!(read.config.scale(), meta.alpha / r as f32);
        let view = reader.at_rank(r).unwrap();
        assert_eq!(view.scale(), read.config.scale());
        for m in &modules {
            let pair = &read.modules[&m.name];
            let (inf, outf, rr, rm) = (
                m.in_features as usize,
                m.out_features as usize,
                r as usize,
                3usize,
            );
            // PEFT tensors = slices of the original tensors (after f16 rounding).
            let want_a: Vec<f32> = m.a[..rr * inf]
                .iter()
                .map(|&v| rounded(ElementType::F16, v))
                .collect();
            let want_b: Vec<f32> = (0..outf * rr)
                .map(|i| rounded(ElementType::F16, m.b[(i / rr) * rm + i % rr]))
                .collect();
            assert_eq!(pair.a, want_a, "{} A[:{r}]", m.name);
            assert_eq!(pair.b, want_b, "{} B[:, :{r}]", m.name);
            // The view applied to x equals scale * B_r (A_r x) from the PEFT tensors.
            let x: Vec<f32> = (0..inf).map(|i| i as f32 * 0.25 - 0.5).collect();
            let ax: Vec<f32> = (0..rr)
                .map(|k| (0..inf).map(|i| pair.a[k * inf + i] * x[i]).sum())
                .collect();
            let want: Vec<f32> = (0..outf)
                .map(|j| {
                    1.0 + read.config.scale()
                        * (0..rr).map(|k| pair.b[j * rr + k] * ax[k]).sum::<f32>()
                })
                .collect();
            let (layer, kind) = parse_linear(&m.name);
            let mut y = vec![1.0f32; outf];
            view.apply(layer, kind, &x, &mut y).unwrap();
            for (got, want) in y.iter().zip(&want) {
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{}: {got} vs {want}",
                    m.name
                );
            }
        }
        // A linear without a module adds nothing; a wrong input width is an error.
        let mut y = vec![1.0f32; 3];
        view.apply(5, LinearKind::Q, &[1.0; 5], &mut y).unwrap();
        assert_eq!(y, [1.0; 3]);
        assert!(view.apply(0, LinearKind::Q, &[1.0; 4], &mut y).is_err());
    }
}

fn parse_linear(name: &str) -> (usize, LinearKind) {
    let rest = name.strip_prefix("model.layers.").unwrap();
    let (layer, path) = rest.split_once('.').unwrap();
    let kind = LinearKind::ALL
        .into_iter()
        .find(|k| k.layer_path() == path)
        .unwrap();
    (layer.parse().unwrap(), kind)
}

#[test]
fn writer_rejects_bad_arguments() {
    let m = meta(2, ElementType::F32);
    let ok = module("m", 2, 2, 2, 0);
    assert!(write_bundle(&m, &[]).is_err());
    assert!(write_bundle(&meta(0, ElementType::F32), std::slice::from_ref(&ok)).is_err());
    let mut short = ok.clone();
    short.a.pop();
    assert!(write_bundle(&m, &[short]).is_err());
    let mut nan = ok.clone();
    nan.b[1] = f32::NAN;
    assert!(matches!(
        write_bundle(&m, &[nan]),
        Err(qdylora_formats::Error::NonFinite { index: 5, .. })
    ));
    assert!(write_bundle(&m, &[ok.clone(), ok]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_bundles_round_trip(
        shapes in prop::collection::vec((1u32..40, 1u32..40), 1..6),
        r_max in 1u32..6,
        dtype in prop::sample::select(vec![ElementType::F32, ElementType::F16, ElementType::Bf16]),
        sqrt in any::<bool>(),
        alpha in -64.0f32..64.0,
        seed in any::<u32>(),
    ) {
        let modules: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(inf, outf))| module(&format!("model.layers.{}.m{i}", seed % 13), inf, outf, r_max, seed ^ i as u32))
            .collect();
        let mut meta = meta(r_max, dtype);
        meta.alpha = alpha;
        meta.scaling = if sqrt { Scaling::AlphaOverSqrtRank } else { Scaling::AlphaOverRank };
        let bytes = write_bundle(&meta, &modules).unwrap();
        let r = BundleReader::parse(&bytes).unwrap();
        prop_assert_eq!(r.complete_rank(), r_max);
        prop_assert_eq!((r.alpha(), r.scaling(), r.dtype()), (alpha, meta.scaling, dtype));
        prop_assert_eq!(bytes.len(), r.prefix_len(r_max).unwrap());
        prop_assert_eq!(r.slice_len() % 64, 0);
        check_against(&r, &modules, dtype, r_max);
        // Every rank prefix is itself a valid bundle of that rank.
        for k in 0..=r_max {
            let prefix = BundleReader::parse(&bytes[..r.prefix_len(k).unwrap()]).unwrap();
            prop_assert_eq!(prefix.complete_rank(), k);
        }
        // Zero-copy f32 rows when the buffer allows it.
        if dtype == ElementType::F32 {
            let aligned = qdylora_formats::AlignedBytes::from_slice(&bytes);
            let r = BundleReader::parse(aligned.as_bytes()).unwrap();
            prop_assert!(r.a_row(0, 0).unwrap().as_f32_slice().is_some());
        }
    }
}

#[test]
fn magic_constant_is_the_file_start() {
    let (_, _, bytes) = small();
    assert_eq!(bytes[..8], bundle::MAGIC);
}
