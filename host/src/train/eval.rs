//! The loss, and evaluation at a rank: held-out loss, perplexity, and exact match of greedy
//! generation against the expected response.

use std::collections::BTreeMap;

use candle_core::{D, Tensor};

use super::data::{Batch, Example};
use crate::model::fused::cross_entropy::{cross_entropy, cross_entropy_unfused};
use crate::model::llama::Llama;
use crate::model::lora::AdapterCall;

/// Mean next-token cross-entropy over the positions where `mask` is set, and the summed
/// (unnormalized) loss as a plain number. Computed in f32 whatever the logits' dtype, by the
/// fused op when `model.fusions.cross_entropy` is on and by the unfused chain otherwise; a
/// target outside the vocabulary is an error either way.
pub fn masked_cross_entropy(
    logits: &Tensor,
    batch: &Batch,
    model: &Llama,
) -> candle_core::Result<(Tensor, f64)> {
    let n = batch.rows * batch.cols;
    let logits = logits.reshape((n, ()))?;
    let vocab = logits.dim(D::Minus1)?;
    // Checked here, on the host copy: the GPU kernel can only answer a bad target with NaN.
    if let Some(i) = batch.targets.iter().position(|&t| t as usize >= vocab) {
        candle_core::bail!(
            "target token id {} (row {}, position {}) is outside the model's vocabulary of {vocab}",
            batch.targets[i],
            i / batch.cols,
            i % batch.cols
        );
    }
    let device = logits.device();
    let targets = Tensor::from_slice(&batch.targets, n, device)?;
    let nll = match model.fusions.cross_entropy {
        true => cross_entropy(&logits, &targets)?,
        false => cross_entropy_unfused(&logits, &targets)?,
    };
    let mask = Tensor::from_slice(&batch.mask, n, device)?;
    let total = (nll * mask)?.sum_all()?;
    let count = batch.scored_tokens().max(1) as f64;
    let sum = f64::from(total.to_scalar::<f32>()?);
    Ok(((total / count)?, sum))
}

/// Held-out loss per scored token (natural log).
pub fn eval_loss(
    model: &Llama,
    call: Option<&AdapterCall<'_>>,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
) -> candle_core::Result<f64> {
    let mut sum = 0.0;
    let mut tokens = 0usize;
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad);
        let ids = Tensor::from_slice(&batch.ids, (batch.rows, batch.cols), &model.device)?;
        let logits = model.forward(&ids, call)?;
        let (_, s) = masked_cross_entropy(&logits, &batch, model)?;
        sum += s;
        tokens += batch.scored_tokens();
    }
    Ok(sum / tokens.max(1) as f64)
}

/// Greedy continuations of equal-length prompts, batched: each step runs the whole sequence
/// and appends every row's argmax until all rows produced `eos` or `max_new` tokens.
pub fn greedy_generate(
    model: &Llama,
    call: Option<&AdapterCall<'_>>,
    prompts: &[&[u32]],
    max_new: usize,
    eos: u32,
) -> candle_core::Result<Vec<Vec<u32>>> {
    let rows = prompts.len();
    if rows == 0 {
        return Ok(Vec::new());
    }
    let len = prompts[0].len();
    if prompts.iter().any(|p| p.len() != len) {
        candle_core::bail!("greedy_generate needs prompts of one length");
    }
    let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut done = vec![false; rows];
    let mut out = vec![Vec::new(); rows];
    for _ in 0..max_new {
        let cols = seqs[0].len();
        let flat: Vec<u32> = seqs.concat();
        let ids = Tensor::from_vec(flat, (rows, cols), &model.device)?;
        let h = model.hidden(&ids, call)?.narrow(1, cols - 1, 1)?;
        let next: Vec<u32> = model.logits(&h)?.squeeze(1)?.argmax(D::Minus1)?.to_vec1()?;
        for (r, &tok) in next.iter().enumerate() {
            // Finished rows keep receiving EOS so the batch stays rectangular.
            let tok = if done[r] { eos } else { tok };
            seqs[r].push(tok);
            if !done[r] {
                if tok == eos {
                    done[r] = true;
                } else {
                    out[r].push(tok);
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(out)
}

/// Exact match of greedy generation: the fraction of examples whose generated response
/// (up to EOS) equals the expected one. Examples without an answer are skipped. Also returns
/// the generations, in input order.
pub fn exact_match(
    model: &Llama,
    call: Option<&AdapterCall<'_>>,
    examples: &[Example],
    batch_size: usize,
    eos: u32,
) -> candle_core::Result<(f64, Vec<Vec<u32>>)> {
    // Batch prompts of equal length together (no padding inside a prompt).
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        if !e.answer.is_empty() {
            by_len.entry(e.prompt_len).or_default().push(i);
        }
    }
    let mut generated = vec![Vec::new(); examples.len()];
    let mut hits = 0usize;
    let mut total = 0usize;
    for (len, idx) in by_len {
        for chunk in idx.chunks(batch_size.max(1)) {
            let prompts: Vec<&[u32]> = chunk.iter().map(|&i| &examples[i].ids[..len]).collect();
            let max_new = chunk
                .iter()
                .map(|&i| examples[i].answer.len() + 1)
                .max()
                .unwrap_or(1);
            let outs = greedy_generate(model, call, &prompts, max_new, eos)?;
            for (&i, o) in chunk.iter().zip(outs) {
                total += 1;
                hits += usize::from(o == examples[i].answer);
                generated[i] = o;
            }
        }
    }
    Ok((hits as f64 / total.max(1) as f64, generated))
}
