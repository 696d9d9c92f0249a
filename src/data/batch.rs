//! Records → token examples → padded batches. The one place that decides which tokens are
//! targets, shared by training, `score` and evaluation so that they can never disagree.
//!
//! QA records are formatted by the run's prompt template (`data::template`; by default
//! `"Question: {q}\nAnswer:"` followed by `" {a}"` and EOS) and only the answer tokens (with the
//! end of the answer: EOS or the chat format's end-of-turn token) are targets. Text records are
//! tokenized with specials and every token after the first is a target.

use tch::{Device, Kind, Tensor};

use super::formats::Record;
use super::template::Template;
use super::tokenizer::Tokenizer;
use crate::error::Result;

pub use super::template::{qa_answer, qa_prompt};

/// A tokenized sample: `ids[n_context..]` are the targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<i64>,
    /// Leading tokens that are context only (the prompt, or the first token of a text).
    pub n_context: usize,
}

impl Example {
    pub fn n_targets(&self) -> usize {
        self.ids.len().saturating_sub(self.n_context.max(1))
    }
}

/// How long text is handled when it exceeds `max_len`. Every mode cuts text as transformers'
/// `tokenizer(text, truncation=True, max_length=max_len, return_overflowing_tokens=...)` does
/// ([`Tokenizer::encode_chunks`]): specials such as Llama-2's BOS start *every* chunk. QA records
/// are never chunked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Keep the first chunk (`truncation=True`; MUSE-News forget set in the mean-teacher recipe).
    Truncate,
    /// Keep every chunk, the short tail included (mt-unlearn's `dataset.py` with `chunking=True`,
    /// used for the MUSE-Books forget set: a forget text's ending must be unlearned too).
    Chunk,
    /// Keep only chunks of exactly `max_len` tokens (mt-unlearn's `tokenize_webtext.py` for the
    /// KL/QKL pretraining text): no padding in the penalty's B×T divisor, and no over-weighting
    /// of document endings. Texts shorter than `max_len` contribute nothing.
    ChunkExact,
}

/// Tokenize one record. QA answers are cut at `max_len` total tokens; a prompt that leaves no room
/// for any answer token is an error naming the record. Text chunks with fewer than two tokens (no
/// target) are dropped.
pub fn tokenize(tok: &Tokenizer, template: &Template, rec: &Record, max_len: usize, overflow: Overflow) -> Result<Vec<Example>> {
    match rec {
        Record::Qa { question, answer } => {
            let (mut ids, n_context) = template.qa_tokens(tok, question, answer)?;
            if n_context >= max_len {
                return Err(crate::other!(
                    "a question is {n_context} tokens, which leaves no answer token within max_len {max_len}: {question:?}"
                ));
            }
            ids.truncate(max_len);
            Ok(vec![Example { ids, n_context }])
        }
        Record::Text(text) => {
            let mut chunks = tok.encode_chunks(text, max_len)?;
            match overflow {
                Overflow::Truncate => chunks.truncate(1),
                Overflow::Chunk => {}
                Overflow::ChunkExact => chunks.retain(|c| c.len() == max_len),
            }
            Ok(chunks.into_iter().filter(|c| c.len() >= 2).map(|ids| Example { ids, n_context: 1 }).collect())
        }
    }
}

/// Tokenize a list of records (flattening chunks), failing with the index of a bad record.
pub fn tokenize_all(tok: &Tokenizer, template: &Template, records: &[Record], max_len: usize, overflow: Overflow) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let ex = tokenize(tok, template, r, max_len, overflow).map_err(|e| crate::other!("record {i}: {e}"))?;
        out.extend(ex);
    }
    if out.is_empty() && overflow == Overflow::ChunkExact && records.iter().any(|r| matches!(r, Record::Text(_))) {
        return Err(crate::other!("no text reaches max_len {max_len} tokens, and `chunk-exact` keeps only full chunks"));
    }
    Ok(out)
}

/// A right-padded batch on a device.
pub struct Batch {
    /// `[b, t]` int64 token ids, padding = pad id.
    pub input_ids: Tensor,
    /// `[b, t]` int64, 1 for real tokens.
    pub attention_mask: Tensor,
    /// `[b, t-1]` float, 1 where `input_ids[:, j+1]` is a target predicted at position j.
    pub target_mask: Tensor,
    /// Number of target tokens in the batch.
    pub n_targets: i64,
}

impl Batch {
    pub fn size(&self) -> i64 {
        self.input_ids.size()[0]
    }

    /// Targets `[b, t-1]`: the input ids shifted left by one.
    pub fn targets(&self) -> Tensor {
        let t = self.input_ids.size()[1];
        self.input_ids.narrow(1, 1, t - 1)
    }
}

/// Right-pad examples into a batch (padding at the end, so positions 0..len are the natural ones
/// and transformers' default position ids agree).
pub fn collate(examples: &[&Example], pad_id: i64, device: Device) -> Batch {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(2).max(2);
    let b = examples.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i64; b * t];
    let mut targets = vec![0f32; b * (t - 1)];
    let mut n_targets = 0i64;
    for (r, e) in examples.iter().enumerate() {
        ids[r * t..r * t + e.ids.len()].copy_from_slice(&e.ids);
        mask[r * t..r * t + e.ids.len()].fill(1);
        for j in e.n_context.max(1)..e.ids.len() {
            targets[r * (t - 1) + j - 1] = 1.0;
            n_targets += 1;
        }
    }
    let shape = [b as i64, t as i64];
    Batch {
        input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        target_mask: Tensor::from_slice(&targets).view([b as i64, t as i64 - 1]).to_device(device),
        n_targets,
    }
}

/// Per-token log-probability of each target, `[b, t-1]` fp32 (zero where not a target).
/// Computed in fp32 whatever the model dtype, as the reference losses do.
pub fn target_logprobs(logits_btv: &Tensor, batch: &Batch) -> Tensor {
    let t = logits_btv.size()[1];
    let lp = logits_btv.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
    lp.gather(-1, &batch.targets().unsqueeze(-1), false).squeeze_dim(-1) * &batch.target_mask
}
