//! On-target tests of the device kernels: the NF4 matvec, the rank-r LoRA update, RMSNorm,
//! softmax and RoPE, each against a plain computation written here (f64 where it matters) or
//! against values known from mathematics.
#![no_std]
#![no_main]

use qdylora_core::nf4::{AbsmaxSource, CODE};
use qdylora_firmware_demo as _;
use qdylora_firmware_demo::synthetic::fill;

/// `|got - want| <= rel * scale` for every element, `scale` being the size of the sum's terms.
fn assert_close(got: &[f32], want: &[f64], rel: f64, scale: f64) {
    defmt::assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = libm::fabs(f64::from(g) - w);
        defmt::assert!(
            err <= rel * scale,
            "element {}: got {} want {}",
            i,
            g,
            w as f32
        );
    }
}

// 7 rows of 45 with blocks of 32: rows start at odd elements and straddle blocks.
const ROWS: usize = 7;
const COLS: usize = 45;
const BLOCKSIZE: usize = 32;
const N: usize = ROWS * COLS;
const BLOCKS: usize = N.div_ceil(BLOCKSIZE);

/// `W x` from the definition `w = CODE[nibble] * absmax[block]`, in f64, and `sum |w x|` per row.
fn reference_matvec<A: AbsmaxSource + ?Sized>(
    packed: &[u8],
    absmax: &A,
    x: &[f32],
) -> ([f64; ROWS], [f64; ROWS]) {
    let mut y = [0.0f64; ROWS];
    let mut size = [0.0f64; ROWS];
    for e in 0..N {
        let byte = packed[e / 2];
        let code = if e.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        };
        let w = f64::from(CODE[usize::from(code)]) * f64::from(absmax.absmax(e / BLOCKSIZE));
        let term = w * f64::from(x[e % COLS]);
        y[e / COLS] += term;
        size[e / COLS] += libm::fabs(term);
    }
    (y, size)
}

#[defmt_test::tests]
mod tests {
    use qdylora_core::double_quant::{self, DoubleQuantRef};
    use qdylora_core::dynamic_map;
    use qdylora_core::infer::rope;
    use qdylora_core::kernels::{self, Nf4Matrix};
    use qdylora_core::nf4;
    use qdylora_core::rank::Scaling;
    use qdylora_core::{Buffer, Error};

    use super::{BLOCKS, BLOCKSIZE, COLS, N, ROWS, assert_close, fill, reference_matvec};

    #[test]
    fn nf4_matvec_matches_dequantize_then_dot() -> Result<(), Error> {
        let w: [f32; N] = fill(21, 0.8);
        let x: [f32; COLS] = fill(22, 1.5);
        let mut packed = [0u8; N.div_ceil(2)];
        let mut absmax = [0.0f32; BLOCKS];
        nf4::quantize(&w, BLOCKSIZE, &mut packed, &mut absmax)?;

        let m = Nf4Matrix::new(ROWS, COLS, BLOCKSIZE, &packed, &absmax[..])?;
        let mut y = [0.0f32; ROWS];
        m.matvec(&x, &mut y)?;
        let (want, size) = reference_matvec(&packed, &absmax[..], &x);
        for r in 0..ROWS {
            assert_close(&y[r..=r], &want[r..=r], 1e-5, size[r]);
        }

        // The same codes with double-quantized absmax, the device model's layout.
        let map = dynamic_map::signed_dynamic_map();
        let mut codes = [0u8; BLOCKS];
        let mut nested = [0.0f32; 1];
        let offset = double_quant::compress(&map, &absmax, &mut codes, &mut nested)?;
        let dq = DoubleQuantRef::new(&map, &codes, &nested, offset)?;
        let m = Nf4Matrix::new(ROWS, COLS, BLOCKSIZE, &packed, dq)?;
        m.matvec(&x, &mut y)?;
        let (want, size) = reference_matvec(&packed, &dq, &x);
        for r in 0..ROWS {
            assert_close(&y[r..=r], &want[r..=r], 1e-5, size[r]);
        }
        Ok(())
    }

    #[test]
    fn nf4_matvec_rejects_wrong_shapes() {
        let packed = [0u8; N.div_ceil(2)];
        let absmax = [1.0f32; BLOCKS];
        defmt::assert_eq!(
            Nf4Matrix::new(ROWS, COLS, BLOCKSIZE, &packed[1..], &absmax[..]).err(),
            Some(Error::BufferLength {
                buffer: Buffer::Packed,
                expected: N.div_ceil(2),
                actual: N.div_ceil(2) - 1
            })
        );
        let m = Nf4Matrix::new(ROWS, COLS, BLOCKSIZE, &packed, &absmax[..]).unwrap();
        let mut y = [0.0f32; ROWS];
        defmt::assert!(m.matvec(&[0.0; COLS - 1], &mut y).is_err());
        defmt::assert!(m.matvec(&[0.0; COLS], &mut y[1..]).is_err());
        defmt::assert!(m.row_dot(ROWS, &[0.0; COLS]).is_err());
    }

    #[test]
    fn lora_accumulate_matches_the_dense_update_at_every_rank() -> Result<(), Error> {
        const R_MAX: usize = 4;
        const IN: usize = 10;
        const OUT: usize = 6;
        // A is [r_max, in]; B is stored as its columns (B[:, k] contiguous), as a bundle does.
        let a: [[f32; IN]; R_MAX] = core::array::from_fn(|k| fill(30 + k as u32, 1.0));
        let b: [[f32; OUT]; R_MAX] = core::array::from_fn(|k| fill(40 + k as u32, 0.5));
        let x: [f32; IN] = fill(50, 2.0);
        let y0: [f32; OUT] = fill(51, 3.0);
        let alpha = 8.0;
        for r in 1..=R_MAX {
            let scale = Scaling::AlphaOverRank.scale(alpha, r as u32);
            defmt::assert_eq!(scale, alpha / r as f32);
            let mut y = y0;
            let pairs = a.iter().zip(&b).take(r).map(|(a, b)| (&a[..], &b[..]));
            kernels::lora_accumulate(pairs, scale, &x, &mut y)?;

            // y0 + scale * (B[:, :r] A[:r, :]) x, the dense matrix built element by element.
            let mut want = [0.0f64; OUT];
            let mut size = 0.0f64;
            for (o, w) in want.iter_mut().enumerate() {
                let mut delta = 0.0f64;
                for i in 0..IN {
                    let dense: f64 = (0..r)
                        .map(|k| f64::from(b[k][o]) * f64::from(a[k][i]))
                        .sum();
                    delta += dense * f64::from(x[i]);
                    size += libm::fabs(dense * f64::from(x[i]));
                }
                *w = f64::from(y0[o]) + f64::from(scale) * delta;
            }
            assert_close(&y, &want, 1e-5, size.max(1.0));
        }
        let mut y = y0;
        let short = [(&a[0][..], &b[0][..OUT - 1])];
        defmt::assert!(kernels::lora_accumulate(short, 1.0, &x, &mut y).is_err());
        Ok(())
    }

    #[test]
    fn rms_norm_matches_its_definition() -> Result<(), Error> {
        const H: usize = 37;
        let x: [f32; H] = fill(60, 4.0);
        let weight: [f32; H] = fill(61, 1.0);
        let eps = 1e-5f32;
        let mut out = [0.0f32; H];
        kernels::rms_norm(&x, &weight[..], eps, &mut out)?;
        let mean_sq = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / H as f64;
        let inv = 1.0 / libm::sqrt(mean_sq + f64::from(eps));
        let want: [f64; H] = core::array::from_fn(|i| f64::from(weight[i]) * f64::from(x[i]) * inv);
        assert_close(&out, &want, 1e-6, 1.0);

        // A constant vector normalizes to the weight (eps 0): 2 / sqrt(4) = 1.
        let mut ones = [0.0f32; 16];
        kernels::rms_norm(&[2.0f32; 16], &[0.5f32; 16][..], 0.0, &mut ones)?;
        defmt::assert_eq!(ones, [0.5f32; 16]);

        defmt::assert!(kernels::rms_norm(&x, &weight[1..], eps, &mut out).is_err());
        Ok(())
    }

    #[test]
    fn softmax_gives_known_probabilities() {
        // exp(ln k) = k: probabilities 1/10, 2/10, 3/10, 4/10, and a masked position gets 0.
        let mut p = [
            0.0f32,
            libm::logf(2.0),
            libm::logf(3.0),
            libm::logf(4.0),
            f32::NEG_INFINITY,
        ];
        kernels::softmax(&mut p);
        assert_close(&p, &[0.1, 0.2, 0.3, 0.4, 0.0], 1e-6, 1.0);

        // Large logits must not overflow: softmax subtracts the maximum.
        let mut big = [1000.0f32, 1000.0, 990.0];
        kernels::softmax(&mut big);
        let e = libm::exp(-10.0);
        assert_close(
            &big,
            &[1.0 / (2.0 + e), 1.0 / (2.0 + e), e / (2.0 + e)],
            1e-6,
            1.0,
        );

        let mut s: [f32; 33] = fill(70, 6.0);
        kernels::softmax(&mut s);
        let sum: f32 = s.iter().sum();
        defmt::assert!((sum - 1.0).abs() <= 1e-5 && s.iter().all(|&v| v > 0.0));
    }

    #[test]
    fn rope_rotates_half_split_pairs_by_position_times_frequency() {
        // head_dim 2: one pair at frequency 1, so position 1 rotates by one radian.
        let mut v = [1.0f32, 0.0];
        rope(&mut v, 2, 1, 10_000.0);
        assert_close(
            &v,
            &[0.540_302_305_868_139_8, 0.841_470_984_807_896_5],
            1e-6,
            1.0,
        );

        // Two heads of 8: element i pairs with i + 4, angle pos * theta^(-2i/8), in f64.
        const HD: usize = 8;
        let theta = 10_000.0f32;
        let x: [f32; 2 * HD] = fill(80, 1.0);
        for pos in [0usize, 1, 7, 300] {
            let mut got = x;
            rope(&mut got, HD, pos, theta);
            let mut want = [0.0f64; 2 * HD];
            for head in 0..2 {
                for i in 0..HD / 2 {
                    let freq = libm::pow(f64::from(theta), -((2 * i) as f64) / HD as f64);
                    let (sin, cos) = (libm::sin(pos as f64 * freq), libm::cos(pos as f64 * freq));
                    let (a, b) = (
                        f64::from(x[head * HD + i]),
                        f64::from(x[head * HD + i + HD / 2]),
                    );
                    want[head * HD + i] = a * cos - b * sin;
                    want[head * HD + i + HD / 2] = b * cos + a * sin;
                }
            }
            // f32 angles at position 300 carry a few e-5 of rounding.
            assert_close(&got, &want, if pos < 10 { 1e-6 } else { 1e-4 }, 1.0);
        }
    }
}
