//! `qdylora sweep`: one trained adapter evaluated at every rank (or a list), with a table, a CSV,
//! a plot and a recommended rank.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;

use crate::model::load::{self, BaseLinears, ModelSource};
use crate::plot::{Series, rank_plot};
use crate::sweep::{RankPoint, parse_ranks, recommend, sweep, write_csv};
use crate::train::data::{BadLines, Dataset, Template, TextCodec, read_jsonl};

/// Arguments of `qdylora sweep`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The base model the adapter was trained on (HF or bitsandbytes 4-bit).
    #[arg(long)]
    pub model: PathBuf,
    /// The adapter: a nested bundle (adapter.qdyl).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Evaluation data, JSONL (all of it is evaluated).
    #[arg(long)]
    pub data: PathBuf,
    /// tokenizer.json (default: the model folder's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Ranks to evaluate: `all` or a comma-separated list.
    #[arg(long, default_value = "all")]
    pub ranks: String,
    /// Prompt template for instruction data.
    #[arg(long, value_enum, default_value_t = Template::Alpaca)]
    pub template: Template,
    /// Tolerance for the recommendation: exact-match points (0.01 = 1 point), or relative loss
    /// when the data has no answers.
    #[arg(long, default_value_t = 0.01)]
    pub tolerance: f64,
    /// Folder for sweep.csv and sweep.svg.
    #[arg(long)]
    pub out: PathBuf,
    /// Apply the bundle even if its base-model fingerprint differs.
    #[arg(long)]
    pub ignore_fingerprint: bool,
    /// Examples per evaluation batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// NF4 blocksize when quantizing an HF checkpoint (must match training).
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
}

/// Prints a sweep as a table.
pub fn print_table(points: &[RankPoint]) {
    println!(
        "{:>5}  {:>9}  {:>10}  {:>11}",
        "rank", "eval loss", "perplexity", "exact match"
    );
    for p in points {
        let em = p
            .exact_match
            .map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
        println!(
            "{:>5}  {:>9.4}  {:>10.3}  {:>11}",
            p.rank, p.eval_loss, p.perplexity, em
        );
    }
}

/// Runs the command.
pub fn run(args: &Args) -> Result<()> {
    let device = Device::Cpu;
    let source = ModelSource::open(&args.model)?;
    let tokenizer = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    let codec = TextCodec::load(&tokenizer)?;
    let model = load::build(
        &source,
        BaseLinears::Nf4 {
            blocksize: args.blocksize,
        },
        &device,
    )?;
    let cfg = source.config().to_decoder_config();
    let bytes = std::fs::read(&args.adapter)
        .with_context(|| format!("reading {}", args.adapter.display()))?;
    let fingerprint = if args.ignore_fingerprint {
        None
    } else {
        Some(load::base_fingerprint(&source, args.blocksize)?)
    };
    let adapter = load::adapter_from_bundle(&bytes, &cfg, fingerprint, &device)?;
    let ranks = parse_ranks(&args.ranks, adapter.r_max)?;
    let records = read_jsonl(&args.data, BadLines::Stop)?;
    let max_len = source.config().max_position_embeddings as usize;
    let data = Dataset::build(&codec, &records, args.template, max_len, 0.0, 0)?;
    if data.train.is_empty() {
        bail!("no example to evaluate");
    }
    let pb = crate::cli::progress::bar(ranks.len() as u64, "sweep");
    let points = sweep(
        &model.llama,
        &adapter,
        &ranks,
        &data.train,
        codec.eos,
        args.batch_size,
        |_| pb.inc(1),
    )?;
    pb.finish_and_clear();
    print_table(&points);
    std::fs::create_dir_all(&args.out)?;
    write_csv(&args.out.join("sweep.csv"), &points)?;
    let (label, pick): (&str, fn(&RankPoint) -> f64) = if points[0].exact_match.is_some() {
        ("exact match", |p| p.exact_match.unwrap_or(0.0))
    } else {
        ("eval loss", |p| p.eval_loss)
    };
    rank_plot(
        &args.out.join("sweep.svg"),
        &format!("{label} vs rank"),
        label,
        &[Series {
            label: "adapter".into(),
            points: points.iter().map(|p| (p.rank as f64, pick(p))).collect(),
        }],
    )?;
    if let Some(r) = recommend(&points, args.tolerance) {
        println!(
            "recommended rank: {} (best by {}), {} (smallest within {} of the best)",
            r.best,
            if r.by_exact_match {
                "exact match"
            } else {
                "loss"
            },
            r.smallest_within,
            args.tolerance
        );
    }
    println!(
        "wrote {} and {}",
        args.out.join("sweep.csv").display(),
        args.out.join("sweep.svg").display()
    );
    Ok(())
}
