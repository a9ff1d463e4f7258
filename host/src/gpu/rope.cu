// Fused rotary position embedding (half-split layout), compiled at run time by NVRTC (see
// rope.rs). Unfused, it is seven passes over the [b, heads, t, d] queries or keys (two
// narrows, four products, a difference, a sum, a concatenation); here one. The backward is
// this kernel with sign = -1 (the inverse rotation). Math in f32 whatever the storage type.
//
// NOT YET RUN ON A GPU: written in a session without one. host/tests/cuda_kernels_emulated.rs
// runs this source on CPU threads and compares it bit for bit with the CPU reference
// (model/fused/rope.rs): the same products in the same order, nothing transcendental.
//
// One thread per pair (x[j], x[j + d/2]) of an output row. Rows of d values nest as
// [b, heads, t] or [b, t, heads] (`orders` bit 0: the input in the tokens order; bit 1: the
// output), so one pass both rotates and splits a linear's [b, t, heads * d] output into heads
// (or merges them back); with one head and both orders the same, row r is position r % t.
//
// Needs elements.cuh (prepended by kernels.rs): load, store.

#define ROPE_INPUT_TOKENS 1u
#define ROPE_OUTPUT_TOKENS 2u

template <typename T>
__device__ void rope_rotate(const T* x, const T* cos, const T* sin, T* out, u64 pairs, u32 t,
                            u32 half, u32 heads, u32 orders, float sign) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const u64 per_batch = (u64)t * heads;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += stride) {
        const u64 row = i / half;
        const u32 j = (u32)(i % half);
        const u64 b = row / per_batch;
        u64 head, p;
        if (orders & ROPE_OUTPUT_TOKENS) {
            head = row % heads;
            p = (row / heads) % t;
        } else {
            head = (row / t) % heads;
            p = row % t;
        }
        const u64 source = (orders & ROPE_INPUT_TOKENS) ? (b * t + p) * heads + head
                                                         : (b * heads + head) * t + p;
        const u64 table = p * half + j;
        const u64 from = source * 2u * half + j;
        const u64 to = row * 2u * half + j;
        const float c = load(cos, table);
        const float s = sign * load(sin, table);
        const float x1 = load(x, from);
        const float x2 = load(x, from + half);
        store(out, to, x1 * c - x2 * s);
        store(out, to + half, x2 * c + x1 * s);
    }
}

extern "C" __global__ void rope_f32(const float* x, const float* cos, const float* sin,
                                    float* out, u64 pairs, u32 t, u32 half, u32 heads, u32 orders,
                                    float sign) {
    rope_rotate(x, cos, sin, out, pairs, t, half, heads, orders, sign);
}
extern "C" __global__ void rope_bf16(const u16* x, const u16* cos, const u16* sin, u16* out,
                                     u64 pairs, u32 t, u32 half, u32 heads, u32 orders,
                                     float sign) {
    rope_rotate(x, cos, sin, out, pairs, t, half, heads, orders, sign);
}
