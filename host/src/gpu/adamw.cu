// The masked AdamW update of one adapter matrix, in place, on the rank indices being trained:
// rows start..start+len of A (rank_dim 0) or those columns of B (rank_dim 1) of a row-major
// [rows, cols] f32 matrix. Compiled at run time by NVRTC (see adamw.rs).
//
// Why a kernel: train/optim.rs's update is ~20 candle ops per matrix plus three slice
// assignments of ~12 ops each, ~55 launches, over 224 matrices at the LLaMA-7B shape: ~12,000
// launches of microseconds each after the backward, where the GPU waits on the CPU to issue
// them. Here it is three launches per matrix (the two moments, then the parameter), or one
// launch for every matrix of the step (adamw_multi, which reads the matrices from a table).
//
// Every operation is the one train/optim.rs's candle ops perform, in the same order and in
// f32: candle's `t * c` is `t * (float)c + 0.0f` (its affine), `t / c` multiplies by
// (float)(1/c), `t + c` is `t * 1.0f + (float)c`. With NVRTC's --fmad=false nothing is fused,
// so the result is the CPU's bit for bit. train/adamw_fused.rs has the same loops on the CPU.
//
// NOT YET RUN ON A GPU: written in a session without one. host/tests/cuda_kernels_emulated.rs
// runs it on CPU threads against train/adamw_fused.rs.
//
// Needs elements.cuh (prepended by kernels.rs): bf16_bits_rne.

// The flat index of the i-th value of the trained slice.
__device__ __forceinline__ u64 slice_index(u64 i, u32 cols, u32 rank_dim, u32 start, u32 len) {
    if (rank_dim == 0) {
        return (u64)start * cols + i;  // whole rows: one contiguous run
    }
    const u64 row = i / len;
    return row * cols + start + (i % len);
}

// One value's moment update: beta * moment + (1 - beta) * term.
__device__ __forceinline__ float moment_next(float moment, float term, float beta,
                                             float one_minus_beta) {
    return (moment * beta + 0.0f) + (term * one_minus_beta + 0.0f);
}

// One value's parameter update from its updated moments (see adamw_param).
__device__ __forceinline__ float param_next(float p, float m, float v, float inv_bc1,
                                            float inv_bc2, float eps, float decay, float lr,
                                            u32 round_bf16) {
    const float m_hat = m * inv_bc1 + 0.0f;
    const float v_hat = v * inv_bc2 + 0.0f;
    const float step = m_hat / (sqrtf(v_hat) * 1.0f + eps);
    float out = (p * decay + 0.0f) - (step * lr + 0.0f);
    if (round_bf16) {
        out = __uint_as_float((u32)bf16_bits_rne(out) << 16);
    }
    return out;
}

// moment = beta * moment + (1 - beta) * g (or g * g when squared), g = grad * grad_scale (the
// gradient-norm clipping's factor; 1 when not clipping).
extern "C" __global__ void adamw_moment(float* moment, const float* grad, u32 rows, u32 cols,
                                        u32 rank_dim, u32 start, u32 len, float grad_scale,
                                        float beta, float one_minus_beta, u32 squared) {
    const u64 n = (u64)(rank_dim == 0 ? cols : rows) * len;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u64 at = slice_index(i, cols, rank_dim, start, len);
        const float g = grad[at] * grad_scale + 0.0f;
        const float term = squared ? g * g : g;
        moment[at] = moment_next(moment[at], term, beta, one_minus_beta);
    }
}

// param = param * decay - lr * m_hat / (sqrt(v_hat) + eps), with m_hat = m * inv_bc1 and
// v_hat = v * inv_bc2 (the bias corrections), then rounded to bf16 values when round_bf16.
extern "C" __global__ void adamw_param(float* param, const float* m, const float* v, u32 rows,
                                       u32 cols, u32 rank_dim, u32 start, u32 len,
                                       float inv_bc1, float inv_bc2, float eps, float decay,
                                       float lr, u32 round_bf16) {
    const u64 n = (u64)(rank_dim == 0 ? cols : rows) * len;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u64 at = slice_index(i, cols, rank_dim, start, len);
        param[at] = param_next(param[at], m[at], v[at], inv_bc1, inv_bc2, eps, decay, lr,
                               round_bf16);
    }
}

// One adapter matrix in adamw_multi's table: 64 bytes, written by train/adamw_fused.rs's
// `table_entry` (the same layout, little-endian). The bias corrections are per matrix because
// each matrix counts its own steps.
struct AdamwEntry {
    float* param;
    float* m;
    float* v;
    const float* grad;
    u32 rows, cols, rank_dim, start, len;
    float inv_bc1, inv_bc2;
    u32 unused;
};
static_assert(sizeof(AdamwEntry) == 64, "the table layout train/adamw_fused.rs writes");

// The whole masked AdamW step, one matrix per blockIdx.y, blocks along x striding over its
// slice: the first moment, the second, then the parameter from both, each value read once and
// written once. The same per-value steps as adamw_moment and adamw_param, so the same bits.
extern "C" __global__ void adamw_multi(const AdamwEntry* table, float grad_scale, float beta1,
                                       float one_minus_beta1, float beta2,
                                       float one_minus_beta2, float eps, float decay, float lr,
                                       u32 round_bf16) {
    const AdamwEntry e = table[blockIdx.y];
    const u64 n = (u64)(e.rank_dim == 0 ? e.cols : e.rows) * e.len;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u64 at = slice_index(i, e.cols, e.rank_dim, e.start, e.len);
        const float g = e.grad[at] * grad_scale + 0.0f;
        const float m = moment_next(e.m[at], g, beta1, one_minus_beta1);
        const float v = moment_next(e.v[at], g * g, beta2, one_minus_beta2);
        e.m[at] = m;
        e.v[at] = v;
        e.param[at] = param_next(e.param[at], m, v, e.inv_bc1, e.inv_bc2, eps, decay, lr,
                                 round_bf16);
    }
}
