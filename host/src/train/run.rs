//! Driving a [`Trainer`] to the end: progress bar, metrics log, periodic evaluation and
//! checkpoints, the final bundle.

use anyhow::Result;
use indicatif::ProgressBar;

use super::data::Dataset;
use super::trainer::{RunFiles, StepReport, Trainer, append_metrics};
use crate::cli::progress;

/// How often to evaluate and save, and how to show progress.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Save a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Evaluate held-out loss at r_max every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Examples per evaluation batch.
    pub eval_batch: usize,
    /// Label in front of the progress bar.
    pub label: String,
    /// Draw a progress bar.
    pub progress: bool,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Steps done in total.
    pub steps: u64,
    /// Mean training loss over the last 10% of steps run now.
    pub final_train_loss: f64,
    /// Held-out loss at the adapter's full rank (NaN without a held-out split).
    pub eval_loss: f64,
    /// Tokens per second over the steps run now.
    pub tokens_per_second: f64,
}

/// Runs the remaining steps of `trainer`, writing into `files`.
pub fn run(
    trainer: &mut Trainer<'_>,
    data: &Dataset,
    files: &RunFiles,
    opts: &RunOptions,
) -> Result<RunSummary> {
    std::fs::create_dir_all(&files.dir)?;
    let total = trainer.config.steps;
    let pb = if opts.progress {
        progress::train_bar(total, &opts.label)
    } else {
        ProgressBar::hidden()
    };
    pb.set_position(trainer.step);
    let mut reports: Vec<StepReport> = Vec::new();
    let mut ema: Option<f64> = None;
    let eval_at = |t: &Trainer<'_>| -> Result<f64> {
        if data.eval.is_empty() {
            Ok(f64::NAN)
        } else {
            t.eval_loss(data, t.adapter.r_max, opts.eval_batch)
        }
    };
    while trainer.step < total {
        let report = trainer.train_step(data)?;
        append_metrics(&files.metrics(), &report)?;
        let smooth = ema.map_or(report.loss, |e| 0.9 * e + 0.1 * report.loss);
        ema = Some(smooth);
        let tps = report.tokens as f64 / report.seconds.max(1e-9);
        pb.set_message(format!(
            "{} loss {smooth:.3} r={:<3} {tps:>7.0} tok/s",
            opts.label, report.rank
        ));
        pb.set_position(report.step);
        reports.push(report);
        let step = trainer.step;
        if opts.checkpoint_every > 0 && step.is_multiple_of(opts.checkpoint_every) && step < total {
            trainer.save_checkpoint(&files.checkpoint())?;
        }
        if opts.eval_every > 0 && step.is_multiple_of(opts.eval_every) && step < total {
            let loss = eval_at(trainer)?;
            pb.println(format!(
                "{} step {step}: held-out loss at r={} {loss:.4}",
                opts.label, trainer.adapter.r_max
            ));
        }
    }
    trainer.save_checkpoint(&files.checkpoint())?;
    let eval_loss = eval_at(trainer)?;
    pb.finish_and_clear();
    let tail = (reports.len() / 10).max(1).min(reports.len());
    let final_train_loss = if reports.is_empty() {
        f64::NAN
    } else {
        reports[reports.len() - tail..]
            .iter()
            .map(|r| r.loss)
            .sum::<f64>()
            / tail as f64
    };
    let seconds: f64 = reports.iter().map(|r| r.seconds).sum();
    let tokens: usize = reports.iter().map(|r| r.tokens).sum();
    Ok(RunSummary {
        steps: trainer.step,
        final_train_loss,
        eval_loss,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
    })
}
