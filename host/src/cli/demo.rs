//! `qdylora demo`: the whole story on the CPU with no download, in a few minutes.

use std::path::PathBuf;

use anyhow::Result;

use crate::demo::{DemoSettings, build_base, default_base_dir, run_demo};

/// Arguments of `qdylora demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output folder.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Base model folder; pretrained there first if it holds no model (default: the base this
    /// project ships, host/assets/demo-base).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Steps of each QLoRA baseline run.
    #[arg(long, default_value_t = DemoSettings::default().train_steps)]
    pub steps: u64,
    /// Steps of the QDyLoRA run (default: r_max times --steps).
    #[arg(long)]
    pub qdylora_steps: Option<u64>,
    /// QDyLoRA's largest rank.
    #[arg(long, default_value_t = DemoSettings::default().r_max)]
    pub r_max: usize,
    /// Adapter learning rate.
    #[arg(long, default_value_t = DemoSettings::default().lr)]
    pub lr: f64,
    /// Seed.
    #[arg(long, default_value_t = DemoSettings::default().seed)]
    pub seed: u64,
}

/// Arguments of `qdylora demo-base`.
#[derive(Debug, clap::Args)]
pub struct BaseArgs {
    /// Folder to write the HF checkpoint and tokenizer into (must not hold a model).
    #[arg(long)]
    pub out: PathBuf,
    /// Pretraining steps.
    #[arg(long, default_value_t = DemoSettings::default().pretrain_steps)]
    pub steps: u64,
    /// Seed.
    #[arg(long, default_value_t = DemoSettings::default().seed)]
    pub seed: u64,
}

/// Runs `qdylora demo`.
pub fn run(args: &Args) -> Result<()> {
    if args.r_max == 0 || args.steps == 0 || args.qdylora_steps == Some(0) {
        anyhow::bail!("--r-max, --steps and --qdylora-steps must be at least 1");
    }
    let settings = DemoSettings {
        train_steps: args.steps,
        qdylora_steps: args
            .qdylora_steps
            .unwrap_or(args.steps.saturating_mul(args.r_max as u64)),
        r_max: args.r_max,
        lr: args.lr,
        seed: args.seed,
        ..DemoSettings::default()
    };
    let base = args.base.clone().unwrap_or_else(default_base_dir);
    run_demo(&args.out, &base, &settings)?;
    Ok(())
}

/// Runs `qdylora demo-base`.
pub fn run_base(args: &BaseArgs) -> Result<()> {
    if args.out.join("model.safetensors").exists() {
        anyhow::bail!("{} already holds a model", args.out.display());
    }
    let settings = DemoSettings {
        pretrain_steps: args.steps,
        seed: args.seed,
        ..DemoSettings::default()
    };
    let loss = build_base(&args.out, &settings)?;
    println!(
        "pretrained {} ({} steps, final loss {loss:.3})",
        args.out.display(),
        args.steps
    );
    Ok(())
}
