// Element access shared by the fused-op kernels (prepended to each of their sources by
// kernels.rs; NVRTC compiles each source on its own). Values are stored as f32 or as bf16 bit
// patterns (u16, no cuda_bf16.h) and computed in f32.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// half::bf16::from_f32 bit for bit: a NaN keeps its sign and top mantissa bits and is made
// quiet; everything else rounds to nearest, ties to even (the same rule as nf4_dequant.cu).
__device__ __forceinline__ u16 bf16_bits_rne(float value) {
    const u32 x = __float_as_uint(value);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((x >> 16) | 0x0040u);
    }
    if ((x & 0x8000u) != 0u && (x & 0x17fffu) != 0u) {
        return (u16)((x >> 16) + 1u);
    }
    return (u16)(x >> 16);
}

__device__ __forceinline__ float load(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float load(const u16* p, u64 i) {
    return __uint_as_float((u32)p[i] << 16);
}
__device__ __forceinline__ void store(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void store(u16* p, u64 i, float v) { p[i] = bf16_bits_rne(v); }

// -inf without math.h (NVRTC has no INFINITY).
#define NEG_INF (__uint_as_float(0xff800000u))

#define WARP 32
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_max(float v) {
    for (int lanes = WARP / 2; lanes > 0; lanes /= 2) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, lanes));
    }
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int lanes = WARP / 2; lanes > 0; lanes /= 2) {
        v += __shfl_xor_sync(FULL_MASK, v, lanes);
    }
    return v;
}
