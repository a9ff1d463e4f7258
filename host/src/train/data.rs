//! Training data: JSONL records (Alpaca `instruction`/`input`/`output`, or `{"text": ...}`), a
//! prompt template, tokenization through `tokenizer.json`, loss masks, a held-out split, and
//! batches of right-padded sequences.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Deserialize;
use tokenizers::Tokenizer;

/// One JSONL record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Instruction data: loss on the response only.
    Instruction {
        /// The task.
        instruction: String,
        /// Optional context.
        input: String,
        /// The expected response.
        output: String,
    },
    /// Plain text: loss on every token.
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    instruction: Option<String>,
    input: Option<String>,
    output: Option<String>,
    text: Option<String>,
}

/// What to do with a line that is not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BadLines {
    /// Stop with an error naming the line.
    Stop,
    /// Skip it with a warning naming the line.
    Skip,
}

/// Parses JSONL text. Blank lines are ignored; `source` names the file in messages.
pub fn parse_jsonl(text: &str, source: &str, bad: BadLines) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut skipped = 0usize;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_record(line) {
            Ok(r) => records.push(r),
            Err(e) => match bad {
                BadLines::Stop => bail!(
                    "{source}:{}: {e} (use --bad-lines skip to skip such lines)",
                    i + 1
                ),
                BadLines::Skip => {
                    eprintln!("warning: {source}:{}: {e}; skipped", i + 1);
                    skipped += 1;
                }
            },
        }
    }
    if records.is_empty() {
        bail!("{source} holds no usable records ({skipped} skipped)");
    }
    Ok(records)
}

fn parse_record(line: &str) -> Result<Record> {
    let raw: RawRecord = serde_json::from_str(line).context("not a JSON object of known fields")?;
    match raw {
        RawRecord {
            text: Some(text),
            instruction: None,
            input: None,
            output: None,
        } => {
            if text.is_empty() {
                bail!("empty \"text\"");
            }
            Ok(Record::Text(text))
        }
        RawRecord {
            text: None,
            instruction: Some(instruction),
            input,
            output: Some(output),
        } => {
            if output.is_empty() {
                bail!("empty \"output\"");
            }
            Ok(Record::Instruction {
                instruction,
                input: input.unwrap_or_default(),
                output,
            })
        }
        _ => bail!("expected {{\"text\"}} or {{\"instruction\", \"input\"?, \"output\"}}"),
    }
}

/// Reads a JSONL file.
pub fn read_jsonl(path: &Path, bad: BadLines) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_jsonl(&text, &path.display().to_string(), bad)
}

/// How an instruction record becomes a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// The Alpaca prompt (`### Instruction:` / `### Input:` / `### Response:`).
    Alpaca,
    /// `{instruction} {input}=`: short prompts for small synthetic tasks.
    Compact,
}

impl Template {
    /// The prompt text (everything before the response).
    pub fn prompt(self, instruction: &str, input: &str) -> String {
        match self {
            Template::Alpaca if input.is_empty() => format!(
                "Below is an instruction that describes a task. Write a response that appropriately \
                 completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
            ),
            Template::Alpaca => format!(
                "Below is an instruction that describes a task, paired with an input that provides \
                 further context. Write a response that appropriately completes the request.\n\n\
                 ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
            ),
            Template::Compact => format!("{instruction} {input}="),
        }
    }
}

/// A tokenized example: ids and, per position, whether the *next-token* loss counts there.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids, BOS first, EOS last.
    pub ids: Vec<u32>,
    /// Number of leading tokens that are prompt (no loss on predicting them).
    pub prompt_len: usize,
    /// The expected response ids (without EOS), for exact match; empty for text records.
    pub answer: Vec<u32>,
}

/// The tokenizer and the special ids the trainer needs.
pub struct TextCodec {
    tokenizer: Tokenizer,
    /// Beginning of sequence.
    pub bos: u32,
    /// End of sequence (the model's stop token).
    pub eos: u32,
    /// Padding (never scored).
    pub pad: u32,
}

impl TextCodec {
    /// Loads `tokenizer.json` and finds `<s>`, `</s>` and a pad token (`<pad>`, else EOS).
    pub fn load(path: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        Self::new(tokenizer)
    }

    /// Wraps a tokenizer.
    pub fn new(tokenizer: Tokenizer) -> Result<Self> {
        let find = |names: &[&str]| names.iter().find_map(|n| tokenizer.token_to_id(n));
        let bos = find(&["<s>", "<|begin_of_text|>", "<bos>"])
            .context("tokenizer has no BOS token (<s>)")?;
        let eos = find(&["</s>", "<|end_of_text|>", "<eos>"])
            .context("tokenizer has no EOS token (</s>)")?;
        let pad = find(&["<pad>"]).unwrap_or(eos);
        Ok(Self {
            tokenizer,
            bos,
            eos,
            pad,
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Text to ids, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    /// Tokenizes a record: BOS + prompt + response + EOS, loss on the response and EOS for
    /// instruction data and on every token for text. Sequences longer than `max_len` are cut
    /// (the caller counts and reports them).
    pub fn example(
        &self,
        record: &Record,
        template: Template,
        max_len: usize,
    ) -> Result<(Example, bool)> {
        let (prompt, answer) = match record {
            Record::Instruction {
                instruction,
                input,
                output,
            } => (
                self.encode(&template.prompt(instruction, input))?,
                self.encode(output)?,
            ),
            Record::Text(text) => (Vec::new(), self.encode(text)?),
        };
        let mut ids = Vec::with_capacity(prompt.len() + answer.len() + 2);
        ids.push(self.bos);
        ids.extend(&prompt);
        ids.extend(&answer);
        ids.push(self.eos);
        let prompt_len = 1 + prompt.len();
        let truncated = ids.len() > max_len;
        ids.truncate(max_len);
        let answer = if matches!(record, Record::Instruction { .. }) {
            answer
        } else {
            Vec::new()
        };
        Ok((
            Example {
                ids,
                prompt_len: prompt_len.min(max_len),
                answer,
            },
            truncated,
        ))
    }
}

/// A tokenized dataset with its held-out split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Examples trained on.
    pub train: Vec<Example>,
    /// Held-out examples.
    pub eval: Vec<Example>,
}

impl Dataset {
    /// Tokenizes `records`, holding out `eval_fraction` of them (at least one when there are two
    /// or more) chosen by `seed`. Warns once with the count of truncated sequences.
    pub fn build(
        codec: &TextCodec,
        records: &[Record],
        template: Template,
        max_len: usize,
        eval_fraction: f64,
        seed: u64,
    ) -> Result<Self> {
        if max_len < 2 {
            bail!("the maximum sequence length must be at least 2");
        }
        let mut examples = Vec::with_capacity(records.len());
        let mut truncated = 0usize;
        for r in records {
            let (e, cut) = codec.example(r, template, max_len)?;
            truncated += usize::from(cut);
            if e.prompt_len >= e.ids.len() {
                // The prompt alone fills the context: nothing left to learn from.
                continue;
            }
            examples.push(e);
        }
        if truncated > 0 {
            eprintln!(
                "warning: {truncated} of {} sequences exceed the context of {max_len} tokens and were truncated",
                records.len()
            );
        }
        if examples.is_empty() {
            bail!("no example has a response within the context of {max_len} tokens");
        }
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0xe7a1_5eed));
        let n_eval = if examples.len() < 2 {
            0
        } else {
            ((examples.len() as f64 * eval_fraction).round() as usize).clamp(1, examples.len() - 1)
        };
        let eval = order[..n_eval]
            .iter()
            .map(|&i| examples[i].clone())
            .collect();
        let train = order[n_eval..]
            .iter()
            .map(|&i| examples[i].clone())
            .collect();
        Ok(Self { train, eval })
    }

    /// Uses separate eval records instead of a split.
    pub fn with_eval(
        codec: &TextCodec,
        train: &[Record],
        eval: &[Record],
        template: Template,
        max_len: usize,
    ) -> Result<Self> {
        let all = Self::build(codec, train, template, max_len, 0.0, 0)?;
        let held = Self::build(codec, eval, template, max_len, 0.0, 0)?;
        Ok(Self {
            train: all.train.into_iter().chain(all.eval).collect(),
            eval: held.train.into_iter().chain(held.eval).collect(),
        })
    }
}

/// A padded batch: `ids [b, t]` inputs, `targets [b, t]` next tokens, `mask [b, t]` (1 where the
/// loss counts).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows.
    pub rows: usize,
    /// Columns (the longest input in the batch).
    pub cols: usize,
    /// Input ids, row-major.
    pub ids: Vec<u32>,
    /// Target ids, row-major.
    pub targets: Vec<u32>,
    /// Loss weights, row-major.
    pub mask: Vec<f32>,
}

impl Batch {
    /// Shifts each example into (input, target) pairs and right-pads with `pad`.
    pub fn new(examples: &[&Example], pad: u32) -> Self {
        let cols = examples
            .iter()
            .map(|e| e.ids.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
            .max(1);
        let rows = examples.len();
        let mut ids = vec![pad; rows * cols];
        let mut targets = vec![pad; rows * cols];
        let mut mask = vec![0.0f32; rows * cols];
        for (r, e) in examples.iter().enumerate() {
            for p in 0..e.ids.len().saturating_sub(1) {
                ids[r * cols + p] = e.ids[p];
                targets[r * cols + p] = e.ids[p + 1];
                // Position p predicts token p+1: it counts when p+1 is past the prompt.
                if p + 1 >= e.prompt_len {
                    mask[r * cols + p] = 1.0;
                }
            }
        }
        Self {
            rows,
            cols,
            ids,
            targets,
            mask,
        }
    }

    /// Tokens whose loss counts.
    pub fn scored_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}

/// Walks the training examples in a seeded order, epoch after epoch; its state is two numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataCursor {
    /// Epochs completed.
    pub epoch: u64,
    /// Position within the current epoch's order.
    pub position: usize,
}

impl DataCursor {
    /// The example indices of the next batch, advancing the cursor (an epoch's tail joins the
    /// next epoch's head so every batch is full).
    pub fn next_batch(&mut self, seed: u64, len: usize, batch: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        let mut order = epoch_order(seed, self.epoch, len);
        while out.len() < batch {
            if self.position >= len {
                self.epoch += 1;
                self.position = 0;
                order = epoch_order(seed, self.epoch, len);
            }
            out.push(order[self.position]);
            self.position += 1;
        }
        out
    }
}

fn epoch_order(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch);
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_errors_name_the_line() {
        let text = "{\"text\": \"a\"}\n\nnot json\n{\"instruction\": \"x\", \"output\": \"y\"}\n";
        let err = parse_jsonl(text, "d.jsonl", BadLines::Stop).unwrap_err();
        assert!(err.to_string().contains("d.jsonl:3"), "{err}");
        let ok = parse_jsonl(text, "d.jsonl", BadLines::Skip).unwrap();
        assert_eq!(ok.len(), 2);
        assert!(parse_jsonl("\n\n", "e.jsonl", BadLines::Stop).is_err());
        assert!(parse_jsonl("{\"text\": \"a\", \"extra\": 1}", "f", BadLines::Stop).is_err());
        assert!(parse_jsonl("{\"instruction\": \"a\"}", "g", BadLines::Stop).is_err());
    }

    #[test]
    fn batch_masks_only_the_response() {
        let e = Example {
            ids: vec![1, 10, 11, 20, 21, 2],
            prompt_len: 3,
            answer: vec![20, 21],
        };
        let short = Example {
            ids: vec![1, 10, 2],
            prompt_len: 1,
            answer: vec![],
        };
        let b = Batch::new(&[&e, &short], 0);
        assert_eq!((b.rows, b.cols), (2, 5));
        assert_eq!(&b.ids[..5], &[1, 10, 11, 20, 21]);
        assert_eq!(&b.targets[..5], &[10, 11, 20, 21, 2]);
        // Predicting 20, 21 and EOS counts; predicting prompt tokens does not.
        assert_eq!(&b.mask[..5], &[0.0, 0.0, 1.0, 1.0, 1.0]);
        assert_eq!(&b.mask[5..], &[1.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(b.scored_tokens(), 5);
    }

    #[test]
    fn cursor_is_a_deterministic_function_of_its_state() {
        let mut a = DataCursor {
            epoch: 0,
            position: 0,
        };
        let first: Vec<Vec<usize>> = (0..7).map(|_| a.next_batch(3, 10, 4)).collect();
        let mut b = DataCursor {
            epoch: 0,
            position: 0,
        };
        for _ in 0..3 {
            b.next_batch(3, 10, 4);
        }
        let resumed: Vec<Vec<usize>> = (3..7).map(|_| b.next_batch(3, 10, 4)).collect();
        assert_eq!(&first[3..], &resumed[..]);
        // Every epoch visits every example once.
        let flat: Vec<usize> = first.concat();
        let mut epoch0: Vec<usize> = flat[..10].to_vec();
        epoch0.sort_unstable();
        assert_eq!(epoch0, (0..10).collect::<Vec<_>>());
    }
}
