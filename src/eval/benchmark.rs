//! The interface every benchmark implements, so that MUSE, TOFU and the next one share the
//! session, the model loading, the sharding and the report.
//!
//! Two steps, so that bad input stops a run before any model is loaded:
//! 1. [`BenchmarkArgs::prepare`]: the benchmark's options (its command-line arguments) read and
//!    check every file they name, knowing only the evaluated model's config, tokenizer and prompt
//!    template; the result is a [`Benchmark`] holding its data in memory.
//! 2. [`Benchmark::evaluate`]: evaluate a model already in memory, given as an [`EvalCtx`] (model,
//!    tokenizer, prompt template, rank group, batching). Every rank calls it together; the work is
//!    sharded as `eval::shard` describes and every rank gets the whole [`Outcome`]. It can be called again
//!    and again on the same `Benchmark` (a trainer evaluating every N steps).
//!
//! `unlearn eval <benchmark>` (`cli/eval.rs`) is the wrapper that loads models from directories,
//! evaluates the reference model a benchmark asks for first ([`Benchmark::reference_model`]),
//! and writes the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::context::EvalCtx;
use super::report::{Metric, Report, SampleRow, TruthStats};
use crate::data::{Template, Tokenizer};
use crate::model::Config;
use crate::Result;

/// What a benchmark may know of the evaluated model before its weights are loaded.
pub struct ModelFacts<'a> {
    pub config: &'a Config,
    pub tok: &'a Tokenizer,
    /// The prompt format the evaluation uses.
    pub template: &'a Template,
}

/// A benchmark's own options: the arguments of `unlearn eval <name>` after the common ones.
pub trait BenchmarkArgs {
    /// The retain model the options name, if any (its tokenizer must be the evaluated model's).
    fn retain_model(&self) -> Option<&Path>;
    /// Every file and directory the options read (the retain model included): `--out` may never
    /// be, contain or lie inside one of them.
    fn inputs(&self) -> Vec<PathBuf>;
    /// Read and check every input the options name (data files, earlier reports) before any
    /// model is loaded.
    fn prepare(&self, model: &ModelFacts) -> Result<Box<dyn Benchmark>>;
}

/// What a report says about the benchmark run.
pub struct Description {
    /// report.json's `benchmark`, e.g. "muse".
    pub name: &'static str,
    /// Whose evaluation code the numbers follow (report.json's `variant`).
    pub variant: &'static str,
    /// The data directory.
    pub data: PathBuf,
    /// Settings that change the numbers.
    pub limits: BTreeMap<String, Value>,
    /// Files read besides `data` and the models, by role (hashed into record.json): MUSE's MMLU
    /// directory, TOFU's `--retain-stats` report.
    pub inputs: Vec<(&'static str, PathBuf)>,
}

/// A benchmark with its inputs read and checked.
pub trait Benchmark {
    fn describe(&self) -> Description;
    /// A model to evaluate before the evaluated one because the metrics compare against it (the
    /// retain model), when this evaluation needs one.
    fn reference_model(&self) -> Option<&Path> {
        None
    }
    /// Measure what the metrics need from the reference model, which `ctx` holds.
    fn measure_reference(&mut self, _ctx: &EvalCtx) -> Result<()> {
        Ok(())
    }
    /// The reference model's values of this benchmark's metrics, by metric name, once
    /// [`Benchmark::measure_reference`] has measured them: what the reach rule compares with.
    fn reference_metrics(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    /// Evaluate `ctx`'s model (every rank together; every rank gets the whole outcome).
    fn evaluate(&self, ctx: &EvalCtx) -> Result<Outcome>;
}

/// Everything one evaluation of one model produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// In display order.
    pub metrics: Vec<(String, Metric)>,
    pub samples: Vec<SampleRow>,
    pub notes: Vec<String>,
    /// Where a reference number came from (MUSE's AUC_retrain), for report.json.
    pub reference: Option<Value>,
    /// Per-question statistics a later evaluation can compare against (TOFU's forget set).
    pub truth_stats: Option<TruthStats>,
    /// Seconds per part.
    pub timings_s: BTreeMap<String, f64>,
}

impl Outcome {
    /// Move the numbers into `report` (whose header is filled) and hand back the samples.
    pub fn into_report(self, report: &mut Report) -> Vec<SampleRow> {
        for (key, metric) in self.metrics {
            report.push(&key, metric);
        }
        report.notes = self.notes;
        report.reference = self.reference;
        report.truth_stats = self.truth_stats;
        report.run.timings_s = self.timings_s;
        self.samples
    }
}
