//! `qdylora gpu-dequant`: NF4 + double-quant dequantization on the GPU, checked bit for bit
//! against the core's CPU dequantization, then timed with CUDA events.
//!
//! **Not yet run on a GPU** (written in a session without one). Without the `cuda` feature the
//! command exists but only says so.

use std::path::PathBuf;

/// Arguments of `qdylora gpu-dequant`.
#[derive(Debug, clap::Args)]
pub struct DequantArgs {
    /// Output features of the random weight.
    #[arg(long, default_value_t = 11008)]
    pub rows: usize,
    /// Input features of the random weight.
    #[arg(long, default_value_t = 4096)]
    pub cols: usize,
    /// NF4 blocksize.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Timed launches per output type (the median is reported).
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Untimed launches before timing.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Seed of the random weight.
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
    /// Print one JSON object (for bench/gpu.sh) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only compile the kernel with NVRTC for `--arch` and write its PTX here (needs NVRTC, not
    /// a GPU).
    #[arg(long)]
    pub ptx: Option<PathBuf>,
    /// NVRTC architecture for `--ptx`.
    #[arg(long, default_value = "compute_90")]
    pub arch: String,
}

/// Runs `qdylora gpu-dequant`.
#[cfg(not(feature = "cuda"))]
pub fn run_dequant(_args: &DequantArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "qdylora was built without the cuda feature: rebuild with \
         `cargo build --release -p qdylora --features cuda`"
    )
}

/// Runs `qdylora gpu-dequant`.
#[cfg(feature = "cuda")]
pub fn run_dequant(args: &DequantArgs) -> anyhow::Result<()> {
    with_cuda::run(args)
}

#[cfg(feature = "cuda")]
mod with_cuda {
    use std::time::Instant;

    use anyhow::{Context, Result, bail, ensure};
    use cudarc::driver::CudaSlice;
    use cudarc::driver::sys::CUevent_flags;
    use half::bf16;
    use qdylora_core::nf4;
    use qdylora_formats::{Nf4Weight, atomic};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    use super::DequantArgs;
    use crate::gpu::{DequantTraffic, DeviceNf4Weight, Gpu, Nf4DequantKernels, dequant};

    pub(super) fn run(args: &DequantArgs) -> Result<()> {
        if let Some(path) = &args.ptx {
            let ptx = dequant::compile_ptx(&args.arch)?;
            atomic::write_file(path, ptx.to_src().as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote the PTX for {} to {}", args.arch, path.display());
            return Ok(());
        }
        ensure!(args.iters > 0, "--iters must be at least 1");
        // Open the GPU before spending seconds on the CPU side.
        let gpu = Gpu::open()?;
        let compile_start = Instant::now();
        let kernels = Nf4DequantKernels::compile(&gpu)?;
        let compile_ms = compile_start.elapsed().as_secs_f64() * 1e3;

        let weight = random_weight(args)?;
        let n = args.rows * args.cols;
        let cpu_f32 = weight
            .dequantize_f32()
            .context("CPU reference dequantization")?;
        let mut cpu_bf16 = vec![bf16::ZERO; n];
        nf4::dequantize(
            &weight.packed,
            &weight.absmax(),
            weight.blocksize,
            &mut cpu_bf16,
        )
        .context("CPU reference dequantization to bf16")?;

        let dev_weight = DeviceNf4Weight::upload(&gpu, &weight)?;
        let mut out_f32: CudaSlice<f32> =
            gpu.stream.alloc_zeros(n).context("allocating f32 output")?;
        let mut out_bf16: CudaSlice<u16> = gpu
            .stream
            .alloc_zeros(n)
            .context("allocating bf16 output")?;

        // Correctness first: a timing of a wrong kernel means nothing.
        kernels.dequantize_f32(&gpu, &dev_weight, &mut out_f32)?;
        kernels.dequantize_bf16(&gpu, &dev_weight, &mut out_bf16)?;
        let gpu_f32 = gpu
            .stream
            .clone_dtoh(&out_f32)
            .context("reading f32 output")?;
        let gpu_bf16 = gpu
            .stream
            .clone_dtoh(&out_bf16)
            .context("reading bf16 output")?;
        let f32_bad = mismatches(
            gpu_f32.iter().map(|v| v.to_bits()),
            cpu_f32.iter().map(|v| v.to_bits()),
        );
        let bf16_bad = mismatches(
            gpu_bf16.iter().copied(),
            cpu_bf16.iter().map(|v| v.to_bits()),
        );
        if let Some(report) = f32_bad.or(bf16_bad) {
            bail!("GPU dequantization differs from the CPU: {report}");
        }

        let f32_ms = time_median_ms(&gpu, args, || {
            kernels.dequantize_f32(&gpu, &dev_weight, &mut out_f32)
        })?;
        let bf16_ms = time_median_ms(&gpu, args, || {
            kernels.dequantize_bf16(&gpu, &dev_weight, &mut out_bf16)
        })?;
        let f32_traffic = DequantTraffic::new(n, args.blocksize, 4);
        let bf16_traffic = DequantTraffic::new(n, args.blocksize, 2);
        let f32_gbps = f32_traffic.gb_per_s(f32_ms / 1e3);
        let bf16_gbps = bf16_traffic.gb_per_s(bf16_ms / 1e3);

        if args.json {
            let result = json!({
                "device": gpu.name,
                "rows": args.rows, "cols": args.cols, "blocksize": args.blocksize,
                "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
                "bit_exact": true,
                "nvrtc_compile_ms": compile_ms,
                "f32": {"median_us": f32_ms * 1e3, "bytes": f32_traffic.total(), "gb_per_s": f32_gbps},
                "bf16": {"median_us": bf16_ms * 1e3, "bytes": bf16_traffic.total(), "gb_per_s": bf16_gbps},
            });
            println!("{result}");
        } else {
            println!(
                "{} | {}x{} NF4 + double quant, blocksize {} | NVRTC compile {compile_ms:.0} ms",
                gpu.name, args.rows, args.cols, args.blocksize
            );
            println!("bit-exact with the CPU (f32 and bf16): yes");
            println!(
                "f32 out : {:8.1} us median of {}, {f32_gbps:7.0} GB/s effective",
                f32_ms * 1e3,
                args.iters
            );
            println!(
                "bf16 out: {:8.1} us median of {}, {bf16_gbps:7.0} GB/s effective",
                bf16_ms * 1e3,
                args.iters
            );
        }
        Ok(())
    }

    /// A seeded `[rows, cols]` weight with the scale of a LLaMA linear, quantized by the core.
    fn random_weight(args: &DequantArgs) -> Result<Nf4Weight> {
        let n = args
            .rows
            .checked_mul(args.cols)
            .context("rows x cols overflows")?;
        let mut rng = StdRng::seed_from_u64(args.seed);
        // Uniform values with a per-row scale, so blocks (and the absmax codes) differ.
        let data: Vec<bf16> = (0..n)
            .map(|i| {
                let row_scale = 0.01 + 0.002 * (i / args.cols.max(1) % 17) as f32;
                bf16::from_f32(rng.random_range(-1.0f32..1.0) * row_scale)
            })
            .collect();
        Nf4Weight::quantize(args.rows, args.cols, &data, args.blocksize)
            .context("quantizing the random weight")
    }

    /// The number of differing values and the first one, or `None` when all agree.
    fn mismatches<T: PartialEq + std::fmt::LowerHex>(
        gpu: impl ExactSizeIterator<Item = T>,
        cpu: impl ExactSizeIterator<Item = T>,
    ) -> Option<String> {
        let (gpu_len, cpu_len) = (gpu.len(), cpu.len());
        if gpu_len != cpu_len {
            return Some(format!("{gpu_len} values vs {cpu_len}"));
        }
        let mut count = 0usize;
        let mut first = None;
        for (i, (g, c)) in gpu.zip(cpu).enumerate() {
            if g != c {
                count += 1;
                first.get_or_insert(format!("index {i}: GPU bits {g:#x}, CPU bits {c:#x}"));
            }
        }
        first.map(|f| format!("{count} of {gpu_len} values differ, first at {f}"))
    }

    /// Median milliseconds of `args.iters` launches, each between two CUDA events, after
    /// `args.warmup` untimed ones.
    fn time_median_ms(
        gpu: &Gpu,
        args: &DequantArgs,
        mut launch: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..args.warmup {
            launch()?;
        }
        let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let mut times = Vec::with_capacity(args.iters);
        for _ in 0..args.iters {
            start.record(&gpu.stream)?;
            launch()?;
            end.record(&gpu.stream)?;
            times.push(f64::from(start.elapsed_ms(&end)?));
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}
