//! Evaluating one adapter at many ranks, and recommending a rank.

use std::path::Path;

use anyhow::Result;

use crate::model::llama::Llama;
use crate::model::lora::{Adapter, AdapterCall, RankGrad};
use crate::train::data::Example;
use crate::train::eval::{eval_loss, exact_match};

/// Quality at one rank.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RankPoint {
    /// The rank.
    pub rank: usize,
    /// Held-out loss per scored token.
    pub eval_loss: f64,
    /// `exp(eval_loss)`.
    pub perplexity: f64,
    /// Exact match of greedy generation, when the data has answers.
    pub exact_match: Option<f64>,
}

/// Evaluates `adapter` truncated to each of `ranks` on `examples`.
pub fn sweep(
    model: &Llama,
    adapter: &Adapter,
    ranks: &[usize],
    examples: &[Example],
    eos: u32,
    batch: usize,
    mut on_rank: impl FnMut(&RankPoint),
) -> Result<Vec<RankPoint>> {
    let with_answers = examples.iter().any(|e| !e.answer.is_empty());
    let mut points = Vec::with_capacity(ranks.len());
    for &rank in ranks {
        let call = AdapterCall {
            adapter,
            rank,
            grad: RankGrad::None,
            dropout: None,
        };
        let loss = eval_loss(model, Some(&call), examples, batch, 0)?;
        let em = if with_answers {
            Some(exact_match(model, Some(&call), examples, batch, eos)?.0)
        } else {
            None
        };
        let p = RankPoint {
            rank,
            eval_loss: loss,
            perplexity: loss.exp(),
            exact_match: em,
        };
        on_rank(&p);
        points.push(p);
    }
    Ok(points)
}

/// The rank to use: the best one, and the smallest one within a tolerance of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recommendation {
    /// Best by the metric.
    pub best: usize,
    /// Smallest rank within the tolerance of the best.
    pub smallest_within: usize,
    /// True when judged by exact match (else by loss).
    pub by_exact_match: bool,
}

/// Judges by exact match when available (tolerance in absolute points of a fraction, e.g. 0.01
/// = one point), else by loss (tolerance relative, e.g. 0.01 = 1%).
pub fn recommend(points: &[RankPoint], tolerance: f64) -> Option<Recommendation> {
    let first = points.first()?;
    if first.exact_match.is_some() {
        let em = |p: &RankPoint| p.exact_match.unwrap_or(0.0);
        // Ties go to the smaller rank.
        let best = points
            .iter()
            .fold(first, |b, p| if em(p) > em(b) { p } else { b });
        let within = points
            .iter()
            .filter(|p| em(p) >= em(best) - tolerance)
            .min_by_key(|p| p.rank)?;
        Some(Recommendation {
            best: best.rank,
            smallest_within: within.rank,
            by_exact_match: true,
        })
    } else {
        let best = points
            .iter()
            .fold(first, |b, p| if p.eval_loss < b.eval_loss { p } else { b });
        let within = points
            .iter()
            .filter(|p| p.eval_loss <= best.eval_loss * (1.0 + tolerance))
            .min_by_key(|p| p.rank)?;
        Some(Recommendation {
            best: best.rank,
            smallest_within: within.rank,
            by_exact_match: false,
        })
    }
}

/// Writes `rank,eval_loss,perplexity,exact_match` rows.
pub fn write_csv(path: &Path, points: &[RankPoint]) -> Result<()> {
    let mut text = String::from("rank,eval_loss,perplexity,exact_match\n");
    for p in points {
        let em = p.exact_match.map_or(String::new(), |v| format!("{v:.4}"));
        text.push_str(&format!(
            "{},{:.6},{:.4},{em}\n",
            p.rank, p.eval_loss, p.perplexity
        ));
    }
    qdylora_formats::atomic::write_file(path, text.as_bytes())?;
    Ok(())
}

/// Parses `all`, `4`, or `1,2,4,8` into ranks within `1..=r_max`.
pub fn parse_ranks(spec: &str, r_max: usize) -> Result<Vec<usize>> {
    if spec.trim() == "all" {
        return Ok((1..=r_max).collect());
    }
    let mut ranks = Vec::new();
    for part in spec.split(',') {
        let r: usize = part
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("rank {part:?} is not a number"))?;
        if r == 0 || r > r_max {
            anyhow::bail!("rank {r} is outside 1..={r_max}");
        }
        if !ranks.contains(&r) {
            ranks.push(r);
        }
    }
    ranks.sort_unstable();
    Ok(ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(rank: usize, loss: f64, em: Option<f64>) -> RankPoint {
        RankPoint {
            rank,
            eval_loss: loss,
            perplexity: loss.exp(),
            exact_match: em,
        }
    }

    #[test]
    fn recommendations() {
        let pts = [
            p(1, 2.0, Some(0.2)),
            p(2, 1.0, Some(0.9)),
            p(4, 0.9, Some(0.905)),
            p(8, 0.95, Some(0.91)),
        ];
        let r = recommend(&pts, 0.01).unwrap();
        assert_eq!((r.best, r.smallest_within, r.by_exact_match), (8, 2, true));
        let no_em: Vec<RankPoint> = pts.iter().map(|q| p(q.rank, q.eval_loss, None)).collect();
        let r = recommend(&no_em, 0.12).unwrap();
        assert_eq!((r.best, r.smallest_within, r.by_exact_match), (4, 2, false));
        assert!(recommend(&[], 0.1).is_none());
    }

    #[test]
    fn rank_lists() {
        assert_eq!(parse_ranks("all", 3).unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_ranks("4, 1,4", 8).unwrap(), vec![1, 4]);
        assert!(parse_ranks("0", 8).is_err());
        assert!(parse_ranks("9", 8).is_err());
        assert!(parse_ranks("x", 8).is_err());
    }
}
