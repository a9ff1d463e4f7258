//! A LLaMA-family decoder on candle: embeddings, RMSNorm, half-split RoPE, grouped-query
//! attention, SwiGLU MLP, tied or untied head. The seven linears of each layer are
//! [`BaseLinear`]s; an [`AdapterCall`] adds LoRA updates at a chosen rank.
//!
//! The activations run in the dtype of the embedding table (f32 on the CPU, bf16 on a GPU);
//! as in transformers, RMSNorm's statistics and the attention softmax are computed in f32.

use candle_core::{DType, Device, Tensor};
use qdylora_core::infer::{DecoderConfig, LinearKind};

use super::fused::Fusions;
use super::fused::rms_norm::{rms_norm, rms_norm_unfused};
use super::fused::rope::{rope, rope_unfused};
use super::fused::softmax::{causal_mask, causal_softmax, causal_softmax_unfused};
use super::fused::swiglu::{swiglu, swiglu_unfused};
use super::linear::BaseLinear;
use super::lora::{AdapterCall, ModuleKey};
use super::matmul::{matmul, matmul_const_rhs};

/// One decoder layer.
#[derive(Debug)]
pub struct Layer {
    /// `input_layernorm.weight`.
    pub input_norm: Tensor,
    /// `post_attention_layernorm.weight`.
    pub post_norm: Tensor,
    /// q, k, v, o, gate, up, down, in [`LinearKind::ALL`] order.
    pub linears: [BaseLinear; 7],
}

impl Layer {
    /// The base linear of `kind`.
    pub(crate) fn linear(&self, kind: LinearKind) -> &BaseLinear {
        let i = LinearKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default();
        &self.linears[i]
    }
}

/// The whole model.
#[derive(Debug)]
pub struct Llama {
    /// Shape.
    pub config: DecoderConfig,
    /// `[vocab, hidden]`.
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// `model.norm.weight`.
    pub final_norm: Tensor,
    /// `lm_head.weight` when untied.
    pub lm_head: Option<Tensor>,
    /// Device of every tensor.
    pub device: Device,
    /// Which fused ops the forward pass uses (all by default).
    pub fusions: Fusions,
}

/// Precomputed RoPE tables for positions `0..t`: `[t, head_dim/2]` each.
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(
        cfg: &DecoderConfig,
        t: usize,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let hd = cfg.head_dim as usize;
        // As transformers: inv_freq = 1 / theta^(2i/d) in f32, angle = pos * inv_freq.
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / hd as f32))
            .collect();
        let mut cos = Vec::with_capacity(t * hd / 2);
        let mut sin = Vec::with_capacity(t * hd / 2);
        for pos in 0..t {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        // Angles in f32, then the tables in the activations' dtype (as transformers does).
        Ok(Self {
            cos: Tensor::from_vec(cos, (t, hd / 2), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (t, hd / 2), device)?.to_dtype(dtype)?,
        })
    }

    /// `x: [b, heads, t, hd]` rotated in the half-split layout, fused or not.
    fn apply(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        match fused {
            true => rope(x, &self.cos, &self.sin),
            false => rope_unfused(x, &self.cos, &self.sin),
        }
    }
}

/// What every layer needs for a sequence length: the RoPE tables, and the causal mask when
/// the attention softmax is unfused (the fused one masks as it goes).
#[derive(Debug)]
pub struct Positions {
    rope: Rope,
    mask: Option<Tensor>,
}

impl Positions {
    /// The RoPE tables `(cos, sin)`, `[t, head_dim / 2]` each in the activations' dtype.
    pub(crate) fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.rope.cos, &self.rope.sin)
    }
}

impl Llama {
    fn linear(
        &self,
        layer: usize,
        kind: LinearKind,
        x: &Tensor,
        adapter: Option<&AdapterCall<'_>>,
    ) -> candle_core::Result<Tensor> {
        let y = self.layers[layer].linear(kind).forward(x)?;
        match adapter {
            Some(call) => {
                let key = ModuleKey { layer, kind };
                call.add_delta(key, x, y, self.fusions.lora_scale)
            }
            None => Ok(y),
        }
    }

    /// RMSNorm of `x` with `weight`, fused or not as [`Llama::fusions`] says.
    fn norm(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        match self.fusions.rms_norm {
            true => rms_norm(x, weight, eps),
            false => rms_norm_unfused(x, weight, eps),
        }
    }

    /// The dtype activations run in (the embedding table's).
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Final hidden states `[b, t, hidden]` for token ids `[b, t]` (u32).
    pub fn hidden(
        &self,
        ids: &Tensor,
        adapter: Option<&AdapterCall<'_>>,
    ) -> candle_core::Result<Tensor> {
        let mut x = self.embed_tokens(ids)?;
        let positions = self.positions(ids.dim(1)?)?;
        for layer in 0..self.layers.len() {
            x = self.layer(layer, &x, &positions, adapter)?;
        }
        self.final_hidden(&x)
    }

    /// The embeddings `[b, t, hidden]` of token ids `[b, t]`: the first layer's input.
    pub fn embed_tokens(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.config.hidden_size as usize,
        ))
    }

    /// RoPE tables and causal mask for sequences of length `t`.
    pub fn positions(&self, t: usize) -> candle_core::Result<Positions> {
        Ok(Positions {
            rope: Rope::new(&self.config, t, &self.device, self.dtype())?,
            mask: match self.fusions.softmax {
                true => None,
                false => Some(causal_mask(t, t, &self.device)?),
            },
        })
    }

    /// Decoder layer `layer`: attention then MLP, each with its residual.
    pub fn layer(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &Positions,
        adapter: Option<&AdapterCall<'_>>,
    ) -> candle_core::Result<Tensor> {
        let x = self.attention(layer, x, positions, adapter)?;
        self.mlp(layer, &x, adapter)
    }

    /// The final norm applied to the last layer's output.
    pub fn final_hidden(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.norm(x, &self.final_norm)
    }

    /// Logits `[b, t, vocab]` for token ids `[b, t]`.
    pub fn forward(
        &self,
        ids: &Tensor,
        adapter: Option<&AdapterCall<'_>>,
    ) -> candle_core::Result<Tensor> {
        let h = self.hidden(ids, adapter)?;
        self.logits(&h)
    }

    /// The head applied to hidden states `[..., hidden]`.
    pub fn logits(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        matmul_const_rhs(h, &head.t()?)
    }

    fn attention(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &Positions,
        adapter: Option<&AdapterCall<'_>>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (
            cfg.num_heads as usize,
            cfg.num_kv_heads as usize,
            cfg.head_dim as usize,
        );
        let h = self.norm(x, &self.layers[layer].input_norm)?;
        let split = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.linear(layer, LinearKind::Q, &h, adapter)?, heads)?;
        let k = split(self.linear(layer, LinearKind::K, &h, adapter)?, kv_heads)?;
        let v = split(self.linear(layer, LinearKind::V, &h, adapter)?, kv_heads)?;
        let rope = &positions.rope;
        let fused = self.fusions.rope;
        let q = rope.apply(&q, fused)?;
        let k = repeat_kv(&rope.apply(&k, fused)?, heads / kv_heads)?;
        let v = repeat_kv(&v, heads / kv_heads)?;
        let scores = matmul(&q, &k.t()?)?;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let probs = match &positions.mask {
            None => causal_softmax(&scores, scale)?,
            Some(mask) => causal_softmax_unfused(&scores, scale, mask)?,
        };
        let attn = matmul(&probs, &v)?;
        let attn = attn.transpose(1, 2)?.reshape((b, t, heads * hd))?;
        let out = self.linear(layer, LinearKind::O, &attn, adapter)?;
        x + out
    }

    fn mlp(
        &self,
        layer: usize,
        x: &Tensor,
        adapter: Option<&AdapterCall<'_>>,
    ) -> candle_core::Result<Tensor> {
        let h = self.norm(x, &self.layers[layer].post_norm)?;
        let gate = self.linear(layer, LinearKind::Gate, &h, adapter)?;
        let up = self.linear(layer, LinearKind::Up, &h, adapter)?;
        let act = match self.fusions.swiglu {
            true => swiglu(&gate, &up)?,
            false => swiglu_unfused(&gate, &up)?,
        };
        let down = self.linear(layer, LinearKind::Down, &act, adapter)?;
        x + down
    }

    /// Bytes the model keeps resident (weights only).
    pub fn resident_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut total = dense(&self.embed) + dense(&self.final_norm);
        total += self.lm_head.as_ref().map_or(0, dense);
        for l in &self.layers {
            total += dense(&l.input_norm) + dense(&l.post_norm);
            total += l
                .linears
                .iter()
                .map(BaseLinear::resident_bytes)
                .sum::<usize>();
        }
        total
    }
}

/// `[b, kv, t, hd] -> [b, kv * n, t, hd]`, each key/value head serving `n` query heads.
pub(crate) fn repeat_kv(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, hd) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, hd))?
        .reshape((b, kv * n, t, hd))
}
