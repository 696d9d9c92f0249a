//! The command line of `unlearn eval <benchmark>`: the options every benchmark shares, followed by
//! the benchmark's own ([`super::benchmark::BenchmarkArgs`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::shard::Batching;
use crate::config::parse_choice;
use crate::data::TemplateKind;

/// `unlearn eval <benchmark>`: the shared options, then the benchmark's.
#[derive(clap::Args, Debug)]
pub struct EvalCmd<A: clap::Args> {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub bench: A,
}

/// Options shared by every benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// HF model directory to evaluate, or a hub id `org/name` in the local Hugging Face cache.
    #[arg(long, value_parser = crate::model::hub::model_arg)]
    pub model: PathBuf,
    /// Prompt template of QA prompts and answers: phi-qa, llama2-chat, llama3-chat, chatml or model
    /// [default: data.template of the training run whose config.toml is next to --model, else phi-qa].
    #[arg(long, value_parser = parse_choice::<TemplateKind>)]
    pub template: Option<TemplateKind>,
    /// Output directory (report.json, report.md, samples.jsonl, metrics.svg, record.json); replaced
    /// when done.
    #[arg(long)]
    pub out: PathBuf,
    /// Label in tables and plots (default: the model directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Earlier evaluation output directories to show before this one in report.md and the plot.
    #[arg(long)]
    pub compare: Vec<PathBuf>,
    /// Samples per scoring forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Upper bound on rows x padded length of a scoring batch (its logits take 4 x vocab bytes
    /// per token, twice).
    #[arg(long, default_value_t = 4096)]
    pub max_batch_tokens: usize,
    /// Prompts decoded together (greedy decoding reads every weight once per step, whatever the
    /// number of rows, so larger batches are much faster on CPU).
    #[arg(long, default_value_t = 32)]
    pub gen_batch_size: usize,
    /// Upper bound on rows x (prompt + new tokens) of a generation batch (KV-cache memory).
    #[arg(long, default_value_t = 65536)]
    pub max_gen_batch_tokens: usize,
    /// Compute dtype: fp32 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Rank group: auto (MPI under mpirun), none, mpi or nccl.
    #[arg(long, default_value = "auto")]
    pub dist: String,
    /// Replace a non-empty --out that is not an earlier evaluation (its files are deleted).
    #[arg(long)]
    pub overwrite: bool,
}

impl CommonArgs {
    /// Batches of teacher-forced scoring.
    pub fn score_batching(&self) -> Batching {
        Batching { batch_size: self.batch_size, max_batch_tokens: self.max_batch_tokens }
    }

    /// Batches of greedy generation.
    pub fn gen_batching(&self) -> Batching {
        Batching { batch_size: self.gen_batch_size, max_batch_tokens: self.max_gen_batch_tokens }
    }

    /// The batching limits, for the report.
    pub fn limits(&self) -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("batch_size".into(), json!(self.batch_size)),
            ("max_batch_tokens".into(), json!(self.max_batch_tokens)),
            ("gen_batch_size".into(), json!(self.gen_batch_size)),
            ("max_gen_batch_tokens".into(), json!(self.max_gen_batch_tokens)),
        ])
    }
}
