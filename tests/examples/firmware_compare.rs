//! The host side of the firmware demo (`scripts/firmware-assets.sh`, `scripts/firmware.sh`).
//!
//! * `prompts`: the first held-out words of a demo's `eval.jsonl` as prompts, one per line, in
//!   the demo's compact template (`{instruction} {input}=`).
//! * `prompts-rs`: the Rust source of the firmware's prompt table (`firmware-demo/assets/
//!   prompts.rs`) from the host's `qdylora generate --json` output, which holds the tokenizer's
//!   ids (BOS first).
//! * `check`: compares a firmware run (its decoded defmt log) with the host's `qdylora generate
//!   --json` at the rank the firmware logged. It fails unless the firmware picked the rank the
//!   host's budget math (`BundleReader::rank_for_budget`, as `qdylora export --budget` reports
//!   it) gives for the budget, copied exactly that prefix, ran the same prompts, generated the
//!   same tokens and produced logits within the tolerance at every step:
//!   `max_j |firmware_j - host_j| <= tolerance * max_j |host_j|`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use qdylora_formats::bundle::BundleReader;

/// Default logit tolerance, relative to the step's largest |host logit|. Both sides compute in
/// f32 from the same NF4 codes and adapter values, in a different order (the host runs whole
/// sequences through candle and its own NF4 kernels, the device one token at a time with a
/// key/value cache), so they differ by rounding only: about 1e-6 measured on the demo, and this
/// leaves a hundredfold margin.
const DEFAULT_TOLERANCE: f32 = 1e-4;

#[derive(Debug, Parser)]
#[command(about = "Host side of the firmware demo: prompt assets and the firmware vs host check")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the first COUNT held-out words of eval.jsonl as prompts, one per line.
    Prompts {
        /// A demo's data/eval.jsonl.
        #[arg(long)]
        eval: PathBuf,
        /// How many prompts.
        #[arg(long, default_value_t = 4)]
        count: usize,
    },
    /// Print the firmware's prompt table (Rust) from `qdylora generate --json` output.
    PromptsRs {
        /// `qdylora generate --json` output for the prompts.
        #[arg(long)]
        generated: PathBuf,
        /// The base model's config.json (for bos_token_id and eos_token_id).
        #[arg(long)]
        config: PathBuf,
    },
    /// Compare a decoded firmware log with the host's `qdylora generate --json` output.
    Check {
        /// The firmware's decoded defmt log.
        #[arg(long)]
        log: PathBuf,
        /// `qdylora generate --json` output at the firmware's rank.
        #[arg(long)]
        host: PathBuf,
        /// The adapter bundle both ran.
        #[arg(long)]
        bundle: PathBuf,
        /// The firmware's adapter RAM budget in bytes.
        #[arg(long)]
        budget: u64,
        /// Largest logit difference allowed, relative to the step's largest |host logit|.
        #[arg(long, default_value_t = DEFAULT_TOLERANCE)]
        tolerance: f32,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Prompts { eval, count } => {
            for prompt in eval_prompts(&read(&eval)?, count)? {
                println!("{prompt}");
            }
        }
        Command::PromptsRs { generated, config } => {
            let generations = parse_host(&read(&generated)?)?;
            let config: serde_json::Value = serde_json::from_str(&read(&config)?)
                .with_context(|| format!("parsing {}", config.display()))?;
            let token = |key: &str| -> Result<u32> {
                let id = config[key]
                    .as_u64()
                    .with_context(|| format!("config.json has no {key}"))?;
                Ok(u32::try_from(id)?)
            };
            print!(
                "{}",
                prompts_rs(&generations, token("bos_token_id")?, token("eos_token_id")?)?
            );
        }
        Command::Check {
            log,
            host,
            bundle,
            budget,
            tolerance,
        } => {
            let firmware = parse_firmware_log(&read(&log)?)?;
            let host = parse_host(&read(&host)?)?;
            let bytes =
                std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let expected = expected_adapter(&bytes, budget)?;
            let summary = compare(&firmware, &host, expected, tolerance)?;
            println!("{summary}");
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The first `count` records of a demo's eval.jsonl as compact-template prompts.
fn eval_prompts(jsonl: &str, count: usize) -> Result<Vec<String>> {
    let mut prompts = Vec::with_capacity(count);
    for (n, line) in jsonl.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        if prompts.len() == count {
            break;
        }
        let record: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("eval.jsonl line {}", n + 1))?;
        let field = |key: &str| {
            record[key]
                .as_str()
                .with_context(|| format!("eval.jsonl line {} has no {key:?} string", n + 1))
        };
        prompts.push(format!("{} {}=", field("instruction")?, field("input")?));
    }
    ensure!(
        prompts.len() == count,
        "eval.jsonl has {} records, {count} wanted",
        prompts.len()
    );
    Ok(prompts)
}

/// One line of `qdylora generate --json`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
struct HostGeneration {
    prompt: String,
    prompt_ids: Vec<u32>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn parse_host(jsonl: &str) -> Result<Vec<HostGeneration>> {
    jsonl
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(n, line)| {
            serde_json::from_str(line).with_context(|| format!("host output line {}", n + 1))
        })
        .collect()
}

/// The Rust source of `firmware-demo/assets/prompts.rs`.
fn prompts_rs(generations: &[HostGeneration], bos: u32, eos: u32) -> Result<String> {
    ensure!(!generations.is_empty(), "no prompts");
    let mut src = String::from(
        "// @generated by scripts/firmware-assets.sh (firmware_compare prompts-rs): do not edit.\n\
         // Token ids from `qdylora generate --json` with the demo base's tokenizer.\n\n\
         /// The task prompts the firmware runs.\n",
    );
    writeln!(
        src,
        "pub const PROMPTS: [Prompt; {}] = [",
        generations.len()
    )?;
    for g in generations {
        ensure!(
            g.prompt_ids.first() == Some(&bos),
            "prompt {:?} does not start with BOS ({bos})",
            g.prompt
        );
        let ids: Vec<String> = g.prompt_ids.iter().map(u32::to_string).collect();
        writeln!(src, "    Prompt {{")?;
        writeln!(src, "        text: {:?},", g.prompt)?;
        writeln!(src, "        ids: &[{}],", ids.join(", "))?;
        writeln!(src, "    }},")?;
    }
    writeln!(src, "];\n")?;
    writeln!(src, "/// End of sequence: generation stops after it.")?;
    writeln!(src, "pub const EOS: u32 = {eos};")?;
    Ok(src)
}

/// What the firmware logged about one prompt.
#[derive(Debug, Clone, Default, PartialEq)]
struct FirmwarePrompt {
    text: String,
    ids: Vec<u32>,
    steps: Vec<(u32, Vec<f32>)>,
    generated: Option<Vec<u32>>,
}

/// What the firmware logged.
#[derive(Debug, Clone, Default, PartialEq)]
struct FirmwareRun {
    rank: u32,
    adapter_bytes: u64,
    budget: u64,
    prompts: Vec<FirmwarePrompt>,
}

/// Parses the lines of a decoded defmt log (`INFO  message`) that `firmware-demo/src/main.rs`
/// and `generate.rs` write; other lines are skipped.
fn parse_firmware_log(log: &str) -> Result<FirmwareRun> {
    let mut run = FirmwareRun::default();
    let mut adapter_lines = 0;
    for (n, line) in log.lines().enumerate() {
        let Some(message) = line.trim_start().strip_prefix("INFO") else {
            continue;
        };
        let message = message.trim();
        parse_line(message, &mut run, &mut adapter_lines)
            .with_context(|| format!("firmware log line {}: {message}", n + 1))?;
    }
    ensure!(
        adapter_lines == 1,
        "the log has {adapter_lines} `adapter rank` lines, expected 1"
    );
    ensure!(!run.prompts.is_empty(), "the log has no prompts");
    for (i, p) in run.prompts.iter().enumerate() {
        ensure!(p.generated.is_some(), "prompt {i} has no `generated` line");
    }
    Ok(run)
}

fn parse_line(message: &str, run: &mut FirmwareRun, adapter_lines: &mut usize) -> Result<()> {
    if let Some(rest) = message.strip_prefix("adapter rank ") {
        // adapter rank R of M: B bytes in RAM (budget X bytes, bundle Y bytes)
        let (rank, rest) = split(rest, " of ")?;
        let (_, rest) = split(rest, ": ")?;
        let (bytes, rest) = split(rest, " bytes in RAM (budget ")?;
        let (budget, _) = split(rest, " bytes")?;
        run.rank = rank.parse()?;
        run.adapter_bytes = bytes.parse()?;
        run.budget = budget.parse()?;
        *adapter_lines += 1;
        return Ok(());
    }
    let Some(rest) = message.strip_prefix("prompt ") else {
        return Ok(());
    };
    let (index, rest) = split(rest, " ")?;
    let index: usize = index.parse()?;
    if let Some(rest) = rest.strip_prefix('"') {
        // prompt I "TEXT" ids [..]
        ensure!(index == run.prompts.len(), "prompt {index} out of order");
        let (text, ids) = rest
            .rsplit_once("\" ids ")
            .context("expected `\"TEXT\" ids [..]`")?;
        run.prompts.push(FirmwarePrompt {
            text: text.to_owned(),
            ids: parse_list(ids)?,
            ..FirmwarePrompt::default()
        });
        return Ok(());
    }
    ensure!(
        index + 1 == run.prompts.len(),
        "prompt {index} is not the current prompt"
    );
    let prompt = run.prompts.last_mut().context("no current prompt")?;
    ensure!(
        prompt.generated.is_none(),
        "prompt {index} goes on after `generated`"
    );
    if let Some(rest) = rest.strip_prefix("step ") {
        // prompt I step S token T logits [..]
        let (step, rest) = split(rest, " token ")?;
        let (token, logits) = split(rest, " logits ")?;
        ensure!(
            step.parse::<usize>()? == prompt.steps.len(),
            "step {step} out of order"
        );
        prompt.steps.push((token.parse()?, parse_list(logits)?));
    } else if let Some(tokens) = rest.strip_prefix("generated ") {
        prompt.generated = Some(parse_list(tokens)?);
    } else {
        bail!("unknown prompt line");
    }
    Ok(())
}

fn split<'a>(text: &'a str, separator: &str) -> Result<(&'a str, &'a str)> {
    text.split_once(separator)
        .with_context(|| format!("expected {separator:?} in {text:?}"))
}

/// `[1, 2, 3]` (defmt's slice format; floats as Rust's shortest round-trip text).
fn parse_list<T: std::str::FromStr>(text: &str) -> Result<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let inner = text
        .trim()
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .with_context(|| format!("expected a [list], got {text:?}"))?;
    if inner.trim().is_empty() {
        return Ok(Vec::new());
    }
    inner
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .with_context(|| format!("bad list element {v:?}"))
        })
        .collect()
}

/// The rank the host's budget math picks for `budget`, and the bytes of its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExpectedAdapter {
    budget: u64,
    rank: u32,
    prefix_len: u64,
}

fn expected_adapter(bundle: &[u8], budget: u64) -> Result<ExpectedAdapter> {
    let reader = BundleReader::parse(bundle).map_err(|e| anyhow::anyhow!("bundle: {e}"))?;
    ensure!(
        reader.complete_rank() == reader.r_max(),
        "the bundle holds ranks 1..={} of {}",
        reader.complete_rank(),
        reader.r_max()
    );
    let rank = reader
        .rank_for_budget(budget)
        .map_err(|e| anyhow::anyhow!("budget {budget}: {e}"))?;
    let prefix_len = reader
        .prefix_len(rank)
        .map_err(|e| anyhow::anyhow!("prefix of rank {rank}: {e}"))?;
    Ok(ExpectedAdapter {
        budget,
        rank,
        prefix_len: prefix_len as u64,
    })
}

/// Checks the firmware run against the host; every mismatch is listed in the error.
fn compare(
    firmware: &FirmwareRun,
    host: &[HostGeneration],
    expected: ExpectedAdapter,
    tolerance: f32,
) -> Result<String> {
    let mut problems = Vec::new();
    if firmware.budget != expected.budget {
        problems.push(format!(
            "firmware budget {} bytes, expected {}",
            firmware.budget, expected.budget
        ));
    }
    if firmware.rank != expected.rank {
        problems.push(format!(
            "firmware rank {}, the host's budget math picks {}",
            firmware.rank, expected.rank
        ));
    }
    if firmware.adapter_bytes != expected.prefix_len {
        problems.push(format!(
            "firmware copied {} bytes, the rank-{} prefix is {}",
            firmware.adapter_bytes, expected.rank, expected.prefix_len
        ));
    }
    if firmware.prompts.len() != host.len() {
        problems.push(format!(
            "{} prompts in the firmware log, {} from the host",
            firmware.prompts.len(),
            host.len()
        ));
    }

    let (mut max_abs, mut max_rel, mut steps) = (0.0f32, 0.0f32, 0usize);
    for (i, (fw, h)) in firmware.prompts.iter().zip(host).enumerate() {
        if fw.text != h.prompt {
            problems.push(format!("prompt {i}: text {:?} vs {:?}", fw.text, h.prompt));
        }
        if fw.ids != h.prompt_ids {
            problems.push(format!(
                "prompt {i}: ids {:?} vs host {:?}",
                fw.ids, h.prompt_ids
            ));
        }
        let fw_tokens: Vec<u32> = fw.steps.iter().map(|(t, _)| *t).collect();
        if fw.generated.as_ref() != Some(&fw_tokens) {
            problems.push(format!(
                "prompt {i}: generated {:?} but steps chose {fw_tokens:?}",
                fw.generated
            ));
        }
        if fw_tokens != h.tokens {
            problems.push(format!(
                "prompt {i}: tokens {fw_tokens:?} vs host {:?}",
                h.tokens
            ));
        }
        if fw.steps.len() != h.logits.len() {
            problems.push(format!(
                "prompt {i}: {} logit steps vs host {}",
                fw.steps.len(),
                h.logits.len()
            ));
        }
        for (s, ((_, fw_logits), host_logits)) in fw.steps.iter().zip(&h.logits).enumerate() {
            if fw_logits.len() != host_logits.len() {
                problems.push(format!(
                    "prompt {i} step {s}: {} logits vs host {}",
                    fw_logits.len(),
                    host_logits.len()
                ));
                continue;
            }
            let scale = host_logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(fw_logits, host_logits);
            let rel = diff / scale;
            if rel.is_nan() || rel > tolerance {
                problems.push(format!(
                    "prompt {i} step {s}: max |logit diff| {diff:e} is {rel:e} of max |logit| \
                     {scale:e}, above the tolerance {tolerance:e}"
                ));
            }
            max_abs = max_abs.max(diff);
            max_rel = max_rel.max(rel);
            steps += 1;
        }
    }
    if !problems.is_empty() {
        bail!(
            "firmware and host disagree ({} {}):\n  {}",
            problems.len(),
            if problems.len() == 1 {
                "problem"
            } else {
                "problems"
            },
            problems.join("\n  ")
        );
    }
    Ok(format!(
        "firmware = host: rank {} ({} bytes) for a {}-byte budget, {} prompts, {steps} steps \
         with identical tokens; logits max |diff| {max_abs:.3e}, max relative {max_rel:.3e} \
         (tolerance {tolerance:e})",
        expected.rank,
        expected.prefix_len,
        expected.budget,
        host.len()
    ))
}

/// `max |a_j - b_j|`, NaN when any difference is NaN (`f32::max` would drop it).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| {
            if m.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
INFO  qdylora firmware-demo, adapter budget budget-64k (65536 bytes)
INFO  adapter rank 2 of 16: 4096 bytes in RAM (budget 65536 bytes, bundle 9999 bytes)
INFO  prompt 0 \"enc ab=\" ids [1, 6, 7]
INFO  prompt 0 step 0 token 9 logits [0.5, -2.0, 10.0]
INFO  prompt 0 step 1 token 2 logits [1.0, 20.0, -3.25]
INFO  prompt 0 generated [9, 2]
INFO  prompt 1 \"enc \"q\"=\" ids [1, 8]
INFO  prompt 1 step 0 token 2 logits [0.0, 1.0, 2.0]
INFO  prompt 1 generated [2]
INFO  stack peak: 100 bytes
";

    fn host() -> Vec<HostGeneration> {
        vec![
            HostGeneration {
                prompt: "enc ab=".into(),
                prompt_ids: vec![1, 6, 7],
                tokens: vec![9, 2],
                logits: vec![vec![0.5, -2.0, 10.0078125], vec![1.0, 20.0, -3.25]],
            },
            HostGeneration {
                prompt: "enc \"q\"=".into(),
                prompt_ids: vec![1, 8],
                tokens: vec![2],
                logits: vec![vec![0.0, 1.0, 2.0]],
            },
        ]
    }

    const EXPECTED: ExpectedAdapter = ExpectedAdapter {
        budget: 65536,
        rank: 2,
        prefix_len: 4096,
    };

    fn check(log: &str, host: &[HostGeneration]) -> Result<String> {
        compare(&parse_firmware_log(log)?, host, EXPECTED, 1e-3)
    }

    #[test]
    fn parses_the_log() {
        let run = parse_firmware_log(LOG).unwrap();
        assert_eq!((run.rank, run.adapter_bytes, run.budget), (2, 4096, 65536));
        assert_eq!(run.prompts.len(), 2);
        assert_eq!(run.prompts[1].text, "enc \"q\"=");
        assert_eq!(run.prompts[0].steps[1], (2, vec![1.0, 20.0, -3.25]));
        assert_eq!(run.prompts[0].generated, Some(vec![9, 2]));
    }

    #[test]
    fn matching_runs_pass_and_report_the_difference() {
        let summary = check(LOG, &host()).unwrap();
        assert!(summary.contains("rank 2"), "{summary}");
        // |10.0 - 10.0078125|, relative to that step's largest |host logit|, 10.0078125.
        assert!(summary.contains("max |diff| 7.812e-3"), "{summary}");
        assert!(summary.contains("max relative 7.806e-4"), "{summary}");
    }

    #[test]
    fn every_mismatch_fails() {
        let cases: [(&str, &str, &str); 7] = [
            ("token 9 logits", "token 8 logits", "tokens [8, 2]"),
            ("generated [9, 2]", "generated [9, 3]", "steps chose"),
            ("10.0]", "10.5]", "above the tolerance"),
            ("10.0]", "NaN]", "above the tolerance"),
            ("adapter rank 2", "adapter rank 3", "budget math picks 2"),
            ("4096 bytes in RAM", "4097 bytes in RAM", "prefix is 4096"),
            ("ids [1, 6, 7]", "ids [1, 6, 8]", "ids [1, 6, 8]"),
        ];
        for (from, to, message) in cases {
            let tampered = LOG.replacen(from, to, 1);
            assert_ne!(tampered, LOG);
            let err = check(&tampered, &host()).unwrap_err().to_string();
            assert!(err.contains(message), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn a_short_or_garbled_log_fails() {
        // Cut before the last prompt finished, a prompt dropped, no adapter line, nothing.
        let cut = &LOG[..LOG.find("INFO  prompt 1 generated").unwrap()];
        assert!(parse_firmware_log(cut).is_err());
        let mut fewer = host();
        fewer.pop();
        assert!(check(LOG, &fewer).is_err());
        let no_adapter: String = LOG
            .lines()
            .filter(|l| !l.contains("adapter rank"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(parse_firmware_log(&no_adapter).is_err());
        assert!(parse_firmware_log("").is_err());
        assert!(parse_firmware_log(&LOG.replace("step 1 token", "step 5 token")).is_err());
        assert!(parse_firmware_log(&LOG.replace("[1.0, 20.0", "[1.0, x")).is_err());
    }

    #[test]
    fn prompts_come_from_eval_records_in_the_compact_template() {
        let jsonl = "{\"input\":\"wrjpz\",\"instruction\":\"enc\",\"output\":\"xkjyg\"}\n\
                     {\"instruction\":\"enc\",\"input\":\"pyznr\",\"output\":\"ysgok\"}\n";
        assert_eq!(
            eval_prompts(jsonl, 2).unwrap(),
            ["enc wrjpz=", "enc pyznr="]
        );
        assert!(eval_prompts(jsonl, 3).is_err());
    }

    #[test]
    fn prompt_table_source() {
        let src = prompts_rs(&host(), 1, 2).unwrap();
        assert!(src.contains("pub const PROMPTS: [Prompt; 2] = ["));
        assert!(src.contains("text: \"enc \\\"q\\\"=\",\n        ids: &[1, 8],"));
        assert!(src.contains("pub const EOS: u32 = 2;"));
        assert!(prompts_rs(&host(), 3, 2).is_err());
    }
}
