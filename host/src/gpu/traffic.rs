//! Bytes moved by one NF4 + double-quant dequantization, the numerator of "effective GB/s".
//!
//! Counted: packed codes, the 8-bit absmax codes, the f32 nested absmax, the 256-entry f32
//! dynamic map (read), and the output (written). The 16-entry NF4 table is a constant of the
//! format (bitsandbytes keeps it in the kernel) and is not counted. `bench/gpu.sh` counts the
//! peer's bytes the same way, so the two GB/s figures compare like with like.

use qdylora_core::double_quant::nested_block_count;
use qdylora_core::dynamic_map::CODE_LEN;
use qdylora_core::nf4::{block_count, packed_len};

/// Bytes read and written by one dequantization of `elements` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DequantTraffic {
    /// Bytes of quantized weight and constants read.
    pub read: u64,
    /// Bytes of output written.
    pub written: u64,
}

impl DequantTraffic {
    /// The traffic for `elements` values in blocks of `blocksize`, written `out_bytes` each.
    pub fn new(elements: usize, blocksize: usize, out_bytes: usize) -> Self {
        let blocks = block_count(elements, blocksize);
        let read = packed_len(elements) + blocks + nested_block_count(blocks) * 4 + CODE_LEN * 4;
        Self {
            read: read as u64,
            written: (elements * out_bytes) as u64,
        }
    }

    /// Read plus written.
    pub fn total(&self) -> u64 {
        self.read + self.written
    }

    /// Effective bandwidth in GB/s (10^9 bytes per second) for one run of `seconds`.
    pub fn gb_per_s(&self, seconds: f64) -> f64 {
        self.total() as f64 / seconds / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_mlp_weight_bytes() {
        // 11008 x 4096 = 45,088,768 values: 22,544,384 packed bytes, 704,512 blocks of 64,
        // 2,752 nested blocks of 256 (11,008 bytes), a 1,024-byte map; bf16 out = 2 bytes each.
        let t = DequantTraffic::new(11008 * 4096, 64, 2);
        assert_eq!(t.read, 22_544_384 + 704_512 + 11_008 + 1_024);
        assert_eq!(t.written, 90_177_536);
        // 78 microseconds (the peer's figure) is then about 1,454 GB/s.
        assert!((t.gb_per_s(78e-6) - 1_454.3).abs() < 0.1);
    }

    #[test]
    fn odd_sizes_round_up() {
        // 65 values: 33 packed bytes, 2 blocks of 64, 1 nested block, f32 out.
        let t = DequantTraffic::new(65, 64, 4);
        assert_eq!(t.read, 33 + 2 + 4 + 1_024);
        assert_eq!(t.written, 260);
    }
}
