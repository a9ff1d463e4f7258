// Fused RMSNorm, forward and the gradient w.r.t. x, compiled at run time by NVRTC (see
// rms_norm.rs). Unfused, the forward is six passes over the [tokens, hidden] activations
// (upcast, square, mean, scale, downcast, weight) and the backward about ten; here each
// direction reads the rows once and writes them once. Math in f32 whatever the storage type.
//
// NOT YET RUN ON A GPU: written in a session without one. host/tests/cuda_kernels_emulated.rs
// runs this source on CPU threads and compares it with the CPU reference
// (model/fused/rms_norm.rs), which uses the same formulas (its sums run in another order).
//
// One warp per row, as the attention softmax: a row is hidden_size values (4,096 for
// LLaMA-7B), so each lane strides over 128 of them and the row's sums are warp shuffles.
// A lane re-reads its values for the second pass from L1/L2, not DRAM.
//
// Needs elements.cuh (prepended by kernels.rs): load/store, bf16_bits_rne, warp_sum.

// The row this warp owns; false past the last row (a whole warp returns together, so the
// shuffles always have all 32 lanes).
__device__ __forceinline__ bool norm_row(u32 rows, u64* row) {
    *row = (u64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    return *row < rows;
}

// 1 / sqrt(sum(x^2) / n + eps) of one row.
template <typename T>
__device__ __forceinline__ float inverse_rms(const T* x, u32 n, float eps) {
    float acc = 0.0f;
    for (u32 j = threadIdx.x % WARP; j < n; j += WARP) {
        const float v = load(x, j);
        acc += v * v;
    }
    return 1.0f / sqrtf(warp_sum(acc) / (float)n + eps);
}

// v rounded to the storage type of `like` and widened back (exact for f32).
__device__ __forceinline__ float rounded(const float*, float v) { return v; }
__device__ __forceinline__ float rounded(const u16*, float v) {
    return __uint_as_float((u32)bf16_bits_rne(v) << 16);
}

// One row: o = round(round(x * r) * w): transformers rounds to the input dtype before the
// weight.
template <typename T>
__device__ void normed_row(const T* xr, const T* weight, T* o, u32 n, float eps) {
    const float r = inverse_rms(xr, n, eps);
    for (u32 j = threadIdx.x % WARP; j < n; j += WARP) {
        store(o, j, rounded(xr, load(xr, j) * r) * load(weight, j));
    }
}

template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* weight, T* out, u32 rows, u32 n, float eps) {
    u64 row;
    if (!norm_row(rows, &row)) return;
    normed_row(x + row * n, weight, out + row * n, n, eps);
}

// dx = r * g - x * r^3 * sum(g * x) / n, with g = grad * weight; with a residual (not null),
// out = residual + round(dx) instead: the gradient of a residual block's input in one pass,
// where unfused the norm's gradient is written, then read again with the residual's and summed.
template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* weight, const T* grad, const T* residual,
                             T* out, u32 rows, u32 n, float eps) {
    u64 row;
    if (!norm_row(rows, &row)) return;
    const T* xr = x + row * n;
    const T* gr = grad + row * n;
    T* o = out + row * n;
    const float r = inverse_rms(xr, n, eps);
    float acc = 0.0f;
    for (u32 j = threadIdx.x % WARP; j < n; j += WARP) {
        acc += load(gr, j) * load(weight, j) * load(xr, j);
    }
    const float c = warp_sum(acc) * r * r * r / (float)n;
    for (u32 j = threadIdx.x % WARP; j < n; j += WARP) {
        const float dx = r * (load(gr, j) * load(weight, j)) - load(xr, j) * c;
        store(o, j, residual == nullptr ? dx : load(residual + row * n, j) + rounded(xr, dx));
    }
}

// A residual sum and the norm that reads it: out[0, rows * n) = s = round(x + y), and
// out[rows * n, 2 rows * n) = rms_norm_fwd of s. The norm reads s back from the sum's rows as
// stored: each lane reads the values it wrote itself, so no barrier is needed, and the norm
// sees the rounded sum, as the unfused add then norm do.
template <typename T>
__device__ void residual_rms_norm_fwd(const T* x, const T* y, const T* weight, T* out, u32 rows,
                                      u32 n, float eps) {
    u64 row;
    if (!norm_row(rows, &row)) return;
    const T* xr = x + row * n;
    const T* yr = y + row * n;
    T* s = out + row * n;
    for (u32 j = threadIdx.x % WARP; j < n; j += WARP) {
        store(s, j, load(xr, j) + load(yr, j));
    }
    normed_row((const T*)s, weight, out + ((u64)rows + row) * n, n, eps);
}

extern "C" __global__ void rms_norm_fwd_f32(const float* x, const float* weight, float* out,
                                            u32 rows, u32 n, float eps) {
    rms_norm_fwd(x, weight, out, rows, n, eps);
}
extern "C" __global__ void rms_norm_fwd_bf16(const u16* x, const u16* weight, u16* out, u32 rows,
                                             u32 n, float eps) {
    rms_norm_fwd(x, weight, out, rows, n, eps);
}
extern "C" __global__ void rms_norm_bwd_f32(const float* x, const float* weight,
                                            const float* grad, float* out, u32 rows, u32 n,
                                            float eps) {
    rms_norm_bwd(x, weight, grad, (const float*)nullptr, out, rows, n, eps);
}
extern "C" __global__ void rms_norm_bwd_bf16(const u16* x, const u16* weight, const u16* grad,
                                             u16* out, u32 rows, u32 n, float eps) {
    rms_norm_bwd(x, weight, grad, (const u16*)nullptr, out, rows, n, eps);
}
extern "C" __global__ void residual_rms_norm_fwd_f32(const float* x, const float* y,
                                                     const float* weight, float* out, u32 rows,
                                                     u32 n, float eps) {
    residual_rms_norm_fwd(x, y, weight, out, rows, n, eps);
}
extern "C" __global__ void residual_rms_norm_fwd_bf16(const u16* x, const u16* y,
                                                      const u16* weight, u16* out, u32 rows,
                                                      u32 n, float eps) {
    residual_rms_norm_fwd(x, y, weight, out, rows, n, eps);
}
extern "C" __global__ void rms_norm_bwd_add_f32(const float* x, const float* weight,
                                                const float* grad, const float* residual,
                                                float* out, u32 rows, u32 n, float eps) {
    rms_norm_bwd(x, weight, grad, residual, out, rows, n, eps);
}
extern "C" __global__ void rms_norm_bwd_add_bf16(const u16* x, const u16* weight, const u16* grad,
                                                 const u16* residual, u16* out, u32 rows, u32 n,
                                                 float eps) {
    rms_norm_bwd(x, weight, grad, residual, out, rows, n, eps);
}
