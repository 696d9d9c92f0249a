//! `tokenizer.json` through the `tokenizers` crate (SentencePiece-style Llama-2 and byte-level BPE
//! Llama-3/SmolLM2 tokenizers alike), plus the special-token ids the trainer needs.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::Config;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    eos_id: Option<i64>,
    pad_id: i64,
}

impl Tokenizer {
    /// Load `dir/tokenizer.json` and check it fits the model's embedding table.
    pub fn from_model_dir(dir: &Path, cfg: &Config) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::format(dir, "no tokenizer.json in this directory"));
        }
        let text = crate::files::read_text(&path)?;
        // The tokenizers crate panics on a JSON syntax error inside `decoder`: check syntax first.
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
        let mut inner = text.parse::<tokenizers::Tokenizer>().map_err(|e| Error::format(&path, format!("cannot load tokenizer: {e}")))?;
        // transformers ignores a truncation or padding saved in tokenizer.json unless a call asks
        // for one (`set_truncation_and_padding` clears them), so do we.
        inner.with_truncation(None).map_err(|e| Error::format(&path, format!("cannot clear truncation: {e}")))?;
        inner.with_padding(None);
        let n = inner.get_vocab_size(true) as i64;
        if n > cfg.vocab_size {
            return Err(Error::format(
                &path,
                format!(
                    "tokenizer has {n} tokens but config.json says vocab_size {}: tokenizer and model do not belong together",
                    cfg.vocab_size
                ),
            ));
        }
        let named = |key: &str| -> Option<i64> {
            let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            let tok = match v.get(key)? {
                Value::String(s) => s.clone(),
                Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            inner.token_to_id(&tok).map(i64::from)
        };
        let eos_id = cfg.eos_token_ids.first().copied().or_else(|| named("eos_token"));
        let pad_id = cfg.pad_token_id.or_else(|| named("pad_token")).or(eos_id).unwrap_or(0);
        Ok(Tokenizer { inner, path, eos_id, pad_id })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of a token given by its text (`<|eot_id|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The texts of the added tokens (specials such as `<|im_end|>`): the pieces that the
    /// tokenizer matches whole in any text, before its model splits the rest.
    pub fn added_tokens(&self) -> Vec<String> {
        let mut out: Vec<(u32, String)> = self.inner.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.content)).collect();
        out.sort();
        out.into_iter().map(|(_, t)| t).collect()
    }

    /// Token ids of `text`; `special` adds the tokenizer's own specials (e.g. Llama's BOS),
    /// as `tokenizer(text)` does in transformers.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, special).map_err(|e| Error::format(&self.path, format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// transformers' `tokenizer(text, truncation=True, max_length=max_len,
    /// return_overflowing_tokens=True)` (stride 0): the text's tokens cut into consecutive pieces
    /// of `max_len` minus the specials the tokenizer adds, each piece then given those specials
    /// (so a Llama-2 tokenizer puts BOS at the start of every chunk, SmolLM2's adds nothing).
    /// Done with the tokenizers crate's own truncation and post-processor, as transformers does.
    pub fn encode_chunks(&self, text: &str, max_len: usize) -> Result<Vec<Vec<i64>>> {
        use tokenizers::PostProcessor;
        let n_special = self.inner.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if max_len <= n_special {
            return Err(Error::format(
                &self.path,
                format!("max_len {max_len} leaves no room next to the {n_special} special token(s) this tokenizer adds"),
            ));
        }
        let mut enc = self.inner.encode(text, false).map_err(|e| Error::format(&self.path, format!("cannot encode text: {e}")))?;
        enc.truncate(max_len - n_special, 0, tokenizers::TruncationDirection::Right);
        let enc =
            self.inner.post_process(enc, None, true).map_err(|e| Error::format(&self.path, format!("cannot add special tokens: {e}")))?;
        let ids = |e: &tokenizers::Encoding| e.get_ids().iter().map(|&i| i as i64).collect::<Vec<_>>();
        Ok(std::iter::once(ids(&enc)).chain(enc.get_overflowing().iter().map(ids)).collect())
    }

    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special).map_err(|e| Error::format(&self.path, format!("cannot decode ids: {e}")))
    }

    /// End-of-sequence id: `eos_token_id` of config.json, else `eos_token` of tokenizer_config.json.
    pub fn eos_id(&self) -> Result<i64> {
        self.eos_id.ok_or_else(|| Error::format(&self.path, "no eos_token_id in config.json nor eos_token in tokenizer_config.json"))
    }

    /// Padding id (pad token if any, else EOS, as the reference trainers do).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A fingerprint of the vocabulary, to detect two models with different tokenizers.
    pub fn vocab_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut vocab: Vec<(String, u32)> = self.inner.get_vocab(true).into_iter().collect();
        vocab.sort_by_key(|(_, id)| *id);
        let mut h = Sha256::new();
        for (tok, id) in vocab {
            h.update(id.to_le_bytes());
            h.update(tok.as_bytes());
        }
        format!("{:x}", h.finalize())
    }
}
