//! Teacher-forced per-sample scoring: the token log-probabilities of each example's targets.
//! Backs `unlearn score`, MUSE PrivLeak and the TOFU probabilities.

use std::path::Path;

use crate::data::batch::{collate, target_logprobs, Example};
use crate::error::Result;
use crate::eval::metrics::{min_k_score, MinKRounding};
use crate::eval::outputs::json_lines;
use crate::eval::shard::{batched, Batching};
use crate::model::Llama;

/// Target-token log-probabilities for every example, in input order. Examples are batched by
/// length (fewer pad tokens) and run under `no_grad`.
pub fn token_logprobs(model: &Llama, examples: &[Example], pad_id: i64, batch_size: usize, label: &str) -> Vec<Vec<f64>> {
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    batched(examples, &lengths, &Batching::rows(batch_size), label, |rows| batch_logprobs(model, rows, pad_id))
}

/// Target-token log-probabilities of one batch, exactly as given (one forward pass, no re-ordering),
/// so that callers can fix the batch composition themselves (sharded evaluation).
pub fn batch_logprobs(model: &Llama, examples: &[&Example], pad_id: i64) -> Vec<Vec<f64>> {
    let _guard = tch::no_grad_guard();
    let batch = collate(examples, pad_id, model.device());
    let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask), None);
    let lp = target_logprobs(&logits, &batch).to_device(tch::Device::Cpu).to_kind(tch::Kind::Double);
    examples
        .iter()
        .enumerate()
        .map(|(row, ex)| {
            let first = ex.n_context.max(1);
            let vals = lp.get(row as i64).narrow(0, first as i64 - 1, (ex.ids.len() - first) as i64);
            Vec::<f64>::try_from(&vals.contiguous()).expect("f64 tensor to vec")
        })
        .collect()
}

/// One line of `unlearn score` output.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SampleScore {
    pub index: usize,
    /// Number of scored (target) tokens.
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token.
    pub nll: f64,
    pub sum_nll: f64,
    /// MUSE's Min-40% score (`None` when the sample is too short for any token to be selected).
    pub min_k_40: Option<f64>,
}

pub fn summarize(index: usize, logprobs: &[f64], rounding: MinKRounding) -> SampleScore {
    let sum_nll: f64 = -logprobs.iter().sum::<f64>();
    SampleScore {
        index,
        tokens: logprobs.len(),
        nll: sum_nll / logprobs.len().max(1) as f64,
        sum_nll,
        min_k_40: min_k_score(logprobs, 0.4, rounding),
    }
}

/// The summary `unlearn score` prints and `eval nll` reports: the mean over samples of each
/// sample's mean NLL per target token (Python's `sum / len`).
pub fn mean_nll(scores: &[SampleScore]) -> f64 {
    scores.iter().map(|s| s.nll).sum::<f64>() / scores.len() as f64
}

/// Write scores as JSON lines, atomically.
pub fn write_scores(path: &Path, scores: &[SampleScore]) -> Result<()> {
    crate::model::weights::write_atomic(path, json_lines(scores).as_bytes())
}
