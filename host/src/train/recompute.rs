//! Activation recomputation (gradient checkpointing) per decoder layer.
//!
//! The forward pass keeps only each layer's input, with no autograd graph behind it. The backward
//! pass walks the layers in reverse and gets each layer's adapter gradients and the gradient of
//! its input, which is the next (earlier) layer's `grad_out`: by the written-out layer backward
//! (`model::backward`) when the model has it on, otherwise with autograd, running the layer's
//! forward again from its saved input made a variable and backpropagating `sum(out * grad_out)`,
//! whose gradient with respect to `out` is exactly `grad_out`. At most one layer's
//! graph is alive at a time, so activation memory grows with the number of layers only by one
//! hidden state each (for LLaMA-7B at batch 4 × 1024 in bf16: 32 MiB per layer).
//!
//! With the written-out backward, the last `keep_layers` layers can keep their tape from the
//! forward pass instead (`Llama::layer_taped`): their forward does not run twice. The last
//! layer's tape costs about no peak memory, since its backward would rebuild the same tape
//! right after the loss; each further kept layer adds one tape to the peak.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use candle_core::{Tensor, TensorId, Var};

use super::data::Batch;
use super::eval::masked_cross_entropy;
use crate::model::backward::ModuleGrads;
use crate::model::llama::Llama;
use crate::model::lora::{AdapterCall, Dropout, ModuleKey};
use crate::phases;

/// The summed loss of one micro-batch, and the gradient of `weight * mean loss` for each of
/// `vars` (`None` where a variable took no part).
pub struct MicroBatchGrads {
    /// Unnormalized loss over the scored tokens.
    pub loss_sum: f64,
    /// Aligned with the `vars` passed in.
    pub grads: Vec<Option<Tensor>>,
}

/// Forward and backward of one micro-batch with per-layer recomputation. `call` carries the rank
/// and gradient rule; its dropout is ignored in favour of `layer_dropout(layer)`, which must give
/// the same masks each time it is called for a layer (a fresh generator from the same seed), so the
/// recomputed forward equals the first one. With the written-out backward, the last
/// `keep_layers` layers keep their activations instead of recomputing them (autograd's path
/// recomputes every layer).
#[allow(clippy::too_many_arguments)] // one micro-batch's whole context; a struct would only rename it
pub fn loss_and_grads(
    model: &Llama,
    ids: &Tensor,
    batch: &Batch,
    call: &AdapterCall<'_>,
    layer_dropout: &dyn Fn(usize) -> Option<Dropout>,
    weight: f64,
    vars: &[&Var],
    keep_layers: usize,
) -> Result<MicroBatchGrads> {
    let positions = model.positions(ids.dim(1)?)?;

    // Forward: keep each layer's input, drop its graph (or build none), except the tapes of
    // the layers that keep their activations.
    let written_out = WrittenOut::usable(model, call, vars);
    let layers = model.layers.len();
    let kept_from = match written_out {
        Some(_) => layers.saturating_sub(keep_layers),
        None => layers,
    };
    let mut inputs = Vec::with_capacity(layers);
    let mut tapes = Vec::with_capacity(layers - kept_from);
    let mut x = model.embed_tokens(ids)?.detach();
    for layer in 0..layers {
        let dropout = layer_dropout(layer);
        let layer_call = with_dropout(*call, dropout.as_ref());
        let out = match written_out {
            Some(_) if layer >= kept_from => {
                let (out, tape) = model.layer_taped(layer, &x, &positions, &layer_call)?;
                tapes.push(tape);
                out
            }
            Some(_) => model.layer_untracked(layer, &x, &positions, &layer_call)?,
            None => model.layer(layer, &x, &positions, Some(&layer_call))?,
        };
        inputs.push(x);
        x = out.detach();
    }
    phases::mark("forward")?;

    // Head and loss, with the last hidden state as a variable to get its gradient.
    let last = Var::from_tensor(&x)?;
    let logits = model.logits(&model.final_hidden(last.as_tensor())?)?;
    let (mean, loss_sum) = masked_cross_entropy(&logits, batch, model)?;
    let store = (mean * weight)?.backward()?;
    let mut grad_out = store
        .get(last.as_tensor())
        .context("the loss does not depend on the last hidden state")?
        .clone();
    drop((store, logits));
    phases::mark("head and loss")?;

    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    for (layer, input) in inputs.into_iter().enumerate().rev() {
        let dropout = || layer_dropout(layer);
        if let Some(written_out) = &written_out {
            let layer_grads = match layer >= kept_from {
                true => {
                    let tape = tapes.pop().context("a kept layer without its tape")?;
                    model.layer_backward_taped(layer, &input, &positions, tape, &grad_out)?
                }
                false => {
                    let dropout = dropout();
                    let layer_call = with_dropout(*call, dropout.as_ref());
                    model.layer_backward(layer, &input, &positions, &layer_call, &grad_out)?
                }
            };
            written_out.add(&mut grads, layer_grads.modules)?;
            grad_out = layer_grads.input;
            continue;
        }
        let dropout = dropout();
        let layer_call = with_dropout(*call, dropout.as_ref());
        let input = Var::from_tensor(&input)?;
        let out = model.layer(layer, input.as_tensor(), &positions, Some(&layer_call))?;
        let store = (out * &grad_out)?.sum_all()?.backward()?;
        for (g, v) in grads.iter_mut().zip(vars) {
            if let Some(new) = store.get(v.as_tensor()) {
                accumulate(g, new.clone())?;
            }
        }
        grad_out = store
            .get(input.as_tensor())
            .with_context(|| format!("layer {layer}'s output does not depend on its input"))?
            .clone();
    }
    phases::mark("layers backward")?;
    Ok(MicroBatchGrads { loss_sum, grads })
}

/// Where the written-out layer backward's module gradients go in `vars`. It computes gradients
/// for the adapter only, so it stands in for autograd only when `vars` are the adapter's
/// matrices (not, say, a pretraining run's base weights) and the model has it switched on.
struct WrittenOut {
    /// Each module's (index of `A`, index of `B`) in `vars`.
    slots: BTreeMap<ModuleKey, (usize, usize)>,
}

impl WrittenOut {
    fn usable(model: &Llama, call: &AdapterCall<'_>, vars: &[&Var]) -> Option<Self> {
        if !model.has_layer_backward() {
            return None;
        }
        let index: HashMap<TensorId, usize> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_tensor().id(), i))
            .collect();
        let modules = &call.adapter.modules;
        let slots: BTreeMap<ModuleKey, (usize, usize)> = modules
            .iter()
            .filter_map(|(key, m)| {
                let a = *index.get(&m.a.as_tensor().id())?;
                let b = *index.get(&m.b.as_tensor().id())?;
                Some((*key, (a, b)))
            })
            .collect();
        (slots.len() == modules.len() && 2 * slots.len() == vars.len()).then_some(Self { slots })
    }

    fn add(&self, grads: &mut [Option<Tensor>], modules: Vec<ModuleGrads>) -> Result<()> {
        for m in modules {
            let (a, b) = *self
                .slots
                .get(&m.key)
                .with_context(|| format!("{:?}: a gradient for a module not in vars", m.key))?;
            accumulate(&mut grads[a], m.a)?;
            accumulate(&mut grads[b], m.b)?;
        }
        Ok(())
    }
}

/// Adds `new` to the gradient in `slot` (or puts it there).
pub fn accumulate(slot: &mut Option<Tensor>, new: Tensor) -> candle_core::Result<()> {
    *slot = Some(match slot.take() {
        Some(old) => (old + new)?,
        None => new,
    });
    Ok(())
}

/// `call` with its dropout replaced (the adapter outlives the layer's dropout).
fn with_dropout<'a>(call: AdapterCall<'a>, dropout: Option<&'a Dropout>) -> AdapterCall<'a> {
    AdapterCall { dropout, ..call }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use candle_core::{DType, Device};
    use qdylora_core::infer::LinearKind;
    use qdylora_core::rank::Scaling;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::model::fused::test_support::small_gqa_config;
    use crate::model::lora::{Adapter, LoraModule, RankGrad};
    use crate::model::place::random_nf4_llama;
    use crate::train::data::Example;

    const LAYERS: usize = 3;
    const R_MAX: usize = 4;

    fn model() -> Llama {
        let config = small_gqa_config(LAYERS as u32);
        random_nf4_llama(config, &Device::Cpu, DType::F32, 64, 1).unwrap()
    }

    /// Adapters on every linear of every layer, `B` random too (zero would hide `A`'s
    /// gradients and every adapter term of the input gradients).
    fn adapter(model: &Llama) -> Adapter {
        let mut rng = StdRng::seed_from_u64(3);
        let mut modules = BTreeMap::new();
        for layer in 0..LAYERS {
            for kind in LinearKind::ALL {
                let shape = kind.shape(&model.config);
                let (i, o) = (shape.in_features as usize, shape.out_features as usize);
                let module = LoraModule::init(i, o, R_MAX, &mut rng, &Device::Cpu).unwrap();
                let b: Vec<f32> = (0..o * R_MAX)
                    .map(|_| rng.random_range(-0.2..0.2))
                    .collect();
                module
                    .b
                    .set(&Tensor::from_vec(b, (o, R_MAX), &Device::Cpu).unwrap())
                    .unwrap();
                modules.insert(ModuleKey { layer, kind }, module);
            }
        }
        Adapter {
            r_max: R_MAX,
            alpha: 8.0,
            scaling: Scaling::AlphaOverRank,
            modules,
        }
    }

    #[test]
    fn kept_layers_give_the_recomputed_gradients_without_running_their_forward_again() {
        let model = model();
        let adapter = adapter(&model);
        let vars = adapter.vars();
        let mut rng = StdRng::seed_from_u64(9);
        let examples: Vec<Example> = (0..2)
            .map(|_| Example {
                ids: (0..7).map(|_| rng.random_range(0..32)).collect(),
                prompt_len: 0,
                answer: Vec::new(),
            })
            .collect();
        let batch = Batch::new(&examples.iter().collect::<Vec<_>>(), 0);
        let ids = Tensor::from_slice(&batch.ids, (batch.rows, batch.cols), &Device::Cpu).unwrap();
        let call = AdapterCall {
            adapter: &adapter,
            rank: 3,
            grad: RankGrad::Last,
            dropout: None,
        };
        let run = |keep: usize| {
            // Each call of `layer_dropout` is one forward pass of that layer.
            let forwards = Cell::new(0);
            let layer_dropout = |layer: usize| {
                forwards.set(forwards.get() + 1);
                Some(Dropout {
                    p: 0.2,
                    rng: RefCell::new(StdRng::seed_from_u64(100 + layer as u64)),
                })
            };
            let out = loss_and_grads(
                &model,
                &ids,
                &batch,
                &call,
                &layer_dropout,
                0.5,
                &vars,
                keep,
            )
            .unwrap();
            let grads: Vec<Vec<f32>> = out
                .grads
                .iter()
                .map(|g| {
                    let g = g.as_ref().expect("every adapter matrix has a gradient");
                    g.flatten_all().unwrap().to_vec1().unwrap()
                })
                .collect();
            (out.loss_sum, grads, forwards.get())
        };
        let (loss, grads, forwards) = run(0);
        assert_eq!(forwards, 2 * LAYERS, "every layer's forward runs twice");
        let nonzero = grads.iter().filter(|g| g.iter().any(|v| *v != 0.0)).count();
        assert_eq!(nonzero, grads.len(), "a gradient is all zeros");
        for keep in [1, 2, LAYERS, LAYERS + 5] {
            let (kept_loss, kept_grads, kept_forwards) = run(keep);
            assert_eq!(
                kept_forwards,
                2 * LAYERS - keep.min(LAYERS),
                "keeping {keep}"
            );
            assert_eq!(kept_loss.to_bits(), loss.to_bits(), "keeping {keep}");
            // The same ops on the same inputs: the same bits.
            assert!(kept_grads == grads, "keeping {keep}: the gradients differ");
        }
    }
}
