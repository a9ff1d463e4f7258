// NF4 + double-quant dequantization, compiled at run time by NVRTC (see dequant.rs).
//
// NOT YET RUN ON A GPU: written in a session without one. `qdylora gpu-dequant` compares its
// output with qdylora-core's CPU dequantization bit for bit and fails when they differ.
//
// Mirrors qdylora_core::nf4::dequantize over a DoubleQuantRef, one f32 rounding per step:
//   scaled = code8[absmax_code[block]] * nested_absmax[block / 256]
//   absmax = scaled + offset
//   value  = nf4[nibble] * absmax
// dequant.rs compiles with --fmad=false so the first two are not fused into one FMA (the core
// rounds twice) and --ftz=false so subnormals are kept as the CPU keeps them.
//
// Layout (bitsandbytes'): element i sits in byte i / 2, the even element in the high nibble;
// blocks of 2^log2_blocksize elements share one absmax. The blocksize is a power of two >= 32,
// so 8 consecutive elements starting at a multiple of 8 always share a block.

// Needs elements.cuh (prepended by kernels.rs): u16/u32/u64 and bf16_bits_rne.
typedef unsigned char u8;

#define NESTED_LOG2 8  // 256 absmax codes per nested absmax
#define GROUP 8        // elements per thread step: one 32-bit load of 4 packed bytes

__device__ __forceinline__ void store_group(float* out, u64 group, const float v[GROUP]) {
    float4* dst = reinterpret_cast<float4*>(out) + 2 * group;
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void store_group(u16* out, u64 group, const float v[GROUP]) {
    // Little endian: the earlier element in the low half of each word.
    uint4 w;
    w.x = (u32)bf16_bits_rne(v[0]) | ((u32)bf16_bits_rne(v[1]) << 16);
    w.y = (u32)bf16_bits_rne(v[2]) | ((u32)bf16_bits_rne(v[3]) << 16);
    w.z = (u32)bf16_bits_rne(v[4]) | ((u32)bf16_bits_rne(v[5]) << 16);
    w.w = (u32)bf16_bits_rne(v[6]) | ((u32)bf16_bits_rne(v[7]) << 16);
    reinterpret_cast<uint4*>(out)[group] = w;
}

__device__ __forceinline__ void store_one(float* out, u64 i, float v) { out[i] = v; }

__device__ __forceinline__ void store_one(u16* out, u64 i, float v) { out[i] = bf16_bits_rne(v); }

template <typename Out>
__device__ __forceinline__ void dequantize(
    const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
    const float* __restrict__ nested_absmax, const float* __restrict__ code8,
    const float* __restrict__ nf4, float offset, u32 log2_blocksize, u64 n,
    Out* __restrict__ out) {
    // Both tables are looked up by data-dependent index: shared memory serves that without the
    // serialisation constant memory would cost. Filled once per block (grid-stride loop).
    __shared__ float s_nf4[16];
    __shared__ float s_code8[256];
    for (u32 i = threadIdx.x; i < 256; i += blockDim.x) s_code8[i] = code8[i];
    for (u32 i = threadIdx.x; i < 16; i += blockDim.x) s_nf4[i] = nf4[i];
    __syncthreads();

    const u64 groups = (n + GROUP - 1) / GROUP;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        const u64 first = g * GROUP;
        const u64 block = first >> log2_blocksize;
        const float scaled = s_code8[absmax_codes[block]] * nested_absmax[block >> NESTED_LOG2];
        const float absmax = scaled + offset;
        if (first + GROUP <= n) {
            // Bytes 4g..4g+4; the allocation is 256-byte aligned, so the load is aligned.
            const u32 word = reinterpret_cast<const u32*>(packed)[g];
            float v[GROUP];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const u32 byte = (word >> (8 * k)) & 0xffu;
                v[2 * k] = s_nf4[byte >> 4] * absmax;
                v[2 * k + 1] = s_nf4[byte & 0xfu] * absmax;
            }
            store_group(out, g, v);
        } else {
            // The ragged end of a tensor whose size is not a multiple of 8.
            for (u64 i = first; i < n; ++i) {
                const u32 byte = packed[i >> 1];
                const u32 nibble = (i & 1) ? (byte & 0xfu) : (byte >> 4);
                store_one(out, i, s_nf4[nibble] * absmax);
            }
        }
    }
}

extern "C" __global__ void nf4_dq_dequantize_f32(
    const u8* packed, const u8* absmax_codes, const float* nested_absmax, const float* code8,
    const float* nf4, float offset, u32 log2_blocksize, u64 n, float* out) {
    dequantize(packed, absmax_codes, nested_absmax, code8, nf4, offset, log2_blocksize, n, out);
}

extern "C" __global__ void nf4_dq_dequantize_bf16(
    const u8* packed, const u8* absmax_codes, const float* nested_absmax, const float* code8,
    const float* nf4, float offset, u32 log2_blocksize, u64 n, u16* out) {
    dequantize(packed, absmax_codes, nested_absmax, code8, nf4, offset, log2_blocksize, n, out);
}
