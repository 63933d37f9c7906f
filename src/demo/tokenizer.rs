//! A Gemma-style tokenizer of its own for the demo models (issue 7 groundwork): BPE trained on the
//! demo corpus with the tokenizers crate, then laid out as Gemma's — special tokens first
//! (`<pad>`, `<eos>`, `<bos>`, `<unk>`, `<mask>`, `<start_of_turn>`, `<end_of_turn>`), the 256
//! byte-fallback tokens, then the learned pieces; a normaliser replacing " " with "▁", a `<bos>`
//! post-processor, and the byte-fallback decoder — as scripts/make_fixtures.py does in Python.

use anyhow::{Result, anyhow};
use serde_json::{Value, json};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    TokenizerBuilder,
};

pub const SPECIALS: [&str; 7] = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"];

/// Trains on `texts` and returns the `tokenizer.json` text (about `vocab_size` learned entries on
/// top of the specials and bytes).
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<String> {
    let err = |e: tokenizers::Error| anyhow!("tokenizer training: {e}");
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect())
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_normalizer(Some(Replace::new(" ", "▁").map_err(err)?.into()))
            .with_pre_tokenizer(Some(
                Split::new(SplitPattern::String("▁".into()), SplitDelimiterBehavior::MergedWithNext, false)
                    .map_err(err)?
                    .into(),
            ))
            .build()
            .map_err(err)?;
    tok.train(&mut trainer, texts.iter()).map_err(err)?;
    let learned: Value = serde_json::from_str(&tok.to_string(false).map_err(err)?)?;
    let mut pieces: Vec<(String, u64)> = learned["model"]["vocab"]
        .as_object()
        .ok_or_else(|| anyhow!("trained tokenizer has no vocabulary"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    pieces.sort_by_key(|p| p.1);
    let mut vocab = serde_json::Map::new();
    let mut add = |piece: String| {
        if !vocab.contains_key(&piece) {
            let id = vocab.len();
            vocab.insert(piece, json!(id));
        }
    };
    SPECIALS.iter().for_each(|s| add(s.to_string()));
    (0..256).for_each(|b| add(format!("<0x{b:02X}>")));
    pieces.into_iter().for_each(|(p, _)| add(p));
    let bos = vocab["<bos>"].clone();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": SPECIALS.iter().map(|s| json!({"id": vocab[*s], "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})).collect::<Vec<_>>(),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [bos], "tokens": ["<bos>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": learned["model"]["merges"]}
    });
    let text = serde_json::to_string_pretty(&spec)?;
    // It must load as a tokenizer.
    tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| anyhow!("built tokenizer does not load: {e}"))?;
    Ok(text)
}
