//! NF4 + double quantization against vectors written by bitsandbytes 0.50.2 itself (CUDA
//! `quantize_4bit(blocksize=64, quant_type="nf4")`, with and without `compress_statistics`), see
//! `data/golden/make_golden.py`. Every comparison is on bits.

use half::bf16;
use qdylora_core::double_quant::{self, DoubleQuantRef};
use qdylora_core::dynamic_map::signed_dynamic_map;
use qdylora_core::nf4;
use safetensors::{Dtype, SafeTensors};

const RAW: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/golden/bnb_raw.safetensors"
);

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn load() -> Self {
        Self {
            bytes: std::fs::read(RAW).expect("golden file"),
        }
    }
    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
}

fn raw(st: &SafeTensors<'_>, name: &str, dtype: Dtype) -> Vec<u8> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
    assert_eq!(t.dtype(), dtype, "{name}");
    t.data().to_vec()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn bf16s(bytes: &[u8]) -> Vec<bf16> {
    bytes
        .chunks_exact(2)
        .map(|c| bf16::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn assert_f32_bits(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{what}[{i}]: ours {a:e}, bnb {b:e}"
        );
    }
}

fn assert_bytes(ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let diffs: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
    assert!(
        diffs.is_empty(),
        "{what}: {} of {} bytes differ, first at {}",
        diffs.len(),
        ours.len(),
        diffs[0]
    );
}

const CASES: [&str; 6] = ["t0", "t1", "t2", "t3", "t4", "t5"];

#[test]
fn dynamic_map_equals_bitsandbytes() {
    let g = Golden::load();
    let st = g.tensors();
    let ours = signed_dynamic_map();
    for case in CASES {
        let theirs = f32s(&raw(&st, &format!("{case}.nested_code"), Dtype::F32));
        assert_f32_bits(&ours, &theirs, &format!("{case}.nested_code"));
    }
}

#[test]
fn nf4_without_double_quant_is_bit_exact() {
    let g = Golden::load();
    let st = g.tensors();
    for case in CASES {
        let w = bf16s(&raw(&st, &format!("{case}.weight"), Dtype::BF16));
        let mut packed = vec![0u8; nf4::packed_len(w.len())];
        let mut absmax = vec![0.0f32; nf4::block_count(w.len(), 64)];
        nf4::quantize(&w, 64, &mut packed, &mut absmax).unwrap();
        let want_packed = raw(&st, &format!("{case}.packed_nodq"), Dtype::U8);
        let want_absmax = f32s(&raw(&st, &format!("{case}.absmax_f32_nodq"), Dtype::F32));
        assert_bytes(&packed, &want_packed, &format!("{case}.packed_nodq"));
        assert_f32_bits(&absmax, &want_absmax, &format!("{case}.absmax_f32_nodq"));
    }
}

#[test]
fn nf4_with_double_quant_is_bit_exact_and_dequantizes_like_bnb() {
    let g = Golden::load();
    let st = g.tensors();
    let code = signed_dynamic_map();
    let mut total = 0;
    for case in CASES {
        let w = bf16s(&raw(&st, &format!("{case}.weight"), Dtype::BF16));
        let n = w.len();
        total += n;
        let blocks = nf4::block_count(n, 64);
        let mut packed = vec![0u8; nf4::packed_len(n)];
        let mut absmax = vec![0.0f32; blocks];
        let mut codes = vec![0u8; blocks];
        let mut nested = vec![0.0f32; double_quant::nested_block_count(blocks)];
        let offset = double_quant::quantize_nf4_double(
            &code,
            &w,
            64,
            &mut packed,
            &mut absmax,
            &mut codes,
            &mut nested,
        )
        .unwrap();

        assert_bytes(
            &packed,
            &raw(&st, &format!("{case}.packed"), Dtype::U8),
            case,
        );
        assert_bytes(
            &codes,
            &raw(&st, &format!("{case}.absmax_u8"), Dtype::U8),
            &format!("{case}.absmax_u8"),
        );
        assert_f32_bits(
            &nested,
            &f32s(&raw(&st, &format!("{case}.nested_absmax"), Dtype::F32)),
            &format!("{case}.nested_absmax"),
        );
        assert_f32_bits(
            &[offset],
            &f32s(&raw(&st, &format!("{case}.offset"), Dtype::F32)),
            &format!("{case}.offset"),
        );

        let dq = DoubleQuantRef::new(&code, &codes, &nested, offset).unwrap();
        let mut deq = vec![bf16::ZERO; n];
        nf4::dequantize(&packed, &dq, 64, &mut deq).unwrap();
        let want = bf16s(&raw(&st, &format!("{case}.dequant_bf16"), Dtype::BF16));
        for (i, (a, b)) in deq.iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{case}.dequant_bf16[{i}]: {a} vs {b}"
            );
        }
    }
    // The cases include one tensor of more than a million elements.
    assert!(total > 1_000_000);
}
