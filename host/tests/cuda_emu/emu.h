// An emulation of the CUDA thread model on CPU threads, so that this project's CUDA C kernels
// (host/src/gpu/*.cu) run unchanged in CI, where there is no GPU and no CUDA toolkit. It proves
// the kernels' logic (indexing, reductions, bit manipulations, ragged ends), not their speed.
//
// The model: blocks run ONE AT A TIME; the threads of a block run concurrently as std::threads
// (one pool, reused for every block of a launch). That makes `__shared__` a plain `static` (one copy, seen by the running block's threads), and
// `__syncthreads()` a std::barrier over the block. Warps are consecutive groups of 32 threads;
// a shuffle goes through a per-warp exchange array between two per-warp barriers.
//
// Things that are undefined in CUDA fail loudly here rather than "working": a shuffle with a
// mask other than all 32 lanes, in a partial warp, or after some lanes of the warp returned.
// Limits: a thread that returns counts as arrived at later `__syncthreads` (what hardware does
// with exited threads); `__shared__` memory starts at zero and keeps its values from one block
// to the next (a missing `__syncthreads` is found by the ThreadSanitizer build, not by reading stale data);
// no dynamic (`extern __shared__`) shared memory, no atomics, no cooperative groups.
//
// Floating point: compile with -ffp-contract=off, as NVRTC runs with --fmad=false, so each
// multiply and add rounds on its own as on the GPU. The maths functions are the host's: CUDA's
// expf is within 2 ulp and __expf is an approximation, so comparisons of results that go
// through them need a tolerance on a real GPU; bit manipulations and + - * / are exact on both.
#pragma once

#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <thread>
#include <vector>

// ---- Qualifiers: plain C++ on the host. `__restrict__` is already a GCC/Clang keyword.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

// ---- Vector types and the index variables.
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Set by the launcher in each emulated thread before it runs the kernel.
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ---- Intrinsics.
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }  // approximate on a GPU, see the top
inline float __fdividef(float a, float b) { return a / b; }
// expf, logf, sqrtf, fmaxf, fminf, fabsf and INFINITY come from <cmath>.

namespace emu {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    std::fflush(stderr);
    std::_Exit(70);
}

// One warp: its barrier, how many of its lanes returned, and the shuffle exchange slots.
struct Warp {
    explicit Warp(unsigned lanes) : barrier(lanes), lanes(lanes) {}
    std::barrier<> barrier;
    const unsigned lanes;
    std::atomic<unsigned> exited{0};
    std::uint64_t slots[32] = {};
};

// The block running now: the `__syncthreads` barrier and its warps.
struct Block {
    explicit Block(unsigned threads) : barrier(threads) {
        for (unsigned first = 0; first < threads; first += 32) {
            warps.emplace_back(threads - first < 32 ? threads - first : 32);
        }
    }
    std::barrier<> barrier;
    std::deque<Warp> warps;  // a deque: barriers cannot move
};

struct Self {
    Block* block = nullptr;
    Warp* warp = nullptr;
    unsigned lane = 0;
};
inline thread_local Self self;

// Every lane writes its value, all wait, each reads its source lane's slot, all wait again so
// that the next shuffle cannot overwrite a slot before it has been read.
template <typename T>
inline T shuffle(unsigned mask, T value, unsigned src_lane) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffle of a type wider than 8 bytes");
    Warp& w = *self.warp;
    if (mask != 0xffffffffu) fail("shuffle with a partial lane mask is not emulated");
    if (w.lanes != 32) fail("shuffle in a partial warp (block size not a multiple of 32)");
    std::memcpy(&w.slots[self.lane], &value, sizeof(T));
    w.barrier.arrive_and_wait();
    if (w.exited.load() != 0) fail("full-mask shuffle after lanes of the warp returned");
    T out;
    std::memcpy(&out, &w.slots[src_lane], sizeof(T));
    w.barrier.arrive_and_wait();
    return out;
}

// The lane's segment of `width` lanes (a power of two up to 32), as the shuffles define it.
inline unsigned segment_start(int width) {
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width");
    return self.lane & ~unsigned(width - 1);
}

// Run from a dying thread: it no longer takes part in any barrier, as on hardware.
inline void leave() {
    self.warp->exited.fetch_add(1);
    self.warp->barrier.arrive_and_drop();
    self.block->barrier.arrive_and_drop();
}

// Runs `body` (which calls the kernel) once per thread of a grid of `grid` blocks of `block`
// threads: blocks in sequence, the threads of each block concurrently. One pool of threads
// serves every block (creating threads per block dominated the run time); each block gets
// fresh barriers, since a thread that returns leaves its block's barriers for good.
template <typename Body>
void launch(dim3 grid, dim3 block, Body body) {
    const unsigned long long threads = 1ull * block.x * block.y * block.z;
    if (threads == 0 || 1ull * grid.x * grid.y * grid.z == 0) fail("empty launch");
    if (threads > 1024 || block.z > 64) fail("block larger than CUDA allows");
    if (grid.y > 65535 || grid.z > 65535) fail("grid.y or grid.z larger than CUDA allows");

    // The launcher and the pool meet at `gate` twice per block: once to start it (after the
    // launcher has set up `current` and `index`), once when every thread has finished it.
    std::barrier<> gate(std::ptrdiff_t(threads) + 1);
    std::optional<Block> current;
    dim3 index;
    bool done = false;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            for (;;) {
                gate.arrive_and_wait();
                if (done) return;
                gridDim = grid;
                blockDim = block;
                blockIdx = index;
                threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
                self = {&*current, &current->warps[t / 32], t % 32};
                body();
                leave();
                gate.arrive_and_wait();
            }
        });
    }
    for (unsigned bz = 0; bz < grid.z; ++bz) {
        for (unsigned by = 0; by < grid.y; ++by) {
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                current.emplace(unsigned(threads));
                index = {bx, by, bz};
                gate.arrive_and_wait();  // start the block
                gate.arrive_and_wait();  // every thread has finished it
            }
        }
    }
    done = true;
    gate.arrive_and_wait();
    for (std::thread& th : pool) th.join();
}

}  // namespace emu

inline void __syncthreads() { emu::self.block->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial lane mask is not emulated");
    emu::self.warp->barrier.arrive_and_wait();
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    const unsigned start = emu::segment_start(width);
    return emu::shuffle(mask, v, start + unsigned(src_lane) % unsigned(width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const unsigned start = emu::segment_start(width);
    const unsigned src = emu::self.lane ^ unsigned(lane_mask);
    // A source in a later segment (or past the warp) gives the lane its own value.
    return emu::shuffle(mask, v, src >= start + unsigned(width) || src >= 32 ? emu::self.lane : src);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned start = emu::segment_start(width);
    const unsigned src = emu::self.lane + delta;
    return emu::shuffle(mask, v, src >= start + unsigned(width) ? emu::self.lane : src);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned start = emu::segment_start(width);
    return emu::shuffle(mask, v, emu::self.lane < start + delta ? emu::self.lane
                                                                : emu::self.lane - delta);
}
