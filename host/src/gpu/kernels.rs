//! The project's CUDA C sources, compiled to PTX by NVRTC at run time (once per process) and
//! loaded into candle's CUDA device, so they run on the same context and stream as candle's
//! own kernels and cuBLAS.
//!
//! Not yet run on a GPU (see the module notes in `gpu`). Compiling needs NVRTC only, which
//! the `kernels_compile` test does without a GPU.

use std::sync::OnceLock;

use candle_core::CudaDevice;
use candle_core::cuda::WrapErr;
use cudarc::driver::CudaFunction;
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

/// One CUDA C source file, compiled on first use.
pub struct KernelSource {
    /// The module name candle caches the loaded PTX under (unique per source).
    module: &'static str,
    /// The CUDA C text.
    source: &'static str,
    /// The architecture compiled for and the PTX text, or NVRTC's message: compiled at most
    /// once per process (one process drives one device).
    compiled: OnceLock<Result<(String, String), String>>,
}

/// A kernel source with the shared element helpers (`elements.cuh`) in front.
macro_rules! with_elements {
    ($file:literal) => {
        concat!(include_str!("elements.cuh"), "\n", include_str!($file))
    };
}

/// NF4 + double-quant dequantization to f32 and bf16 (`nf4_dequant.cu`).
pub static NF4_DEQUANT: KernelSource =
    KernelSource::new("qdylora_nf4_dequant", with_elements!("nf4_dequant.cu"));

/// The fused attention softmax, forward and backward (`causal_softmax.cu`).
pub static CAUSAL_SOFTMAX: KernelSource = KernelSource::new(
    "qdylora_causal_softmax",
    with_elements!("causal_softmax.cu"),
);

/// The fused SwiGLU, forward and both gradients (`swiglu.cu`).
pub static SWIGLU: KernelSource = KernelSource::new("qdylora_swiglu", with_elements!("swiglu.cu"));

/// The fused RMSNorm, forward and the gradient w.r.t. x (`rms_norm.cu`).
pub static RMS_NORM: KernelSource =
    KernelSource::new("qdylora_rms_norm", with_elements!("rms_norm.cu"));

/// The fused rotary position embedding, either direction (`rope.cu`).
pub static ROPE: KernelSource = KernelSource::new("qdylora_rope", with_elements!("rope.cu"));

/// The fused cross-entropy of the loss, forward and backward (`cross_entropy.cu`).
pub static CROSS_ENTROPY: KernelSource =
    KernelSource::new("qdylora_cross_entropy", with_elements!("cross_entropy.cu"));

/// The masked AdamW update of an adapter matrix, in place (`adamw.cu`).
pub static ADAMW: KernelSource = KernelSource::new("qdylora_adamw", with_elements!("adamw.cu"));

/// Seeded random bytes for speed-only weights (`fill_random.cu`).
pub static FILL_RANDOM: KernelSource =
    KernelSource::new("qdylora_fill_random", include_str!("fill_random.cu"));

impl KernelSource {
    const fn new(module: &'static str, source: &'static str) -> Self {
        Self {
            module,
            source,
            compiled: OnceLock::new(),
        }
    }

    /// Compiles the source to PTX for `arch` (e.g. `compute_90`), without caching. Needs
    /// NVRTC, not a GPU.
    pub fn compile_ptx(&self, arch: &str) -> anyhow::Result<Ptx> {
        compile(self.module, self.source, arch).map_err(anyhow::Error::msg)
    }

    /// The kernel `name`, loaded into `dev` (compiled for its architecture on first use).
    /// Launch it on `dev.cuda_stream()`, candle's stream.
    pub fn function(&self, dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
        let arch = nvrtc_arch(dev)?;
        let compiled = self.compiled.get_or_init(|| {
            compile_text(self.module, self.source, &arch).map(|p| (arch.clone(), p))
        });
        let uncached;
        let ptx = match compiled {
            Ok((cached_arch, ptx)) if *cached_arch == arch => ptx,
            // A second device of another architecture: correct, just not cached.
            Ok(_) => {
                uncached = compile_text(self.module, self.source, &arch)
                    .map_err(candle_core::Error::msg)?;
                &uncached
            }
            Err(message) => return Err(candle_core::Error::msg(message.clone())),
        };
        // candle keys loaded modules by name per device; the architecture is part of the
        // name so that one device never gets the other's PTX.
        let func = dev.get_or_load_custom_func(name, &format!("{}_{arch}", self.module), ptx)?;
        Ok(func.into_cuda_function())
    }
}

/// NVRTC's `--gpu-architecture` for `dev`, e.g. `compute_90` for an H100.
pub fn nvrtc_arch(dev: &CudaDevice) -> candle_core::Result<String> {
    let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
    Ok(format!("compute_{major}{minor}"))
}

fn compile_text(module: &str, source: &str, arch: &str) -> Result<String, String> {
    compile(module, source, arch).map(|ptx| ptx.to_src())
}

fn compile(module: &str, source: &str, arch: &str) -> Result<Ptx, String> {
    let opts = CompileOptions {
        // The core rounds after every multiply and add: no contraction into FMAs, and
        // subnormals are kept as the CPU keeps them.
        fmad: Some(false),
        ftz: Some(false),
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some(format!("{module}.cu")),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| match e {
        CompileError::CompileError { nvrtc, log, .. } => format!(
            "NVRTC failed to compile {module} for {arch} ({nvrtc:?}): {}",
            log.to_string_lossy()
        ),
        other => format!("NVRTC failed on {module} for {arch}: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs NVRTC (no GPU needed), so it needs `libnvrtc.so.13` at run time like the whole
    /// `cuda` build: `LD_LIBRARY_PATH=<cuda 13 lib folder>`.
    #[test]
    fn kernels_compile() {
        // Every source with its entry points (`_f32` and `_bf16` where a name ends in `_`).
        let sources: [(&KernelSource, &[&str]); 8] = [
            (&NF4_DEQUANT, &["nf4_dq_dequantize_"]),
            (&FILL_RANDOM, &["fill_random_u8"]),
            (
                &CAUSAL_SOFTMAX,
                &["causal_softmax_fwd_", "causal_softmax_bwd_"],
            ),
            (
                &SWIGLU,
                &[
                    "swiglu_fwd_",
                    "swiglu_bwd_gate_",
                    "swiglu_bwd_up_",
                    "swiglu_bwd_",
                ],
            ),
            (
                &RMS_NORM,
                &[
                    "rms_norm_fwd_",
                    "rms_norm_bwd_",
                    "residual_rms_norm_fwd_",
                    "rms_norm_bwd_add_",
                ],
            ),
            (&ADAMW, &["adamw_moment", "adamw_param", "adamw_multi"]),
            (&ROPE, &["rope_"]),
            (
                &CROSS_ENTROPY,
                &["cross_entropy_fwd_", "cross_entropy_bwd_"],
            ),
        ];
        for (source, entries) in sources {
            let ptx = source
                .compile_ptx("compute_90")
                .unwrap_or_else(|e| panic!("{}: {e:#}", source.module))
                .to_src();
            assert!(ptx.contains(".target sm_90"), "{}", source.module);
            for entry in entries {
                let names = match entry.strip_suffix('_') {
                    Some(stem) => vec![format!("{stem}_f32"), format!("{stem}_bf16")],
                    None => vec![entry.to_string()],
                };
                for name in names {
                    assert!(ptx.contains(&format!(".entry {name}")), "{name}");
                }
            }
        }
    }

    #[test]
    fn compile_errors_are_reported() {
        let err = compile("broken", "this is not CUDA", "compute_90").unwrap_err();
        assert!(err.contains("NVRTC failed to compile broken"), "{err}");
    }
}
