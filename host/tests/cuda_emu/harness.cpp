// Runs one kernel launch described by a launch file under the CUDA emulation (emu.h).
//
//   harness LAUNCH_FILE
//
// The launch file is text, one item per line, written by host/tests/cuda_kernels_emulated.rs:
//   kernel nf4_dq_dequantize_f32
//   grid 3 1 1
//   block 256 1 1
//   buf packed.bin          one argument per line after the grid and block, in order:
//   f32 0x3c23d70a          buf FILE (a pointer; FILE is relative to the launch file),
//   u32 6                   u32 N, u64 N, i32 N, or f32 BITS (hex, so the value is exact)
//   mem param.bin           memory the kernel reaches through a table, not as an argument
//   ptr 8 0 16              in the last buf: the 8 bytes at byte 8 become the address of mem
//                           number 0 (in file order) plus 16 bytes
// After the launch every buffer passed to a non-const pointer parameter, and every mem, is
// written back to its file. The parameter types come from the kernel's signature and are
// checked against the file.
//
// Adding a kernel: include its source below as host/src/gpu/kernels.rs assembles it (the fused
// ops get elements.cuh in front), in a namespace of its own (each source is a separate NVRTC
// program, so their helpers share names), and add one KERNEL line per entry point.
#include "emu.h"

#include <csignal>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <unistd.h>
#include <utility>

// Test-only: a source's own bf16_bits_rne applied to any bit patterns. A rounding tie is rare
// in the kernels' real outputs, so the test checks the function over chosen patterns instead.
#define BF16_ROUNDING_ENTRY(name)                                                         \
    extern "C" __global__ void name(const u32* in, u16* out, u64 n) {                     \
        const u64 stride = (u64)gridDim.x * blockDim.x;                                   \
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {    \
            out[i] = bf16_bits_rne(__uint_as_float(in[i]));                               \
        }                                                                                 \
    }

namespace nf4_dequant {
#include "elements.cuh"
#include "nf4_dequant.cu"
BF16_ROUNDING_ENTRY(bf16_rounding_of_nf4_dequant)
}
namespace causal_softmax {
#include "elements.cuh"
#include "causal_softmax.cu"
BF16_ROUNDING_ENTRY(bf16_rounding_of_elements)
}
namespace swiglu {
#include "elements.cuh"
#include "swiglu.cu"
}
namespace rms_norm {
#include "elements.cuh"
#include "rms_norm.cu"
}
namespace rope {
#include "elements.cuh"
#include "rope.cu"
}
namespace cross_entropy {
#include "elements.cuh"
#include "cross_entropy.cu"
}
namespace adamw {
#include "elements.cuh"
#include "adamw.cu"
}
namespace selftest {
#include "selftest.cu"
}

// The sanitizers' settings live in the binary, so the Rust test needs no environment. Leak
// checking needs ptrace, which containers often deny, and nothing here outlives the process.
extern "C" const char* __asan_default_options() { return "detect_leaks=0"; }
extern "C" const char* __ubsan_default_options() { return "print_stacktrace=1"; }
extern "C" const char* __tsan_default_options() { return "halt_on_error=1:exitcode=66"; }

namespace {

[[noreturn]] void die(const std::string& message) {
    std::fprintf(stderr, "harness: %s\n", message.c_str());
    std::exit(2);
}

struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
};

// One argument of the launch file. A buffer is allocated with exactly its length (so the
// sanitizer flags any access past it) at the 256-byte alignment cudaMalloc gives.
struct Arg {
    std::string kind;
    std::string path;
    unsigned long long value = 0;
    std::unique_ptr<void, FreeDeleter> data;
    std::size_t len = 0;
    bool written = false;
};

struct Launch {
    std::string kernel;
    dim3 grid, block;
    std::vector<Arg> args;
    std::vector<Arg> memory;  // reached through addresses in a table (mem lines)
};

// A `ptr AT MEM OFFSET` line: writes memory buffer MEM's address plus OFFSET into the last
// buffer argument at byte AT.
void relocate(Launch& launch, std::size_t at, std::size_t mem, std::size_t offset) {
    if (launch.args.empty() || launch.args.back().kind != "buf") die("ptr must follow a buf");
    if (mem >= launch.memory.size()) die("ptr names a mem not given before it");
    Arg& table = launch.args.back();
    const Arg& target = launch.memory[mem];
    if (at + 8 > table.len || offset > target.len) die("ptr outside its buffers");
    const std::uint64_t address =
        std::uint64_t(reinterpret_cast<std::uintptr_t>(target.data.get())) + offset;
    std::memcpy(static_cast<char*>(table.data.get()) + at, &address, sizeof address);
}

std::string directory_of(const std::string& path) {
    const std::size_t slash = path.rfind('/');
    return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

void load_buffer(Arg& arg) {
    std::ifstream in(arg.path, std::ios::binary | std::ios::ate);
    if (!in) die("cannot open buffer " + arg.path);
    arg.len = std::size_t(in.tellg());
    void* p = nullptr;
    if (posix_memalign(&p, 256, arg.len == 0 ? 1 : arg.len) != 0) die("out of memory");
    arg.data.reset(p);
    in.seekg(0);
    if (!in.read(static_cast<char*>(p), std::streamsize(arg.len))) die("cannot read " + arg.path);
}

void store_buffer(const Arg& arg) {
    std::ofstream out(arg.path, std::ios::binary | std::ios::trunc);
    out.write(static_cast<const char*>(arg.data.get()), std::streamsize(arg.len));
    if (!out.flush()) die("cannot write " + arg.path);
}

Launch parse(const std::string& file) {
    std::ifstream in(file);
    if (!in) die("cannot open launch file " + file);
    const std::string dir = directory_of(file);
    Launch launch;
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream words(line);
        std::string key;
        if (!(words >> key)) continue;
        Arg arg;
        arg.kind = key;
        bool ok = true;
        if (key == "kernel") {
            ok = bool(words >> launch.kernel);
        } else if (key == "grid" || key == "block") {
            dim3& d = key == "grid" ? launch.grid : launch.block;
            ok = bool(words >> d.x >> d.y >> d.z);
        } else if (key == "buf") {
            ok = bool(words >> arg.path);
            arg.path = dir + "/" + arg.path;
            if (ok) load_buffer(arg);
            launch.args.push_back(std::move(arg));
        } else if (key == "mem") {
            ok = bool(words >> arg.path);
            arg.path = dir + "/" + arg.path;
            if (ok) load_buffer(arg);
            arg.written = true;
            launch.memory.push_back(std::move(arg));
        } else if (key == "ptr") {
            std::size_t at = 0, mem = 0, offset = 0;
            ok = bool(words >> at >> mem >> offset);
            if (ok) relocate(launch, at, mem, offset);
        } else if (key == "u32" || key == "u64" || key == "i32") {
            long long v = 0;
            ok = bool(words >> v);
            arg.value = (unsigned long long)v;
            launch.args.push_back(std::move(arg));
        } else if (key == "f32") {
            ok = bool(words >> std::hex >> arg.value);
            launch.args.push_back(std::move(arg));
        } else {
            die("unknown line: " + line);
        }
        if (!ok) die("malformed line: " + line);
    }
    if (launch.kernel.empty()) die("no kernel named in " + file);
    return launch;
}

// The value of argument `i` for a kernel parameter of type P, checked against its kind.
template <typename P>
P take(Arg& arg, std::size_t i) {
    auto expect = [&](const char* kind) {
        if (arg.kind != kind) {
            die("argument " + std::to_string(i) + " is " + arg.kind + ", the kernel takes " +
                kind);
        }
    };
    if constexpr (std::is_pointer_v<P>) {
        expect("buf");
        arg.written = !std::is_const_v<std::remove_pointer_t<P>>;
        return static_cast<P>(arg.data.get());
    } else if constexpr (std::is_same_v<P, float>) {
        expect("f32");
        return std::bit_cast<float>(std::uint32_t(arg.value));
    } else if constexpr (std::is_same_v<P, int>) {
        expect("i32");
        return int(arg.value);
    } else if constexpr (std::is_same_v<P, unsigned>) {
        expect("u32");
        return unsigned(arg.value);
    } else {
        static_assert(std::is_same_v<P, unsigned long long>, "a kernel parameter type to add");
        expect("u64");
        return arg.value;
    }
}

template <typename... P, std::size_t... I>
void run(void (*kernel)(P...), Launch& launch, std::index_sequence<I...>) {
    if (launch.args.size() != sizeof...(P)) {
        die(launch.kernel + " takes " + std::to_string(sizeof...(P)) + " arguments, the file has " +
            std::to_string(launch.args.size()));
    }
    // Converted once; each emulated thread then calls the kernel with the same values.
    const std::tuple<P...> values{take<P>(launch.args[I], I)...};
    emu::launch(launch.grid, launch.block, [&] { std::apply(kernel, values); });
}

template <auto Kernel>
void entry(Launch& launch) {
    [&]<typename... P>(void (*kernel)(P...)) {
        run(kernel, launch, std::index_sequence_for<P...>{});
    }(Kernel);
}

#define KERNEL(ns, name) {#name, &entry<&ns::name>}

const std::map<std::string, void (*)(Launch&)> registry = {
    KERNEL(nf4_dequant, nf4_dq_dequantize_f32),
    KERNEL(nf4_dequant, nf4_dq_dequantize_bf16),
    KERNEL(causal_softmax, causal_softmax_fwd_f32),
    KERNEL(causal_softmax, causal_softmax_fwd_bf16),
    KERNEL(causal_softmax, causal_softmax_bwd_f32),
    KERNEL(causal_softmax, causal_softmax_bwd_bf16),
    KERNEL(swiglu, swiglu_fwd_f32),
    KERNEL(swiglu, swiglu_fwd_bf16),
    KERNEL(swiglu, swiglu_bwd_gate_f32),
    KERNEL(swiglu, swiglu_bwd_gate_bf16),
    KERNEL(swiglu, swiglu_bwd_up_f32),
    KERNEL(swiglu, swiglu_bwd_up_bf16),
    KERNEL(swiglu, swiglu_bwd_f32),
    KERNEL(swiglu, swiglu_bwd_bf16),
    KERNEL(rms_norm, rms_norm_fwd_f32),
    KERNEL(rms_norm, rms_norm_fwd_bf16),
    KERNEL(rms_norm, rms_norm_bwd_f32),
    KERNEL(rms_norm, rms_norm_bwd_bf16),
    KERNEL(rms_norm, residual_rms_norm_fwd_f32),
    KERNEL(rms_norm, residual_rms_norm_fwd_bf16),
    KERNEL(rms_norm, rms_norm_bwd_add_f32),
    KERNEL(rms_norm, rms_norm_bwd_add_bf16),
    KERNEL(rope, rope_f32),
    KERNEL(rope, rope_bf16),
    KERNEL(adamw, adamw_moment),
    KERNEL(adamw, adamw_param),
    KERNEL(adamw, adamw_multi),
    KERNEL(cross_entropy, cross_entropy_fwd_f32),
    KERNEL(cross_entropy, cross_entropy_fwd_bf16),
    KERNEL(cross_entropy, cross_entropy_bwd_f32),
    KERNEL(cross_entropy, cross_entropy_bwd_bf16),
    KERNEL(nf4_dequant, bf16_rounding_of_nf4_dequant),
    KERNEL(causal_softmax, bf16_rounding_of_elements),
    KERNEL(selftest, selftest_block_sum),
    KERNEL(selftest, selftest_partial_mask),
    KERNEL(selftest, selftest_shuffle_after_exit),
    KERNEL(selftest, selftest_write_past_end),
    KERNEL(selftest, selftest_missing_sync),
};

// A deadlock (e.g. `__syncthreads` inside a branch some threads skip) would hang the test.
void on_alarm(int) {
    const char message[] = "harness: the launch did not finish in time (deadlock at a barrier?)\n";
    [[maybe_unused]] const auto n = write(2, message, sizeof message - 1);
    _exit(71);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) die("usage: harness LAUNCH_FILE");
    std::signal(SIGALRM, on_alarm);
    alarm(300);
    Launch launch = parse(argv[1]);
    const auto found = registry.find(launch.kernel);
    if (found == registry.end()) die("no kernel named " + launch.kernel + " in the registry");
    found->second(launch);
    for (const Arg& arg : launch.args) {
        if (arg.written) store_buffer(arg);
    }
    for (const Arg& mem : launch.memory) store_buffer(mem);
    return 0;
}
