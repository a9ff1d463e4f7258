//! Property tests of the core: packing, quantization error bounds, double-quant reconstruction,
//! and the nested-rank size and budget rules.

use proptest::prelude::*;
use qdylora_core::ElementType;
use qdylora_core::double_quant::{self, DoubleQuantRef};
use qdylora_core::dynamic_map::{self, signed_dynamic_map};
use qdylora_core::nf4::{self, AbsmaxSource};
use qdylora_core::rank::{AdapterShape, ModuleShape, PrefixLayout, Scaling};

fn blocksize() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![32usize, 64, 128, 256, 4096])
}

/// Values spread over many magnitudes, with exact zeros mixed in.
fn weights(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            8 => -10.0f32..10.0,
            1 => Just(0.0f32),
            1 => -1e-20f32..1e-20,
        ],
        1..max_len,
    )
}

/// Distance from a scaled value to the nearest 8-bit code: at most half the local gap inside the
/// code's range [-0.99297, 1], the clamping distance below it.
fn code8_nearest_distance(code: &[f32; 256], t: f32) -> f32 {
    code.iter()
        .map(|&c| (c - t).abs())
        .fold(f32::INFINITY, f32::min)
}

proptest! {
    #[test]
    fn pack_unpack_identity(indices in prop::collection::vec(0u8..16, 0..300)) {
        let mut packed = vec![0u8; nf4::packed_len(indices.len())];
        nf4::pack_indices(&indices, &mut packed).unwrap();
        let mut back = vec![0u8; indices.len()];
        nf4::unpack_indices(&packed, &mut back).unwrap();
        prop_assert_eq!(&back, &indices);
        // Even elements sit in the high nibble.
        if let Some(&first) = indices.first() {
            prop_assert_eq!(packed[0] >> 4, first);
        }
    }

    #[test]
    fn quantization_error_is_within_half_the_local_gap(w in weights(700), bs in blocksize()) {
        let mut packed = vec![0u8; nf4::packed_len(w.len())];
        let mut absmax = vec![0.0f32; nf4::block_count(w.len(), bs)];
        nf4::quantize(&w, bs, &mut packed, &mut absmax).unwrap();
        let mut deq = vec![0.0f32; w.len()];
        nf4::dequantize(&packed, &absmax[..], bs, &mut deq).unwrap();
        for (i, (&x, &d)) in w.iter().zip(&deq).enumerate() {
            let a = absmax[i / bs];
            prop_assert!(x.abs() <= a);
            if a == 0.0 {
                prop_assert_eq!(d, 0.0);
                continue;
            }
            let q = nf4::unpack_index(&packed, i);
            let bound = nf4::half_gap(q, x / a) * a;
            prop_assert!(
                (d - x).abs() <= bound + a * 1e-6,
                "element {} = {} dequantized to {}, bound {}", i, x, d, bound
            );
        }
    }

    #[test]
    fn double_quant_reconstruction_is_within_the_nearest_code_distance(
        absmax in prop::collection::vec(0.0f32..4.0, 1..1200)
    ) {
        let code = signed_dynamic_map();
        let mut codes = vec![0u8; absmax.len()];
        let mut nested = vec![0.0f32; double_quant::nested_block_count(absmax.len())];
        let offset = double_quant::compress(&code, &absmax, &mut codes, &mut nested).unwrap();
        let dq = DoubleQuantRef::new(&code, &codes, &nested, offset).unwrap();
        for (i, &a) in absmax.iter().enumerate() {
            let n = nested[i / double_quant::NESTED_BLOCKSIZE];
            let t = if n == 0.0 { 0.0 } else { (a - offset) / n };
            let bound = code8_nearest_distance(&code, t) * n;
            let err = (dq.absmax(i) - a).abs();
            prop_assert!(
                err <= bound + 1e-6 * (n + offset.abs()),
                "absmax[{}] = {} reconstructed {} (err {}, bound {})", i, a, dq.absmax(i), err, bound
            );
        }
    }

    #[test]
    fn eight_bit_quantizer_picks_the_nearest_code(t in -1.0f32..=1.0) {
        let code = signed_dynamic_map();
        let q = dynamic_map::quantize_scaled(&code, t);
        let c = code[usize::from(q)];
        // Nearest up to the rounding of the midpoint the kernel compares against.
        prop_assert!((c - t).abs() <= code8_nearest_distance(&code, t) + 1e-7);
    }

    #[test]
    fn prefix_size_is_monotone_and_additive(
        dims in prop::collection::vec((1u32..5000, 1u32..5000), 1..12),
        r_max in 1u32..128,
        header in 0u64..10_000,
        align_pow in 0u32..7,
        dtype in prop::sample::select(vec![ElementType::F32, ElementType::F16, ElementType::Bf16]),
    ) {
        let modules: Vec<ModuleShape> = dims
            .iter()
            .map(|&(i, o)| ModuleShape { in_features: i, out_features: o })
            .collect();
        let shape = AdapterShape { modules: &modules, r_max, alpha: 16.0, dtype, scaling: Scaling::AlphaOverRank };
        let layout = PrefixLayout { header_bytes: header, slice_align: 1 << align_pow };
        let body = |r: u32| shape.prefix_bytes(layout, r).unwrap() - header;
        let raw: u64 = dims.iter().map(|&(i, o)| u64::from(i + o)).sum::<u64>() * dtype.size_bytes() as u64;
        prop_assert!(body(1) >= raw && body(1) < raw + (1 << align_pow));
        for a in 0..=r_max {
            if a < r_max {
                prop_assert!(body(a + 1) > body(a));
            }
            for b in 0..=(r_max - a) {
                prop_assert_eq!(body(a + b), body(a) + body(b));
            }
        }
        prop_assert!(shape.prefix_bytes(layout, r_max + 1).is_err());
    }

    #[test]
    fn budget_choice_is_the_largest_fitting_rank(
        dims in prop::collection::vec((1u32..3000, 1u32..3000), 1..8),
        r_max in 1u32..96,
        header in 0u64..4096,
        budget in 0u64..4_000_000,
    ) {
        let modules: Vec<ModuleShape> = dims
            .iter()
            .map(|&(i, o)| ModuleShape { in_features: i, out_features: o })
            .collect();
        let shape = AdapterShape { modules: &modules, r_max, alpha: 8.0, dtype: ElementType::F16, scaling: Scaling::AlphaOverRank };
        let layout = PrefixLayout { header_bytes: header, slice_align: 64 };
        match shape.max_rank_within(layout, budget) {
            Ok(r) => {
                prop_assert!(r >= 1 && r <= r_max);
                prop_assert!(shape.prefix_bytes(layout, r).unwrap() <= budget);
                if r < r_max {
                    prop_assert!(shape.prefix_bytes(layout, r + 1).unwrap() > budget);
                }
            }
            Err(qdylora_core::Error::BudgetTooSmall { rank_one_bytes, .. }) => {
                prop_assert_eq!(rank_one_bytes, shape.prefix_bytes(layout, 1).unwrap());
                prop_assert!(budget < rank_one_bytes);
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

#[test]
fn blocks_of_any_size_round_trip_through_dequantize_generic_outputs() {
    // f16 and bf16 outputs are the f32 result rounded once.
    let w: Vec<f32> = (0..200)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut packed = vec![0u8; nf4::packed_len(w.len())];
    let mut absmax = vec![0.0f32; nf4::block_count(w.len(), 64)];
    nf4::quantize(&w, 64, &mut packed, &mut absmax).unwrap();
    let mut f = vec![0.0f32; w.len()];
    let mut h = vec![half::f16::ZERO; w.len()];
    let mut b = vec![half::bf16::ZERO; w.len()];
    nf4::dequantize(&packed, &absmax[..], 64, &mut f).unwrap();
    nf4::dequantize(&packed, &absmax[..], 64, &mut h).unwrap();
    nf4::dequantize(&packed, &absmax[..], 64, &mut b).unwrap();
    for i in 0..w.len() {
        assert_eq!(h[i], half::f16::from_f32(f[i]));
        assert_eq!(b[i], half::bf16::from_f32(f[i]));
    }
    assert_eq!(absmax.blocks(), 4);
}
