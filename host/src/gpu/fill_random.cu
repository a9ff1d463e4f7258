// Seeded pseudo-random bytes, for NF4 weights that only serve speed measurements (any byte is a
// valid NF4 pair or absmax code, so every value such a weight dequantizes to is finite).
//
// NOT YET RUN ON A GPU: written in a session without one.
//
// Byte i is byte (i % 8) of splitmix64(seed + (i / 8) * golden gamma): a pure function of the
// index, so the result does not depend on the launch shape.

typedef unsigned char u8;
typedef unsigned long long u64;

__device__ __forceinline__ u64 splitmix64(u64 state) {
    u64 z = state + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

extern "C" __global__ void fill_random_u8(u8* out, u64 n, u64 seed) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u64 word = splitmix64(seed + (i >> 3) * 0x9e3779b97f4a7c15ull);
        out[i] = (u8)(word >> (8 * (i & 7)));
    }
}
