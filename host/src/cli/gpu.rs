//! `qdylora gpu-dequant`: NF4 + double-quant dequantization on the GPU, checked bit for bit
//! against the core's CPU dequantization, the NF4 linear (forward and input gradient, f32 and
//! bf16) checked against a CPU product, then the dequantization timed with CUDA events.
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
    /// Rows of the random input for the NF4 linear check (0 skips that check).
    #[arg(long, default_value_t = 8)]
    pub check_rows: usize,
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
        "qdylora was built without the cuda feature (build the GPU binary with \
         bench/build-cuda.sh)"
    )
}

/// Runs `qdylora gpu-dequant`.
#[cfg(feature = "cuda")]
pub fn run_dequant(args: &DequantArgs) -> anyhow::Result<()> {
    with_cuda::run(args)
}

#[cfg(feature = "cuda")]
mod with_cuda {
    use std::sync::Arc;
    use std::time::Instant;

    use anyhow::{Context, Result, bail, ensure};
    use candle_core::{DType, Device, Tensor, Var};
    use cudarc::driver::CudaSlice;
    use cudarc::driver::sys::CUevent_flags;
    use half::bf16;
    use qdylora_core::nf4;
    use qdylora_formats::{Nf4Weight, atomic};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::{Value, json};

    use super::DequantArgs;
    use crate::gpu::kernels::NF4_DEQUANT;
    use crate::gpu::nf4_linear::{linear_add_forward, linear_add_input_grad};
    use crate::gpu::{
        CudaNf4Weight, DequantElement, DequantTraffic, Gpu, dequantize_into, linear_forward, memory,
    };
    use crate::model::fused::add_product::{add_product, add_product_into};
    use crate::train::adamw_fused;
    use crate::train::optim::{AdamWConfig, MaskedAdamW};

    /// ‖GPU − CPU‖ / ‖CPU‖ allowed for the f32 linear: both accumulate in f32, in different
    /// orders (about 1e-6 expected; a wrong code or scale gives errors near 1).
    const F32_LINEAR_TOLERANCE: f64 = 1e-4;
    /// The same for bf16, issue 7's bf16 tolerance (outputs are rounded to bf16).
    const BF16_LINEAR_TOLERANCE: f64 = 1e-2;

    pub(super) fn run(args: &DequantArgs) -> Result<()> {
        if let Some(path) = &args.ptx {
            let ptx = NF4_DEQUANT.compile_ptx(&args.arch)?;
            atomic::write_file(path, ptx.to_src().as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote the PTX for {} to {}", args.arch, path.display());
            return Ok(());
        }
        ensure!(args.iters > 0, "--iters must be at least 1");
        // Open the GPU before spending seconds on the CPU side.
        let gpu = Gpu::open()?;
        let dev = &gpu.cuda;
        let compile_start = Instant::now();
        NF4_DEQUANT.function(dev, f32::KERNEL)?;
        let compile_ms = compile_start.elapsed().as_secs_f64() * 1e3;

        let weight = random_weight(args)?;
        let n = weight.rows * weight.cols;
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

        memory::reset_peak(dev)?;
        let dev_weight = Arc::new(CudaNf4Weight::upload(dev, &weight)?);
        let stream = dev.cuda_stream();
        let mut out_f32: CudaSlice<f32> = stream.alloc_zeros(n).context("allocating f32 output")?;
        let mut out_bf16: CudaSlice<bf16> =
            stream.alloc_zeros(n).context("allocating bf16 output")?;

        // Correctness first: a timing of a wrong kernel means nothing.
        dequantize_into(dev, &dev_weight, &mut out_f32)?;
        dequantize_into(dev, &dev_weight, &mut out_bf16)?;
        let gpu_f32 = stream.clone_dtoh(&out_f32).context("reading f32 output")?;
        let gpu_bf16 = stream
            .clone_dtoh(&out_bf16)
            .context("reading bf16 output")?;
        let f32_bad = mismatches(
            gpu_f32.iter().map(|v| v.to_bits()),
            cpu_f32.iter().map(|v| v.to_bits()),
        );
        let bf16_bad = mismatches(
            gpu_bf16.iter().map(|v| v.to_bits()),
            cpu_bf16.iter().map(|v| v.to_bits()),
        );
        if let Some(report) = f32_bad.or(bf16_bad) {
            bail!("GPU dequantization differs from the CPU: {report}");
        }
        let linear = if args.check_rows > 0 {
            check_linear(&gpu, &dev_weight, &cpu_f32, &cpu_bf16, args)?
        } else {
            Value::Null
        };
        let random = check_random_weight(&gpu, args)?;
        let add_product = check_add_product(&gpu, args.seed)?;
        let adamw = check_adamw(&gpu, args.seed)?;

        let f32_ms = time_median_ms(&gpu, args, || {
            Ok(dequantize_into(dev, &dev_weight, &mut out_f32)?)
        })?;
        let bf16_ms = time_median_ms(&gpu, args, || {
            Ok(dequantize_into(dev, &dev_weight, &mut out_bf16)?)
        })?;
        let peak = memory::peak_bytes(dev)?;
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
                "linear_check": linear,
                "random_weight_check": random,
                "add_product_check": add_product,
                "adamw_check": adamw,
                "memory": {"counter": format!("{:?}", memory::counter(dev)), "peak_bytes": peak},
            });
            println!("{result}");
        } else {
            println!(
                "{} | {}x{} NF4 + double quant, blocksize {} | NVRTC compile + load {compile_ms:.0} ms",
                gpu.name, args.rows, args.cols, args.blocksize
            );
            println!("bit-exact with the CPU (f32 and bf16): yes");
            if !linear.is_null() {
                println!("NF4 linear vs CPU (relative error): {linear}");
            }
            println!("random GPU weight: {random}");
            println!("add product (cuBLAS beta = 1) vs CPU (relative error): {add_product}");
            println!("fused AdamW, one launch for all matrices, vs CPU: {adamw}");
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
            println!(
                "peak GPU memory: {:.3} GiB ({})",
                memory::gib(peak),
                memory::counter(dev).describe()
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

    /// The NF4 linear on the GPU against candle's CPU matmul over the core's dequantized weight,
    /// forward (`x Wᵀ`) and input gradient (`g W`, through autograd), in f32 and bf16. Fails
    /// beyond the tolerances; returns the relative errors.
    fn check_linear(
        gpu: &Gpu,
        w: &Arc<CudaNf4Weight>,
        cpu_f32: &[f32],
        cpu_bf16: &[bf16],
        args: &DequantArgs,
    ) -> Result<Value> {
        let (rows, cols, m) = (args.rows, args.cols, args.check_rows);
        let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
        let mut random =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let x = random(m * cols);
        let g = random(m * rows);
        // Sums for the `add` variants to add into (the adapter's terms in training).
        let (acc_y, acc_x) = (random(m * rows), random(m * cols));
        let cpu_w_bf16: Vec<f32> = cpu_bf16.iter().map(|v| v.to_f32()).collect();
        let mut report = serde_json::Map::new();
        for (dtype, cpu_w, tolerance) in [
            (DType::F32, cpu_f32, F32_LINEAR_TOLERANCE),
            (DType::BF16, &cpu_w_bf16[..], BF16_LINEAR_TOLERANCE),
        ] {
            let x_gpu = Tensor::from_slice(&x, (m, cols), &gpu.device)?.to_dtype(dtype)?;
            let g_gpu = Tensor::from_slice(&g, (m, rows), &gpu.device)?.to_dtype(dtype)?;
            let x_var = Var::from_tensor(&x_gpu)?;
            let y = linear_forward(x_var.as_tensor(), w)?;
            ensure!(
                y.dims() == [m, rows] && y.dtype() == dtype,
                "NF4 linear output {y:?}"
            );
            let grads = (&y * &g_gpu)?.sum_all()?.backward()?;
            let grad_x = grads
                .get(x_var.as_tensor())
                .context("no gradient for the NF4 linear's input")?;

            // The reference sees the same rounded inputs and weight, in f32 on the CPU.
            let x_ref = on_cpu_f32(&x_gpu)?;
            let g_ref = on_cpu_f32(&g_gpu)?;
            let w_ref = Tensor::from_slice(cpu_w, (rows, cols), &Device::Cpu)?;
            let y_ref = x_ref.matmul(&w_ref.t()?)?;
            let grad_ref = g_ref.matmul(&w_ref)?;
            let forward = relative_error(&on_cpu_f32(&y)?, &y_ref)?;
            let input_grad = relative_error(&on_cpu_f32(grad_x)?, &grad_ref)?;

            // The same products added into existing sums in place (cuBLAS beta = 1).
            let acc_y = Tensor::from_slice(&acc_y, (m, rows), &gpu.device)?.to_dtype(dtype)?;
            let acc_x = Tensor::from_slice(&acc_x, (m, cols), &gpu.device)?.to_dtype(dtype)?;
            let sum_y = linear_add_forward(acc_y.copy()?, &x_gpu, w)?;
            let sum_x = linear_add_input_grad(acc_x.copy()?, &g_gpu, w)?;
            let sum_y_ref = (on_cpu_f32(&acc_y)? + &y_ref)?;
            let sum_x_ref = (on_cpu_f32(&acc_x)? + &grad_ref)?;
            let add_forward = relative_error(&on_cpu_f32(&sum_y)?, &sum_y_ref)?;
            let add_input_grad = relative_error(&on_cpu_f32(&sum_x)?, &sum_x_ref)?;
            let errors = [forward, input_grad, add_forward, add_input_grad];
            if !errors.iter().all(|e| *e < tolerance) {
                bail!(
                    "GPU NF4 linear ({dtype:?}) differs from the CPU: relative error forward \
                     {forward:.3e}, input gradient {input_grad:.3e}, added into a sum \
                     {add_forward:.3e} and {add_input_grad:.3e} (tolerance {tolerance:.0e})"
                );
            }
            report.insert(
                format!("{dtype:?}").to_lowercase(),
                json!({"forward": forward, "input_grad": input_grad,
                       "add_forward": add_forward, "add_input_grad": add_input_grad,
                       "tolerance": tolerance}),
            );
        }
        report.insert("rows".into(), json!(m));
        Ok(Value::Object(report))
    }

    /// The written-out backward's in-place `acc + lhs · rhs` (one strided-batched cuBLAS call
    /// with beta = 1) against the CPU's sum of the same rounded inputs, f32 and bf16: the LoRA
    /// path's matrices for both layouts of `rhs`, on shapes that are not multiples of anything,
    /// and the chunked attention's batches (a transposed `lhs`, a slice of rows of a larger
    /// tensor as `rhs` and as `acc`, whose other rows must keep their values).
    fn check_add_product(gpu: &Gpu, seed: u64) -> Result<Value> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xadd);
        let mut report = serde_json::Map::new();
        for (dtype, tolerance) in [
            (DType::F32, F32_LINEAR_TOLERANCE),
            (DType::BF16, BF16_LINEAR_TOLERANCE),
        ] {
            let mut random = |dims: &[usize]| -> Result<Tensor> {
                let values: Vec<f32> = (0..dims.iter().product::<usize>())
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect();
                Ok(Tensor::from_vec(values, dims, &gpu.device)?.to_dtype(dtype)?)
            };
            let mut worst = 0.0f64;
            let mut compare = |case: String, ours: &Tensor, expected: &Tensor| -> Result<()> {
                let err = relative_error(&on_cpu_f32(ours)?, expected)?;
                if err.is_nan() || err >= tolerance {
                    bail!(
                        "GPU add product ({dtype:?}, {case}) differs from the CPU: relative \
                         error {err:.3e} (tolerance {tolerance:.0e})"
                    );
                }
                worst = worst.max(err);
                Ok(())
            };
            for (m, n, k) in [(37, 70, 5), (64, 96, 1), (1, 33, 17)] {
                for rhs_transposed in [false, true] {
                    let acc = random(&[m, n])?;
                    let lhs = random(&[m, k])?;
                    let rhs = match rhs_transposed {
                        true => random(&[n, k])?.t()?,
                        false => random(&[k, n])?,
                    };
                    let expected =
                        (on_cpu_f32(&acc)? + on_cpu_f32(&lhs)?.matmul(&on_cpu_f32(&rhs)?)?)?;
                    let ours = add_product(acc.copy()?, &lhs, &rhs)?;
                    let case = format!("{m}x{n}x{k}, rhs transposed {rhs_transposed}");
                    compare(case, &ours, &expected)?;
                }
            }
            // Rows [0, seen) of a [2, 3, t, hd] gradient += chunk probabilitiesᵀ · rows
            // [start, seen) of a [2, 3, t, hd] tensor.
            for (t, hd, start, len) in [(23, 40, 9, 7), (64, 128, 48, 16)] {
                let seen = start + len;
                let whole = random(&[2, 3, t, hd])?;
                let lhs = random(&[2, 3, len, seen])?.t()?;
                let rhs = random(&[2, 3, t, hd])?.narrow(2, start, len)?;
                let cpu = on_cpu_f32(&whole)?;
                let added =
                    (cpu.narrow(2, 0, seen)? + on_cpu_f32(&lhs)?.matmul(&on_cpu_f32(&rhs)?)?)?;
                let expected = Tensor::cat(&[added, cpu.narrow(2, seen, t - seen)?], 2)?;
                let ours = whole.copy()?;
                add_product_into(&ours.narrow(2, 0, seen)?, &lhs, &rhs)?;
                compare(
                    format!("batch of 6, rows 0..{seen} of {t}"),
                    &ours,
                    &expected,
                )?;
            }
            report.insert(
                format!("{dtype:?}").to_lowercase(),
                json!({"worst": worst, "tolerance": tolerance}),
            );
        }
        Ok(Value::Object(report))
    }

    /// The optimizer's one launch for every matrix (`adamw_fused::update_all`) against the
    /// CPU's per-matrix update of the same values, bit for bit: rows of `A`s and columns of
    /// `B`s of several widths, three steps (one of them clipped), f32 and bf16 rounding.
    fn check_adamw(gpu: &Gpu, seed: u64) -> Result<Value> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xada);
        // (rows, cols, rank dimension): A is [r, in], B is [out, r].
        let shapes = [(8, 300, 0), (700, 8, 1), (8, 1000, 0), (33, 8, 1)];
        let steps = [(2..3, 1.0), (0..1, 0.37), (2..3, 1.0)];
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let init = random_matrices(&mut rng, &shapes, 0.5)?;
        for round_to in [DType::F32, DType::BF16] {
            let vars = |dev: &Device| -> Result<Vec<Var>> {
                let on = |t: &Tensor| Ok(Var::from_tensor(&t.to_device(dev)?)?);
                init.iter().map(on).collect()
            };
            let (gpu_params, cpu_params) = (vars(&gpu.device)?, vars(&Device::Cpu)?);
            let optimizer = |params: &[Var]| {
                let ranked: Vec<(&Var, usize)> = params.iter().zip(shapes.map(|s| s.2)).collect();
                MaskedAdamW::new(config, &ranked)
            };
            let (mut gpu_opt, mut cpu_opt) = (optimizer(&gpu_params)?, optimizer(&cpu_params)?);
            for (step, (ranks, scale)) in steps.iter().enumerate() {
                let grads = random_matrices(&mut rng, &shapes, 4.0)?;
                let lr = 1e-2 / (step + 1) as f64;
                let on_gpu = grads
                    .iter()
                    .map(|g| g.to_device(&gpu.device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let params: Vec<&Var> = gpu_params.iter().collect();
                let one_launch = adamw_fused::update_all(
                    config,
                    &mut gpu_opt.states,
                    &params,
                    &on_gpu,
                    ranks.clone(),
                    lr,
                    round_to,
                    *scale,
                )?;
                ensure!(one_launch, "the one-launch AdamW did not apply on the GPU");
                for ((p, g), state) in cpu_params.iter().zip(&grads).zip(&mut cpu_opt.states) {
                    let (r, c) = (ranks.clone(), config);
                    let fused = adamw_fused::update(c, state, p, g, r, lr, round_to, *scale)?;
                    ensure!(fused, "the CPU's fused AdamW did not apply");
                }
                let states = gpu_opt.states.iter().zip(&cpu_opt.states);
                for (k, ((gp, cp), (gs, cs))) in
                    gpu_params.iter().zip(&cpu_params).zip(states).enumerate()
                {
                    let case = format!("GPU AdamW ({round_to:?}, step {step}, matrix {k})");
                    same_bits(&format!("{case} parameter"), gp.as_tensor(), cp.as_tensor())?;
                    same_bits(&format!("{case} first moment"), &gs.m, &cs.m)?;
                    same_bits(&format!("{case} second moment"), &gs.v, &cs.v)?;
                }
            }
        }
        Ok(json!({"bit_exact": true, "matrices": shapes.len(), "steps": steps.len()}))
    }

    /// One CPU f32 matrix per `(rows, cols, _)`, uniform in ±`scale`.
    fn random_matrices(
        rng: &mut StdRng,
        shapes: &[(usize, usize, usize)],
        scale: f32,
    ) -> Result<Vec<Tensor>> {
        let matrix = |&(rows, cols, _): &(usize, usize, usize)| {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-scale..scale))
                .collect();
            Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
        };
        shapes.iter().map(matrix).collect()
    }

    /// Fails unless the two f32 tensors hold the same bits.
    fn same_bits(what: &str, ours: &Tensor, theirs: &Tensor) -> Result<()> {
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            let v = on_cpu_f32(t)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.iter().map(|x| x.to_bits()).collect())
        };
        match mismatches(bits(ours)?.into_iter(), bits(theirs)?.into_iter()) {
            Some(report) => bail!("{what} differs from the CPU: {report}"),
            None => Ok(()),
        }
    }

    fn on_cpu_f32(t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    }

    /// ‖a − b‖ / ‖b‖ over all values (f64 sums).
    fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        ensure!(a.len() == b.len(), "{} values vs {}", a.len(), b.len());
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (x, y) in a.iter().zip(&b) {
            diff += (f64::from(*x) - f64::from(*y)).powi(2);
            norm += f64::from(*y).powi(2);
        }
        // A NaN anywhere makes the ratio NaN, which fails every tolerance test.
        Ok(if norm > 0.0 {
            (diff / norm).sqrt()
        } else {
            diff.sqrt()
        })
    }

    /// The speed-only random weight (`CudaNf4Weight::random`, what the training benchmark
    /// builds) dequantizes to finite values within its documented range, and not to a constant.
    fn check_random_weight(gpu: &Gpu, args: &DequantArgs) -> Result<Value> {
        let dev = &gpu.cuda;
        let w = CudaNf4Weight::random(dev, args.rows, args.cols, args.blocksize, args.seed)?;
        let values = dev
            .cuda_stream()
            .clone_dtoh(&crate::gpu::dequantize::<f32>(dev, &w)?)
            .context("reading the random weight")?;
        let max_abs = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let finite = values.iter().all(|v| v.is_finite());
        let distinct = values.iter().any(|v| *v != values[0]);
        // NF4 codes reach ±1 and the absmax stays within 0.05 (see `weight.rs`).
        if !(finite && distinct && max_abs <= 0.05 + 1e-6) {
            bail!(
                "the random GPU weight is not as documented: finite {finite}, not constant \
                 {distinct}, max |value| {max_abs}"
            );
        }
        Ok(json!({"finite": finite, "max_abs": max_abs}))
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

    /// Median milliseconds of `args.iters` launches queued back to back on candle's stream with
    /// a CUDA event between each pair, after `args.warmup` untimed ones.
    fn time_median_ms(
        gpu: &Gpu,
        args: &DequantArgs,
        mut launch: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..args.warmup {
            launch()?;
        }
        let stream = gpu.cuda.cuda_stream();
        let ctx = stream.context();
        // All launches are queued back to back with an event between each pair and read after
        // one synchronization: the GPU never waits for the host, so each interval is one
        // kernel, not the kernel plus the host's launch latency.
        let events = (0..=args.iters)
            .map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
            .collect::<Result<Vec<_>, _>>()?;
        events[0].record(&stream)?;
        for event in &events[1..] {
            launch()?;
            event.record(&stream)?;
        }
        stream.synchronize()?;
        let mut times = events
            .windows(2)
            .map(|pair| Ok(f64::from(pair[0].elapsed_ms(&pair[1])?)))
            .collect::<Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}
