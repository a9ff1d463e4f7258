//! The CUDA C kernels of `src/gpu` run on CPU threads under an emulation of the CUDA thread
//! model (`tests/cuda_emu`: blocks, threads, `__syncthreads`, warp shuffles, `__shared__`), and
//! compared with this project's CPU reference. CI has no GPU and no CUDA toolkit, so this is
//! where the kernels' logic (indexing, reductions, rounding on the bits, ragged ends) is
//! checked; their speed is not.
//!
//! The harness is the same kernel source text compiled by the host's C++20 compiler (`CXX`, or
//! `c++`) once per test process, with AddressSanitizer and UBSan (any read or write past a
//! buffer, any misaligned vector access fails the launch); one test builds it again with
//! ThreadSanitizer, which finds a missing `__syncthreads`. Without a compiler the tests fail:
//! they must not disappear from CI quietly.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use half::bf16;
use qdylora::model::fused::softmax::Element;
use qdylora::model::fused::{rms_norm, rope, softmax, swiglu};
use qdylora::train::adamw_fused::{
    MomentStep, MultiStep, ParamStep, RankSlice, TABLE_ENTRY_BYTES, moment_values, param_values,
    table_entry, with_bias_corrections,
};
use qdylora_core::nf4;
use qdylora_formats::Nf4Weight;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---- The driver: compile the harness, write a launch file, run it, read the buffers back.

/// A kernel argument, in the kernel's parameter order.
enum Arg {
    /// A device buffer: its bytes before the launch (read back after it).
    Buf(Vec<u8>),
    /// A buffer of device addresses: its bytes, each `(at, mem, offset)` overwritten by the
    /// address of memory buffer `mem` plus `offset` bytes (8 bytes at byte `at`).
    Table(Vec<u8>, Vec<(usize, usize, usize)>),
    U32(u32),
    U64(u64),
    F32(f32),
}

/// How the harness binary is instrumented.
#[derive(Clone, Copy)]
enum Sanitizer {
    /// AddressSanitizer and UBSan: out-of-bounds accesses, misaligned vector accesses.
    Address,
    /// ThreadSanitizer: data races, such as a read of shared memory with no barrier after the
    /// write.
    Thread,
}

impl Sanitizer {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Self::Address => &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
            Self::Thread => &["-fsanitize=thread"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Address => "asan",
            Self::Thread => "tsan",
        }
    }
}

/// Compiles `tests/cuda_emu/harness.cpp` (which includes the kernels from `src/gpu`) into
/// `out` with `compiler`. The binary appears under its name only once complete.
fn compile_harness(compiler: &OsStr, sanitizer: Sanitizer, out: &Path) -> Result<(), String> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let partial = out.with_extension(format!("partial-{}", std::process::id()));
    let output = Command::new(compiler)
        // -ffp-contract=off: NVRTC runs with --fmad=false, so nothing is fused into an FMA.
        // -fno-strict-aliasing: the kernels reinterpret byte buffers as u32, float4 and uint4.
        // -O1: the launches are small; it compiles in about half the time of -O2.
        .args(["-std=c++20", "-O1", "-g1", "-pthread", "-ffp-contract=off"])
        .args(["-fno-strict-aliasing", "-fno-omit-frame-pointer"])
        .args(["-Wall", "-Wno-unknown-pragmas"])
        .args(sanitizer.flags())
        .arg("-I")
        .arg(crate_dir.join("src/gpu"))
        .arg(crate_dir.join("tests/cuda_emu/harness.cpp"))
        .arg("-o")
        .arg(&partial)
        .output()
        .map_err(|e| {
            format!(
                "cannot run the C++ compiler {compiler:?} ({e}). These tests need a C++20 \
                 compiler with <barrier> and the sanitizer runtimes: install the Debian package \
                 g++ (apt-get install g++), or set CXX. They fail rather than skip."
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "{compiler:?} failed to compile the CUDA emulation harness ({}). It needs C++20 \
             (<barrier>: g++ 11 or later) and libasan/libubsan/libtsan (part of the Debian \
             package g++):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    std::fs::rename(&partial, out).map_err(|e| format!("renaming {partial:?}: {e}"))
}

/// The harness for `sanitizer`, compiled on first use in this process.
fn harness(sanitizer: Sanitizer) -> &'static Path {
    static ASAN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static TSAN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let cell = match sanitizer {
        Sanitizer::Address => &ASAN,
        Sanitizer::Thread => &TSAN,
    };
    let built = cell.get_or_init(|| {
        let compiler = std::env::var_os("CXX").unwrap_or_else(|| OsString::from("c++"));
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cuda_emu_harness_{}", sanitizer.name()));
        compile_harness(&compiler, sanitizer, &out).map(|()| out)
    });
    match built {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

/// Runs `kernel` on a `grid` x `block` launch and returns the buffer arguments after it, in
/// order, scalars left out (the harness writes back those behind non-const pointers), or the
/// harness's error output.
fn try_launch(
    sanitizer: Sanitizer,
    kernel: &str,
    grid: u32,
    block: u32,
    args: &[Arg],
) -> Result<Vec<Vec<u8>>, String> {
    try_launch_with_memory(sanitizer, kernel, [grid, 1], block, args, &[]).map(|(a, _)| a)
}

/// Buffers' bytes, in order.
type Buffers = Vec<Vec<u8>>;

/// [`try_launch`] on a two-dimensional grid, with `memory`: buffers that are not arguments,
/// which the kernel reaches through the addresses in [`Arg::Table`]s. Returns the buffer
/// arguments and the memory buffers after the launch.
fn try_launch_with_memory(
    sanitizer: Sanitizer,
    kernel: &str,
    [grid_x, grid_y]: [u32; 2],
    block: u32,
    args: &[Arg],
    memory: &[Vec<u8>],
) -> Result<(Buffers, Buffers), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(dir.path().join(name), bytes).map_err(|e| e.to_string())
    };
    let mut script = format!("kernel {kernel}\ngrid {grid_x} {grid_y} 1\nblock {block} 1 1\n");
    let mut mems = Vec::new();
    for (i, bytes) in memory.iter().enumerate() {
        let name = format!("mem{i}.bin");
        write(&name, bytes)?;
        script += &format!("mem {name}\n");
        mems.push(name);
    }
    let mut buffers = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        match arg {
            Arg::Buf(bytes) | Arg::Table(bytes, _) => {
                let name = format!("arg{i}.bin");
                write(&name, bytes)?;
                script += &format!("buf {name}\n");
                buffers.push(name);
                if let Arg::Table(_, addresses) = arg {
                    for (at, mem, offset) in addresses {
                        script += &format!("ptr {at} {mem} {offset}\n");
                    }
                }
            }
            Arg::U32(v) => script += &format!("u32 {v}\n"),
            Arg::U64(v) => script += &format!("u64 {v}\n"),
            // As bits, so the kernel gets exactly this value.
            Arg::F32(v) => script += &format!("f32 {:#010x}\n", v.to_bits()),
        }
    }
    let launch_file = dir.path().join("launch.txt");
    std::fs::write(&launch_file, script).map_err(|e| e.to_string())?;
    let output = Command::new(harness(sanitizer))
        .arg(&launch_file)
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "{kernel} ({grid_x} x {grid_y} x {block}): the harness exited with {}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let read = |names: &[String]| {
        names
            .iter()
            .map(|name| std::fs::read(dir.path().join(name)).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, String>>()
    };
    Ok((read(&buffers)?, read(&mems)?))
}

/// [`try_launch`] under AddressSanitizer, failing the test on any error.
fn launch(kernel: &str, grid: u32, block: u32, args: &[Arg]) -> Vec<Vec<u8>> {
    try_launch(Sanitizer::Address, kernel, grid, block, args).unwrap_or_else(|e| panic!("{e}"))
}

// ---- Bytes in and out. Output buffers start as 0xff bytes (NaN in both types), so a value the
// kernel never writes cannot pass for a right one.

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[bf16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    let words = bytes.chunks_exact(4);
    words
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn bf16s(bytes: &[u8]) -> Vec<bf16> {
    let halves = bytes.chunks_exact(2);
    halves
        .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
        .collect()
}

/// The values rounded to bf16.
fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    let words = bytes.chunks_exact(4);
    words
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Fails with the first few elements where `ok(i)` is false.
fn check_all(what: &str, len: usize, ok: impl Fn(usize) -> bool, show: impl Fn(usize) -> String) {
    let bad: Vec<usize> = (0..len).filter(|&i| !ok(i)).collect();
    if !bad.is_empty() {
        let first: Vec<String> = bad.iter().take(8).map(|&i| show(i)).collect();
        panic!(
            "{what}: {} of {len} values differ; first: {}",
            bad.len(),
            first.join("; ")
        );
    }
}

fn same_bits_f32(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    check_all(
        what,
        want.len(),
        |i| got[i].to_bits() == want[i].to_bits(),
        |i| {
            format!(
                "[{i}] got {:e} ({:#010x}) want {:e}",
                got[i],
                got[i].to_bits(),
                want[i]
            )
        },
    );
}

fn same_bits_bf16(what: &str, got: &[bf16], want: &[bf16]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    check_all(
        what,
        want.len(),
        |i| got[i].to_bits() == want[i].to_bits(),
        |i| {
            format!(
                "[{i}] got {:#06x} want {:#06x}",
                got[i].to_bits(),
                want[i].to_bits()
            )
        },
    );
}

/// Steps between two bf16 values on the number line (+0 and -0 are the same point).
fn bf16_ulps(a: bf16, b: bf16) -> u32 {
    let line = |x: bf16| {
        let bits = i32::from(x.to_bits());
        if bits & 0x8000 != 0 {
            -(bits & 0x7fff)
        } else {
            bits
        }
    };
    line(a).abs_diff(line(b))
}

// ---- NF4 + double-quant dequantization (nf4_dequant.cu): bit for bit with qdylora-core.

/// Values with a scale that changes every 997 elements, so the absmax blocks and the nested
/// blocks differ, including all-zero blocks.
fn weight_values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let scales = [1e-3f32, 0.02, 1.0, 30.0, 0.0];
    (0..n)
        .map(|i| rng.random_range(-1.0f32..1.0) * scales[(i / 997) % scales.len()])
        .collect()
}

/// The kernel's arguments for `w`, in `dequant.rs`'s order, with `out` as the output.
fn dequant_args(w: &Nf4Weight, out: Vec<u8>) -> Vec<Arg> {
    let n = w.rows * w.cols;
    vec![
        Arg::Buf(w.packed.clone()),
        Arg::Buf(w.absmax_codes.clone()),
        Arg::Buf(f32_bytes(&w.nested_absmax)),
        Arg::Buf(f32_bytes(&w.code8[..])),
        Arg::Buf(f32_bytes(&nf4::CODE)),
        Arg::F32(w.offset),
        Arg::U32(w.blocksize.trailing_zeros()),
        Arg::U64(n as u64),
        Arg::Buf(out),
    ]
}

/// `grid_for` in `weight.rs`: one thread per group of 8 values, capped at `max_grid` blocks
/// (small here, so that the grid-stride loop goes round more than once).
fn dequant_grid(n: usize, block: u32, max_grid: u32) -> u32 {
    let blocks = n.div_ceil(8).div_ceil(block as usize);
    u32::try_from(blocks).unwrap().clamp(1, max_grid)
}

#[test]
fn nf4_dequantization_matches_the_core_bit_for_bit() {
    // (rows, cols, blocksize, threads per block, max grid)
    let cases = [
        (1, 1, 64, 256, 3),      // one value: only the ragged end
        (1, 7, 32, 256, 3),      // less than one group
        (3, 3, 32, 256, 3),      // one group and one ragged value
        (64, 300, 64, 256, 3),   // 300 blocks: the nested absmax index moves; loop wraps 3 times
        (37, 111, 64, 256, 3),   // ragged, not a multiple of the blocksize
        (129, 257, 32, 256, 4),  // 1,037 blocks of 32 (5 nested), ragged
        (100, 333, 128, 256, 2), // 261 blocks of 128, ragged
        (3, 5001, 4096, 256, 3), // the largest blocksize, ragged
        (16, 4096, 256, 96, 5),  // 96 threads: the table fill loops three times
    ];
    for (seed, &(rows, cols, blocksize, block, max_grid)) in cases.iter().enumerate() {
        let n = rows * cols;
        let w = Nf4Weight::quantize(rows, cols, &weight_values(n, seed as u64), blocksize).unwrap();
        let mut want = vec![0.0f32; n];
        nf4::dequantize(&w.packed, &w.absmax(), blocksize, &mut want).unwrap();
        let want_bf16: Vec<bf16> = want.iter().map(|&v| bf16::from_f32(v)).collect();
        let grid = dequant_grid(n, block, max_grid);
        let case = format!("{rows}x{cols} blocksize {blocksize}, grid {grid} x {block}");

        let out = launch(
            "nf4_dq_dequantize_f32",
            grid,
            block,
            &dequant_args(&w, vec![0xff; 4 * n]),
        );
        same_bits_f32(&format!("f32, {case}"), &f32s(&out[5]), &want);

        let out = launch(
            "nf4_dq_dequantize_bf16",
            grid,
            block,
            &dequant_args(&w, vec![0xff; 2 * n]),
        );
        same_bits_bf16(&format!("bf16, {case}"), &bf16s(&out[5]), &want_bf16);
    }
}

/// Both copies of the kernels' `bf16_bits_rne` (in `nf4_dequant.cu` and `elements.cuh`) round
/// as `half::bf16::from_f32` does: every upper half with the lower halves where rounding
/// decides (zero, just below, at and just above one half, the maximum), so every NaN, infinity,
/// subnormal and tie of both parities.
#[test]
fn the_kernels_bf16_rounding_matches_half() {
    let bits: Vec<u32> = (0..=0xffffu32)
        .flat_map(|hi| [0, 1, 0x7fff, 0x8000, 0x8001, 0xffff].map(|lo| (hi << 16) | lo))
        .collect();
    let want: Vec<u16> = bits
        .iter()
        .map(|&b| bf16::from_f32(f32::from_bits(b)).to_bits())
        .collect();
    for kernel in ["bf16_rounding_of_nf4_dequant", "bf16_rounding_of_elements"] {
        let args = [
            Arg::Buf(u32_bytes(&bits)),
            Arg::Buf(vec![0xff; 2 * bits.len()]),
            Arg::U64(bits.len() as u64),
        ];
        let got = bf16s(&launch(kernel, 4, 256, &args)[1]);
        check_all(
            kernel,
            bits.len(),
            |i| got[i].to_bits() == want[i],
            |i| {
                format!(
                    "{:#010x}: got {:#06x} want {:#06x}",
                    bits[i],
                    got[i].to_bits(),
                    want[i]
                )
            },
        );
    }
}

// ---- Causal softmax (causal_softmax.cu) against model::fused::softmax's rows.

/// One warp per row, four rows per block (`warp_per_row_grid` in `gpu/fused.rs`).
const SOFTMAX_BLOCK: u32 = 128;

/// A batch of attention scores: `heads` sequences of `tq` rows of `tk` keys.
struct SoftmaxCase {
    heads: usize,
    tq: usize,
    tk: usize,
    scale: f32,
    /// Scores are uniform in `centre ± 30`.
    centre: f32,
}

const SOFTMAX_CASES: [SoftmaxCase; 7] = [
    SoftmaxCase {
        heads: 3,
        tq: 7,
        tk: 7,
        scale: 0.125,
        centre: 0.0,
    }, // last block: 1 row of 4
    SoftmaxCase {
        heads: 2,
        tq: 5,
        tk: 40,
        scale: 0.125,
        centre: 0.0,
    }, // tq < tk
    SoftmaxCase {
        heads: 2,
        tq: 45,
        tk: 45,
        scale: 0.125,
        centre: 0.0,
    }, // not a multiple of 32
    SoftmaxCase {
        heads: 2,
        tq: 150,
        tk: 150,
        scale: 0.125,
        centre: 0.0,
    }, // longer than 4 warps
    SoftmaxCase {
        heads: 3,
        tq: 1,
        tk: 200,
        scale: 0.125,
        centre: 0.0,
    }, // one query (decoding)
    SoftmaxCase {
        heads: 1,
        tq: 33,
        tk: 161,
        scale: 0.125,
        centre: 0.0,
    }, // tq < tk, both ragged
    SoftmaxCase {
        heads: 1,
        tq: 40,
        tk: 40,
        scale: 1.0,
        centre: 90.0,
    }, // exp overflows unless max goes first
];

impl SoftmaxCase {
    fn rows(&self) -> usize {
        self.heads * self.tq
    }

    fn grid(&self) -> u32 {
        u32::try_from(self.rows().div_ceil(4)).unwrap()
    }

    fn scalars(&self) -> [Arg; 4] {
        [
            Arg::U32(u32::try_from(self.rows()).unwrap()),
            Arg::U32(u32::try_from(self.tq).unwrap()),
            Arg::U32(u32::try_from(self.tk).unwrap()),
            Arg::F32(self.scale),
        ]
    }

    /// Random scores and probability gradients.
    fn inputs(&self, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let len = self.rows() * self.tk;
        let scores = (0..len)
            .map(|_| self.centre + rng.random_range(-30.0f32..30.0))
            .collect();
        let grads = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        (scores, grads)
    }

    fn describe(&self) -> String {
        let Self {
            heads,
            tq,
            tk,
            scale,
            centre,
        } = self;
        format!("{heads} x [{tq}, {tk}], scale {scale}, scores {centre} ± 30")
    }
}

/// The bound on |kernel - reference| of a score gradient `scale · p_j · (g_j - Σ p·g)` from
/// the f32 rounding of two differently ordered sums: relative 1e-5 of the result and of the
/// two terms whose difference it is (they can cancel).
fn grad_tolerance(probs: &[f32], grads: &[f32], want: &[f32], scale: f32, tk: usize) -> Vec<f32> {
    let rows = probs.chunks(tk).zip(grads.chunks(tk)).zip(want.chunks(tk));
    rows.flat_map(|((p, g), d)| {
        let dot_bound: f32 = p.iter().zip(g).map(|(p, g)| p * g.abs()).sum();
        (0..tk).map(move |j| 1e-5 * (d[j].abs() + scale * p[j] * (g[j].abs() + dot_bound)))
    })
    .collect()
}

#[test]
fn causal_softmax_f32_matches_the_cpu_rows() {
    for (seed, case) in SOFTMAX_CASES.iter().enumerate() {
        let (scores, grads) = case.inputs(seed as u64);
        let (tq, tk, scale) = (case.tq, case.tk, case.scale);
        let len = scores.len();
        let mut probs = vec![0.0f32; len];
        softmax::forward_rows(&scores, &mut probs, tq, tk, scale);
        let mut want_grad = vec![0.0f32; len];
        softmax::backward_rows(&scores, &grads, &mut want_grad, tq, tk, scale);

        let mut args = vec![Arg::Buf(f32_bytes(&scores)), Arg::Buf(vec![0xff; 4 * len])];
        args.extend(case.scalars());
        let got = f32s(&launch("causal_softmax_fwd_f32", case.grid(), SOFTMAX_BLOCK, &args)[1]);
        // Masked keys must be exactly 0 in both: the bound is 0 there.
        check_all(
            &format!("forward f32, {}", case.describe()),
            len,
            |i| (got[i] - probs[i]).abs() <= 1e-5 * probs[i].abs(),
            |i| format!("[{i}] got {:e} want {:e}", got[i], probs[i]),
        );

        let mut args = vec![
            Arg::Buf(f32_bytes(&scores)),
            Arg::Buf(f32_bytes(&grads)),
            Arg::Buf(vec![0xff; 4 * len]),
        ];
        args.extend(case.scalars());
        let got = f32s(&launch("causal_softmax_bwd_f32", case.grid(), SOFTMAX_BLOCK, &args)[2]);
        let tolerance = grad_tolerance(&probs, &grads, &want_grad, scale, tk);
        check_all(
            &format!("backward f32, {}", case.describe()),
            len,
            |i| (got[i] - want_grad[i]).abs() <= tolerance[i],
            |i| format!("[{i}] got {:e} want {:e}", got[i], want_grad[i]),
        );
    }
}

#[test]
fn causal_softmax_bf16_matches_the_cpu_rows_within_one_ulp() {
    for (seed, case) in SOFTMAX_CASES.iter().enumerate() {
        let (scores, grads) = case.inputs(100 + seed as u64);
        let scores: Vec<bf16> = scores.iter().map(|&v| bf16::from_f32(v)).collect();
        let grads: Vec<bf16> = grads.iter().map(|&v| bf16::from_f32(v)).collect();
        let (tq, tk, scale) = (case.tq, case.tk, case.scale);
        let len = scores.len();
        let mut probs = vec![bf16::ZERO; len];
        softmax::forward_rows(&scores, &mut probs, tq, tk, scale);
        let mut want_grad = vec![bf16::ZERO; len];
        softmax::backward_rows(&scores, &grads, &mut want_grad, tq, tk, scale);

        let mut args = vec![Arg::Buf(bf16_bytes(&scores)), Arg::Buf(vec![0xff; 2 * len])];
        args.extend(case.scalars());
        let got = bf16s(&launch("causal_softmax_fwd_bf16", case.grid(), SOFTMAX_BLOCK, &args)[1]);
        check_all(
            &format!("forward bf16, {}", case.describe()),
            len,
            |i| bf16_ulps(got[i], probs[i]) <= 1,
            |i| format!("[{i}] got {} want {}", got[i], probs[i]),
        );

        let mut args = vec![
            Arg::Buf(bf16_bytes(&scores)),
            Arg::Buf(bf16_bytes(&grads)),
            Arg::Buf(vec![0xff; 2 * len]),
        ];
        args.extend(case.scalars());
        let got = bf16s(&launch("causal_softmax_bwd_bf16", case.grid(), SOFTMAX_BLOCK, &args)[2]);
        check_all(
            &format!("backward bf16, {}", case.describe()),
            len,
            |i| bf16_ulps(got[i], want_grad[i]) <= 1,
            |i| format!("[{i}] got {} want {}", got[i], want_grad[i]),
        );
    }
}

// ---- SwiGLU (swiglu.cu) against model::fused::swiglu: the same formulas in the same order,
// and under the emulation the same expf (the host's) on both sides, so bit for bit. (On a GPU
// CUDA's expf may differ by an ulp or two.)

/// Threads per block of the elementwise kernels (`gpu/fused.rs`).
const ELEMENTWISE_BLOCK: u32 = 256;

#[test]
fn swiglu_matches_the_cpu_values_bit_for_bit() {
    // (values, grid): the grid `elementwise_grid` gives, and smaller ones so the loop wraps.
    let cases = [(1, 1), (1000, 4), (1000, 1), (70_001, 3)];
    for (seed, &(n, grid)) in cases.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(200 + seed as u64);
        let mut gate: Vec<f32> = (0..n).map(|_| rng.random_range(-12.0f32..12.0)).collect();
        // Where exp(-x) overflows or sigmoid saturates, and zero.
        for (slot, v) in gate.iter_mut().zip([-100.0, 100.0, 0.0, -0.0, -88.0]) {
            *slot = v;
        }
        let up: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let grad: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let case = format!("{n} values, grid {grid}");
        swiglu_kernels_match(&gate, &up, &grad, grid, &case);
        // bf16 storage: the inputs rounded first, the reference on the same bf16 values.
        swiglu_kernels_match(&to_bf16(&gate), &to_bf16(&up), &to_bf16(&grad), grid, &case);
    }
}

/// A storage type of the fused kernels, as the launch files carry it.
trait Stored: Element {
    /// The kernels' name suffix.
    const SUFFIX: &'static str;
    /// Bytes per value.
    const SIZE: usize;
    fn to_bytes(v: &[Self]) -> Vec<u8>;
    fn from_bytes(bytes: &[u8]) -> Vec<Self>;
    fn same_bits(what: &str, got: &[Self], want: &[Self]);
}

impl Stored for f32 {
    const SUFFIX: &'static str = "f32";
    const SIZE: usize = 4;
    fn to_bytes(v: &[Self]) -> Vec<u8> {
        f32_bytes(v)
    }
    fn from_bytes(bytes: &[u8]) -> Vec<Self> {
        f32s(bytes)
    }
    fn same_bits(what: &str, got: &[Self], want: &[Self]) {
        same_bits_f32(what, got, want)
    }
}

impl Stored for bf16 {
    const SUFFIX: &'static str = "bf16";
    const SIZE: usize = 2;
    fn to_bytes(v: &[Self]) -> Vec<u8> {
        bf16_bytes(v)
    }
    fn from_bytes(bytes: &[u8]) -> Vec<Self> {
        bf16s(bytes)
    }
    fn same_bits(what: &str, got: &[Self], want: &[Self]) {
        same_bits_bf16(what, got, want)
    }
}

/// The forward and the gradient kernels of SwiGLU in `T` (each gradient alone, and both in one
/// pass) against the CPU values, bit for bit.
fn swiglu_kernels_match<T: Stored>(gate: &[T], up: &[T], grad: &[T], grid: u32, case: &str) {
    let n = gate.len();
    let check = |pass: &str, inputs: &[&[T]], want: &[T]| {
        let mut args: Vec<Arg> = inputs.iter().map(|v| Arg::Buf(T::to_bytes(v))).collect();
        args.push(Arg::Buf(vec![0xff; T::SIZE * want.len()]));
        args.push(Arg::U64(n as u64));
        let kernel = format!("swiglu_{pass}_{}", T::SUFFIX);
        let out = &launch(&kernel, grid, ELEMENTWISE_BLOCK, &args)[inputs.len()];
        T::same_bits(&format!("{kernel}, {case}"), &T::from_bytes(out), want);
    };
    let mut want = vec![T::narrow(0.0); n];
    swiglu::forward_values(gate, up, &mut want);
    check("fwd", &[gate, up], &want);
    swiglu::grad_gate_values(gate, up, grad, &mut want);
    check("bwd_gate", &[gate, up, grad], &want);
    swiglu::grad_up_values(gate, grad, &mut want);
    check("bwd_up", &[gate, grad], &want);
    let mut want = vec![T::narrow(0.0); 2 * n];
    swiglu::grads_values(gate, up, grad, &mut want);
    check("bwd", &[gate, up, grad], &want);
}

// ---- RMSNorm (rms_norm.cu) against model::fused::rms_norm's rows: the same formulas, the
// row sums in another order (lanes, then shuffles), so within f32 rounding of them.

/// `(rows, n)`: a last block with one row of four, rows shorter than a warp, ragged rows,
/// rows of many warps' width, LLaMA-7B's 4,096.
const RMS_NORM_CASES: [(usize, usize); 6] =
    [(1, 1), (9, 31), (6, 45), (5, 200), (3, 4096), (13, 64)];

#[test]
fn rms_norm_matches_the_cpu_rows() {
    for (seed, &(rows, n)) in RMS_NORM_CASES.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(300 + seed as u64);
        let mut x: Vec<f32> = (0..rows * n)
            .map(|_| rng.random_range(-4.0f32..4.0))
            .collect();
        // A row of zeros: the statistic is eps alone.
        if rows > 2 {
            x[n..2 * n].fill(0.0);
        }
        let w: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let grad: Vec<f32> = (0..rows * n)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let case = format!("{rows} rows of {n}");
        rms_norm_kernels_match(&x, &w, &grad, n, 0.0, &case);
        let y: Vec<f32> = (0..rows * n)
            .map(|_| rng.random_range(-4.0f32..4.0))
            .collect();
        residual_kernels_match(&x, &y, &w, &grad, n, &case);
        residual_kernels_match(
            &to_bf16(&x),
            &to_bf16(&y),
            &to_bf16(&w),
            &to_bf16(&grad),
            n,
            &case,
        );
        // bf16: the forward rounds twice (before and after the weight, as transformers does),
        // so a last-bit difference in the statistic can move it two steps; the backward once.
        rms_norm_kernels_match(
            &to_bf16(&x),
            &to_bf16(&w),
            &to_bf16(&grad),
            n,
            2f32.powi(-7),
            &case,
        );
    }
}

/// The two RMSNorm kernels in `T` against the CPU rows, within `steps` of `T`'s relative
/// rounding step `step` (2 forward, 1 backward) plus 1e-5 of the terms summed in f32.
fn rms_norm_kernels_match<T: Stored>(
    x: &[T],
    w: &[T],
    grad: &[T],
    n: usize,
    step: f32,
    case: &str,
) {
    const EPS: f32 = 1e-5;
    let len = x.len();
    let rows = len / n;
    let grid = u32::try_from(rows.div_ceil(4)).unwrap();
    let run = |pass: &str, inputs: &[&[T]]| -> Vec<f32> {
        let mut args: Vec<Arg> = inputs.iter().map(|v| Arg::Buf(T::to_bytes(v))).collect();
        args.push(Arg::Buf(vec![0xff; T::SIZE * len]));
        args.extend([Arg::U32(rows as u32), Arg::U32(n as u32), Arg::F32(EPS)]);
        let kernel = format!("rms_norm_{pass}_{}", T::SUFFIX);
        let out = &launch(&kernel, grid, SOFTMAX_BLOCK, &args)[inputs.len()];
        T::from_bytes(out).iter().map(|v| v.widen()).collect()
    };
    let wide = |v: &[T]| -> Vec<f32> { v.iter().map(|v| v.widen()).collect() };
    let (xf, wf, gf) = (wide(x), wide(w), wide(grad));
    // Each row's inverse RMS and Σ |g·w·x|, for the bounds.
    let stats: Vec<(f32, f32)> = xf
        .chunks(n)
        .zip(gf.chunks(n))
        .map(|(x, g)| {
            let sq: f32 = x.iter().map(|v| v * v).sum();
            let dot: f32 = x
                .iter()
                .zip(g)
                .zip(&wf)
                .map(|((x, g), w)| (x * g * w).abs())
                .sum();
            (1.0 / (sq / n as f32 + EPS).sqrt(), dot)
        })
        .collect();

    let mut want = vec![T::narrow(0.0); len];
    rms_norm::forward_rows(x, w, &mut want, EPS);
    let want = wide(&want);
    let got = run("fwd", &[x, w]);
    check_all(
        &format!("rms_norm_fwd_{}, {case}", T::SUFFIX),
        len,
        |i| {
            let (r, _) = stats[i / n];
            let term = (xf[i] * r * wf[i % n]).abs();
            (got[i] - want[i]).abs() <= 2.0 * step * want[i].abs() + 1e-5 * term
        },
        |i| format!("[{i}] got {:e} want {:e}", got[i], want[i]),
    );
    // The bound above leaves room for the two roundings to land apart, which is rare: in bf16
    // nearly every value must be the CPU's to the bit (a kernel that skipped the rounding
    // before the weight would differ in about half of them).
    let differing = (0..len).filter(|&i| got[i] != want[i]).count();
    assert!(
        step == 0.0 || differing * 50 <= len,
        "rms_norm_fwd_{}, {case}: {differing} of {len} values differ in some bit",
        T::SUFFIX
    );

    let mut want = vec![T::narrow(0.0); len];
    rms_norm::backward_rows(x, w, grad, &mut want, EPS);
    let want = wide(&want);
    let got = run("bwd", &[x, w, grad]);
    check_all(
        &format!("rms_norm_bwd_{}, {case}", T::SUFFIX),
        len,
        |i| {
            let (r, dot) = stats[i / n];
            let terms = (r * gf[i] * wf[i % n]).abs() + xf[i].abs() * r * r * r * dot / n as f32;
            (got[i] - want[i]).abs() <= step * want[i].abs() + 1e-5 * terms
        },
        |i| format!("[{i}] got {:e} want {:e}", got[i], want[i]),
    );
}

/// The RMSNorm kernels with a residual sum against the plain ones, bit for bit: the forward's
/// first half is `x + y` rounded to `T` (the CPU's), its second half `rms_norm_fwd` of that
/// sum; the backward is `y + round(rms_norm_bwd)`, with `y` as the residual gradient. (The
/// plain kernels are held to the CPU rows by `rms_norm_kernels_match`.)
fn residual_kernels_match<T: Stored>(x: &[T], y: &[T], w: &[T], grad: &[T], n: usize, case: &str) {
    const EPS: f32 = 1e-5;
    let len = x.len();
    let rows = len / n;
    let grid = u32::try_from(rows.div_ceil(4)).unwrap();
    let run = |kernel: &str, inputs: &[&[T]], out_len: usize| -> Vec<T> {
        let mut args: Vec<Arg> = inputs.iter().map(|v| Arg::Buf(T::to_bytes(v))).collect();
        args.push(Arg::Buf(vec![0xff; T::SIZE * out_len]));
        args.extend([Arg::U32(rows as u32), Arg::U32(n as u32), Arg::F32(EPS)]);
        let kernel = format!("{kernel}_{}", T::SUFFIX);
        T::from_bytes(&launch(&kernel, grid, SOFTMAX_BLOCK, &args)[inputs.len()])
    };
    let sum: Vec<T> = x
        .iter()
        .zip(y)
        .map(|(a, b)| T::narrow(a.widen() + b.widen()))
        .collect();
    let both = run("residual_rms_norm_fwd", &[x, y, w], 2 * len);
    let what = format!("residual_rms_norm_fwd_{}, {case}", T::SUFFIX);
    T::same_bits(&format!("{what}: the sum"), &both[..len], &sum);
    let normed = run("rms_norm_fwd", &[&sum, w], len);
    T::same_bits(&format!("{what}: the norm"), &both[len..], &normed);

    let dx = run("rms_norm_bwd", &[x, w, grad], len);
    let want: Vec<T> = y
        .iter()
        .zip(&dx)
        .map(|(r, d)| T::narrow(r.widen() + d.widen()))
        .collect();
    let got = run("rms_norm_bwd_add", &[x, w, grad, y], len);
    T::same_bits(
        &format!("rms_norm_bwd_add_{}, {case}", T::SUFFIX),
        &got,
        &want,
    );
}

// ---- RoPE (rope.cu) against model::fused::rope: the same products in the same order and no
// transcendental, so bit for bit on any hardware.

#[test]
fn rope_matches_the_cpu_rows_bit_for_bit() {
    // (batch rows, heads, t, d, grid): the grid `elementwise_grid` gives, and smaller ones so
    // the loop wraps. Each in the three row orders the model uses: in place (the heads folded
    // into the leading rows), a linear's output split into heads, and heads merged back.
    let cases = [
        (1, 1, 1, 2, 1),
        (2, 3, 7, 10, 1),
        (1, 4, 33, 128, 3),
        (2, 1, 50, 64, 13),
        (3, 5, 6, 8, 2),
    ];
    let orders = [
        (rope::RowOrder::Heads, rope::RowOrder::Heads),
        (rope::RowOrder::Tokens, rope::RowOrder::Heads),
        (rope::RowOrder::Heads, rope::RowOrder::Tokens),
    ];
    for (seed, &(batch, heads, t, d, grid)) in cases.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(400 + seed as u64);
        let half = d / 2;
        let x: Vec<f32> = (0..batch * heads * t * d)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        let angle = |i: usize| (i / half) as f32 * 0.3f32.powf((i % half) as f32 / half as f32);
        let cos: Vec<f32> = (0..t * half).map(|i| angle(i).cos()).collect();
        let sin: Vec<f32> = (0..t * half).map(|i| angle(i).sin()).collect();
        for (input, output) in orders {
            let rows = match input == output {
                true => rope::Rows::in_place_order(t),
                false => rope::Rows {
                    t,
                    heads,
                    input,
                    output,
                },
            };
            let case = format!("[{batch}, {heads}, {t}, {d}] {input:?} to {output:?}, grid {grid}");
            rope_kernel_matches(&x, &cos, &sin, rows, grid, &case);
            rope_kernel_matches(
                &to_bf16(&x),
                &to_bf16(&cos),
                &to_bf16(&sin),
                rows,
                grid,
                &case,
            );
        }
    }
}

/// The RoPE kernel in `T`, both directions, against the CPU rows.
fn rope_kernel_matches<T: Stored>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    rows: rope::Rows,
    grid: u32,
    case: &str,
) {
    let half = cos.len() / rows.t;
    for direction in [rope::Direction::Forward, rope::Direction::Inverse] {
        let mut want = vec![T::narrow(0.0); x.len()];
        rope::rotate_rows(x, cos, sin, &mut want, rows, direction.sign());
        let args = [
            Arg::Buf(T::to_bytes(x)),
            Arg::Buf(T::to_bytes(cos)),
            Arg::Buf(T::to_bytes(sin)),
            Arg::Buf(vec![0xff; T::SIZE * x.len()]),
            Arg::U64((x.len() / 2) as u64),
            Arg::U32(rows.t as u32),
            Arg::U32(half as u32),
            Arg::U32(rows.heads as u32),
            Arg::U32(rows.order_bits()),
            Arg::F32(direction.sign()),
        ];
        let kernel = format!("rope_{}", T::SUFFIX);
        let out = &launch(&kernel, grid, ELEMENTWISE_BLOCK, &args)[3];
        T::same_bits(
            &format!("{kernel} {direction:?}, {case}"),
            &T::from_bytes(out),
            &want,
        );
    }
}

// ---- Cross-entropy (cross_entropy.cu) against the same rows in f64. (The CPU rows of
// model::fused::cross_entropy add a row's exponentials one after another, an error that grows
// with the vocabulary, 3e-5 of the sum at 32,000; the kernel's strided-then-tree sum is closer
// to exact, so the test holds it to the error of its own summation instead.)

/// Threads per block, as `gpu/cross_entropy.rs` launches them.
const CROSS_ENTROPY_BLOCK: u32 = 256;

/// `(rows, vocab, centre)`: one column, rows shorter than a warp, a ragged row of a few
/// blocks' width, logits near 90 (exp overflows unless the max goes first), LLaMA's 32,000.
const CROSS_ENTROPY_CASES: [(usize, usize, f32); 5] = [
    (2, 1, 0.0),
    (5, 7, 0.0),
    (6, 1001, 0.0),
    (4, 300, 90.0),
    (2, 32000, 0.0),
];

#[test]
fn cross_entropy_matches_f64_rows() {
    for (seed, &(rows, vocab, centre)) in CROSS_ENTROPY_CASES.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(500 + seed as u64);
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|_| centre + rng.random_range(-8.0f32..8.0))
            .collect();
        let mut targets: Vec<u32> = (0..rows)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        // A target past the vocabulary (the host rejects it first): NaN, and no read past the row.
        targets[rows - 1] = vocab as u32;
        let grad: Vec<f32> = (0..rows).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let case = format!("{rows} rows of {vocab} around {centre}");
        cross_entropy_kernels_match(&logits, &targets, &grad, 0.0, &case);
        cross_entropy_kernels_match(&to_bf16(&logits), &targets, &grad, 2f32.powi(-8), &case);
    }
}

/// Both cross-entropy kernels with logits in `T` against f64 rows. A row's sum of
/// exponentials is off by at most (terms per thread + the 5 + 7 additions of the tree) f32
/// rounding steps, plus about two ulps per `expf`: that relative error moves the loss by as
/// much and each softmax value by as much of itself. The gradients may also be `step` off
/// (their rounding to `T`). A target past the vocabulary gives NaN for its row, only there.
fn cross_entropy_kernels_match<T: Stored>(
    logits: &[T],
    targets: &[u32],
    grad: &[f32],
    step: f32,
    case: &str,
) {
    const ULP: f64 = 1.0 / (1u64 << 24) as f64;
    let rows = targets.len();
    let vocab = logits.len() / rows;
    let sum_error = (vocab.div_ceil(CROSS_ENTROPY_BLOCK as usize) + 12 + 4) as f64 * ULP;
    // Per row: the max, ln Σ exp(x - max), and the softmax, in f64.
    let wide: Vec<f64> = logits.iter().map(|v| v.widen() as f64).collect();
    let stats: Vec<(f64, f64)> = wide
        .chunks(vocab)
        .map(|r| {
            let max = r.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            (max, r.iter().map(|v| (v - max).exp()).sum::<f64>().ln())
        })
        .collect();
    let bad = |row: usize| targets[row] as usize >= vocab;
    let scalars = || [Arg::U32(rows as u32), Arg::U32(vocab as u32)];

    let mut args = vec![
        Arg::Buf(T::to_bytes(logits)),
        Arg::Buf(u32_bytes(targets)),
        Arg::Buf(vec![0xff; 4 * rows]),
    ];
    args.extend(scalars());
    let kernel = format!("cross_entropy_fwd_{}", T::SUFFIX);
    let got = f32s(&launch(&kernel, rows as u32, CROSS_ENTROPY_BLOCK, &args)[2]);
    let want = |i: usize| {
        let (max, ln_sum) = stats[i];
        ln_sum + max - wide[i * vocab + targets[i] as usize]
    };
    check_all(
        &format!("{kernel}, {case}"),
        rows,
        |i| match bad(i) {
            true => got[i].is_nan(),
            false => {
                let (max, ln_sum) = stats[i];
                let rounding = 4.0 * ULP * (ln_sum.abs() + 2.0 * max.abs() + 1.0);
                (got[i] as f64 - want(i)).abs() <= 2.0 * sum_error + rounding
            }
        },
        |i| {
            format!(
                "[{i}] got {:e} want {:e}",
                got[i],
                if bad(i) { f64::NAN } else { want(i) }
            )
        },
    );

    let mut args = vec![
        Arg::Buf(T::to_bytes(logits)),
        Arg::Buf(u32_bytes(targets)),
        Arg::Buf(f32_bytes(grad)),
        Arg::Buf(vec![0xff; T::SIZE * logits.len()]),
    ];
    args.extend(scalars());
    let kernel = format!("cross_entropy_bwd_{}", T::SUFFIX);
    let got: Vec<f32> = T::from_bytes(&launch(&kernel, rows as u32, CROSS_ENTROPY_BLOCK, &args)[3])
        .iter()
        .map(|v| v.widen())
        .collect();
    // (value, bound) of logit i.
    let want = |i: usize| {
        let (row, j) = (i / vocab, i % vocab);
        let (max, ln_sum) = stats[row];
        let p = (wide[i] - max - ln_sum).exp();
        let hit = if j == targets[row] as usize { 1.0 } else { 0.0 };
        let g = grad[row] as f64;
        let value = g * (p - hit);
        let bound = g.abs() * (p * (2.0 * sum_error + 8.0 * ULP) + 2.0 * ULP * (p - hit).abs());
        (value, bound + step as f64 * value.abs())
    };
    check_all(
        &format!("{kernel}, {case}"),
        logits.len(),
        |i| match bad(i / vocab) {
            true => got[i].is_nan(),
            false => {
                let (value, bound) = want(i);
                (got[i] as f64 - value).abs() <= bound
            }
        },
        |i| format!("[{i}] got {:e} want {:?}", got[i], want(i)),
    );
}

// ---- The emulator itself (tests/cuda_emu/selftest.cu).

/// `selftest_block_sum` over `n` inputs: per-block sums and per-warp prefix sums.
fn block_sum(sanitizer: Sanitizer, n: usize, grid: u32, block: u32) -> Result<(), String> {
    let input: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(7919) % 1000).collect();
    let args = [
        Arg::Buf(u32_bytes(&input)),
        Arg::Buf(vec![0xff; 4 * grid as usize]),
        Arg::Buf(vec![0xff; 4 * n]),
        Arg::U32(n as u32),
    ];
    let out = try_launch(sanitizer, "selftest_block_sum", grid, block, &args)?;
    let sums: Vec<u32> = input
        .chunks(block as usize)
        .map(|c| c.iter().sum())
        .collect();
    assert_eq!(u32s(&out[1]), sums, "block sums");
    let scans: Vec<u32> = (0..n)
        .map(|i| input[i / 32 * 32..=i].iter().sum())
        .collect();
    assert_eq!(u32s(&out[2]), scans, "warp prefix sums");
    Ok(())
}

#[test]
fn the_emulator_reduces_with_shuffles_and_shared_memory() {
    // 4 blocks of 8 warps, the last one ragged; then a block of one warp.
    block_sum(Sanitizer::Address, 1000, 4, 256).unwrap();
    block_sum(Sanitizer::Address, 20, 1, 32).unwrap();
}

#[test]
fn the_emulator_fails_loudly_on_what_cuda_leaves_undefined() {
    let out32 = || vec![Arg::Buf(vec![0; 4 * 64])];
    let cases = [
        ("selftest_partial_mask", out32(), "partial lane mask"),
        (
            "selftest_shuffle_after_exit",
            out32(),
            "shuffle after lanes of the warp returned",
        ),
        (
            "selftest_write_past_end",
            vec![Arg::Buf(vec![0; 4 * 10]), Arg::U32(10)],
            "heap-buffer-overflow",
        ),
    ];
    for (kernel, args, expected) in cases {
        let err = try_launch(Sanitizer::Address, kernel, 1, 64, &args)
            .expect_err(&format!("{kernel} must fail"));
        assert!(err.contains(expected), "{kernel}: {err}");
    }
    // A block of 48 threads has a partial warp: no shuffle there.
    let err = block_sum(Sanitizer::Address, 48, 1, 48).expect_err("a partial warp must fail");
    assert!(err.contains("partial warp"), "{err}");
}

/// The ThreadSanitizer build sees a missing `__syncthreads` as the data race it is, whatever
/// the timing, and the real kernels (shared tables, shuffles) have none.
#[test]
fn the_kernels_have_no_data_race() {
    let input: Vec<u8> = (0..64u32).flat_map(|v| v.to_le_bytes()).collect();
    let args = [Arg::Buf(input), Arg::Buf(vec![0; 4 * 64])];
    let err = try_launch(Sanitizer::Thread, "selftest_missing_sync", 1, 64, &args)
        .expect_err("a read of shared memory with no barrier after the write is a race");
    assert!(err.contains("data race"), "{err}");

    block_sum(Sanitizer::Thread, 300, 2, 256).unwrap();

    let w = Nf4Weight::quantize(64, 300, &weight_values(64 * 300, 7), 64).unwrap();
    let args = dequant_args(&w, vec![0xff; 4 * 64 * 300]);
    try_launch(Sanitizer::Thread, "nf4_dq_dequantize_f32", 2, 256, &args).unwrap();

    let case = &SOFTMAX_CASES[5];
    let (scores, grads) = case.inputs(7);
    let mut args = vec![
        Arg::Buf(f32_bytes(&scores)),
        Arg::Buf(f32_bytes(&grads)),
        Arg::Buf(vec![0xff; 4 * scores.len()]),
    ];
    args.extend(case.scalars());
    try_launch(
        Sanitizer::Thread,
        "causal_softmax_bwd_f32",
        case.grid(),
        SOFTMAX_BLOCK,
        &args,
    )
    .unwrap();

    // The residual norm reads back the sums its lanes wrote (each lane its own: no barrier).
    let (rows, n) = (5, 200);
    let x: Vec<f32> = (0..rows * n).map(|i| (i % 13) as f32 * 0.5 - 3.0).collect();
    let args = [
        Arg::Buf(f32_bytes(&x)),
        Arg::Buf(f32_bytes(&x)),
        Arg::Buf(f32_bytes(&x[..n])),
        Arg::Buf(vec![0xff; 4 * 2 * x.len()]),
        Arg::U32(rows as u32),
        Arg::U32(n as u32),
        Arg::F32(1e-5),
    ];
    try_launch(
        Sanitizer::Thread,
        "residual_rms_norm_fwd_f32",
        2,
        SOFTMAX_BLOCK,
        &args,
    )
    .unwrap();

    // Cross-entropy reduces each row across the block's warps through shared memory, twice.
    let (rows, vocab) = (3, 1001);
    let logits: Vec<f32> = (0..rows * vocab).map(|i| (i % 37) as f32 * 0.25).collect();
    let args = [
        Arg::Buf(f32_bytes(&logits)),
        Arg::Buf(u32_bytes(&[0, 500, 1000])),
        Arg::Buf(f32_bytes(&[1.0, -0.5, 2.0])),
        Arg::Buf(vec![0xff; 4 * logits.len()]),
        Arg::U32(rows as u32),
        Arg::U32(vocab as u32),
    ];
    let grid = rows as u32;
    try_launch(
        Sanitizer::Thread,
        "cross_entropy_bwd_f32",
        grid,
        CROSS_ENTROPY_BLOCK,
        &args,
    )
    .unwrap();
}

// ---- Masked AdamW (adamw.cu) against train::adamw_fused's CPU loops: the same f32 operations
// in the same order, so bit for bit (sqrt and division are correctly rounded on both).

/// (rows, cols, rank_dim, start, len, grid): rows of A (whole, one contiguous run) and
/// columns of B (strided), one rank or several, the first and the last index, and grids
/// smaller than the slice so the loop wraps.
const ADAMW_CASES: [(usize, usize, usize, usize, usize, u32); 5] = [
    (8, 300, 0, 3, 1, 2),
    (8, 300, 0, 0, 8, 1),
    (700, 8, 1, 7, 1, 3),
    (700, 8, 1, 2, 3, 1),
    (1, 1, 0, 0, 1, 1),
];

/// Random `[param, grad, m, v]` of `n` values each (`v` non-negative, as a second moment is).
fn adamw_inputs(rng: &mut StdRng, n: usize) -> [Vec<f32>; 4] {
    let mut values =
        |scale: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-scale..scale)).collect() };
    let (param, grad, m) = (values(0.5), values(4.0), values(0.1));
    let v = values(0.1).iter().map(|x| x * x).collect();
    [param, grad, m, v]
}

#[test]
fn adamw_matches_the_cpu_update_bit_for_bit() {
    for (seed, &(rows, cols, rank_dim, start, len, grid)) in ADAMW_CASES.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(900 + seed as u64);
        let n = rows * cols;
        let [param, grad, m, v] = adamw_inputs(&mut rng, n);
        let slice = RankSlice {
            rows,
            cols,
            rank_dim,
            start,
            len,
        };
        let dims = || [rows, cols, rank_dim, start, len].map(|d| Arg::U32(d as u32));
        let case = format!("{rows}x{cols}, rank_dim {rank_dim}, ranks {start}..+{len}");
        for (squared, beta, grad_scale) in [(false, 0.9f64, 1.0f32), (true, 0.999, 0.37)] {
            let step = MomentStep {
                grad_scale,
                beta: beta as f32,
                one_minus_beta: (1.0 - beta) as f32,
                squared,
            };
            let moment = if squared { &v } else { &m };
            let mut want = moment.clone();
            moment_values(&mut want, &grad, &step, &slice);
            let mut args = vec![Arg::Buf(f32_bytes(moment)), Arg::Buf(f32_bytes(&grad))];
            args.extend(dims());
            args.extend([
                Arg::F32(grad_scale),
                Arg::F32(step.beta),
                Arg::F32(step.one_minus_beta),
                Arg::U32(u32::from(squared)),
            ]);
            let got = f32s(&launch("adamw_moment", grid, ELEMENTWISE_BLOCK, &args)[0]);
            same_bits_f32(
                &format!("adamw_moment squared {squared}, {case}"),
                &got,
                &want,
            );
        }
        for round_bf16 in [false, true] {
            let step = ParamStep {
                inv_bc1: (1.0 / (1.0 - 0.9f64.powi(3))) as f32,
                inv_bc2: (1.0 / (1.0 - 0.999f64.powi(3))) as f32,
                eps: 1e-8,
                decay: (1.0 - 2e-4 * 0.1f64) as f32,
                lr: 2e-4,
                round_bf16,
            };
            let mut want = param.clone();
            param_values(&mut want, &m, &v, &step, &slice);
            let mut args = vec![
                Arg::Buf(f32_bytes(&param)),
                Arg::Buf(f32_bytes(&m)),
                Arg::Buf(f32_bytes(&v)),
            ];
            args.extend(dims());
            args.extend([
                Arg::F32(step.inv_bc1),
                Arg::F32(step.inv_bc2),
                Arg::F32(step.eps),
                Arg::F32(step.decay),
                Arg::F32(step.lr),
                Arg::U32(u32::from(round_bf16)),
            ]);
            let got = f32s(&launch("adamw_param", grid, ELEMENTWISE_BLOCK, &args)[0]);
            same_bits_f32(
                &format!("adamw_param round {round_bf16}, {case}"),
                &got,
                &want,
            );
            // Outside the slice nothing moved.
            let inside: std::collections::HashSet<usize> =
                (0..slice.values()).map(|i| slice.index(i)).collect();
            let moved_outside = (0..n).filter(|i| !inside.contains(i) && got[*i] != param[*i]);
            assert_eq!(
                moved_outside.count(),
                0,
                "{case}: values outside the slice moved"
            );
        }
    }
}

/// `adamw_multi`: every matrix of a step from one table, each with its own slice and bias
/// corrections, against the three CPU loops per matrix, bit for bit; the table written by
/// `adamw_fused::table_entry`, the encoding the GPU launch uses.
#[test]
fn adamw_multi_matches_the_cpu_update_of_each_matrix_bit_for_bit() {
    // (rows, cols, rank_dim, start, len, step count t, leading padding in f32 values): the
    // padding places a matrix at an offset inside its buffer, as a tensor view's start.
    let matrices = [
        (8, 300, 0, 3, 1, 3, 0),
        (700, 8, 1, 7, 1, 1, 5),
        (700, 8, 1, 2, 3, 5, 0),
        (8, 300, 0, 0, 8, 2, 3),
        (1, 1, 0, 0, 1, 7, 0),
    ];
    for (round_bf16, grad_scale) in [(false, 1.0f32), (true, 0.37)] {
        let mut rng = StdRng::seed_from_u64(950 + u64::from(round_bf16));
        let moment = |beta: f64, squared| MomentStep {
            grad_scale,
            beta: beta as f32,
            one_minus_beta: (1.0 - beta) as f32,
            squared,
        };
        let step = MultiStep {
            first: moment(0.9, false),
            second: moment(0.999, true),
            param: ParamStep {
                inv_bc1: 1.0,
                inv_bc2: 1.0,
                eps: 1e-8,
                decay: (1.0 - 2e-4 * 0.1f64) as f32,
                lr: 2e-4,
                round_bf16,
            },
        };
        let (mut table, mut addresses, mut memory, mut want) = (vec![], vec![], vec![], vec![]);
        for (k, &(rows, cols, rank_dim, start, len, t, pad)) in matrices.iter().enumerate() {
            let [param, grad, m, v] = adamw_inputs(&mut rng, pad + rows * cols);
            let slice = RankSlice {
                rows,
                cols,
                rank_dim,
                start,
                len,
            };
            let inv_bc = [
                (1.0 / (1.0 - 0.9f64.powi(t))) as f32,
                (1.0 / (1.0 - 0.999f64.powi(t))) as f32,
            ];
            let (mut p_want, mut m_want, mut v_want) = (param.clone(), m.clone(), v.clone());
            let body = |x: &mut Vec<f32>| x.split_off(pad);
            let (mut pb, mut mb, mut vb) =
                (body(&mut p_want), body(&mut m_want), body(&mut v_want));
            let gb = &grad[pad..];
            moment_values(&mut mb, gb, &step.first, &slice);
            moment_values(&mut vb, gb, &step.second, &slice);
            let param_step = with_bias_corrections(step.param, inv_bc);
            param_values(&mut pb, &mb, &vb, &param_step, &slice);
            p_want.extend(pb);
            m_want.extend(mb);
            v_want.extend(vb);
            want.push([p_want, m_want, v_want]);
            table.extend(table_entry([0; 4], &slice, inv_bc).unwrap());
            for (j, buffer) in [param, m, v, grad].iter().enumerate() {
                addresses.push((k * TABLE_ENTRY_BYTES + 8 * j, memory.len(), 4 * pad));
                memory.push(f32_bytes(buffer));
            }
        }
        let mut args = vec![Arg::Table(table, addresses)];
        args.extend([
            Arg::F32(grad_scale),
            Arg::F32(step.first.beta),
            Arg::F32(step.first.one_minus_beta),
            Arg::F32(step.second.beta),
            Arg::F32(step.second.one_minus_beta),
            Arg::F32(step.param.eps),
            Arg::F32(step.param.decay),
            Arg::F32(step.param.lr),
            Arg::U32(u32::from(round_bf16)),
        ]);
        // Three blocks per matrix: smaller than the widest slice, so the loop wraps.
        let grid = [3, matrices.len() as u32];
        let (_, got) =
            try_launch_with_memory(Sanitizer::Address, "adamw_multi", grid, 64, &args, &memory)
                .unwrap_or_else(|e| panic!("{e}"));
        for (k, want) in want.iter().enumerate() {
            for (j, name) in ["param", "m", "v"].iter().enumerate() {
                let case = format!("matrix {k} {name}, round {round_bf16}");
                same_bits_f32(&case, &f32s(&got[4 * k + j]), &want[j]);
            }
            assert_eq!(
                got[4 * k + 3],
                memory[4 * k + 3],
                "matrix {k}: the gradient moved"
            );
        }
    }
}

#[test]
fn a_missing_compiler_fails_and_names_the_package() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_emu_no_compiler");
    let err =
        compile_harness(OsStr::new("/nonexistent/c++"), Sanitizer::Address, &out).unwrap_err();
    assert!(err.contains("g++"), "{err}");
    assert!(!out.exists());
}
