//! One decoder step of a LLaMA-family model (GQA, half-split RoPE, RMSNorm, SwiGLU) over
//! borrowed weights, with every buffer carved from one caller-provided f32 arena.
//!
//! This is the device path: NF4 + double-quant linears through [`Nf4Matrix`], an optional LoRA
//! delta per linear, a key/value cache for `max_seq` positions. It computes what transformers'
//! `LlamaForCausalLM` computes, token by token.

use crate::element::ElementSource;
use crate::error::{Buffer, Error, check_len};
use crate::kernels::{self, Nf4Matrix};
use crate::nf4::AbsmaxSource;
use crate::rank::ModuleShape;

/// The seven linears of a decoder layer that are quantized and can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LinearKind {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl LinearKind {
    /// All seven, in the order files list them.
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// The PEFT / transformers short name (`q_proj`, ...).
    pub const fn short_name(self) -> &'static str {
        match self {
            LinearKind::Q => "q_proj",
            LinearKind::K => "k_proj",
            LinearKind::V => "v_proj",
            LinearKind::O => "o_proj",
            LinearKind::Gate => "gate_proj",
            LinearKind::Up => "up_proj",
            LinearKind::Down => "down_proj",
        }
    }

    /// The path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`, ...).
    pub const fn layer_path(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    /// Parses a short name.
    pub fn from_short_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.short_name() == name)
    }

    /// `in` and `out` features of this linear in a model.
    pub fn shape(self, cfg: &DecoderConfig) -> ModuleShape {
        let (h, q, kv, i) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let (in_features, out_features) = match self {
            LinearKind::Q => (h, q),
            LinearKind::K | LinearKind::V => (h, kv),
            LinearKind::O => (q, h),
            LinearKind::Gate | LinearKind::Up => (h, i),
            LinearKind::Down => (i, h),
        };
        ModuleShape {
            in_features,
            out_features,
        }
    }
}

/// The two norms of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NormKind {
    /// `input_layernorm`, before attention.
    Input,
    /// `post_attention_layernorm`, before the MLP.
    PostAttention,
}

/// The shape of a LLaMA-family decoder.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DecoderConfig {
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Model width.
    pub hidden_size: u32,
    /// MLP width.
    pub intermediate_size: u32,
    /// Decoder layers.
    pub num_layers: u32,
    /// Query heads.
    pub num_heads: u32,
    /// Key/value heads (GQA); divides `num_heads`.
    pub num_kv_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Whether `lm_head` is the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl DecoderConfig {
    /// Width of all query heads together.
    pub const fn q_dim(&self) -> u32 {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub const fn kv_dim(&self) -> u32 {
        self.num_kv_heads * self.head_dim
    }

    /// Rejects zero sizes, an odd head width (RoPE pairs halves) and heads that do not group.
    pub fn validate(&self) -> Result<(), Error> {
        let sizes = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        ];
        if sizes.contains(&0) {
            return Err(Error::Shape {
                expected: 1,
                actual: 0,
            });
        }
        if !self.head_dim.is_multiple_of(2) || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::Shape {
                expected: self.num_kv_heads as usize,
                actual: self.num_heads as usize,
            });
        }
        Ok(())
    }

    /// f32 elements of the arena [`Decoder::new`] needs for `max_seq` positions.
    pub const fn arena_len(&self, max_seq: usize) -> usize {
        let h = self.hidden_size as usize;
        let q = self.q_dim() as usize;
        let kv = self.kv_dim() as usize;
        let i = self.intermediate_size as usize;
        let cache = 2 * self.num_layers as usize * max_seq * kv;
        3 * h + 2 * q + 2 * kv + max_seq + 2 * i + self.vocab_size as usize + cache
    }
}

/// Read access to a decoder's weights, wherever they live (a device file in flash, host memory).
pub trait DecoderWeights {
    /// A vector of any element type (embedding rows, norm weights).
    type Vector<'w>: ElementSource
    where
        Self: 'w;
    /// How this model stores the absmax of its NF4 linears.
    type Absmax<'w>: AbsmaxSource
    where
        Self: 'w;

    /// The model's shape.
    fn config(&self) -> &DecoderConfig;
    /// Row `token` of the embedding matrix.
    fn embedding_row(&self, token: usize) -> Result<Self::Vector<'_>, Error>;
    /// A layer norm weight.
    fn layer_norm(&self, layer: usize, which: NormKind) -> Result<Self::Vector<'_>, Error>;
    /// The final norm weight.
    fn final_norm(&self) -> Result<Self::Vector<'_>, Error>;
    /// A quantized linear.
    fn linear(
        &self,
        layer: usize,
        which: LinearKind,
    ) -> Result<Nf4Matrix<'_, Self::Absmax<'_>>, Error>;
    /// Row `token` of `lm_head` (the embedding row when tied).
    fn lm_head_row(&self, token: usize) -> Result<Self::Vector<'_>, Error>;
}

/// An adapter's contribution to one linear: `y += delta(x)`.
pub trait LinearDelta {
    /// Adds this linear's update to `y`; a linear without an adapter adds nothing.
    fn apply(&self, layer: usize, which: LinearKind, x: &[f32], y: &mut [f32])
    -> Result<(), Error>;
}

/// The base model alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAdapter;

impl LinearDelta for NoAdapter {
    fn apply(&self, _: usize, _: LinearKind, _: &[f32], _: &mut [f32]) -> Result<(), Error> {
        Ok(())
    }
}

/// Step-by-step decoder state: activations and the key/value cache, all in one arena.
pub struct Decoder<'s> {
    cfg: DecoderConfig,
    max_seq: usize,
    x: &'s mut [f32],
    xb: &'s mut [f32],
    xb2: &'s mut [f32],
    q: &'s mut [f32],
    attn: &'s mut [f32],
    k: &'s mut [f32],
    v: &'s mut [f32],
    scores: &'s mut [f32],
    h1: &'s mut [f32],
    h2: &'s mut [f32],
    logits: &'s mut [f32],
    key_cache: &'s mut [f32],
    value_cache: &'s mut [f32],
}

fn take<'s>(arena: &mut &'s mut [f32], n: usize) -> &'s mut [f32] {
    let (head, tail) = core::mem::take(arena).split_at_mut(n);
    *arena = tail;
    head
}

impl<'s> Decoder<'s> {
    /// Carves the buffers from `arena` (exactly [`DecoderConfig::arena_len`] elements).
    pub fn new(cfg: DecoderConfig, max_seq: usize, arena: &'s mut [f32]) -> Result<Self, Error> {
        cfg.validate()?;
        if max_seq == 0 {
            return Err(Error::Shape {
                expected: 1,
                actual: 0,
            });
        }
        check_len(Buffer::Scratch, cfg.arena_len(max_seq), arena.len())?;
        let h = cfg.hidden_size as usize;
        let q = cfg.q_dim() as usize;
        let kv = cfg.kv_dim() as usize;
        let i = cfg.intermediate_size as usize;
        let cache = cfg.num_layers as usize * max_seq * kv;
        let mut rest = arena;
        Ok(Self {
            cfg,
            max_seq,
            x: take(&mut rest, h),
            xb: take(&mut rest, h),
            xb2: take(&mut rest, h),
            q: take(&mut rest, q),
            attn: take(&mut rest, q),
            k: take(&mut rest, kv),
            v: take(&mut rest, kv),
            scores: take(&mut rest, max_seq),
            h1: take(&mut rest, i),
            h2: take(&mut rest, i),
            logits: take(&mut rest, cfg.vocab_size as usize),
            key_cache: take(&mut rest, cache),
            value_cache: take(&mut rest, cache),
        })
    }

    /// Positions the cache holds.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// Runs token `token` at position `pos` (positions must be fed in order from 0) and returns
    /// the logits for the next token.
    pub fn step<W: DecoderWeights + ?Sized, D: LinearDelta + ?Sized>(
        &mut self,
        weights: &W,
        delta: &D,
        token: usize,
        pos: usize,
    ) -> Result<&[f32], Error> {
        let cfg = self.cfg;
        if weights.config() != &cfg {
            return Err(Error::Shape {
                expected: cfg.hidden_size as usize,
                actual: weights.config().hidden_size as usize,
            });
        }
        if pos >= self.max_seq {
            return Err(Error::Shape {
                expected: self.max_seq,
                actual: pos,
            });
        }
        if token >= cfg.vocab_size as usize {
            return Err(Error::Shape {
                expected: cfg.vocab_size as usize,
                actual: token,
            });
        }
        let row = weights.embedding_row(token)?;
        check_len(Buffer::Weights, self.x.len(), row.len())?;
        for (i, v) in self.x.iter_mut().enumerate() {
            *v = row.get(i);
        }
        for layer in 0..cfg.num_layers as usize {
            self.attention_block(weights, delta, layer, pos)?;
            self.mlp_block(weights, delta, layer)?;
        }
        kernels::rms_norm(self.x, &weights.final_norm()?, cfg.rms_norm_eps, self.xb)?;
        for (t, out) in self.logits.iter_mut().enumerate() {
            *out = kernels::dot(&weights.lm_head_row(t)?, self.xb)?;
        }
        Ok(self.logits)
    }

    fn linear<W: DecoderWeights + ?Sized, D: LinearDelta + ?Sized>(
        weights: &W,
        delta: &D,
        layer: usize,
        which: LinearKind,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), Error> {
        weights.linear(layer, which)?.matvec(x, y)?;
        delta.apply(layer, which, x, y)
    }

    fn attention_block<W: DecoderWeights + ?Sized, D: LinearDelta + ?Sized>(
        &mut self,
        weights: &W,
        delta: &D,
        layer: usize,
        pos: usize,
    ) -> Result<(), Error> {
        let cfg = self.cfg;
        let hd = cfg.head_dim as usize;
        let kv = cfg.kv_dim() as usize;
        let norm = weights.layer_norm(layer, NormKind::Input)?;
        kernels::rms_norm(self.x, &norm, cfg.rms_norm_eps, self.xb)?;
        Self::linear(weights, delta, layer, LinearKind::Q, self.xb, self.q)?;
        Self::linear(weights, delta, layer, LinearKind::K, self.xb, self.k)?;
        Self::linear(weights, delta, layer, LinearKind::V, self.xb, self.v)?;
        rope(self.q, hd, pos, cfg.rope_theta);
        rope(self.k, hd, pos, cfg.rope_theta);

        let base = layer * self.max_seq * kv;
        self.key_cache[base + pos * kv..base + (pos + 1) * kv].copy_from_slice(self.k);
        self.value_cache[base + pos * kv..base + (pos + 1) * kv].copy_from_slice(self.v);

        let group = (cfg.num_heads / cfg.num_kv_heads) as usize;
        let scale = 1.0 / libm::sqrtf(hd as f32);
        for head in 0..cfg.num_heads as usize {
            let kv_off = (head / group) * hd;
            let qh = &self.q[head * hd..(head + 1) * hd];
            let scores = &mut self.scores[..=pos];
            for (t, s) in scores.iter_mut().enumerate() {
                let kt = &self.key_cache[base + t * kv + kv_off..][..hd];
                *s = qh.iter().zip(kt).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            kernels::softmax(scores);
            let out = &mut self.attn[head * hd..(head + 1) * hd];
            out.fill(0.0);
            for (t, &p) in scores.iter().enumerate() {
                let vt = &self.value_cache[base + t * kv + kv_off..][..hd];
                for (o, &vv) in out.iter_mut().zip(vt) {
                    *o += p * vv;
                }
            }
        }
        Self::linear(weights, delta, layer, LinearKind::O, self.attn, self.xb2)?;
        for (x, d) in self.x.iter_mut().zip(self.xb2.iter()) {
            *x += d;
        }
        Ok(())
    }

    fn mlp_block<W: DecoderWeights + ?Sized, D: LinearDelta + ?Sized>(
        &mut self,
        weights: &W,
        delta: &D,
        layer: usize,
    ) -> Result<(), Error> {
        let norm = weights.layer_norm(layer, NormKind::PostAttention)?;
        kernels::rms_norm(self.x, &norm, self.cfg.rms_norm_eps, self.xb)?;
        Self::linear(weights, delta, layer, LinearKind::Gate, self.xb, self.h1)?;
        Self::linear(weights, delta, layer, LinearKind::Up, self.xb, self.h2)?;
        for (g, u) in self.h1.iter_mut().zip(self.h2.iter()) {
            *g = kernels::silu(*g) * u;
        }
        Self::linear(weights, delta, layer, LinearKind::Down, self.h1, self.xb2)?;
        for (x, d) in self.x.iter_mut().zip(self.xb2.iter()) {
            *x += d;
        }
        Ok(())
    }
}

/// Rotary position embedding in the half-split layout (`rotate_half`): within each head, element
/// `i` pairs with `i + head_dim/2`, at frequency `theta^(-2i/head_dim)`.
pub fn rope(x: &mut [f32], head_dim: usize, pos: usize, theta: f32) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let inv_freq = 1.0 / libm::powf(theta, (2 * i) as f32 / head_dim as f32);
            let angle = pos as f32 * inv_freq;
            let (sin, cos) = (libm::sinf(angle), libm::cosf(angle));
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos - b * sin;
            head[i + half] = b * cos + a * sin;
        }
    }
}

/// Index of the largest value (the first one on ties), for greedy decoding.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}
