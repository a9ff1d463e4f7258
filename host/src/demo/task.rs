//! The demo's synthetic task family: words of random letters put through character-level
//! operations. The base model is pretrained on a mix of them (copy, reverse, Caesar shifts and a
//! few fixed substitution ciphers); the fine-tuning task is a *new* secret cipher, `enc`, with a
//! different random substitution for each letter position, on held-out words. Learning five new
//! 26-letter tables is what the adapter's capacity is spent on (rank 1 is not enough, rank 4
//! is), and exact match of the whole word is unambiguous.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::train::data::Record;

const LETTERS: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";

/// A character-level operation on a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The word itself.
    Copy,
    /// The word backwards.
    Reverse,
    /// Every letter shifted by `k` places (wrapping).
    Shift(u8),
    /// Every letter replaced through a permutation of the alphabet.
    Cipher([u8; 26]),
    /// Letter `i` replaced through permutation `i` (a polyalphabetic cipher).
    PositionCipher([[u8; 26]; WORD_LEN]),
}

impl Op {
    /// Applies the operation.
    pub fn apply(&self, word: &str) -> String {
        let map = |pos: usize, c: u8| -> char {
            let i = usize::from(c - b'a');
            char::from(match self {
                Op::Copy | Op::Reverse => c,
                Op::Shift(k) => b'a' + ((i as u8 + k) % 26),
                Op::Cipher(p) => p[i],
                Op::PositionCipher(ps) => ps[pos % WORD_LEN][i],
            })
        };
        match self {
            Op::Reverse => word
                .bytes()
                .rev()
                .enumerate()
                .map(|(p, c)| map(p, c))
                .collect(),
            _ => word.bytes().enumerate().map(|(p, c)| map(p, c)).collect(),
        }
    }
}

/// A random permutation of the alphabet.
pub fn permutation(rng: &mut StdRng) -> [u8; 26] {
    let mut p = *LETTERS;
    p.shuffle(rng);
    p
}

/// Letters per word. One length keeps the positional part of every operation a fixed offset,
/// so a small model learns the mechanics quickly and the adapter's capacity goes to the table.
pub const WORD_LEN: usize = 5;

/// A random word of [`WORD_LEN`] letters.
pub fn word(rng: &mut StdRng) -> String {
    (0..WORD_LEN)
        .map(|_| char::from(LETTERS[rng.random_range(0..26)]))
        .collect()
}

/// The operations the base model is pretrained on, by instruction keyword.
pub fn pretraining_ops(seed: u64) -> Vec<(String, Op)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0b5e_0b5e);
    let mut ops = vec![
        ("copy".to_string(), Op::Copy),
        ("rev".to_string(), Op::Reverse),
        ("rot1".to_string(), Op::Shift(1)),
        ("rot3".to_string(), Op::Shift(3)),
    ];
    for i in 1..=4 {
        ops.push((format!("sub{i}"), Op::Cipher(permutation(&mut rng))));
    }
    ops
}

/// Pretraining text: `"{op} {word}={result}"` lines, loss on every token.
pub fn pretraining_corpus(seed: u64, n: usize) -> Vec<Record> {
    let ops = pretraining_ops(seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0de);
    (0..n)
        .map(|_| {
            let (name, op) = &ops[rng.random_range(0..ops.len())];
            let w = word(&mut rng);
            Record::Text(format!("{name} {w}={}", op.apply(&w)))
        })
        .collect()
}

/// The fine-tuning task: the secret position-dependent cipher `enc` (none of its tables is a
/// pretraining cipher), as instruction records, on disjoint train and eval words.
pub fn finetune_task(seed: u64, n_train: usize, n_eval: usize) -> (Vec<Record>, Vec<Record>) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x005e_c2e7);
    let cipher = Op::PositionCipher(core::array::from_fn(|_| permutation(&mut rng)));
    let mut seen = BTreeSet::new();
    let mut records = Vec::with_capacity(n_train + n_eval);
    while records.len() < n_train + n_eval {
        let w = word(&mut rng);
        if seen.insert(w.clone()) {
            records.push(Record::Instruction {
                instruction: "enc".into(),
                output: cipher.apply(&w),
                input: w,
            });
        }
    }
    let eval = records.split_off(n_train);
    (records, eval)
}

/// Records as JSONL text (the demo writes its task next to its outputs).
pub fn to_jsonl(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| {
            let v = match r {
                Record::Instruction {
                    instruction,
                    input,
                    output,
                } => serde_json::json!({"instruction": instruction, "input": input, "output": output}),
                Record::Text(t) => serde_json::json!({ "text": t }),
            };
            format!("{v}\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::{BadLines, parse_jsonl};

    #[test]
    fn operations() {
        assert_eq!(Op::Reverse.apply("abcz"), "zcba");
        assert_eq!(Op::Shift(3).apply("xyza"), "abcd");
        let mut p = *LETTERS;
        p.reverse();
        assert_eq!(Op::Cipher(p).apply("abz"), "zya");
        let mut tables = [*LETTERS; WORD_LEN];
        tables[1] = p;
        assert_eq!(Op::PositionCipher(tables).apply("abzzz"), "ayzzz");
    }

    #[test]
    fn finetune_words_are_disjoint_and_jsonl_round_trips() {
        let (train, eval) = finetune_task(7, 300, 50);
        let words = |rs: &[Record]| -> BTreeSet<String> {
            rs.iter()
                .map(|r| match r {
                    Record::Instruction { input, .. } => input.clone(),
                    Record::Text(t) => t.clone(),
                })
                .collect()
        };
        assert_eq!(train.len(), 300);
        assert!(words(&train).is_disjoint(&words(&eval)));
        let back = parse_jsonl(&to_jsonl(&eval), "eval", BadLines::Stop).unwrap();
        assert_eq!(back, eval);
        // The secret cipher is none of the pretraining ones.
        let enc = match &train[0] {
            Record::Instruction { input, output, .. } => (input.clone(), output.clone()),
            Record::Text(_) => unreachable!(),
        };
        for (_, op) in pretraining_ops(7) {
            if matches!(op, Op::Cipher(_)) {
                assert_ne!(op.apply(&enc.0), enc.1);
            }
        }
    }
}
