//! A decoder layer's backward pass written out, for training with per-layer recomputation
//! (`train::recompute`): the layer's forward runs again keeping the tensors its backward needs,
//! then each op's gradient is computed once, by the same fused ops' backward kernels autograd
//! would call. The first forward pass of that training runs the same ops without keeping
//! anything (`Llama::layer_untracked`), so both forwards add the LoRA path alike.
//!
//! Why not candle's autograd: its gradient store starts every tensor's gradient as zeros and
//! adds each contribution to it, so every gradient in the graph costs a zero-fill and an add on
//! top of the op that made it (for a LLaMA-7B layer at 4,096 tokens, gigabytes of extra memory
//! traffic); it computes the gradients of both sides of every product, needed or not, and it pads each adapter slice's gradient
//! to the full rank through a concatenation. Here a gradient is written once, only the adapter
//! rows that learn are computed, and the last linear's base product (whose output the backward
//! never reads) is skipped. The test below holds it to autograd's gradients.

mod adapted;
mod attention;

use candle_core::Tensor;
use qdylora_core::infer::LinearKind;

pub use adapted::ModuleGrads;

use super::fused::rms_norm::{
    residual_rms_norm, rms_norm, rms_norm_backward, rms_norm_backward_add,
};
use super::fused::rope::{rope, rope_backward, rope_backward_merge_heads, rope_split_heads};
use super::fused::swiglu::{swiglu, swiglu_backward, swiglu_backward_two_pass};
use super::llama::{Llama, Positions, repeat_kv};
use super::lora::{AdapterCall, ModuleKey};
use crate::phases;

/// The [`phases::within`] category of the attention's products and softmax, both directions.
const ATTENTION: &str = "attention core (QKᵀ, softmax, PV)";

/// The gradients of one decoder layer: of its input, and of each adapter module in it whose
/// rows learn.
#[derive(Debug)]
pub struct LayerGrads {
    /// `d input`, shaped like the layer's input.
    pub input: Tensor,
    /// One entry per adapted linear.
    pub modules: Vec<ModuleGrads>,
}

/// The attention block's tensors the backward pass reads.
struct AttentionTape<'a> {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    core: attention::Tape,
    qkv: adapted::SharedInput<'a>,
    o: adapted::Saved<'a>,
}

/// The MLP block's tensors the backward pass reads.
struct MlpTape<'a> {
    gate: Tensor,
    up: Tensor,
    gate_up: adapted::SharedInput<'a>,
    down: adapted::Saved<'a>,
}

/// Everything a decoder layer's backward reads from its forward pass (at LLaMA-7B's shape and
/// 4,096 tokens in bf16, about 0.8 GiB with the chunked attention's scores).
pub struct LayerTape<'a> {
    /// The attention block's output plus the residual: the MLP block's input.
    mid: Tensor,
    attention: AttentionTape<'a>,
    mlp: MlpTape<'a>,
}

impl Llama {
    /// Whether [`Llama::layer_backward`] is switched on and can stand in for autograd: it is
    /// written for the fused ops, so any of them switched off means autograd.
    pub fn has_layer_backward(&self) -> bool {
        let f = self.fusions;
        f.layer_backward && f.softmax && f.swiglu && f.rms_norm && f.rope && f.lora_scale
    }

    /// Decoder layer `layer`'s gradients for input `x: [b, t, hidden]` (a plain tensor, not
    /// tracked) and the gradient `grad_out` of its output, with the adapter `call` (its
    /// dropout must draw the masks the first forward drew): the layer's forward runs again to
    /// rebuild its tape.
    pub fn layer_backward(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &Positions,
        call: &AdapterCall<'_>,
        grad_out: &Tensor,
    ) -> candle_core::Result<LayerGrads> {
        self.check_layer_backward()?;
        let (_, tape) = self.tape(layer, x, positions, call, false)?;
        self.layer_backward_taped(layer, x, positions, tape, grad_out)
    }

    /// [`Llama::layer_backward`] from the tape [`Llama::layer_taped`] kept in the forward pass
    /// for the same `x`: no forward runs again.
    pub fn layer_backward_taped(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &Positions,
        tape: LayerTape<'_>,
        grad_out: &Tensor,
    ) -> candle_core::Result<LayerGrads> {
        self.check_layer_backward()?;
        let LayerTape {
            mid,
            attention,
            mlp,
        } = tape;
        let mut modules = Vec::with_capacity(7);
        let grad_mid = self.mlp_backward(layer, &mid, mlp, grad_out, &mut modules)?;
        drop(mid);
        let input =
            self.attention_backward(layer, x, positions, attention, &grad_mid, &mut modules)?;
        Ok(LayerGrads { input, modules })
    }

    /// Decoder layer `layer`'s output for an untracked input `x`, by the same ops as
    /// [`Llama::layer_backward`]'s forward (so its LoRA sums are fused as that one's are) and
    /// without building an autograd graph: the forward pass of training with recomputation.
    /// Draws the same dropout masks as [`Llama::layer`].
    pub fn layer_untracked(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &Positions,
        call: &AdapterCall<'_>,
    ) -> candle_core::Result<Tensor> {
        // The tape lives to the end, as autograd's graph would: freeing its large buffers in
        // the middle of the layer makes the CPU's allocator return them to the system and fault
        // them in again (measured: 5× the system time of a `train-bench` step).
        let (out, _tape) = self.layer_taped(layer, x, positions, call)?;
        Ok(out)
    }

    /// [`Llama::layer_untracked`], also returning the tape that
    /// [`Llama::layer_backward_taped`] reads: a layer whose activations are kept instead of
    /// recomputed.
    pub fn layer_taped<'a>(
        &'a self,
        layer: usize,
        x: &Tensor,
        positions: &Positions,
        call: &AdapterCall<'_>,
    ) -> candle_core::Result<(Tensor, LayerTape<'a>)> {
        let (out, tape) = self.tape(layer, x, positions, call, true)?;
        let out =
            out.ok_or_else(|| candle_core::Error::msg("the MLP block was asked for its output"))?;
        Ok((out, tape))
    }

    /// The layer's forward, keeping its tape; the output only `with_output` (see
    /// [`Llama::mlp_tape`]).
    fn tape<'a>(
        &'a self,
        layer: usize,
        x: &Tensor,
        positions: &Positions,
        call: &AdapterCall<'_>,
        with_output: bool,
    ) -> candle_core::Result<(Option<Tensor>, LayerTape<'a>)> {
        let (attention_out, attention) = self.attention_tape(layer, x, positions, call)?;
        // The attention block's residual sum, and the MLP block's norm that reads it.
        let post_norm = &self.layers[layer].post_norm;
        let eps = self.config.rms_norm_eps;
        let (mid, h) = match self.fusions.residual_norm {
            true => residual_rms_norm(x, &attention_out, post_norm, eps)?,
            false => {
                let mid = (x + attention_out)?;
                let h = rms_norm(&mid, post_norm, eps)?;
                (mid, h)
            }
        };
        let (out, mlp) = self.mlp_tape(layer, &mid, &h, call, with_output)?;
        let tape = LayerTape {
            mid,
            attention,
            mlp,
        };
        Ok((out, tape))
    }

    fn check_layer_backward(&self) -> candle_core::Result<()> {
        if !self.has_layer_backward() {
            candle_core::bail!(
                "the written-out layer backward needs every fused op on, got {:?}",
                self.fusions
            );
        }
        Ok(())
    }

    fn key(layer: usize, kind: LinearKind) -> ModuleKey {
        ModuleKey { layer, kind }
    }

    /// The attention block's forward (as `Llama::layer`'s) without its residual sum: the output
    /// projection's output, and the tape.
    fn attention_tape<'a>(
        &'a self,
        layer: usize,
        x: &Tensor,
        positions: &Positions,
        call: &AdapterCall<'_>,
    ) -> candle_core::Result<(Tensor, AttentionTape<'a>)> {
        let (b, t, _) = x.dims3()?;
        let shape = self.heads();
        let weights = &self.layers[layer];
        let h = rms_norm(x, &weights.input_norm, self.config.rms_norm_eps)?;
        let sums = self.sums();
        let linear = |kind| (weights.linear(kind), Self::key(layer, kind));
        let qkv = [LinearKind::Q, LinearKind::K, LinearKind::V].map(linear);
        let (outputs, qkv) = adapted::forward_shared(&qkv, &h, call, sums)?;
        let [q, k, v] = exactly(outputs)?;
        let split = |y: Tensor, n: usize| {
            y.reshape((b, t, n, shape.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin) = positions.rope_tables();
        // RoPE splitting the heads as it rotates writes q and k once, not copied then rotated.
        let rotate = |y: Tensor, n: usize| match self.fusions.rope_heads {
            true => rope_split_heads(&y, n, cos, sin),
            false => rope(&split(y, n)?, cos, sin),
        };
        let q = rotate(q, shape.heads)?;
        let k = repeat_kv(&rotate(k, shape.kv_heads)?, shape.group())?;
        let v = repeat_kv(&split(v, shape.kv_heads)?, shape.group())?;
        let chunks = self.attention_chunks();
        let (attn, core) = phases::within(ATTENTION, || {
            attention::forward(&q, &k, &v, shape.softmax_scale(), chunks)
        })?;
        let attn = attn
            .transpose(1, 2)?
            .reshape((b, t, shape.heads * shape.head_dim))?;
        let (base, key) = linear(LinearKind::O);
        let (out, o) = adapted::forward(base, key, &attn, call, sums)?;
        let tape = AttentionTape {
            q,
            k,
            v,
            core,
            qkv,
            o,
        };
        Ok((out, tape))
    }

    /// The attention block's backward: `d x` for `d out`, with `x` the block's input.
    fn attention_backward(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &Positions,
        tape: AttentionTape<'_>,
        grad_out: &Tensor,
        modules: &mut Vec<ModuleGrads>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let shape = self.heads();
        let d_attn = collect(tape.o.backward(grad_out, None)?, modules);
        let d_attn = d_attn
            .reshape((b, t, shape.heads, shape.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let (d_q, d_k, d_v) = phases::within(ATTENTION, || {
            let (q, k, v) = (&tape.q, &tape.k, &tape.v);
            attention::backward(q, k, v, tape.core, d_attn, shape.softmax_scale())
        })?;
        let (cos, sin) = positions.rope_tables();
        let merge = |d: Tensor| {
            let (_, n, _, hd) = d.dims4()?;
            d.transpose(1, 2)?.reshape((b, t, n * hd))
        };
        let rotate_back = |d: Tensor| match self.fusions.rope_heads {
            true => rope_backward_merge_heads(&d, cos, sin),
            false => merge(rope_backward(&d, cos, sin)?),
        };
        let d_q = rotate_back(d_q)?;
        let d_k = rotate_back(shape.sum_groups(&d_k)?)?;
        let d_v = merge(shape.sum_groups(&d_v)?)?;
        // q, k and v read the same input: their input gradients add into one sum.
        let (d_h, qkv_modules) = tape.qkv.backward(&[&d_q, &d_k, &d_v])?;
        modules.extend(qkv_modules);
        self.norm_backward_add(x, &self.layers[layer].input_norm, &d_h, grad_out)
    }

    /// The MLP block's forward for its input `x` and that input normed, `h`, keeping its tape.
    /// The block's output is computed only `with_output`: the recomputed forward's backward
    /// never reads it, so there the last linear's base product and the residual sum are
    /// skipped.
    fn mlp_tape<'a>(
        &'a self,
        layer: usize,
        x: &Tensor,
        h: &Tensor,
        call: &AdapterCall<'_>,
        with_output: bool,
    ) -> candle_core::Result<(Option<Tensor>, MlpTape<'a>)> {
        let weights = &self.layers[layer];
        let sums = self.sums();
        let kind = |k| (weights.linear(k), Self::key(layer, k));
        let gate_up = [LinearKind::Gate, LinearKind::Up].map(kind);
        let (outputs, gate_up) = adapted::forward_shared(&gate_up, h, call, sums)?;
        let [gate, up] = exactly(outputs)?;
        let act = swiglu(&gate, &up)?;
        let (base, key) = kind(LinearKind::Down);
        let (out, down) = match with_output {
            true => {
                let (down, saved) = adapted::forward(base, key, &act, call, sums)?;
                (Some((x + down)?), saved)
            }
            false => (None, adapted::prepare(base, key, &act, call, sums)?),
        };
        let tape = MlpTape {
            gate,
            up,
            gate_up,
            down,
        };
        Ok((out, tape))
    }

    /// The MLP block's backward: `d x` for `d out`, with `x` the block's input.
    fn mlp_backward(
        &self,
        layer: usize,
        x: &Tensor,
        tape: MlpTape<'_>,
        grad_out: &Tensor,
        modules: &mut Vec<ModuleGrads>,
    ) -> candle_core::Result<Tensor> {
        let d_act = collect(tape.down.backward(grad_out, None)?, modules);
        let (d_gate, d_up) = match self.fusions.swiglu_grads {
            true => swiglu_backward(&tape.gate, &tape.up, &d_act)?,
            false => swiglu_backward_two_pass(&tape.gate, &tape.up, &d_act)?,
        };
        drop((d_act, tape.gate, tape.up));
        let (d_h, gate_up_modules) = tape.gate_up.backward(&[&d_gate, &d_up])?;
        modules.extend(gate_up_modules);
        self.norm_backward_add(x, &self.layers[layer].post_norm, &d_h, grad_out)
    }

    /// A block's input gradient: `residual` (the block output's gradient, through the skip
    /// connection) plus the norm's gradient for `d_h`, the gradient of `x` normed by `weight`.
    fn norm_backward_add(
        &self,
        x: &Tensor,
        weight: &Tensor,
        d_h: &Tensor,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        match self.fusions.residual_norm {
            true => rms_norm_backward_add(x, weight, d_h, residual, eps),
            false => residual + rms_norm_backward(x, weight, d_h, eps)?,
        }
    }

    /// How each linear sums its base and adapter terms.
    fn sums(&self) -> adapted::Sums {
        adapted::Sums {
            lora_add: self.fusions.lora_add,
            base_add: self.fusions.base_add,
            lora_stack: self.fusions.lora_stack,
        }
    }

    /// Query chunks of the causal attention ([`attention`]): 1 is the whole score matrix.
    fn attention_chunks(&self) -> usize {
        match self.fusions.causal_chunks {
            true => attention::CHUNKS,
            false => 1,
        }
    }

    fn heads(&self) -> Heads {
        let c = &self.config;
        Heads {
            heads: c.num_heads as usize,
            kv_heads: c.num_kv_heads as usize,
            head_dim: c.head_dim as usize,
        }
    }
}

/// The attention's head counts.
#[derive(Clone, Copy)]
struct Heads {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Heads {
    /// Query heads per key/value head.
    fn group(self) -> usize {
        self.heads / self.kv_heads
    }

    fn softmax_scale(self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }

    /// `[b, heads, t, hd] -> [b, kv_heads, t, hd]`: the gradient of `repeat_kv`, summing each
    /// group of query heads that shared a key/value head.
    fn sum_groups(self, d: &Tensor) -> candle_core::Result<Tensor> {
        if self.group() == 1 {
            return Ok(d.clone());
        }
        let (b, _, t, hd) = d.dims4()?;
        d.reshape((b, self.kv_heads, self.group(), t, hd))?.sum(2)
    }
}

/// The outputs of [`adapted::forward_shared`] as an array of its `N` linears.
fn exactly<const N: usize>(outputs: Vec<Tensor>) -> candle_core::Result<[Tensor; N]> {
    let n = outputs.len();
    <[Tensor; N]>::try_from(outputs)
        .map_err(|_| candle_core::Error::msg(format!("{n} outputs for {N} linears")))
}

/// The input gradient of a linear's backward, its module gradients moved into `modules`.
fn collect((dx, grads): (Tensor, Option<ModuleGrads>), modules: &mut Vec<ModuleGrads>) -> Tensor {
    modules.extend(grads);
    dx
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use candle_core::{DType, Device, Var};
    use qdylora_core::rank::Scaling;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::model::fused::test_support::{flat, scaled_diff, small_gqa_config};
    use crate::model::linear::BaseLinear;
    use crate::model::lora::{Adapter, Dropout, LoraModule, RankGrad};
    use crate::model::place::random_nf4_llama;

    const R_MAX: usize = 6;

    /// One layer, grouped-query attention (4 query heads on 2 key/value heads), NF4 linears,
    /// norm weights other than ones.
    fn model() -> Llama {
        let config = small_gqa_config(1);
        let mut model = random_nf4_llama(config, &Device::Cpu, DType::F32, 64, 1).unwrap();
        let layer = &mut model.layers[0];
        layer.input_norm = random(&[64], 2, 0.5, 1.5);
        layer.post_norm = random(&[64], 3, 0.5, 1.5);
        model
    }

    fn random(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Adapters on all seven linears with both factors random (B is zero at initialization,
    /// which would hide half the gradients).
    fn adapter(model: &Llama) -> Adapter {
        let mut modules = BTreeMap::new();
        for (i, kind) in LinearKind::ALL.into_iter().enumerate() {
            let shape = kind.shape(&model.config);
            let (inputs, outputs) = (shape.in_features as usize, shape.out_features as usize);
            let mut rng = StdRng::seed_from_u64(10 + i as u64);
            let mut values = |n: usize| (0..n).map(|_| rng.random_range(-0.3..0.3)).collect();
            let (a, b) = (values(R_MAX * inputs), values(outputs * R_MAX));
            let module = LoraModule::from_vecs(inputs, outputs, R_MAX, a, b, &Device::Cpu).unwrap();
            modules.insert(ModuleKey { layer: 0, kind }, module);
        }
        Adapter {
            r_max: R_MAX,
            alpha: 8.0,
            scaling: Scaling::AlphaOverRank,
            modules,
        }
    }

    fn dropout() -> Dropout {
        Dropout {
            p: 0.25,
            rng: RefCell::new(StdRng::seed_from_u64(7)),
        }
    }

    /// `max |ours - theirs|` over `max |theirs|`, for tensors of one shape.
    fn relative(ours: &Tensor, theirs: &Tensor) -> f32 {
        assert_eq!(ours.dims(), theirs.dims());
        scaled_diff(ours, theirs)
    }

    /// [`model`] with its NF4 linears replaced by the dense f32 weights they hold (on the CPU,
    /// the path on which [`BaseLinear::add_forward`] adds in place, as the GPU's does).
    fn dense_model() -> Llama {
        let mut model = model();
        for linear in &mut model.layers[0].linears {
            let BaseLinear::Nf4(w) = &*linear else {
                panic!("the test model's linears are NF4");
            };
            let values = w.dequantize_f32().unwrap();
            let weight = Tensor::from_vec(values, (w.rows, w.cols), &Device::Cpu).unwrap();
            *linear = BaseLinear::dense(&weight).unwrap();
        }
        model
    }

    #[test]
    fn the_written_out_layer_backward_gives_autograds_gradients() {
        // Each way of summing the base and adapter terms, with the shared inputs' adapter
        // products stacked or not, RoPE moving the heads or not, the residual sums in the
        // norms' kernels or not and SwiGLU's gradients in one pass or two (each of these on
        // and off twice in each of the four sum settings), over both kinds of base linear.
        let sums = [(true, true), (true, false), (false, true), (false, false)];
        let others = [
            [true, true, true, true],
            [true, false, false, true],
            [false, true, true, false],
            [false, false, false, false],
        ];
        for (base_add, lora_add) in sums {
            for [lora_stack, rope_heads, residual_norm, swiglu_grads] in others {
                for mut model in [model(), dense_model()] {
                    let f = &mut model.fusions;
                    (f.base_add, f.lora_add) = (base_add, lora_add);
                    (f.lora_stack, f.rope_heads) = (lora_stack, rope_heads);
                    (f.residual_norm, f.swiglu_grads) = (residual_norm, swiglu_grads);
                    let dense = matches!(model.layers[0].linears[0], BaseLinear::Dense { .. });
                    let case = format!("{:?}, dense {dense}", model.fusions);
                    layer_backward_matches_autograd(&model, &case);
                }
            }
        }
    }

    fn layer_backward_matches_autograd(model: &Llama, sums: &str) {
        let adapter = adapter(model);
        let (b, t) = (2, 5);
        let positions = model.positions(t).unwrap();
        let x = random(&[b, t, 64], 4, -1.0, 1.0);
        let grad_out = random(&[b, t, 64], 5, -1.0, 1.0);
        for (grad, rank) in [
            (RankGrad::Last, 1),
            (RankGrad::Last, 4),
            (RankGrad::Last, R_MAX),
            (RankGrad::All, 3),
            (RankGrad::All, R_MAX),
            (RankGrad::None, 2),
        ] {
            for with_dropout in [true, false] {
                let (d1, d2) = (dropout(), dropout());
                let call = |d| AdapterCall {
                    adapter: &adapter,
                    rank,
                    grad,
                    dropout: with_dropout.then_some(d),
                };
                // Autograd: the layer's forward from a variable input, backpropagating
                // `sum(out * grad_out)`.
                let input = Var::from_tensor(&x).unwrap();
                let out = model
                    .layer(0, input.as_tensor(), &positions, Some(&call(&d1)))
                    .unwrap();
                let store = (out * &grad_out)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();

                let ours = model
                    .layer_backward(0, &x, &positions, &call(&d2), &grad_out)
                    .unwrap();
                let case = format!("{sums}, dropout {with_dropout}: {grad:?} at rank {rank}");
                let d_input = relative(&ours.input, store.get(input.as_tensor()).unwrap());
                assert!(d_input < 1e-5, "{case}: input gradient off by {d_input}");

                let learning = grad.learning_rows(rank);
                let expected = if learning.is_empty() { 0 } else { 7 };
                assert_eq!(ours.modules.len(), expected, "{case}");
                for m in &ours.modules {
                    let module = &adapter.modules[&m.key];
                    for (name, ours, var, rank_dim) in
                        [("A", &m.a, &module.a, 0), ("B", &m.b, &module.b, 1)]
                    {
                        let theirs = store.get(var.as_tensor()).unwrap();
                        let diff = relative(ours, theirs);
                        assert!(diff < 1e-5, "{case}, {:?} {name}: off by {diff}", m.key);
                        // Only the learning rank indices are non-zero.
                        for i in 0..R_MAX {
                            let slice = ours.narrow(rank_dim, i, 1).unwrap();
                            let nonzero = flat(&slice).iter().any(|v| *v != 0.0);
                            assert_eq!(nonzero, learning.contains(&i), "{case} {name} index {i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_untracked_forward_is_the_layers_forward() {
        for base_add in [true, false] {
            let settings = [
                (true, false, true),
                (true, true, false),
                (false, false, true),
            ];
            for (lora_stack, with_dropout, residual_norm) in settings {
                for mut model in [model(), dense_model()] {
                    model.fusions.base_add = base_add;
                    model.fusions.lora_stack = lora_stack;
                    model.fusions.residual_norm = residual_norm;
                    untracked_forward_matches(&model, with_dropout);
                }
            }
        }
    }

    fn untracked_forward_matches(model: &Llama, with_dropout: bool) {
        let adapter = adapter(model);
        let positions = model.positions(5).unwrap();
        let x = random(&[2, 5, 64], 4, -1.0, 1.0);
        let (d1, d2) = (dropout(), dropout());
        let call = |d| AdapterCall {
            adapter: &adapter,
            rank: 4,
            grad: RankGrad::Last,
            dropout: with_dropout.then_some(d),
        };
        let theirs = model.layer(0, &x, &positions, Some(&call(&d1))).unwrap();
        let ours = model
            .layer_untracked(0, &x, &positions, &call(&d2))
            .unwrap();
        assert!(!ours.track_op());
        let diff = relative(&ours, &theirs);
        assert!(diff < 1e-6, "off by {diff}");
        // The adapter takes part (a model without it gives another output).
        let plain = model.layer(0, &x, &positions, None).unwrap();
        assert!(relative(&plain, &theirs) > 1e-3);
    }

    /// The linears that share an input run stacked exactly when `lora_stack` is on and there is
    /// no dropout, and give the same outputs, input gradient and adapter gradients as one by one.
    #[test]
    fn shared_input_linears_stack_without_dropout() {
        let model = model();
        let adapter = adapter(&model);
        let linears = [LinearKind::Q, LinearKind::K, LinearKind::V]
            .map(|kind| (model.layers[0].linear(kind), ModuleKey { layer: 0, kind }));
        let h = random(&[2, 5, 64], 4, -1.0, 1.0);
        let d = dropout();
        let grads: Vec<Tensor> = linears
            .iter()
            .enumerate()
            .map(|(i, (base, _))| random(&[2, 5, base.out_features()], 20 + i as u64, -1.0, 1.0))
            .collect();
        let grads: Vec<&Tensor> = grads.iter().collect();
        let run = |lora_stack: bool, with_dropout: bool| {
            let call = AdapterCall {
                adapter: &adapter,
                rank: 4,
                grad: RankGrad::Last,
                dropout: with_dropout.then_some(&d),
            };
            let sums = adapted::Sums {
                lora_add: true,
                base_add: true,
                lora_stack,
            };
            let (outputs, shared) = adapted::forward_shared(&linears, &h, &call, sums).unwrap();
            let stacked = shared.is_stacked();
            let (dx, modules) = shared.backward(&grads).unwrap();
            (stacked, outputs, dx, modules)
        };
        assert!(!run(true, true).0, "stacked with dropout");
        let (stacked, outputs, dx, modules) = run(true, false);
        let (alone, outputs_alone, dx_alone, modules_alone) = run(false, false);
        assert!(stacked && !alone);
        for (ours, theirs) in outputs.iter().zip(&outputs_alone) {
            assert!(relative(ours, theirs) < 1e-6);
        }
        assert!(relative(&dx, &dx_alone) < 1e-6);
        assert_eq!(modules.len(), 3);
        for (ours, theirs) in modules.iter().zip(&modules_alone) {
            assert_eq!(ours.key, theirs.key);
            assert!(relative(&ours.a, &theirs.a) < 1e-6, "{:?}", ours.key);
            assert!(relative(&ours.b, &theirs.b) < 1e-6, "{:?}", ours.key);
        }
    }

    #[test]
    fn unfused_models_are_refused() {
        let mut model = model();
        let adapter = adapter(&model);
        model.fusions.softmax = false;
        assert!(!model.has_layer_backward());
        let x = random(&[1, 3, 64], 4, -1.0, 1.0);
        let call = AdapterCall {
            adapter: &adapter,
            rank: 2,
            grad: RankGrad::Last,
            dropout: None,
        };
        let err = model
            .layer_backward(0, &x, &model.positions(3).unwrap(), &call, &x)
            .unwrap_err();
        assert!(err.to_string().contains("fused"), "{err}");
    }
}
