//! The demo's character-level tokenizer, built with the `tokenizers` crate and saved as an
//! ordinary `tokenizer.json` (WordLevel over single characters, a split into characters, a fuse
//! decoder), so transformers' `PreTrainedTokenizerFast` reads it too.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Special tokens first (ids 0..4), then the characters the demo's text uses.
pub const SPECIALS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];
const CHARS: &str = " =abcdefghijklmnopqrstuvwxyz0123456789";

/// Builds the tokenizer.
pub fn build() -> Result<Tokenizer> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert((*s).to_string(), i as u32);
    }
    for (i, c) in CHARS.chars().enumerate() {
        vocab.insert(c.to_string(), (SPECIALS.len() + i) as u32);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| anyhow::anyhow!("building the vocabulary: {e}"))?;
    let mut tok = Tokenizer::new(model);
    let split = Split::new(
        SplitPattern::Regex("[\\s\\S]".into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow::anyhow!("building the splitter: {e}"))?;
    tok.with_pre_tokenizer(Some(split));
    tok.with_decoder(Some(Fuse::new()));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;
    Ok(tok)
}

/// Vocabulary size of [`build`].
pub fn vocab_size() -> usize {
    SPECIALS.len() + CHARS.chars().count()
}

/// Writes `tokenizer.json` into `dir`.
pub fn save(tok: &Tokenizer, dir: &Path) -> Result<()> {
    let json = tok
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    qdylora_formats::atomic::write_file(&dir.join("tokenizer.json"), json.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::TextCodec;

    #[test]
    fn characters_round_trip_and_specials_are_found() {
        let codec = TextCodec::new(build().unwrap()).unwrap();
        assert_eq!(codec.vocab_size(), vocab_size());
        assert_eq!((codec.pad, codec.bos, codec.eos), (0, 1, 2));
        let ids = codec.encode("enc abc=xyz").unwrap();
        assert_eq!(ids.len(), 11);
        assert_eq!(codec.decode(&ids).unwrap(), "enc abc=xyz");
        assert!(ids.iter().all(|&i| i >= 4));
    }
}
