//! `unlearn eval muse|tofu`: benchmark evaluation of one model, sharded over the ranks when run
//! under `mpirun` (every rank computes its share of the batches; rank 0 writes the outputs).
//!
//! Outputs in `--out`: report.json, report.md, samples.jsonl, metrics.svg (replaced as a whole,
//! only once everything has been computed). `--compare DIR` (repeatable) puts earlier reports
//! next to this one in report.md and the plot; `unlearn report` does the same for any set of
//! finished evaluations plus training curves.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::Tokenizer;
use crate::dist;
use crate::error::{Error, Result};
use crate::eval::muse::{self, AucReference, Corpus, MuseOptions, Part, Variant};
use crate::eval::report::{write_eval_outputs, ModelInfo, Report, RunInfo, SampleRow, TruthStats};
use crate::eval::shard::{Batching, EvalCtx};
use crate::eval::tofu::{self, RetainStats, TofuOptions, TRUTH_STAT_DEFINITION};
use crate::model::{load_model, parse_device, parse_kind, Config, LoadedModel};
use crate::record::{Input, Record};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub bench: EvalBench,
}

#[derive(clap::Subcommand, Debug)]
pub enum EvalBench {
    /// MUSE: VerbMem, KnowMem (forget, retain), PrivLeak and MMLU.
    Muse(MuseArgs),
    /// TOFU: Forget Quality, Model Utility and their components.
    Tofu(TofuArgs),
}

/// Options shared by both benchmarks.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// HF model directory to evaluate.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (report.json, report.md, samples.jsonl, metrics.svg); replaced when done.
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
}

#[derive(clap::Args, Debug)]
pub struct MuseArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Corpus directory, e.g. ../shared/data/muse/news (verbmem/, knowmem/, privleak/).
    #[arg(long)]
    pub data: PathBuf,
    /// MMLU subsample directory [default: DATA/../mmlu_subsample].
    #[arg(long)]
    pub mmlu: Option<PathBuf>,
    /// Parts to run (comma separated); a requested part with missing files is an error.
    /// Default: every part whose files exist (the others are skipped with a note).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub parts: Option<Vec<Part>>,
    /// Which code's choices to follow where MUSE's original and open-unlearning differ.
    #[arg(long, value_enum, default_value_t = Variant::Muse)]
    pub variant: Variant,
    /// Corpus, for the PrivLeak reference AUC constant [default: from the data directory name].
    #[arg(long, value_enum)]
    pub corpus: Option<Corpus>,
    /// Reference (retrained model) AUC for PrivLeak.
    #[arg(long, conflicts_with = "retain_model")]
    pub retain_auc: Option<f64>,
    /// Retained model whose forget-vs-holdout AUC, measured now, is the PrivLeak reference.
    #[arg(long)]
    pub retain_model: Option<PathBuf>,
    /// Use only the first N samples of every split.
    #[arg(long)]
    pub max_samples: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens_verbmem: usize,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens_knowmem: usize,
    #[arg(long, default_value_t = 4)]
    pub max_new_tokens_mmlu: usize,
    /// Keep only the last N tokens of long generation prompts (leading BOS kept). Not in MUSE.
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Cut PrivLeak texts after N tokens [default: none; 2048 with --variant open-unlearning].
    #[arg(long)]
    pub max_text_tokens: Option<usize>,
}

#[derive(clap::Args, Debug)]
pub struct TofuArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Forget split: forget01, forget05 or forget10 (reads FORGET_perturbed.json).
    #[arg(long)]
    pub forget: String,
    /// TOFU data directory.
    #[arg(long, default_value = "../shared/data/tofu")]
    pub data: PathBuf,
    /// Retain model, evaluated now on the forget set, for Forget Quality.
    #[arg(long, conflicts_with = "retain_stats")]
    pub retain_model: Option<PathBuf>,
    /// report.json (or its directory) of an earlier `eval tofu` of the retain model.
    #[arg(long)]
    pub retain_stats: Option<PathBuf>,
    /// Use only the first N questions of every set.
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Greedy answer length limit for ROUGE.
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    match &args.bench {
        EvalBench::Muse(a) => run_muse(a),
        EvalBench::Tofu(a) => run_tofu(a),
    }
}

/// A model directory's tokenizer, without loading the weights.
fn tokenizer_of(dir: &Path) -> Result<Tokenizer> {
    let cfg = Config::from_file(&dir.join("config.json"))?;
    Tokenizer::from_model_dir(dir, &cfg)
}

/// The retain model must tokenize exactly as the evaluated one, or its numbers are not comparable.
fn check_same_tokenizer(main: &Tokenizer, main_dir: &Path, other: &Tokenizer, other_dir: &Path) -> Result<()> {
    if main.vocab_fingerprint() != other.vocab_fingerprint() {
        return Err(Error::format(
            other.path(),
            format!(
                "the retain model {} has a different tokenizer than the evaluated model {} (vocabulary fingerprints differ); both must share one tokenizer",
                other_dir.display(),
                main_dir.display()
            ),
        ));
    }
    Ok(())
}

/// Rank group, device and model-loading settings of one evaluation.
struct Session {
    comm: dist::Comm,
    device: tch::Device,
    kind: tch::Kind,
    score_batching: Batching,
    gen_batching: Batching,
    start: Instant,
}

impl Session {
    fn new(c: &CommonArgs) -> Result<Session> {
        if c.batch_size == 0 || c.max_batch_tokens == 0 || c.gen_batch_size == 0 || c.max_gen_batch_tokens == 0 {
            return Err(crate::other!("batch sizes and token budgets must be positive"));
        }
        let device = dist::rank_device(parse_device(&c.device)?);
        let comm = dist::init(&c.dist, device)?;
        dist::set_cpu_threads();
        Ok(Session {
            comm,
            device,
            kind: parse_kind(&c.dtype)?,
            score_batching: Batching { batch_size: c.batch_size, max_batch_tokens: c.max_batch_tokens },
            gen_batching: Batching { batch_size: c.gen_batch_size, max_batch_tokens: c.max_gen_batch_tokens },
            start: Instant::now(),
        })
    }

    fn load(&self, dir: &Path) -> Result<LoadedModel> {
        tracing::info!("loading {}", dir.display());
        load_model(dir, self.kind, self.device)
    }

    fn ctx<'a>(&'a self, m: &'a LoadedModel, tok: &'a Tokenizer) -> Result<EvalCtx<'a>> {
        let mut eos = m.config.eos_token_ids.clone();
        if let Ok(e) = tok.eos_id() {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        Ok(EvalCtx { model: &m.model, tok, comm: &*self.comm, score_batching: self.score_batching, gen_batching: self.gen_batching, eos, pad_id: tok.pad_id() })
    }

    fn report(&self, c: &CommonArgs, benchmark: &str, variant: &str, data: &Path, tok: &Tokenizer) -> Result<Report> {
        let name = c.name.clone().unwrap_or_else(|| {
            c.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| c.model.display().to_string())
        });
        let mut limits = std::collections::BTreeMap::new();
        limits.insert("batch_size".into(), serde_json::json!(c.batch_size));
        limits.insert("max_batch_tokens".into(), serde_json::json!(c.max_batch_tokens));
        limits.insert("gen_batch_size".into(), serde_json::json!(c.gen_batch_size));
        limits.insert("max_gen_batch_tokens".into(), serde_json::json!(c.max_gen_batch_tokens));
        Ok(Report {
            benchmark: benchmark.into(),
            name,
            model: ModelInfo {
                path: c.model.display().to_string(),
                sha256: String::new(), // set by `finish` from the record's digest (one read of the weights)
                tokenizer_fingerprint: tok.vocab_fingerprint(),
                dtype: c.dtype.clone(),
            },
            variant: variant.into(),
            data: data.display().to_string(),
            limits,
            metrics: Default::default(),
            order: vec![],
            notes: vec![],
            reference: None,
            truth_stats: None,
            run: RunInfo { ranks: self.comm.world(), device: format!("{:?}", self.device), ..Default::default() },
        })
    }

    /// Rank 0 writes; everyone waits so that no rank exits (and tears down MPI) early.
    fn finish(&self, c: &CommonArgs, mut report: Report, samples: &[SampleRow], compare: &[Report], inputs: &[Input]) -> Result<()> {
        report.run.wall_s = self.start.elapsed().as_secs_f64();
        if self.comm.rank() == 0 {
            let settings = serde_json::json!({"benchmark": report.benchmark, "variant": report.variant, "data": report.data,
                "dtype": c.dtype, "device": c.device, "limits": report.limits});
            let mut record = Record::new("eval", settings, self.comm.world()).with_inputs(&[&[Input::Model("model", &c.model)], inputs].concat())?;
            record.metric_variant = Some(report.variant.clone());
            report.model.sha256 = record.weights_sha256("model").unwrap_or_default().to_string();
            write_eval_outputs(&c.out, &report, samples, compare)?;
            crate::record::log_given(&c.model)?;
            crate::record::write_and_log(&record, &c.out)?;
            for (k, m) in report.ordered() {
                tracing::info!("{k} = {}", crate::eval::report::fmt_value(m.value));
            }
            tracing::info!("wrote {} ({:.1} s)", c.out.display(), report.run.wall_s);
        }
        self.comm.barrier()
    }
}

fn load_compares(c: &CommonArgs) -> Result<Vec<Report>> {
    c.compare.iter().map(|p| Report::load(p)).collect()
}

fn run_muse(a: &MuseArgs) -> Result<()> {
    let c = &a.common;
    let s = Session::new(c)?;
    let tok = tokenizer_of(&c.model)?;
    let retain_tok = a.retain_model.as_deref().map(tokenizer_of).transpose()?;
    if let (Some(rt), Some(rdir)) = (&retain_tok, &a.retain_model) {
        check_same_tokenizer(&tok, &c.model, rt, rdir)?;
    }
    let opts = MuseOptions {
        mmlu: a.mmlu.clone().unwrap_or_else(|| a.data.join("../mmlu_subsample")),
        data: a.data.clone(),
        parts: a.parts.clone(),
        variant: a.variant,
        max_samples: a.max_samples,
        max_new_tokens_verbmem: a.max_new_tokens_verbmem,
        max_new_tokens_knowmem: a.max_new_tokens_knowmem,
        max_new_tokens_mmlu: a.max_new_tokens_mmlu,
        max_prompt_tokens: a.max_prompt_tokens,
        max_text_tokens: a.max_text_tokens.or((a.variant == Variant::OpenUnlearning).then_some(2048)),
    };
    let data = muse::load_data(&opts)?;
    let compare = load_compares(c)?;
    let mut notes = vec![];
    let reference = match (a.retain_auc, &a.retain_model, &data.privleak) {
        (Some(v), _, _) => Some(AucReference { value: v, source: "given with --retain-auc".into() }),
        (None, Some(dir), Some((forget, holdout))) => {
            let m = s.load(dir)?;
            let rt = retain_tok.as_ref().expect("tokenizer loaded with the retain model");
            let (auc, _, _) = muse::privleak_scores(&s.ctx(&m, rt)?, forget, holdout, &opts, "retain privleak")?;
            Some(AucReference { value: auc, source: format!("forget-vs-holdout AUC of the retain model {}, measured with the same settings", dir.display()) })
        }
        (None, Some(_), None) => {
            notes.push("--retain-model given but no PrivLeak data: the retain model was not evaluated".into());
            None
        }
        (None, None, _) => a.corpus.or_else(|| Corpus::from_dir(&a.data)).map(|corpus| AucReference {
            value: corpus.auc_retrain(),
            source: format!("MUSE constant AUC_RETRAIN[\"{}\"][\"forget_holdout_Min-40%\"] of the official retrained 7B model", corpus.name()),
        }),
    };
    let m = s.load(&c.model)?;
    let outcome = muse::evaluate(&s.ctx(&m, &tok)?, &data, &opts, reference.as_ref())?;
    drop(m);
    let mut report = s.report(c, "muse", a.variant.name(), &a.data, &tok)?;
    report.limits.extend(opts.limits());
    for (k, metric) in outcome.metrics {
        report.push(&k, metric);
    }
    report.notes = notes.into_iter().chain(outcome.notes).collect();
    report.reference = outcome.reference;
    report.run.timings_s = outcome.timings_s;
    let mut inputs = vec![Input::Data("benchmark", &a.data)];
    inputs.extend(opts.mmlu.exists().then_some(Input::Data("mmlu", &opts.mmlu)));
    inputs.extend(a.retain_model.as_deref().map(|d| Input::Model("retain_model", d)));
    s.finish(c, report, &outcome.samples, &compare, &inputs)
}

/// Forget-set truth statistics of an earlier `eval tofu` report, checked against this run.
fn retain_stats_from_report(path: &Path, forget: &str, tok: &Tokenizer) -> Result<RetainStats> {
    let r = Report::load(path)?;
    let file = if path.is_dir() { path.join("report.json") } else { path.to_path_buf() };
    let ts = r.truth_stats.ok_or_else(|| Error::format(&file, "has no `truth_stats` (it is not the report of an `unlearn eval tofu` run)"))?;
    if ts.split != forget {
        return Err(Error::format(&file, format!("truth_stats are for {}, but --forget is {forget}", ts.split)));
    }
    if ts.tokenizer_fingerprint != tok.vocab_fingerprint() {
        return Err(Error::format(&file, "truth_stats were computed by a model with a different tokenizer than the evaluated model's"));
    }
    if ts.values.is_empty() || ts.values.iter().any(|v| !v.is_finite()) {
        return Err(Error::format(&file, "truth_stats.values must be a non-empty list of finite numbers"));
    }
    Ok(RetainStats { values: ts.values, source: format!("from {}", file.display()) })
}

fn run_tofu(a: &TofuArgs) -> Result<()> {
    let c = &a.common;
    let s = Session::new(c)?;
    let tok = tokenizer_of(&c.model)?;
    let retain_tok = a.retain_model.as_deref().map(tokenizer_of).transpose()?;
    if let (Some(rt), Some(rdir)) = (&retain_tok, &a.retain_model) {
        check_same_tokenizer(&tok, &c.model, rt, rdir)?;
    }
    let mut retain = a.retain_stats.as_deref().map(|p| retain_stats_from_report(p, &a.forget, &tok)).transpose()?;
    let cfg = Config::from_file(&c.model.join("config.json"))?;
    let opts = TofuOptions {
        max_samples: a.max_samples,
        max_new_tokens: a.max_new_tokens,
        max_len: cfg.max_position_embeddings.max(2) as usize,
    };
    let sets = tofu::load_sets(&a.data, &a.forget, a.max_samples)?;
    let compare = load_compares(c)?;
    if let (Some(dir), Some(rt)) = (&a.retain_model, &retain_tok) {
        let m = s.load(dir)?;
        let values = tofu::forget_truth_stats(&s.ctx(&m, rt)?, &sets[0], opts.max_len)?;
        retain = Some(RetainStats { values, source: format!("retain model {}, evaluated in this run", dir.display()) });
    }
    let m = s.load(&c.model)?;
    let outcome = tofu::evaluate(&s.ctx(&m, &tok)?, &sets, &opts, retain.as_ref())?;
    drop(m);
    let mut report = s.report(c, "tofu", "tofu", &a.data, &tok)?;
    report.limits.extend(opts.limits());
    for (k, metric) in outcome.metrics {
        report.push(&k, metric);
    }
    report.notes = outcome.notes;
    report.run.timings_s = outcome.timings_s;
    report.truth_stats = Some(TruthStats {
        split: a.forget.clone(),
        definition: TRUTH_STAT_DEFINITION.into(),
        tokenizer_fingerprint: tok.vocab_fingerprint(),
        values: outcome.forget_truth_stats,
    });
    let mut inputs = vec![Input::Data("benchmark", &a.data)];
    inputs.extend(a.retain_model.as_deref().map(|d| Input::Model("retain_model", d)));
    inputs.extend(a.retain_stats.as_deref().map(|p| Input::Data("retain_stats", p)));
    s.finish(c, report, &outcome.samples, &compare, &inputs)
}
