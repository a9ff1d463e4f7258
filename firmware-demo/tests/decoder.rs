//! On-target test of `infer::Decoder::step` on a tiny synthetic LLaMA-style model (2 layers, GQA,
//! NF4 + double-quant linears held in fixed arrays), with and without a LoRA delta.
//!
//! The reference is a separate f64 forward pass written from the model's definition: weights
//! dequantized element by element from the codes, RMSNorm, half-split RoPE, causal attention
//! over the cached positions, SwiGLU, tied `lm_head`.
#![no_std]
#![no_main]

use qdylora_core::Error;
use qdylora_core::double_quant::{self, DoubleQuantRef};
use qdylora_core::dynamic_map::{self, CODE_LEN};
use qdylora_core::infer::{DecoderConfig, DecoderWeights, LinearDelta, LinearKind, NormKind};
use qdylora_core::kernels::{self, Nf4Matrix};
use qdylora_core::nf4::CODE;
use qdylora_firmware_demo as _;
use qdylora_firmware_demo::synthetic::{fill, unit};

const VOCAB: usize = 24;
const H: usize = 32;
const INTER: usize = 48;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = 8;
const KV: usize = KV_HEADS * HD;
const MAX_SEQ: usize = 4;
const BLOCKSIZE: usize = 64;
/// The largest linear (gate, up and down are 32 x 48).
const MAX_WEIGHTS: usize = H * INTER;
const MAX_BLOCKS: usize = MAX_WEIGHTS / BLOCKSIZE;

const CFG: DecoderConfig = DecoderConfig {
    vocab_size: VOCAB as u32,
    hidden_size: H as u32,
    intermediate_size: INTER as u32,
    num_layers: LAYERS as u32,
    num_heads: HEADS as u32,
    num_kv_heads: KV_HEADS as u32,
    head_dim: HD as u32,
    rope_theta: 10_000.0,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
};
const ARENA: usize = CFG.arena_len(MAX_SEQ);

fn kind_index(which: LinearKind) -> usize {
    LinearKind::ALL
        .iter()
        .position(|&k| k == which)
        .unwrap_or(0)
}

/// `(rows, cols)` of a linear: `[out, in]`.
fn dims(which: LinearKind) -> (usize, usize) {
    let s = which.shape(&CFG);
    (s.out_features as usize, s.in_features as usize)
}

/// One NF4 linear with double-quantized absmax, in arrays sized for the largest.
struct Linear {
    which: LinearKind,
    packed: [u8; MAX_WEIGHTS / 2],
    codes: [u8; MAX_BLOCKS],
    nested: [f32; 1],
    offset: f32,
}

impl Linear {
    fn new(map: &[f32; CODE_LEN], layer: usize, which: LinearKind) -> Result<Self, Error> {
        let (rows, cols) = dims(which);
        let n = rows * cols;
        let seed = 100 + (layer * 7 + kind_index(which)) as u32;
        // Uniform weights of std ~ 1.4 / sqrt(in) keep activations of order one.
        let scale = 2.5 / libm::sqrtf(cols as f32);
        let mut w = [0.0f32; MAX_WEIGHTS];
        for (i, v) in w[..n].iter_mut().enumerate() {
            *v = unit(seed, i as u32) * scale;
        }
        let mut lin = Linear {
            which,
            packed: [0; MAX_WEIGHTS / 2],
            codes: [0; MAX_BLOCKS],
            nested: [0.0],
            offset: 0.0,
        };
        let blocks = n / BLOCKSIZE;
        let mut absmax = [0.0f32; MAX_BLOCKS];
        lin.offset = double_quant::quantize_nf4_double(
            map,
            &w[..n],
            BLOCKSIZE,
            &mut lin.packed[..n / 2],
            &mut absmax[..blocks],
            &mut lin.codes[..blocks],
            &mut lin.nested,
        )?;
        Ok(lin)
    }

    /// The reference's weight `[row, col]`, from the definition of NF4 + double quantization.
    fn weight(&self, map: &[f32; CODE_LEN], row: usize, col: usize) -> f64 {
        let e = row * dims(self.which).1 + col;
        let byte = self.packed[e / 2];
        let code = if e.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        };
        let absmax = map[usize::from(self.codes[e / BLOCKSIZE])] * self.nested[0] + self.offset;
        f64::from(CODE[usize::from(code)] * absmax)
    }
}

/// The seven linears of layer `l`.
fn layer(map: &[f32; CODE_LEN], l: usize) -> Result<[Linear; 7], Error> {
    let [q, k, v, o, gate, up, down] = LinearKind::ALL;
    Ok([
        Linear::new(map, l, q)?,
        Linear::new(map, l, k)?,
        Linear::new(map, l, v)?,
        Linear::new(map, l, o)?,
        Linear::new(map, l, gate)?,
        Linear::new(map, l, up)?,
        Linear::new(map, l, down)?,
    ])
}

/// The whole model in fixed arrays.
struct TinyModel {
    map: [f32; CODE_LEN],
    embedding: [f32; VOCAB * H],
    norms: [[f32; H]; 2 * LAYERS],
    final_norm: [f32; H],
    linears: [[Linear; 7]; LAYERS],
}

impl TinyModel {
    fn new() -> Result<Self, Error> {
        let map = dynamic_map::signed_dynamic_map();
        let norm =
            |seed: u32| -> [f32; H] { core::array::from_fn(|i| 1.0 + 0.3 * unit(seed, i as u32)) };
        Ok(TinyModel {
            embedding: core::array::from_fn(|i| unit(1, i as u32)),
            norms: core::array::from_fn(|i| norm(10 + i as u32)),
            final_norm: norm(20),
            linears: [layer(&map, 0)?, layer(&map, 1)?],
            map,
        })
    }

    fn embedding(&self, token: usize) -> Result<&[f32], Error> {
        self.embedding
            .get(token * H..(token + 1) * H)
            .ok_or(Error::Shape {
                expected: VOCAB,
                actual: token,
            })
    }
}

impl DecoderWeights for TinyModel {
    type Vector<'w> = &'w [f32];
    type Absmax<'w> = DoubleQuantRef<'w>;

    fn config(&self) -> &DecoderConfig {
        &CFG
    }

    fn embedding_row(&self, token: usize) -> Result<&[f32], Error> {
        self.embedding(token)
    }

    fn layer_norm(&self, layer: usize, which: NormKind) -> Result<&[f32], Error> {
        let index = 2 * layer + usize::from(which == NormKind::PostAttention);
        self.norms.get(index).map(|n| &n[..]).ok_or(Error::Shape {
            expected: LAYERS,
            actual: layer,
        })
    }

    fn final_norm(&self) -> Result<&[f32], Error> {
        Ok(&self.final_norm)
    }

    fn linear(
        &self,
        layer: usize,
        which: LinearKind,
    ) -> Result<Nf4Matrix<'_, DoubleQuantRef<'_>>, Error> {
        let lin = &self.linears.get(layer).ok_or(Error::Shape {
            expected: LAYERS,
            actual: layer,
        })?[kind_index(which)];
        let (rows, cols) = dims(which);
        let n = rows * cols;
        let absmax = DoubleQuantRef::new(
            &self.map,
            &lin.codes[..n / BLOCKSIZE],
            &lin.nested,
            lin.offset,
        )?;
        Nf4Matrix::new(rows, cols, BLOCKSIZE, &lin.packed[..n / 2], absmax)
    }

    fn lm_head_row(&self, token: usize) -> Result<&[f32], Error> {
        self.embedding(token)
    }
}

/// A rank-2 LoRA on `q_proj` and `down_proj` of every layer: A rows and B columns, f32.
struct TinyLora {
    /// `[layer][0 = q, 1 = down][k]`: A row k (first `in` used) and B column k (all `H` used;
    /// both adapted linears output `H` features).
    a: [[[[f32; INTER]; 2]; 2]; LAYERS],
    b: [[[[f32; H]; 2]; 2]; LAYERS],
    scale: f32,
}

impl TinyLora {
    fn new() -> Self {
        let seed = |base: usize, l: usize, m: usize, k: usize| (base + l * 4 + m * 2 + k) as u32;
        TinyLora {
            a: core::array::from_fn(|l| {
                core::array::from_fn(|m| core::array::from_fn(|k| fill(seed(200, l, m, k), 0.3)))
            }),
            b: core::array::from_fn(|l| {
                core::array::from_fn(|m| core::array::from_fn(|k| fill(seed(300, l, m, k), 0.3)))
            }),
            scale: 2.0,
        }
    }

    fn module(which: LinearKind) -> Option<usize> {
        match which {
            LinearKind::Q => Some(0),
            LinearKind::Down => Some(1),
            _ => None,
        }
    }
}

impl LinearDelta for TinyLora {
    fn apply(
        &self,
        layer: usize,
        which: LinearKind,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), Error> {
        let Some(m) = Self::module(which) else {
            return Ok(());
        };
        let cols = dims(which).1;
        let pairs = (0..2).map(|k| (&self.a[layer][m][k][..cols], &self.b[layer][m][k][..]));
        kernels::lora_accumulate(pairs, self.scale, x, y)
    }
}

/// The f64 reference forward pass, with its own key/value cache.
struct Reference {
    keys: [[[f64; KV]; MAX_SEQ]; LAYERS],
    values: [[[f64; KV]; MAX_SEQ]; LAYERS],
}

fn rms_norm(x: &[f64; H], weight: &[f32; H]) -> [f64; H] {
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / H as f64;
    let inv = 1.0 / libm::sqrt(mean_sq + f64::from(CFG.rms_norm_eps));
    core::array::from_fn(|i| f64::from(weight[i]) * x[i] * inv)
}

fn rotate(x: &mut [f64], pos: usize) {
    for head in x.chunks_exact_mut(HD) {
        for i in 0..HD / 2 {
            let freq = libm::pow(f64::from(CFG.rope_theta), -((2 * i) as f64) / HD as f64);
            let (sin, cos) = (libm::sin(pos as f64 * freq), libm::cos(pos as f64 * freq));
            let (a, b) = (head[i], head[i + HD / 2]);
            head[i] = a * cos - b * sin;
            head[i + HD / 2] = b * cos + a * sin;
        }
    }
}

impl Reference {
    fn new() -> Self {
        Reference {
            keys: [[[0.0; KV]; MAX_SEQ]; LAYERS],
            values: [[[0.0; KV]; MAX_SEQ]; LAYERS],
        }
    }

    /// `y = W x (+ the LoRA delta)` for the first `rows` outputs.
    fn linear(
        model: &TinyModel,
        lora: Option<&TinyLora>,
        layer: usize,
        which: LinearKind,
        x: &[f64],
        y: &mut [f64],
    ) {
        let lin = &model.linears[layer][kind_index(which)];
        let (rows, cols) = dims(which);
        for (r, out) in y[..rows].iter_mut().enumerate() {
            *out = (0..cols).map(|c| lin.weight(&model.map, r, c) * x[c]).sum();
            if let (Some(lora), Some(m)) = (lora, TinyLora::module(which)) {
                for k in 0..2 {
                    let a = &lora.a[layer][m][k];
                    let ax: f64 = (0..cols).map(|c| f64::from(a[c]) * x[c]).sum();
                    *out += f64::from(lora.scale) * f64::from(lora.b[layer][m][k][r]) * ax;
                }
            }
        }
    }

    fn step(
        &mut self,
        model: &TinyModel,
        lora: Option<&TinyLora>,
        token: usize,
        pos: usize,
    ) -> [f64; VOCAB] {
        let mut x: [f64; H] = core::array::from_fn(|i| f64::from(model.embedding[token * H + i]));
        for l in 0..LAYERS {
            let xn = rms_norm(&x, &model.norms[2 * l]);
            let (mut q, mut k, mut v) = ([0.0f64; H], [0.0f64; KV], [0.0f64; KV]);
            Self::linear(model, lora, l, LinearKind::Q, &xn, &mut q);
            Self::linear(model, lora, l, LinearKind::K, &xn, &mut k);
            Self::linear(model, lora, l, LinearKind::V, &xn, &mut v);
            rotate(&mut q, pos);
            rotate(&mut k, pos);
            self.keys[l][pos] = k;
            self.values[l][pos] = v;

            let mut attn = [0.0f64; H];
            for h in 0..HEADS {
                let kv = (h / (HEADS / KV_HEADS)) * HD;
                let mut scores = [0.0f64; MAX_SEQ];
                for (t, s) in scores[..=pos].iter_mut().enumerate() {
                    let dot: f64 = (0..HD)
                        .map(|i| q[h * HD + i] * self.keys[l][t][kv + i])
                        .sum();
                    *s = dot / libm::sqrt(HD as f64);
                }
                let max = scores[..=pos]
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                let total: f64 = scores[..=pos].iter().map(|s| libm::exp(s - max)).sum();
                for (t, s) in scores[..=pos].iter().enumerate() {
                    let p = libm::exp(s - max) / total;
                    for i in 0..HD {
                        attn[h * HD + i] += p * self.values[l][t][kv + i];
                    }
                }
            }
            let mut o = [0.0f64; H];
            Self::linear(model, lora, l, LinearKind::O, &attn, &mut o);
            x.iter_mut().zip(o).for_each(|(x, d)| *x += d);

            let xn = rms_norm(&x, &model.norms[2 * l + 1]);
            let (mut gate, mut up) = ([0.0f64; INTER], [0.0f64; INTER]);
            Self::linear(model, lora, l, LinearKind::Gate, &xn, &mut gate);
            Self::linear(model, lora, l, LinearKind::Up, &xn, &mut up);
            let hidden: [f64; INTER] =
                core::array::from_fn(|i| gate[i] / (1.0 + libm::exp(-gate[i])) * up[i]);
            let mut down = [0.0f64; H];
            Self::linear(model, lora, l, LinearKind::Down, &hidden, &mut down);
            x.iter_mut().zip(down).for_each(|(x, d)| *x += d);
        }
        let xn = rms_norm(&x, &model.final_norm);
        core::array::from_fn(|t| {
            (0..H)
                .map(|i| f64::from(model.embedding[t * H + i]) * xn[i])
                .sum()
        })
    }
}

/// Runs the prompt through the decoder and the reference; checks every position's logits and
/// returns the last ones.
fn run_and_compare<D: LinearDelta>(
    model: &TinyModel,
    delta: &D,
    lora: Option<&TinyLora>,
    tokens: &[usize],
) -> Result<[f32; VOCAB], Error> {
    let mut arena = [0.0f32; ARENA];
    let mut decoder = qdylora_core::infer::Decoder::new(CFG, MAX_SEQ, &mut arena)?;
    let mut reference = Reference::new();
    let mut last = [0.0f32; VOCAB];
    for (pos, &token) in tokens.iter().enumerate() {
        let got = decoder.step(model, delta, token, pos)?;
        let want = reference.step(model, lora, token, pos);
        let size = want.iter().fold(1.0f64, |m, w| m.max(libm::fabs(*w)));
        for (t, (&g, &w)) in got.iter().zip(&want).enumerate() {
            defmt::assert!(
                libm::fabs(f64::from(g) - w) <= 1e-4 * size,
                "position {} logit {}: got {} want {}",
                pos,
                t,
                g,
                w as f32
            );
        }
        last.copy_from_slice(got);
    }
    Ok(last)
}

struct State {
    model: TinyModel,
    lora: TinyLora,
}

const PROMPT: [usize; MAX_SEQ] = [3, 17, 5, 17];

#[defmt_test::tests]
mod tests {
    use qdylora_core::Error;
    use qdylora_core::infer::{Decoder, NoAdapter};

    use super::{ARENA, CFG, MAX_SEQ, PROMPT, State, TinyLora, TinyModel, VOCAB, run_and_compare};

    #[init]
    fn init() -> State {
        match TinyModel::new() {
            Ok(model) => State {
                model,
                lora: TinyLora::new(),
            },
            Err(e) => defmt::panic!("building the tiny model: {}", e),
        }
    }

    #[test]
    fn base_model_steps_match_the_reference(state: &mut State) -> Result<(), Error> {
        let logits = run_and_compare(&state.model, &NoAdapter, None, &PROMPT)?;
        // Not a degenerate model: the logits of the last position are spread out.
        let (lo, hi) = logits
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        defmt::assert!(hi - lo > 0.5, "logits span only {}", hi - lo);
        Ok(())
    }

    #[test]
    fn lora_steps_match_the_reference(state: &mut State) -> Result<(), Error> {
        let base = run_and_compare(&state.model, &NoAdapter, None, &PROMPT)?;
        let adapted = run_and_compare(&state.model, &state.lora, Some(&state.lora), &PROMPT)?;
        // The delta changes the output, so the comparison above covered it.
        let moved = base
            .iter()
            .zip(&adapted)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        defmt::assert!(
            moved > 0.05,
            "the adapter moved the logits by only {}",
            moved
        );
        Ok(())
    }

    #[test]
    fn bad_token_or_position_is_a_typed_error(state: &mut State) -> Result<(), Error> {
        let mut arena = [0.0f32; ARENA];
        let mut decoder = Decoder::new(CFG, MAX_SEQ, &mut arena)?;
        defmt::assert!(decoder.step(&state.model, &NoAdapter, VOCAB, 0).is_err());
        defmt::assert!(decoder.step(&state.model, &NoAdapter, 0, MAX_SEQ).is_err());
        defmt::assert!(Decoder::new(CFG, MAX_SEQ, &mut arena[1..]).is_err());
        Ok(())
    }
}
