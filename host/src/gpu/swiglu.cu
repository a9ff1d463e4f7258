// Fused SwiGLU, silu(gate) * up, forward and backward, compiled at run time by NVRTC (see
// swiglu.rs). Unfused, the forward is two kernels and candle's backward of silu and the
// product about eight, each a pass over [tokens, intermediate] values; here each direction is
// one pass. Math in f32 whatever the storage type.
//
// NOT YET RUN ON A GPU: written in a session without one. host/tests/cuda_kernels_emulated.rs
// runs it on CPU threads and compares it with the CPU reference (model/fused/swiglu.rs), which
// uses the same formulas in the same order.
//
// Needs elements.cuh (prepended by kernels.rs): load, store.

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ void swiglu_fwd(const T* gate, const T* up, T* out, u64 n) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = load(gate, i);
        store(out, i, g * sigmoid(g) * load(up, i));
    }
}

// d gate = d out * up * silu'(gate), silu'(x) = s * (1 + x * (1 - s)) with s = sigmoid(x).
template <typename T>
__device__ void swiglu_bwd_gate(const T* gate, const T* up, const T* grad, T* out, u64 n) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = load(gate, i);
        const float s = sigmoid(g);
        store(out, i, load(grad, i) * load(up, i) * (s * (1.0f + g * (1.0f - s))));
    }
}

// d up = d out * silu(gate).
template <typename T>
__device__ void swiglu_bwd_up(const T* gate, const T* grad, T* out, u64 n) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = load(gate, i);
        store(out, i, load(grad, i) * (g * sigmoid(g)));
    }
}

// Both gradients in one pass: d gate into out[0, n), d up into out[n, 2n). The two kernels
// above read gate and grad each (and up once) and write one gradient each; this one reads the
// three inputs once. Same formulas, so the same bits as the pair.
template <typename T>
__device__ void swiglu_bwd(const T* gate, const T* up, const T* grad, T* out, u64 n) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = load(gate, i);
        const float d = load(grad, i);
        const float s = sigmoid(g);
        store(out, i, d * load(up, i) * (s * (1.0f + g * (1.0f - s))));
        store(out, n + i, d * (g * s));
    }
}

extern "C" __global__ void swiglu_fwd_f32(const float* gate, const float* up, float* out, u64 n) {
    swiglu_fwd(gate, up, out, n);
}
extern "C" __global__ void swiglu_fwd_bf16(const u16* gate, const u16* up, u16* out, u64 n) {
    swiglu_fwd(gate, up, out, n);
}
extern "C" __global__ void swiglu_bwd_gate_f32(const float* gate, const float* up,
                                               const float* grad, float* out, u64 n) {
    swiglu_bwd_gate(gate, up, grad, out, n);
}
extern "C" __global__ void swiglu_bwd_gate_bf16(const u16* gate, const u16* up, const u16* grad,
                                                u16* out, u64 n) {
    swiglu_bwd_gate(gate, up, grad, out, n);
}
extern "C" __global__ void swiglu_bwd_up_f32(const float* gate, const float* grad, float* out,
                                             u64 n) {
    swiglu_bwd_up(gate, grad, out, n);
}
extern "C" __global__ void swiglu_bwd_up_bf16(const u16* gate, const u16* grad, u16* out, u64 n) {
    swiglu_bwd_up(gate, grad, out, n);
}
extern "C" __global__ void swiglu_bwd_f32(const float* gate, const float* up, const float* grad,
                                          float* out, u64 n) {
    swiglu_bwd(gate, up, grad, out, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const u16* gate, const u16* up, const u16* grad,
                                           u16* out, u64 n) {
    swiglu_bwd(gate, up, grad, out, n);
}
