//! A GGUF's tokenizer (vocabulary, merges and special tokens stored as `tokenizer.*` metadata)
//! rebuilt as the HF `tokenizer.json` + `tokenizer_config.json` pair that
//! [`crate::data::Tokenizer`] and transformers load.
//!
//! Only llama.cpp's `gpt2` tokenizer model (byte-level BPE: SmolLM2, Llama 3, StarCoder, ...) is
//! supported. What a GGUF does not store is how text is split before BPE: llama.cpp names it
//! with `tokenizer.ggml.pre` and hard-codes the regexes per name. We map the names whose HF
//! equivalent is known exactly and refuse the others, since a wrong split silently changes
//! token ids.

use serde_json::{json, Map, Value};

use super::reader::GgufFile;
use crate::error::{Error, Result};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Llama 3's split regex, as in its `tokenizer.json` (llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The two files, ready to be written.
#[derive(Debug, Clone)]
pub struct HfTokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    /// Number of entries in the vocabulary.
    pub vocab_size: usize,
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The HF pre-tokenizer that splits text as llama.cpp's pre-tokenizer type `pre` does.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    Some(match pre {
        // GPT-2's regex, which ByteLevel applies itself.
        "gpt-2" => byte_level(true),
        // llama.cpp splits off every digit (`\p{N}`), then applies GPT-2's regex to the rest:
        // the `Digits(individual) + ByteLevel` sequence of SmolLM2's and StarCoder's tokenizer.json.
        "smollm" | "starcoder" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)],
        }),
        "llama3" | "llama-v3" | "llama-bpe" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ],
        }),
        _ => return None,
    })
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special,
    })
}

/// `[bos] $A [eos]` as the tokenizer's `add_bos_token` / `add_eos_token` ask.
fn post_processor(bos: Option<&str>, bos_id: Option<i64>, eos: Option<&str>, eos_id: Option<i64>) -> Value {
    let mut specials = Map::new();
    let mut around = |seq: &str, type_id: u32| -> Vec<Value> {
        let mut v = vec![];
        if let (Some(t), Some(id)) = (bos, bos_id) {
            v.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
            specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        v.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let (Some(t), Some(id)) = (eos, eos_id) {
            v.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
            specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        v
    };
    let single = around("A", 0);
    let mut pair = single.clone();
    pair.extend(around("B", 1));
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// Build `tokenizer.json` and `tokenizer_config.json` from `g`'s metadata.
pub fn hf_tokenizer_from_gguf(g: &GgufFile, model_max_length: i64) -> Result<HfTokenizerFiles> {
    let path = g.path();
    let model = g
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| Error::format(path, "no tokenizer in this GGUF (missing `tokenizer.ggml.model`)"))?;
    if model != "gpt2" {
        return Err(Error::unsupported(path, format!("GGUF tokenizer model `{model}` (supported: gpt2, i.e. byte-level BPE)")));
    }
    let pre_name = g.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre = pre_tokenizer(pre_name).ok_or_else(|| {
        Error::unsupported(path, format!("GGUF pre-tokenizer `{pre_name}` (supported: gpt-2, smollm, starcoder, llama-bpe/llama3)"))
    })?;
    let tokens =
        g.get_str_array("tokenizer.ggml.tokens")?.ok_or_else(|| Error::format(path, "missing metadata `tokenizer.ggml.tokens`"))?;
    let merges =
        g.get_str_array("tokenizer.ggml.merges")?.ok_or_else(|| Error::format(path, "missing metadata `tokenizer.ggml.merges`"))?;
    let types = g.get_int_array("tokenizer.ggml.token_type")?.unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(Error::format(
            path,
            format!("`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}", types.len(), tokens.len()),
        ));
    }

    let mut vocab = Map::new();
    for (id, tok) in tokens.iter().enumerate() {
        // A name listed twice keeps its last id, as transformers' GGUF loader does.
        if let Some(prev) = vocab.insert(tok.to_string(), json!(id)) {
            tracing::warn!("{}: token {tok:?} appears at ids {prev} and {id}; keeping {id}", path.display());
        }
    }
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split(' ').collect::<Vec<_>>().as_slice() {
            [a, b] => Ok(json!([a, b])),
            _ => Err(Error::format(path, format!("`tokenizer.ggml.merges[{i}]` = {m:?} is not two tokens separated by one space"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED)
        .map(|(id, (tok, &ty))| added_token(id, tok, ty == TOKEN_CONTROL))
        .collect();

    let token_of = |key: &str| -> Result<(Option<i64>, Option<&str>)> {
        let Some(id) = g.get_i64(key)? else { return Ok((None, None)) };
        let tok = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get(i))
            .copied()
            .ok_or_else(|| Error::format(path, format!("`{key}` = {id} is outside the vocabulary of {} tokens", tokens.len())))?;
        Ok((Some(id), Some(tok)))
    };
    let (bos_id, bos) = token_of("tokenizer.ggml.bos_token_id")?;
    let (eos_id, eos) = token_of("tokenizer.ggml.eos_token_id")?;
    let (_, unk) = token_of("tokenizer.ggml.unknown_token_id")?;
    let (_, pad) = token_of("tokenizer.ggml.padding_token_id")?;
    // transformers reads a missing flag as "do not add" for byte-level vocabularies.
    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post_processor(bos.filter(|_| add_bos), bos_id, eos.filter(|_| add_eos), eos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(template) = g.get_str("tokenizer.chat_template")? {
        cfg["chat_template"] = json!(template);
    }
    Ok(HfTokenizerFiles { tokenizer_json, tokenizer_config: cfg, vocab_size: tokens.len() })
}
