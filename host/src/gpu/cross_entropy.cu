// Fused cross-entropy of the loss, forward and backward, compiled at run time by NVRTC (see
// cross_entropy.rs). Per row of [rows, vocab] logits: loss = logsumexp(row) - row[target], and
// d logits = grad * (softmax(row) - onehot(target)). It replaces the unfused chain (an f32 copy
// of the logits kept for backward, then max, subtract, exp, sum, log, gather, each a pass) with
// reads of the logits in their own dtype and one write of the result. Math in f32.
//
// NOT YET RUN ON A GPU: written in a session without one. host/tests/cuda_kernels_emulated.rs
// runs this source on CPU threads under an emulation of the CUDA thread model (with
// AddressSanitizer, and ThreadSanitizer for the shared-memory reductions) and compares it with
// the CPU reference (model/fused/cross_entropy.rs), which uses the same formulas.
//
// Grid: one block of CE_THREADS threads per row (blockDim.x a multiple of 32, at most
// CE_THREADS; blocks past the last row do nothing). A row is long (32,000 values for LLaMA) and
// there are thousands of them (4,096 tokens per step), so a block per row gives every SM many
// blocks while each thread strides over ~125 values of its row with coalesced loads; the row's
// max and sum are reduced with warp shuffles, then across the block's warps in shared memory.
// The backward recomputes the row's max and sum rather than saving them from the forward: two
// more reads of a row the block has just read (mostly from cache), no second output.
//
// A target >= vocab (a caller's bug; the host checks targets before the launch) is never read:
// the forward writes NaN for that row's loss and the backward NaN for all of its gradients.
//
// Needs elements.cuh (prepended by kernels.rs): load/store, NEG_INF, warp_max, warp_sum.

#define CE_THREADS 256
#define CE_WARPS (CE_THREADS / WARP)

// A quiet NaN without math.h.
#define CE_NAN (__uint_as_float(0x7fc00000u))

// Every thread's value of `v` combined over the block with `op` (max or sum): each warp reduces
// with shuffles, lane 0 of each puts its result in shared memory, and every thread then combines
// the warps' results in the same order, so all threads get the same value. The second barrier
// keeps the next reduction from overwriting `partial` before every thread has read it.
template <bool IS_MAX>
__device__ __forceinline__ float block_reduce(float v) {
    __shared__ float partial[CE_WARPS];
    v = IS_MAX ? warp_max(v) : warp_sum(v);
    if (threadIdx.x % WARP == 0) partial[threadIdx.x / WARP] = v;
    __syncthreads();
    float total = partial[0];
    for (u32 w = 1; w < blockDim.x / WARP; ++w) {
        total = IS_MAX ? fmaxf(total, partial[w]) : total + partial[w];
    }
    __syncthreads();
    return total;
}

// The max of the row and the sum of exp(x - max) over it.
template <typename T>
__device__ __forceinline__ void row_stats(const T* x, u32 vocab, float* max, float* sum) {
    float m = NEG_INF;
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, load(x, j));
    m = block_reduce<true>(m);
    float acc = 0.0f;
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) acc += expf(load(x, j) - m);
    *max = m;
    *sum = block_reduce<false>(acc);
}

template <typename T>
__device__ void ce_fwd(const T* logits, const u32* targets, float* losses, u32 rows,
                       u32 vocab) {
    const u64 row = blockIdx.x;
    if (row >= rows) return;
    const u32 target = targets[row];
    // The same for the whole block, so no thread waits at a barrier the others skip.
    if (target >= vocab) {
        if (threadIdx.x == 0) losses[row] = CE_NAN;
        return;
    }
    const T* x = logits + row * vocab;
    float max, sum;
    row_stats(x, vocab, &max, &sum);
    if (threadIdx.x == 0) losses[row] = (logf(sum) + max) - load(x, target);
}

template <typename T>
__device__ void ce_bwd(const T* logits, const u32* targets, const float* grad, T* grad_logits,
                       u32 rows, u32 vocab) {
    const u64 row = blockIdx.x;
    if (row >= rows) return;
    const u32 target = targets[row];
    T* d = grad_logits + row * vocab;
    if (target >= vocab) {
        for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) store(d, j, CE_NAN);
        return;
    }
    const T* x = logits + row * vocab;
    const float g = grad[row];
    float max, sum;
    row_stats(x, vocab, &max, &sum);
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float p = expf(load(x, j) - max) / sum;
        store(d, j, g * (p - (j == target ? 1.0f : 0.0f)));
    }
}

extern "C" __global__ void cross_entropy_fwd_f32(const float* logits, const u32* targets,
                                                 float* losses, u32 rows, u32 vocab) {
    ce_fwd(logits, targets, losses, rows, vocab);
}

extern "C" __global__ void cross_entropy_fwd_bf16(const u16* logits, const u32* targets,
                                                  float* losses, u32 rows, u32 vocab) {
    ce_fwd(logits, targets, losses, rows, vocab);
}

extern "C" __global__ void cross_entropy_bwd_f32(const float* logits, const u32* targets,
                                                 const float* grad, float* grad_logits,
                                                 u32 rows, u32 vocab) {
    ce_bwd(logits, targets, grad, grad_logits, rows, vocab);
}

extern "C" __global__ void cross_entropy_bwd_bf16(const u16* logits, const u32* targets,
                                                  const float* grad, u16* grad_logits,
                                                  u32 rows, u32 vocab) {
    ce_bwd(logits, targets, grad, grad_logits, rows, vocab);
}
