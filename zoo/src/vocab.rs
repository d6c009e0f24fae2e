//! The zoo's character-level vocabulary and its `tokenizer.json`.
//!
//! Ids 0–3 are `<pad>`, `<s>`, `</s>`, `<unk>`; printable ASCII (space to `~`) follows from id
//! 4. The tokenizer file is a BPE model with no merges and no pre-tokenizer, which splits text
//! into single characters; its post-processor prepends `<s>` and its `Fuse` decoder joins
//! tokens without spaces, so the `tokenizers` crate and transformers' `AutoTokenizer` encode
//! exactly as [`encode`] does.

use serde_json::{Value, json};

pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const UNK: u32 = 3;
const FIRST_CHAR: u32 = 4;
const SPECIALS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

/// Number of ids in use (the model's embedding may be larger).
pub const USED: usize = FIRST_CHAR as usize + 95;

/// Token ids of `text` (no special tokens); characters outside printable ASCII are `<unk>`.
pub fn encode(text: &str) -> Vec<u32> {
    text.chars().map(|c| if (' '..='~').contains(&c) { FIRST_CHAR + (c as u32 - ' ' as u32) } else { UNK }).collect()
}

/// Text of ids, special tokens dropped.
pub fn decode(ids: &[u32]) -> String {
    ids.iter().filter(|&&i| (FIRST_CHAR..USED as u32).contains(&i)).filter_map(|&i| char::from_u32(i - FIRST_CHAR + ' ' as u32)).collect()
}

/// The `tokenizer.json` document.
pub fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert((*s).to_string(), json!(i));
    }
    for c in ' '..='~' {
        vocab.insert(c.to_string(), json!(encode(&c.to_string())[0]));
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

/// `tokenizer_config.json` for transformers.
pub fn tokenizer_config_json() -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": true, "clean_up_tokenization_spaces": false, "model_max_length": 64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = "Q: reverse abc A: cba~";
        assert_eq!(decode(&encode(s)), s);
        assert_eq!(encode("é"), vec![UNK]);
        assert_eq!(encode(" ")[0], FIRST_CHAR);
        assert_eq!(encode("~")[0] as usize, USED - 1);
    }
}
