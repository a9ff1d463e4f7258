//! `qdylora export`: from a trained adapter, the nested bundle (rank r = byte prefix), PEFT
//! adapters at chosen ranks, the device model container, and the rank each byte budget affords.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use qdylora_core::ElementType;
use qdylora_formats::bundle::BundleReader;
use qdylora_formats::device_model::write_device_model;
use qdylora_formats::{Nf4Weight, atomic, peft};

use crate::model::load::{self, ModelSource};
use crate::model::lora::ModuleKey;
use crate::train::trainer::adapter_bundle;

/// Element type names on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// f32
    F32,
    /// f16
    F16,
    /// bf16
    Bf16,
}

impl Dtype {
    /// The core's element type.
    pub fn element_type(self) -> ElementType {
        match self {
            Dtype::F32 => ElementType::F32,
            Dtype::F16 => ElementType::F16,
            Dtype::Bf16 => ElementType::Bf16,
        }
    }
}

/// Arguments of `qdylora export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The trained adapter: a nested bundle (a training run's adapter.qdyl).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The base model (needed for the device model and the fingerprint check).
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Element type of the exported bundle.
    #[arg(long, value_enum, default_value_t = Dtype::F16)]
    pub dtype: Dtype,
    /// PEFT adapters to write, one folder per rank (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub peft_ranks: Vec<u32>,
    /// Also write the device model container (model.qdm) of the NF4 base.
    #[arg(long)]
    pub device_model: bool,
    /// Element type of the device model's dense tensors.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub device_dtype: Dtype,
    /// Byte budgets to report the largest fitting rank for (e.g. 64KiB,256KiB,1MiB).
    #[arg(long, value_delimiter = ',', default_value = "64KiB,256KiB,1MiB")]
    pub budget: Vec<String>,
    /// NF4 blocksize when quantizing an HF checkpoint.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Export even if the adapter's base-model fingerprint differs from --model.
    #[arg(long)]
    pub ignore_fingerprint: bool,
}

/// Parses `64KiB`, `1MiB`, `500KB`, `2MB`, `12345`, `64k` into bytes.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("{text:?} is not a byte count like 64KiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => bail!("unknown byte unit {u:?} in {text:?} (use B, KiB, MiB, GiB, KB, MB, GB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("{text:?} is too large"))
}

/// One budget's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetRank {
    /// The budget in bytes.
    pub budget: u64,
    /// The largest rank whose prefix fits, or `None` when not even rank 1 does.
    pub rank: Option<u32>,
}

/// The largest rank of `bundle` within each budget.
pub fn budget_ranks(bundle: &BundleReader<'_>, budgets: &[u64]) -> Vec<BudgetRank> {
    budgets
        .iter()
        .map(|&budget| BudgetRank {
            budget,
            rank: bundle.rank_for_budget(budget).ok(),
        })
        .collect()
}

/// Prints bytes per rank (every rank up to 8, then powers of two and r_max) and the budgets.
pub fn print_budget_table(bundle: &BundleReader<'_>, budgets: &[BudgetRank]) -> Result<()> {
    let r_max = bundle.r_max();
    println!("{:>5}  {:>12}", "rank", "bytes");
    for r in 1..=r_max {
        if r <= 8 || r.is_power_of_two() || r == r_max {
            println!(
                "{r:>5}  {:>12}",
                bundle.prefix_len(r).map_err(|e| anyhow::anyhow!("{e}"))?
            );
        }
    }
    for b in budgets {
        match b.rank {
            Some(r) => println!("budget {:>9}: rank {r}", human_bytes(b.budget)),
            None => println!(
                "budget {:>9}: too small (rank 1 needs {} bytes)",
                human_bytes(b.budget),
                bundle.prefix_len(1).unwrap_or(0)
            ),
        }
    }
    Ok(())
}

/// `65536` → `64KiB`.
pub fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

/// Writes the device model container of an NF4 base.
pub fn write_device_container(
    path: &Path,
    source: &ModelSource,
    blocksize: usize,
    dense_dtype: ElementType,
) -> Result<()> {
    let cfg = source.config().to_decoder_config();
    let owned;
    let (quantized, dense) = match source {
        ModelSource::Bnb(c) => (&c.quantized, &c.dense),
        ModelSource::Hf(c) => {
            owned = load::quantize_linears(c, blocksize)?;
            (&owned, &c.tensors)
        }
    };
    let q: Vec<(String, &Nf4Weight)> = quantized
        .iter()
        .map(|(k, w)| (format!("{k}.weight"), w))
        .collect();
    let d: Vec<(String, Vec<usize>, &[f32])> = dense
        .iter()
        .filter(|(name, _)| {
            let linear = name
                .strip_suffix(".weight")
                .and_then(ModuleKey::parse_hf_path)
                .is_some();
            let tied_head = cfg.tie_word_embeddings && *name == "lm_head.weight";
            !(linear || tied_head)
        })
        .map(|(k, t)| (k.clone(), t.shape.clone(), t.data.as_slice()))
        .collect();
    let fingerprint = load::base_fingerprint(source, blocksize)?;
    let bytes = write_device_model(&cfg, fingerprint, &q, &d, dense_dtype)?;
    atomic::write_file(path, &bytes)?;
    Ok(())
}

/// Runs the command.
pub fn run(args: &Args) -> Result<()> {
    let budgets = args
        .budget
        .iter()
        .map(|b| parse_bytes(b))
        .collect::<Result<Vec<u64>>>()?;
    let source = ModelSource::open(&args.model)?;
    let bytes = std::fs::read(&args.adapter)
        .with_context(|| format!("reading {}", args.adapter.display()))?;
    let cfg = source.config().to_decoder_config();
    let fingerprint = if args.ignore_fingerprint {
        None
    } else {
        Some(load::base_fingerprint(&source, args.blocksize)?)
    };
    let device = candle_core::Device::Cpu;
    let adapter = load::adapter_from_bundle(&bytes, &cfg, fingerprint, &device)?;
    let fingerprint = BundleReader::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("bundle: {e}"))?
        .fingerprint();
    std::fs::create_dir_all(&args.out)?;

    let bundle_path = args.out.join("adapter.qdyl");
    let out_bytes = adapter_bundle(&adapter, args.dtype.element_type(), fingerprint)?;
    atomic::write_file(&bundle_path, &out_bytes)?;
    let reader = BundleReader::parse(&out_bytes).map_err(|e| anyhow::anyhow!("bundle: {e}"))?;
    println!(
        "nested bundle: {} ({} bytes, ranks 1..={})",
        bundle_path.display(),
        out_bytes.len(),
        reader.r_max()
    );

    for &r in &args.peft_ranks {
        if r == 0 || r > reader.r_max() {
            bail!("--peft-ranks {r} is outside 1..={}", reader.r_max());
        }
        let mut p = peft::from_bundle_rank(&reader, r)?;
        p.config.base_model_name_or_path = Some(args.model.display().to_string());
        let dir = args.out.join(format!("peft-r{r}"));
        p.write(&dir)?;
        println!("PEFT adapter at rank {r}: {}", dir.display());
    }

    if args.device_model {
        let path = args.out.join("model.qdm");
        write_device_container(
            &path,
            &source,
            args.blocksize,
            args.device_dtype.element_type(),
        )?;
        println!(
            "device model: {} ({} bytes)",
            path.display(),
            std::fs::metadata(&path)?.len()
        );
    }
    print_budget_table(&reader, &budget_ranks(&reader, &budgets))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("64KiB").unwrap(), 65_536);
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("500KB").unwrap(), 500_000);
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert_eq!(parse_bytes(" 64k ").unwrap(), 65_536);
        assert!(parse_bytes("64 parsecs").is_err());
        assert!(parse_bytes("KiB").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
        assert_eq!(human_bytes(262_144), "256KiB");
        assert_eq!(human_bytes(1000), "1000B");
    }
}
