// Fused scaled causal softmax for attention, forward and backward, compiled at run time by
// NVRTC (see causal_softmax.rs). It replaces the unfused chain (scale, upcast to f32, add the
// causal mask, max, subtract, exp, sum, divide, downcast: one pass over the [b, h, tq, tk]
// scores each) with one read of the scores and one write of the probabilities.
//
// NOT YET RUN ON A GPU: written in a session without one. host/tests/cuda_kernels_emulated.rs
// runs this source on CPU threads under an emulation of the CUDA thread model and compares it
// with the CPU reference (model/fused/softmax.rs), which mirrors it step for step.
//
// Row r of the scores is query i = r % tq; it sees keys 0 ..= i + (tk - tq) (the queries are
// the last tq of tk positions, as with a cache). Statistics are f32 whatever the storage type,
// as transformers computes the attention softmax. One warp per row: each lane strides over the
// row, and the row's max and sum are reduced with warp shuffles (no shared memory).
//
// The backward recomputes the probabilities in f32 from the saved scores instead of reading
// the rounded output: the same traffic, and the gradient is as precise as the f32 chain's.

// Needs elements.cuh (prepended by kernels.rs): load/store, warp_max, warp_sum.

// The row this warp owns and the number of keys its query sees; false past the last row.
// `row` is the same for every lane of a warp, so a warp returns as a whole and the shuffles
// below always have all 32 lanes.
__device__ __forceinline__ bool warp_row(u32 rows, u32 tq, u32 tk, u64* row, u32* visible) {
    *row = (u64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (*row >= rows) return false;
    *visible = (u32)(*row % tq) + (tk - tq) + 1u;
    return true;
}

// The row's max of scale * s and sum of exp(scale * s - max) over the visible keys.
template <typename T>
__device__ __forceinline__ void row_stats(const T* s, u32 visible, float scale, float* max,
                                          float* sum) {
    const u32 lane = threadIdx.x % WARP;
    float m = NEG_INF;
    for (u32 j = lane; j < visible; j += WARP) m = fmaxf(m, load(s, j) * scale);
    m = warp_max(m);
    float acc = 0.0f;
    for (u32 j = lane; j < visible; j += WARP) acc += expf(load(s, j) * scale - m);
    *max = m;
    *sum = warp_sum(acc);
}

template <typename T>
__device__ void softmax_fwd(const T* scores, T* probs, u32 rows, u32 tq, u32 tk, float scale) {
    u64 row;
    u32 visible;
    if (!warp_row(rows, tq, tk, &row, &visible)) return;
    const T* s = scores + row * tk;
    T* p = probs + row * tk;
    float max, sum;
    row_stats(s, visible, scale, &max, &sum);
    for (u32 j = threadIdx.x % WARP; j < tk; j += WARP) {
        store(p, j, j < visible ? expf(load(s, j) * scale - max) / sum : 0.0f);
    }
}

// d scores = scale * p * (d p - sum_j p_j d p_j), zero on the masked keys.
template <typename T>
__device__ void softmax_bwd(const T* scores, const T* grad_probs, T* grad_scores, u32 rows,
                            u32 tq, u32 tk, float scale) {
    u64 row;
    u32 visible;
    if (!warp_row(rows, tq, tk, &row, &visible)) return;
    const T* s = scores + row * tk;
    const T* g = grad_probs + row * tk;
    T* d = grad_scores + row * tk;
    const u32 lane = threadIdx.x % WARP;
    float max, sum;
    row_stats(s, visible, scale, &max, &sum);
    float acc = 0.0f;
    for (u32 j = lane; j < visible; j += WARP) {
        acc += expf(load(s, j) * scale - max) / sum * load(g, j);
    }
    const float dot = warp_sum(acc);
    for (u32 j = lane; j < tk; j += WARP) {
        float v = 0.0f;
        if (j < visible) {
            const float p = expf(load(s, j) * scale - max) / sum;
            v = scale * (p * (load(g, j) - dot));
        }
        store(d, j, v);
    }
}

extern "C" __global__ void causal_softmax_fwd_f32(const float* scores, float* probs, u32 rows,
                                                  u32 tq, u32 tk, float scale) {
    softmax_fwd(scores, probs, rows, tq, tk, scale);
}

extern "C" __global__ void causal_softmax_fwd_bf16(const u16* scores, u16* probs, u32 rows,
                                                   u32 tq, u32 tk, float scale) {
    softmax_fwd(scores, probs, rows, tq, tk, scale);
}

extern "C" __global__ void causal_softmax_bwd_f32(const float* scores, const float* grad_probs,
                                                  float* grad_scores, u32 rows, u32 tq, u32 tk,
                                                  float scale) {
    softmax_bwd(scores, grad_probs, grad_scores, rows, tq, tk, scale);
}

extern "C" __global__ void causal_softmax_bwd_bf16(const u16* scores, const u16* grad_probs,
                                                   u16* grad_scores, u32 rows, u32 tq, u32 tk,
                                                   float scale) {
    softmax_bwd(scores, grad_probs, grad_scores, rows, tq, tk, scale);
}
