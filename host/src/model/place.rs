//! Where and in which dtype a model runs: moving a loaded model to a device (NF4 weights go to
//! GPU memory as packed codes, never dequantized), and random models for speed measurements.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use qdylora_core::infer::{DecoderConfig, LinearKind};
use qdylora_formats::Nf4Weight;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::fused::Fusions;
use super::linear::BaseLinear;
use super::llama::{Layer, Llama};

/// A bf16 run must follow the f32 CPU run of the same training steps within this relative loss
/// difference at every step (checked on the CPU by `host/tests/recompute.rs`, on a GPU by
/// `qdylora train-bench --check-against-cpu`).
pub const BF16_LOSS_TOLERANCE: f64 = 0.02;

/// `model` on `device` with activations in `dtype` (f32, or bf16 for GPU training). Norm weights
/// and embeddings follow `dtype`; NF4 linears stay packed (on a GPU: uploaded as they are).
pub fn place(model: &Llama, device: &Device, dtype: DType) -> Result<Llama> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        bail!("activations must be f32, bf16 or f16, not {dtype:?}");
    }
    let move_dense = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
    let layers = model
        .layers
        .iter()
        .map(|l| {
            let linears: Vec<BaseLinear> = l
                .linears
                .iter()
                .map(|lin| place_linear(lin, device, dtype))
                .collect::<Result<_>>()?;
            Ok(Layer {
                input_norm: move_dense(&l.input_norm)?,
                post_norm: move_dense(&l.post_norm)?,
                linears: linears
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("7 linears"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Llama {
        config: model.config,
        embed: move_dense(&model.embed)?,
        layers,
        final_norm: move_dense(&model.final_norm)?,
        lm_head: model.lm_head.as_ref().map(move_dense).transpose()?,
        device: device.clone(),
        fusions: model.fusions,
    })
}

fn place_linear(linear: &BaseLinear, device: &Device, dtype: DType) -> Result<BaseLinear> {
    match (linear, device) {
        (BaseLinear::Nf4(w), Device::Cpu) => {
            if dtype != DType::F32 {
                bail!("the CPU NF4 kernels compute in f32; use --dtype f32 on the CPU");
            }
            Ok(BaseLinear::Nf4(w.clone()))
        }
        #[cfg(feature = "cuda")]
        (BaseLinear::Nf4(w), Device::Cuda(dev)) => Ok(BaseLinear::Nf4Cuda(Arc::new(
            crate::gpu::CudaNf4Weight::upload(dev, w).context("uploading an NF4 weight")?,
        ))),
        #[cfg(feature = "cuda")]
        (BaseLinear::Nf4Cuda(w), Device::Cuda(_)) => Ok(BaseLinear::Nf4Cuda(w.clone())),
        (BaseLinear::Dense { weight_t }, _) => Ok(BaseLinear::Dense {
            weight_t: weight_t.to_device(device)?.to_dtype(dtype)?,
        }),
        (_, other) => bail!("NF4 weights cannot run on {other:?} in this build"),
    }
}

/// A model with random weights, built on `device` (speed only: the numbers mean nothing). NF4
/// linears with `blocksize`; on a GPU their codes are generated there (no host copy), on the CPU
/// they are quantized from normal(0, 0.02) values.
pub fn random_nf4_llama(
    config: DecoderConfig,
    device: &Device,
    dtype: DType,
    blocksize: usize,
    seed: u64,
) -> Result<Llama> {
    config.validate().context("model shape")?;
    let hidden = config.hidden_size as usize;
    let vocab = config.vocab_size as usize;
    let mut rng = StdRng::seed_from_u64(seed);
    // On a GPU the embeddings are drawn there (seeded); the CPU's generator takes no seed, so
    // there they come from `rng` and a run repeats exactly.
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    let mut normal = |shape: (usize, usize)| -> Result<Tensor> {
        let t = if device.is_cpu() {
            let dist = rand_distr::Normal::new(0.0f32, 0.02).context("normal(0, 0.02)")?;
            let values: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.sample(dist)).collect();
            Tensor::from_vec(values, shape, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?
        };
        Ok(t.to_dtype(dtype)?)
    };
    let ones = || -> Result<Tensor> { Ok(Tensor::ones(hidden, dtype, device)?) };
    let embed = normal((vocab, hidden))?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(normal((vocab, hidden))?)
    };
    let mut layers = Vec::with_capacity(config.num_layers as usize);
    for _ in 0..config.num_layers {
        let linears: Vec<BaseLinear> = LinearKind::ALL
            .iter()
            .map(|kind| {
                let shape = kind.shape(&config);
                let (rows, cols) = (shape.out_features as usize, shape.in_features as usize);
                random_linear(rows, cols, device, dtype, blocksize, rng.random())
            })
            .collect::<Result<_>>()?;
        layers.push(Layer {
            input_norm: ones()?,
            post_norm: ones()?,
            linears: linears
                .try_into()
                .map_err(|_| anyhow::anyhow!("7 linears"))?,
        });
    }
    Ok(Llama {
        embed,
        lm_head,
        config,
        layers,
        final_norm: ones()?,
        device: device.clone(),
        fusions: Fusions::default(),
    })
}

fn random_linear(
    rows: usize,
    cols: usize,
    device: &Device,
    dtype: DType,
    blocksize: usize,
    seed: u64,
) -> Result<BaseLinear> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => Ok(BaseLinear::Nf4Cuda(Arc::new(
            crate::gpu::CudaNf4Weight::random(dev, rows, cols, blocksize, seed)?,
        ))),
        _ => {
            let mut rng = StdRng::seed_from_u64(seed);
            let normal = rand_distr::Normal::new(0.0f32, 0.02).context("normal(0, 0.02)")?;
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.sample(normal)).collect();
            let w = Nf4Weight::quantize(rows, cols, &data, blocksize).context("quantizing")?;
            place_linear(&BaseLinear::Nf4(Arc::new(w)), device, dtype)
        }
    }
}
