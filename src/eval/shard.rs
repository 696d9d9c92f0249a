//! Sharded evaluation: the samples of a split are cut into batches by a fixed plan, the batches
//! are dealt to the ranks, and the per-sample results are gathered back onto every rank.
//!
//! The plan depends only on the samples' lengths and the batching options, never on the number of
//! ranks, so every sample is computed in the same batch (same rows, same padding) under
//! `mpirun -np N` as in a single process. That matters: greedy decoding takes an argmax, and
//! batching a prompt with different neighbours changes its padding and hence the floating-point
//! rounding of its logits, which can flip a near-tie. With the plan fixed, the only remaining
//! source of difference is the BLAS thread count (set OMP_NUM_THREADS equal in both runs for
//! bit-identical results).

use crate::data::batch::Example;
use crate::dist::gather::all_gather_indexed;
use crate::dist::Collective;
use crate::eval::generate::greedy_batch;
use crate::eval::score::batch_logprobs;
use crate::model::Llama;
use crate::progress::Progress;
use crate::Result;

/// How samples are grouped into forward passes.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// At most this many samples per batch.
    pub batch_size: usize,
    /// At most this many (padded) tokens per batch: rows x longest sequence. One sample longer
    /// than this still forms a batch of its own.
    pub max_batch_tokens: usize,
}

/// Batches of sample indices: longest first (ties by index), filled greedily under both limits.
pub fn plan(lengths: &[usize], b: &Batching) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut batches: Vec<Vec<usize>> = vec![];
    let mut cur: Vec<usize> = vec![];
    let mut longest = 0;
    for i in order {
        // Sorted longest first, so the first row of a batch fixes its padded length.
        let width = if cur.is_empty() { lengths[i] } else { longest };
        if !cur.is_empty() && (cur.len() >= b.batch_size.max(1) || (cur.len() + 1) * width > b.max_batch_tokens) {
            batches.push(std::mem::take(&mut cur));
        }
        if cur.is_empty() {
            longest = lengths[i];
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// This rank's batches: batch k goes to rank k mod world (strided, so long and short batches
/// spread evenly over the ranks).
fn my_batches<'a>(batches: &'a [Vec<usize>], comm: &dyn Collective) -> impl Iterator<Item = &'a Vec<usize>> {
    let (rank, world) = (comm.rank(), comm.world());
    batches.iter().enumerate().filter(move |(k, _)| k % world == rank).map(|(_, b)| b)
}

/// Greedy continuations of every prompt (at most `max_new_tokens`, stopping at any `eos`), computed
/// across the ranks; every rank returns all of them, in input order.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Llama,
    prompts: &[Vec<i64>],
    max_new_tokens: usize,
    eos: &[i64],
    pad_id: i64,
    batching: &Batching,
    comm: &dyn Collective,
    label: &str,
) -> Result<Vec<Vec<i64>>> {
    let lengths: Vec<usize> = prompts.iter().map(|p| p.len() + max_new_tokens).collect();
    let batches = plan(&lengths, batching);
    let total: usize = my_batches(&batches, comm).map(Vec::len).sum();
    let bar = Progress::new(total as u64, label);
    let mut mine = Vec::with_capacity(total);
    for batch in my_batches(&batches, comm) {
        let rows: Vec<&[i64]> = batch.iter().map(|&i| prompts[i].as_slice()).collect();
        for (gen, &i) in greedy_batch(model, &rows, max_new_tokens, eos, pad_id).into_iter().zip(batch) {
            mine.push((i, gen));
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish();
    all_gather_indexed(comm, &mine, prompts.len())
}

/// Target-token log-probabilities of every example (see [`batch_logprobs`]), computed across the
/// ranks; every rank returns all of them, in input order.
pub fn logprobs(
    model: &Llama,
    examples: &[Example],
    pad_id: i64,
    batching: &Batching,
    comm: &dyn Collective,
    label: &str,
) -> Result<Vec<Vec<f64>>> {
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let batches = plan(&lengths, batching);
    let total: usize = my_batches(&batches, comm).map(Vec::len).sum();
    let bar = Progress::new(total as u64, label);
    let mut mine = Vec::with_capacity(total);
    for batch in my_batches(&batches, comm) {
        let rows: Vec<&Example> = batch.iter().map(|&i| &examples[i]).collect();
        for (lp, &i) in batch_logprobs(model, &rows, pad_id).into_iter().zip(batch) {
            mine.push((i, lp));
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish();
    all_gather_indexed(comm, &mine, examples.len())
}

/// What every evaluation part needs: the model, its tokenizer, the rank group and how to batch.
pub struct EvalCtx<'a> {
    pub model: &'a Llama,
    pub tok: &'a crate::data::Tokenizer,
    /// Prompt format of QA prompts and answers (the one the model was trained with).
    pub template: &'a crate::data::Template,
    pub comm: &'a dyn Collective,
    /// Batches of teacher-forced scoring (bounded by the `[rows, len, vocab]` logits).
    pub score_batching: Batching,
    /// Batches of greedy generation (bounded by the KV cache; decoding is memory-bound, so more
    /// rows per step are almost free).
    pub gen_batching: Batching,
    /// Generation stops after any of these ids.
    pub eos: Vec<i64>,
    pub pad_id: i64,
}

impl EvalCtx<'_> {
    pub fn generate(&self, prompts: &[Vec<i64>], max_new_tokens: usize, label: &str) -> Result<Vec<Vec<i64>>> {
        generate(self.model, prompts, max_new_tokens, &self.eos, self.pad_id, &self.gen_batching, self.comm, label)
    }

    pub fn logprobs(&self, examples: &[Example], label: &str) -> Result<Vec<Vec<f64>>> {
        logprobs(self.model, examples, self.pad_id, &self.score_batching, self.comm, label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_respects_both_limits_and_covers_every_sample_once() {
        let lengths = [5, 9, 3, 9, 1, 7, 2];
        let b = Batching { batch_size: 3, max_batch_tokens: 20 };
        let batches = plan(&lengths, &b);
        let mut seen: Vec<usize> = batches.concat();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        assert_eq!(batches[0], vec![1, 3]); // 9, 9: a third row would make 27 > 20 tokens
        for batch in &batches {
            let width = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() <= 3 && (batch.len() == 1 || batch.len() * width <= 20), "{batch:?}");
        }
        // A sample longer than the token budget still gets a batch of its own.
        assert_eq!(plan(&[50, 1], &b), vec![vec![0], vec![1]]);
    }
}
