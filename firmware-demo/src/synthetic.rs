//! Deterministic synthetic data: values from an integer hash of their index, computed at
//! compile time where they are `static`, so the self-check and the tests need no data tables.

/// A value in [-1, 1) for index `i` of stream `seed` (the murmur3 finalizer on `seed` and `i`;
/// the top 24 bits are scaled exactly into the range).
pub const fn unit(seed: u32, i: u32) -> f32 {
    let mut h = seed.wrapping_mul(0x9e37_79b9) ^ i.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
}

/// `N` values of stream `seed`, each `unit(seed, i) * scale`.
pub const fn fill<const N: usize>(seed: u32, scale: f32) -> [f32; N] {
    let mut out = [0.0f32; N];
    let mut i = 0;
    while i < N {
        out[i] = unit(seed, i as u32) * scale;
        i += 1;
    }
    out
}
