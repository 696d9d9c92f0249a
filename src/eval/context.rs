//! What every evaluation part runs on: a model already in memory, its tokenizer and prompt
//! template, the rank group and how to batch. `unlearn eval` builds one from a model directory; a trainer can build one
//! from the model it is training (see [`crate::eval::benchmark`]).

use crate::data::batch::Example;
use crate::data::{Template, Tokenizer};
use crate::dist::Collective;
use crate::eval::generate::greedy_batch;
use crate::eval::score::batch_logprobs;
use crate::eval::shard::{sharded, Batching};
use crate::model::Llama;
use crate::Result;

pub struct EvalCtx<'a> {
    pub model: &'a Llama,
    pub tok: &'a Tokenizer,
    /// Prompt format of QA prompts and answers (the one the model was trained with).
    pub template: &'a Template,
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

impl<'a> EvalCtx<'a> {
    /// `config_eos`: the model config's EOS ids; the tokenizer's own EOS is added when it has one,
    /// and so is the template's end-of-turn token (a chat answer ends there even when config.json
    /// does not list it).
    pub fn new(
        model: &'a Llama,
        tok: &'a Tokenizer,
        template: &'a Template,
        comm: &'a dyn Collective,
        config_eos: &[i64],
        score_batching: Batching,
        gen_batching: Batching,
    ) -> EvalCtx<'a> {
        let mut eos = config_eos.to_vec();
        for e in tok.eos_id().ok().into_iter().chain(template.stop_ids()) {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        EvalCtx { model, tok, template, comm, score_batching, gen_batching, eos, pad_id: tok.pad_id() }
    }

    /// Greedy continuations of every prompt (at most `max_new_tokens`, stopping at any EOS),
    /// computed across the ranks; every rank returns all of them, in input order.
    pub fn generate(&self, prompts: &[Vec<i64>], max_new_tokens: usize, label: &str) -> Result<Vec<Vec<i64>>> {
        let lengths: Vec<usize> = prompts.iter().map(|p| p.len() + max_new_tokens).collect();
        sharded(prompts, &lengths, &self.gen_batching, self.comm, label, |rows| {
            let rows: Vec<&[i64]> = rows.iter().map(|p| p.as_slice()).collect();
            greedy_batch(self.model, &rows, max_new_tokens, &self.eos, self.pad_id)
        })
    }

    /// Target-token log-probabilities of every example (see [`batch_logprobs`]), computed across
    /// the ranks; every rank returns all of them, in input order.
    pub fn logprobs(&self, examples: &[Example], label: &str) -> Result<Vec<Vec<f64>>> {
        let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
        sharded(examples, &lengths, &self.score_batching, self.comm, label, |rows| batch_logprobs(self.model, rows, self.pad_id))
    }
}
