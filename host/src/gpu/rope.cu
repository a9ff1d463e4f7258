// Fused rotary position embedding (half-split layout), compiled at run time by NVRTC (see
// rope.rs). Unfused, it is seven passes over the [b, heads, t, d] queries or keys (two
// narrows, four products, a difference, a sum, a concatenation); here one. The backward is
// this kernel with sign = -1 (the inverse rotation). Math in f32 whatever the storage type.
//
// NOT YET RUN ON A GPU: written in a session without one. host/tests/cuda_kernels_emulated.rs
// runs this source on CPU threads and compares it bit for bit with the CPU reference
// (model/fused/rope.rs): the same products in the same order, nothing transcendental.
//
// One thread per pair (x[j], x[j + d/2]) of a row; row r is position r % t of the tables.
//
// Needs elements.cuh (prepended by kernels.rs): load, store.

template <typename T>
__device__ void rope_rotate(const T* x, const T* cos, const T* sin, T* out, u64 pairs, u32 t,
                            u32 half, float sign) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += stride) {
        const u64 row = i / half;
        const u32 j = (u32)(i % half);
        const u64 table = (row % t) * half + j;
        const u64 first = row * 2u * half + j;
        const float c = load(cos, table);
        const float s = sign * load(sin, table);
        const float a = load(x, first);
        const float b = load(x, first + half);
        store(out, first, a * c - b * s);
        store(out, first + half, b * c + a * s);
    }
}

extern "C" __global__ void rope_f32(const float* x, const float* cos, const float* sin,
                                    float* out, u64 pairs, u32 t, u32 half, float sign) {
    rope_rotate(x, cos, sin, out, pairs, t, half, sign);
}
extern "C" __global__ void rope_bf16(const u16* x, const u16* cos, const u16* sin, u16* out,
                                     u64 pairs, u32 t, u32 half, float sign) {
    rope_rotate(x, cos, sin, out, pairs, t, half, sign);
}
