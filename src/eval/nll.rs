//! Forget and retain NLL on chosen slices of data files: the teacher-forced answer NLL that
//! `unlearn score` computes, as a benchmark, so that a run can watch it (`[eval.nll]`, the reach
//! rule on `nll.forget_nll`) and `unlearn eval nll` can report it with the same sharding.
//!
//! A slice is records `offset .. offset + max_samples` of a file in any format `data.forget`
//! accepts (QA or text records, formatted by the run's prompt template exactly as training and
//! `unlearn score` format them). A retain slice past `data.retain_limit` is data the run never
//! trained on. The metric is `unlearn score`'s summary: the mean over samples of each sample's mean
//! NLL per target token (every sample weighs the same, whatever its length); the token count is in
//! the report. With `--retain-model`, the retain model's NLLs on the same slices are measured first
//! and are the reference of the reach rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::benchmark::{Benchmark, BenchmarkArgs, Description, ModelFacts, Outcome};
use super::context::EvalCtx;
use super::metrics::MinKRounding;
use super::report::{Metric, SampleRow};
use super::score::{mean_nll, summarize, SampleScore};
use crate::data::{read_records, tokenize, Example, Overflow, Record};
use crate::error::{Error, Result};

/// `unlearn eval nll` options.
#[derive(clap::Args, Debug)]
pub struct NllArgs {
    /// Forget data file (any format data.forget accepts: JSON array, JSON arrays per line, JSON
    /// lines, .txt, .parquet; QA or text records).
    #[arg(long)]
    pub forget: Option<PathBuf>,
    /// Retain data file (the same formats), e.g. the run's data.retain with --retain-offset past
    /// the records it trained on.
    #[arg(long)]
    pub retain: Option<PathBuf>,
    /// Skip the first N records of each file.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Skip the first N records of the forget file [default: --offset].
    #[arg(long)]
    pub forget_offset: Option<usize>,
    /// Skip the first N records of the retain file [default: --offset].
    #[arg(long)]
    pub retain_offset: Option<usize>,
    /// Use at most N records of each file after its offset.
    #[arg(long, value_parser = crate::cli::at_least_one)]
    pub max_samples: Option<usize>,
    /// Cut each sample at this many tokens, as `unlearn score --max-len` does (a text keeps its
    /// first chunk).
    #[arg(long, default_value_t = 512, value_parser = crate::cli::at_least_one)]
    pub max_len: usize,
    /// Retain model whose NLLs on the same slices are measured first (the reference of
    /// `stop.reach = "nll.forget_nll"`): a directory, or a hub id `org/name` in the local Hugging
    /// Face cache.
    #[arg(long, value_parser = crate::model::hub::model_arg)]
    pub retain_model: Option<PathBuf>,
}

impl BenchmarkArgs for NllArgs {
    fn retain_model(&self) -> Option<&Path> {
        self.retain_model.as_deref()
    }

    fn inputs(&self) -> Vec<PathBuf> {
        [self.forget.clone(), self.retain.clone(), self.retain_model.clone()].into_iter().flatten().collect()
    }

    fn prepare(&self, model: &ModelFacts) -> Result<Box<dyn Benchmark>> {
        if self.forget.is_none() && self.retain.is_none() {
            return Err(crate::other!("eval nll: give --forget FILE, --retain FILE or both"));
        }
        let mut splits = vec![];
        for (key, path, offset) in [
            ("forget", &self.forget, self.forget_offset.unwrap_or(self.offset)),
            ("retain", &self.retain, self.retain_offset.unwrap_or(self.offset)),
        ] {
            let Some(path) = path else { continue };
            splits.push(Slice::load(key, path, offset, self.max_samples, self.max_len, model)?);
        }
        Ok(Box::new(Nll { splits, max_len: self.max_len, max_samples: self.max_samples, retain_model: self.retain_model.clone(), reference: None }))
    }
}

/// The tokenized samples of one slice of one file.
struct Slice {
    /// "forget" or "retain": the metric is `<key>_nll`.
    key: &'static str,
    path: PathBuf,
    offset: usize,
    /// Record index in the file and its text (for samples.jsonl), one per example.
    samples: Vec<(usize, String)>,
    /// What is scored, kept apart so that each evaluation borrows them instead of copying.
    examples: Vec<Example>,
}

impl Slice {
    fn load(key: &'static str, path: &Path, offset: usize, limit: Option<usize>, max_len: usize, model: &ModelFacts) -> Result<Slice> {
        let records = read_records(path)?;
        if offset >= records.len() {
            return Err(Error::format(path, format!("has {} records, so a {key} offset of {offset} leaves none to evaluate", records.len())));
        }
        let end = limit.map_or(records.len(), |n| records.len().min(offset + n));
        let (mut samples, mut examples) = (vec![], vec![]);
        for (i, rec) in records.iter().enumerate().take(end).skip(offset) {
            let ex = tokenize(model.tok, model.template, rec, max_len, Overflow::Truncate).map_err(|e| Error::format(path, format!("record {i}: {e}")))?;
            let text = match rec {
                Record::Qa { question, answer } => format!("{question}\n{answer}"),
                Record::Text(t) => t.clone(),
            };
            // A text of fewer than two tokens has no target: it cannot be scored.
            for e in ex {
                samples.push((i, text.clone()));
                examples.push(e);
            }
        }
        if samples.is_empty() {
            return Err(Error::format(path, format!("records {offset}..{end} have no target token to score")));
        }
        Ok(Slice { key, path: path.to_path_buf(), offset, samples, examples })
    }

    /// Per-sample scores of `ctx`'s model (sharded; every rank gets them all).
    fn score(&self, ctx: &EvalCtx, label: &str) -> Result<Vec<SampleScore>> {
        let lps = ctx.logprobs(&self.examples, label)?;
        Ok(lps.iter().zip(&self.samples).map(|(lp, (i, _))| summarize(*i, lp, MinKRounding::Floor)).collect())
    }

    fn records(&self) -> String {
        let last = self.samples.last().map_or(self.offset, |s| s.0);
        format!("records {}..={last} of {}", self.offset, self.path.display())
    }
}

/// An NLL evaluation with its slices read and tokenized.
pub struct Nll {
    splits: Vec<Slice>,
    max_len: usize,
    max_samples: Option<usize>,
    retain_model: Option<PathBuf>,
    /// The retain model's `<split>_nll`, once measured.
    reference: Option<BTreeMap<String, f64>>,
}

impl Benchmark for Nll {
    fn describe(&self) -> Description {
        let mut limits: BTreeMap<String, serde_json::Value> =
            BTreeMap::from([("max_len".into(), json!(self.max_len)), ("max_samples".into(), json!(self.max_samples))]);
        for s in &self.splits {
            limits.insert(format!("{}_offset", s.key), json!(s.offset));
        }
        let inputs = self.splits.iter().skip(1).map(|s| (s.key, s.path.clone())).collect();
        Description { name: "nll", variant: "unlearn-score", data: self.splits[0].path.clone(), limits, inputs }
    }
    fn reference_model(&self) -> Option<&Path> {
        self.retain_model.as_deref()
    }
    fn measure_reference(&mut self, ctx: &EvalCtx) -> Result<()> {
        let mut values = BTreeMap::new();
        for s in &self.splits {
            values.insert(format!("{}_nll", s.key), mean_nll(&s.score(ctx, &format!("retain model {}", s.key))?));
        }
        self.reference = Some(values);
        Ok(())
    }
    fn reference_metrics(&self) -> BTreeMap<String, f64> {
        self.reference.clone().unwrap_or_default()
    }
    fn evaluate(&self, ctx: &EvalCtx) -> Result<Outcome> {
        let mut out = Outcome::default();
        for s in &self.splits {
            let t = std::time::Instant::now();
            let scores = s.score(ctx, s.key)?;
            let tokens: usize = scores.iter().map(|x| x.tokens).sum();
            let key = format!("{}_nll", s.key);
            let definition = format!(
                "mean over the {} samples ({}) of each sample's mean NLL per target token ({tokens} tokens in all; answer tokens of QA records in the {} template, tokens 2..n of texts; cut at {} tokens), as `unlearn score` prints it",
                scores.len(),
                s.records(),
                ctx.template.name(),
                self.max_len
            );
            out.metrics.push((key.clone(), Metric::new(mean_nll(&scores), definition, scores.len(), "toward retain")));
            out.notes.push(format!("{}: {} samples, {tokens} target tokens ({})", s.key, scores.len(), s.records()));
            for (sc, (_, text)) in scores.iter().zip(&s.samples) {
                out.samples.push(SampleRow::new(&key, sc.index, text, None, None, json!({"nll": sc.nll, "tokens": sc.tokens, "sum_nll": sc.sum_nll})));
            }
            out.timings_s.insert(key, t.elapsed().as_secs_f64());
        }
        if let (Some(values), Some(dir)) = (&self.reference, &self.retain_model) {
            out.reference = Some(json!({"retain_model": dir.display().to_string(), "values": values}));
        }
        Ok(out)
    }
}
