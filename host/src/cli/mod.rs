//! The `qdylora` command line: one module per subcommand.
pub mod demo;
pub mod device;
pub mod export;
pub mod generate;
pub mod gpu;
pub mod logits;
pub mod progress;
pub mod quantize;
pub mod sweep;
pub mod train;
pub mod train_bench;

use clap::{Parser, Subcommand};

/// QDyLoRA: quantized, dynamic-rank LoRA fine-tuning whose adapters ship to small devices.
#[derive(Debug, Parser)]
#[command(name = "qdylora", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Quantize an HF LLaMA checkpoint to a bitsandbytes NF4 double-quant checkpoint.
    Quantize(quantize::Args),
    /// Compute logits for token ids with a model (HF or bitsandbytes 4-bit) and an optional adapter.
    Logits(logits::Args),
    /// Train a QDyLoRA adapter (all ranks at once) or a plain QLoRA baseline on an NF4 base.
    Train(train::Args),
    /// Greedy generation with the NF4 base and an adapter at a rank (what a device computes).
    Generate(generate::Args),
    /// Evaluate a trained adapter at every rank and recommend one.
    Sweep(sweep::Args),
    /// Export the nested bundle, PEFT adapters, the device model, and ranks per byte budget.
    Export(export::Args),
    /// The whole story on the CPU, no download: base, NF4, QDyLoRA vs QLoRA, sweep, export.
    Demo(demo::Args),
    /// Pretrain the demo's small base model from generated text (how host/assets/demo-base was made).
    DemoBase(demo::BaseArgs),
    /// NF4 dequantization on the GPU, checked bit for bit against the CPU and timed (needs the
    /// `cuda` feature and an NVIDIA GPU; not yet run on one).
    GpuDequant(gpu::DequantArgs),
    /// Training throughput and peak memory on a random NF4 model (LLaMA-7B shape on a GPU with
    /// the `cuda` feature; small shapes on the CPU).
    TrainBench(train_bench::Args),
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Quantize(args) => quantize::run(&args),
            Command::Logits(args) => logits::run(&args),
            Command::Train(args) => train::run_command(&args),
            Command::Generate(args) => generate::run(&args),
            Command::Sweep(args) => sweep::run(&args),
            Command::Export(args) => export::run(&args),
            Command::Demo(args) => demo::run(&args),
            Command::DemoBase(args) => demo::run_base(&args),
            Command::GpuDequant(args) => gpu::run_dequant(&args),
            Command::TrainBench(args) => train_bench::run(&args),
        }
    }
}
