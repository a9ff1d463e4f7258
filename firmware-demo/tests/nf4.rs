//! On-target tests of NF4 quantization, nibble packing and double quantization.
//!
//! The expectations come from the definitions (the NF4 code table, "nearest code", the packing
//! rule of bitsandbytes), computed here independently of the code under test.
#![no_std]
#![no_main]

use qdylora_firmware_demo as _;

/// Half the widest gap between neighbouring NF4 codes (between -1.0 and -0.6961928): no value
/// can be further than this, times its block's absmax, from the code it is quantized to.
const NF4_HALF_GAP_MAX: f32 = (1.0 - 0.696_192_8) / 2.0;

/// Half the widest gap of the signed 8-bit dynamic map: its top decade has 64 codes spaced
/// (1 - 0.1) / 64 apart.
const DYNAMIC_HALF_GAP_MAX: f32 = 0.9 / 64.0 / 2.0;

/// Synthetic weights with a different magnitude per block, an all-zero block, an outlier and an
/// odd length (a short last block and a padding nibble).
fn weights<const N: usize>(blocksize: usize) -> [f32; N] {
    let scales = [1.0f32, 1e-3, 30.0, 0.2, 0.0, 5e-6];
    let mut w: [f32; N] = qdylora_firmware_demo::synthetic::fill(7, 1.0);
    for (i, v) in w.iter_mut().enumerate() {
        *v *= scales[(i / blocksize) % scales.len()];
    }
    w[N / 3] = 250.0;
    w
}

/// Code index of element `i`: the even element sits in the high nibble.
fn nibble(packed: &[u8], i: usize) -> usize {
    let byte = packed[i / 2];
    usize::from(if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0x0f
    })
}

#[defmt_test::tests]
mod tests {
    use qdylora_core::double_quant::{self, DoubleQuantRef};
    use qdylora_core::dynamic_map;
    use qdylora_core::nf4::{self, AbsmaxSource, CODE};
    use qdylora_core::{Buffer, Error};

    use super::{DYNAMIC_HALF_GAP_MAX, NF4_HALF_GAP_MAX, nibble, weights};

    const BLOCKSIZE: usize = 64;
    const N: usize = 1001;
    const BLOCKS: usize = N.div_ceil(BLOCKSIZE);

    #[test]
    fn quantize_picks_the_nearest_code_and_dequantizes_within_bound() -> Result<(), Error> {
        let w: [f32; N] = weights(BLOCKSIZE);
        let mut packed = [0u8; N.div_ceil(2)];
        let mut absmax = [0.0f32; BLOCKS];
        nf4::quantize(&w, BLOCKSIZE, &mut packed, &mut absmax)?;
        let mut out = [0.0f32; N];
        nf4::dequantize(&packed, &absmax[..], BLOCKSIZE, &mut out)?;

        for (b, block) in w.chunks(BLOCKSIZE).enumerate() {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            defmt::assert_eq!(absmax[b], amax, "absmax of block {}", b);
        }
        for (i, (&x, &y)) in w.iter().zip(&out).enumerate() {
            let amax = absmax[i / BLOCKSIZE];
            let q = nibble(&packed, i);
            defmt::assert_eq!(y, CODE[q] * amax, "dequantized element {}", i);
            if amax == 0.0 {
                defmt::assert_eq!(y, 0.0);
                continue;
            }
            // Nearest code, up to the rounding of the f32 reciprocal near a midpoint.
            let scaled = x / amax;
            let best = CODE
                .iter()
                .fold(f32::INFINITY, |m, c| m.min((c - scaled).abs()));
            let err = (CODE[q] - scaled).abs();
            defmt::assert!(
                err <= best + 1e-6,
                "element {}: code {} is not nearest",
                i,
                q
            );
            defmt::assert!((y - x).abs() <= NF4_HALF_GAP_MAX * amax * (1.0 + 1e-6));
        }
        // The padding nibble of the odd count is the code of 0.0.
        defmt::assert_eq!(packed[N / 2] & 0x0f, 7);
        Ok(())
    }

    #[test]
    fn packing_puts_the_even_element_high_and_pads_with_zero_code() -> Result<(), Error> {
        let mut packed = [0u8; 3];
        nf4::pack_indices(&[1, 2, 3, 4, 5], &mut packed)?;
        defmt::assert_eq!(packed, [0x12, 0x34, 0x57]);
        let all: [u8; 16] = core::array::from_fn(|i| i as u8);
        let mut packed16 = [0u8; 8];
        nf4::pack_indices(&all, &mut packed16)?;
        let mut back = [0u8; 16];
        nf4::unpack_indices(&packed16, &mut back)?;
        defmt::assert_eq!(back, all);

        // -a and +a are the extreme codes 0 and 15, 0.0 is code 7; the odd third element pads.
        let mut q = [0u8; 2];
        let mut absmax = [0.0f32; 1];
        nf4::quantize(&[-2.0f32, 2.0, 0.0], BLOCKSIZE, &mut q, &mut absmax)?;
        defmt::assert_eq!(q, [0x0f, 0x77]);
        defmt::assert_eq!(absmax, [2.0]);
        Ok(())
    }

    #[test]
    fn wrong_lengths_and_bad_values_are_typed_errors() {
        let mut packed = [0u8; 2];
        let mut absmax = [0.0f32; 1];
        defmt::assert_eq!(
            nf4::quantize(&[1.0f32; 5], BLOCKSIZE, &mut packed, &mut absmax),
            Err(Error::BufferLength {
                buffer: Buffer::Packed,
                expected: 3,
                actual: 2
            })
        );
        defmt::assert_eq!(
            nf4::quantize(
                &[1.0f32, f32::NAN],
                BLOCKSIZE,
                &mut packed[..1],
                &mut absmax
            ),
            Err(Error::NonFinite { index: 1 })
        );
        defmt::assert_eq!(
            nf4::quantize(&[1.0f32; 4], 48, &mut packed, &mut absmax),
            Err(Error::InvalidBlockSize { blocksize: 48 })
        );
        let mut out = [0.0f32; 5];
        defmt::assert!(nf4::dequantize(&packed, &absmax[..], BLOCKSIZE, &mut out).is_err());
    }

    #[test]
    fn double_quant_reconstructs_absmax_within_the_dynamic_code_gap() -> Result<(), Error> {
        // 600 absmax values: two full nested blocks of 256 and a short one.
        const M: usize = 600;
        let absmax: [f32; M] = core::array::from_fn(|i| {
            let u = qdylora_firmware_demo::synthetic::unit(11, i as u32);
            0.05 + 1.5 * (u + 1.0) * if i < 256 { 1.0 } else { 0.1 }
        });
        let map = dynamic_map::signed_dynamic_map();
        let widest = map.windows(2).fold(0.0f32, |m, w| m.max(w[1] - w[0]));
        defmt::assert!(widest / 2.0 <= DYNAMIC_HALF_GAP_MAX * (1.0 + 1e-4));

        let mut codes = [0u8; M];
        let mut nested = [0.0f32; 3];
        let offset = double_quant::compress(&map, &absmax, &mut codes, &mut nested)?;

        let mean = absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / M as f64;
        defmt::assert!(libm::fabs(f64::from(offset) - mean) <= 1e-6 * mean);
        for (b, block) in absmax.chunks(256).enumerate() {
            let amax = block.iter().fold(0.0f32, |m, a| m.max((a - offset).abs()));
            defmt::assert_eq!(nested[b], amax, "nested absmax {}", b);
        }
        let dq = DoubleQuantRef::new(&map, &codes, &nested, offset)?;
        let mut all = [0.0f32; M];
        dq.reconstruct_all(&mut all)?;
        for (i, &a) in absmax.iter().enumerate() {
            let nested_amax = nested[i / 256];
            let got = dq.absmax(i);
            defmt::assert_eq!(got, all[i]);
            defmt::assert_eq!(got, map[usize::from(codes[i])] * nested_amax + offset);
            // The code is the nearest one to the scaled value.
            let scaled = (a - offset) / nested_amax;
            let best = map
                .iter()
                .fold(f32::INFINITY, |m, c| m.min((c - scaled).abs()));
            let err = (map[usize::from(codes[i])] - scaled).abs();
            defmt::assert!(
                err <= best + 1e-6,
                "absmax {}: code {} not nearest",
                i,
                codes[i]
            );
            defmt::assert!((got - a).abs() <= DYNAMIC_HALF_GAP_MAX * nested_amax + 1e-6 * a);
        }
        Ok(())
    }

    #[test]
    fn nf4_with_double_quant_dequantizes_within_the_combined_bound() -> Result<(), Error> {
        let w: [f32; N] = weights(BLOCKSIZE);
        let map = dynamic_map::signed_dynamic_map();
        let mut packed = [0u8; N.div_ceil(2)];
        let mut absmax = [0.0f32; BLOCKS];
        let mut codes = [0u8; BLOCKS];
        let mut nested = [0.0f32; 1];
        let offset = double_quant::quantize_nf4_double(
            &map,
            &w,
            BLOCKSIZE,
            &mut packed,
            &mut absmax,
            &mut codes,
            &mut nested,
        )?;
        let dq = DoubleQuantRef::new(&map, &codes, &nested, offset)?;
        let mut out = [0.0f32; N];
        nf4::dequantize(&packed, &dq, BLOCKSIZE, &mut out)?;
        for (i, (&x, &y)) in w.iter().zip(&out).enumerate() {
            let b = i / BLOCKSIZE;
            // The code was chosen with the exact absmax, the value rebuilt with the 8-bit one.
            let bound = NF4_HALF_GAP_MAX * absmax[b] + (dq.absmax(b) - absmax[b]).abs();
            defmt::assert!(
                (y - x).abs() <= bound * (1.0 + 1e-5) + 1e-6,
                "element {}",
                i
            );
        }
        Ok(())
    }
}
