//! The attention core of the written-out layer backward, `softmax(scale · q kᵀ + causal mask) v`
//! forward and backward, split into query chunks.
//!
//! Why chunks: under the causal mask, query `i` sees keys `0..=i` only, yet the whole `[t, t]`
//! score matrix is multiplied, stored, softmaxed and read back, upper half included. Chunk `c`
//! of `n` (queries `[s, e)`) multiplies only keys `[0, e)`, so the products and the scores'
//! traffic shrink to `(n + 1) / 2n` of the whole (62.5 % at 4 chunks); each chunk's softmax is
//! [`causal_softmax`] with `tq < tk`, which sees exactly the keys the whole row's would. Chunk
//! `c`'s key and value gradients cover keys `[0, e)`: the last chunk (all keys) writes them,
//! and each earlier one adds its share into their leading rows in place ([`add_product_into`]).

use candle_core::Tensor;

use crate::model::fused::add_product::add_product_into;
use crate::model::fused::softmax::{causal_softmax, causal_softmax_backward};
use crate::model::matmul::matmul;

/// Query chunks when chunking is on: 62.5 % of the unchunked work, in ~4× the launches (at
/// LLaMA-7B's 1,024 tokens, products of 256 query rows, still large for cuBLAS). Eight would
/// save 6 % more of the attention core for twice the launches again.
pub(super) const CHUNKS: usize = 4;

/// One query chunk's saved scores and probabilities: `[b, h, len, start + len]`.
struct Chunk {
    start: usize,
    len: usize,
    scores: Tensor,
    probs: Tensor,
}

/// What [`backward`] reads from [`forward`].
pub(super) struct Tape {
    chunks: Vec<Chunk>,
}

/// The `(start, len)` of each of `chunks` near-equal runs of `t` query rows (fewer when
/// `t < chunks`), in order.
fn bounds(t: usize, chunks: usize) -> Vec<(usize, usize)> {
    let chunks = chunks.clamp(1, t.max(1));
    (0..chunks)
        .map(|c| (c * t / chunks, (c + 1) * t / chunks - c * t / chunks))
        .collect()
}

/// The attention output `[b, h, t, hd]` for `q, k, v: [b, h, t, hd]` (contiguous; `k` and `v`
/// already repeated to `h` heads), in `chunks` query chunks, and what its backward reads.
pub(super) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    chunks: usize,
) -> candle_core::Result<(Tensor, Tape)> {
    let t = q.dim(2)?;
    let mut outputs = Vec::with_capacity(chunks);
    let mut tape = Tape {
        chunks: Vec::with_capacity(chunks),
    };
    for (start, len) in bounds(t, chunks) {
        let seen = start + len;
        let scores = matmul(&q.narrow(2, start, len)?, &k.narrow(2, 0, seen)?.t()?)?;
        let probs = causal_softmax(&scores, scale)?;
        outputs.push(matmul(&probs, &v.narrow(2, 0, seen)?)?);
        tape.chunks.push(Chunk {
            start,
            len,
            scores,
            probs,
        });
    }
    // One chunk: candle's cat returns it as is, no copy.
    Ok((Tensor::cat(&outputs, 2)?, tape))
}

/// The gradients `(d q, d k, d v)`, each `[b, h, t, hd]`, for the output's gradient `d_out`,
/// from [`forward`]'s inputs and tape.
pub(super) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    tape: Tape,
    d_out: Tensor,
    scale: f32,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let d_out = d_out.contiguous()?;
    let t = q.dim(2)?;
    let mut d_q = Vec::with_capacity(tape.chunks.len());
    let (mut d_k, mut d_v): (Option<Tensor>, Option<Tensor>) = (None, None);
    // The last chunk sees every key, so its key and value gradients start the full ones.
    for chunk in tape.chunks.into_iter().rev() {
        let Chunk {
            start,
            len,
            scores,
            probs,
        } = chunk;
        let seen = start + len;
        let d_chunk = d_out.narrow(2, start, len)?;
        let d_probs = matmul(&d_chunk, &v.narrow(2, 0, seen)?.t()?)?;
        accumulate(&mut d_v, &probs.t()?, &d_chunk, t)?;
        drop(probs);
        let d_scores = causal_softmax_backward(&scores, &d_probs, scale)?;
        drop((d_probs, scores));
        d_q.push(matmul(&d_scores, &k.narrow(2, 0, seen)?)?);
        accumulate(&mut d_k, &d_scores.t()?, &q.narrow(2, start, len)?, t)?;
    }
    d_q.reverse();
    let d_q = Tensor::cat(&d_q, 2)?;
    let missing = || candle_core::Error::msg("attention backward: no chunks");
    Ok((d_q, d_k.ok_or_else(missing)?, d_v.ok_or_else(missing)?))
}

/// `grad[.., :seen, :] += lhs · rhs` (`seen` = `lhs`'s rows), the first call making `grad`,
/// which must then cover all `t` rows.
fn accumulate(
    grad: &mut Option<Tensor>,
    lhs: &Tensor,
    rhs: &Tensor,
    t: usize,
) -> candle_core::Result<()> {
    let seen = lhs.dim(2)?;
    match grad {
        Some(grad) => add_product_into(&grad.narrow(2, 0, seen)?, lhs, rhs),
        None if seen == t => {
            *grad = Some(matmul(lhs, rhs)?);
            Ok(())
        }
        None => candle_core::bail!("attention backward: the last chunk sees {seen} of {t} keys"),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Var};

    use super::*;
    use crate::model::fused::test_support::{bf16_exact, flat, scaled_diff, weighted_sum_grads};

    #[test]
    fn chunks_cover_the_rows_once_in_order() {
        for (t, chunks) in [(1024, 4), (7, 4), (3, 4), (5, 1), (1, 4), (9, 2)] {
            let b = bounds(t, chunks);
            assert_eq!(b.len(), chunks.min(t));
            let mut next = 0;
            for (start, len) in b {
                assert_eq!(start, next, "{t} in {chunks}");
                assert!(len >= 1, "{t} in {chunks}: an empty chunk");
                next = start + len;
            }
            assert_eq!(next, t, "{t} in {chunks}");
        }
        assert!(bounds(1024, 4).iter().all(|&(_, len)| len == 256));
    }

    /// Chunked or not, forward and backward match candle's autograd through the same ops on
    /// the whole score matrix (f32: the same values up to the order of the sums).
    #[test]
    fn chunked_attention_matches_autograd_of_the_whole() {
        let (b, h, t, hd) = (2, 3, 11, 4);
        let scale = 0.5f32;
        let var = |seed| Var::from_tensor(&bf16_exact(&[b, h, t, hd], seed, 1.0, DType::F32));
        let (q, k, v) = (var(1).unwrap(), var(2).unwrap(), var(3).unwrap());
        let weights = bf16_exact(&[b, h, t, hd], 4, 1.0, DType::F32);
        let scores = q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap();
        let probs = causal_softmax(&scores, scale).unwrap();
        let expected = probs.matmul(v.as_tensor()).unwrap();
        let grads = weighted_sum_grads(&expected, &weights, [&q, &k, &v]);
        let plain = |v: &Var| v.as_tensor().detach();
        let (q, k, v) = (plain(&q), plain(&k), plain(&v));
        for chunks in [1, 2, 4, 11] {
            let (out, tape) = forward(&q, &k, &v, scale, chunks).unwrap();
            assert!(
                scaled_diff(&out, &expected) < 1e-6,
                "{chunks} chunks: forward"
            );
            let ours = backward(&q, &k, &v, tape, weights.clone(), scale).unwrap();
            let (d_q, d_k, d_v) = ours;
            for (name, ours, theirs) in [
                ("q", d_q, &grads[0]),
                ("k", d_k, &grads[1]),
                ("v", d_v, &grads[2]),
            ] {
                assert_eq!(ours.dims(), &[b, h, t, hd]);
                let diff = scaled_diff(&ours, theirs);
                assert!(diff < 1e-5, "{chunks} chunks: d {name} off by {diff}");
            }
        }
    }

    /// The scores kept are the visible part only: at 4 chunks, 5/8 of the whole.
    #[test]
    fn chunks_keep_only_the_keys_they_see() {
        let x = bf16_exact(&[1, 2, 8, 4], 5, 1.0, DType::BF16);
        let (_, tape) = forward(&x, &x, &x, 1.0, 4).unwrap();
        let kept: usize = tape.chunks.iter().map(|c| c.scores.elem_count()).sum();
        assert_eq!(kept * 8, 2 * 8 * 8 * 5);
        let widths: Vec<usize> = tape
            .chunks
            .iter()
            .map(|c| c.scores.dim(3).unwrap())
            .collect();
        assert_eq!(widths, [2, 4, 6, 8]);
        assert!(flat(&tape.chunks[3].probs).iter().all(|p| p.is_finite()));
    }
}
