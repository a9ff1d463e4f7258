// Small kernels that check the emulator itself (run by cuda_kernels_emulated.rs): one whose
// result needs every shuffle and __syncthreads to be right, and broken ones that must fail.

typedef unsigned int u32;

#define FULL_MASK 0xffffffffu

// out_sum[block] = sum of the block's inputs (two-level: warp shuffles, then shared memory and
// a second warp); out_scan[i] = inclusive prefix sum of the inputs within i's warp. Inputs past
// `n` count as 0.
extern "C" __global__ void selftest_block_sum(const u32* in, u32* out_sum, u32* out_scan, u32 n) {
    __shared__ u32 warp_sums[32];
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    const u32 lane = threadIdx.x % 32;
    const u32 warp = threadIdx.x / 32;
    const u32 mine = i < n ? in[i] : 0u;

    u32 scan = mine;
    for (u32 d = 1; d < 32; d *= 2) {
        const u32 up = __shfl_up_sync(FULL_MASK, scan, d);
        if (lane >= d) scan += up;
    }
    if (i < n) out_scan[i] = scan;

    u32 sum = mine;
    for (int m = 16; m > 0; m /= 2) sum += __shfl_xor_sync(FULL_MASK, sum, m);
    // Every lane holds the warp's sum now; lane 31's scan must be it.
    if (__shfl_sync(FULL_MASK, scan, 31) != sum) sum = 0xdeadbeefu;
    if (lane == 0) warp_sums[warp] = sum;
    __syncthreads();

    if (warp == 0) {
        u32 total = lane < blockDim.x / 32 ? warp_sums[lane] : 0u;
        for (u32 d = 16; d > 0; d /= 2) total += __shfl_down_sync(FULL_MASK, total, d);
        if (lane == 0) out_sum[blockIdx.x] = total;
    }
}

// Undefined in CUDA when other lanes do not take part: the emulator refuses partial masks.
extern "C" __global__ void selftest_partial_mask(u32* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, threadIdx.x, 1);
}

// Half of each warp returns, the other half shuffles with a full mask: undefined in CUDA.
extern "C" __global__ void selftest_shuffle_after_exit(u32* out) {
    if (threadIdx.x % 32 >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, threadIdx.x, 1);
}

// Off by one: writes out[n], one past the end.
extern "C" __global__ void selftest_write_past_end(u32* out, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = i;
}

// Reads a neighbour's shared slot without the __syncthreads between the write and the read.
extern "C" __global__ void selftest_missing_sync(const u32* in, u32* out) {
    __shared__ u32 slots[1024];
    slots[threadIdx.x] = in[threadIdx.x];
    out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}
