//! TOFU (Maini et al. 2024) evaluation with the legacy `locuslab/tofu` definitions
//! (see `metrics::tofu`), on the four evaluation sets: the forget split's `_perturbed` file,
//! `retain_perturbed`, `real_authors_perturbed` and `world_facts_perturbed`.
//!
//! Every probability is the length-normalized probability of an answer in the run's prompt
//! template (`data::template`: by default `"Question: {q}\nAnswer:"` with specials, then `" {a}"` +
//! EOS as targets; a chat format's answer + end-of-turn token), the format training uses; mean NLL
//! L over those target tokens, P = exp(-L).
//! Generation for ROUGE starts from the same prompt (greedy, up to 200 new tokens, stop at EOS),
//! decoded without specials and without `clean_up_tokenization` (the tokenizer configs of Llama-2
//! and SmolLM2 turn it off); ROUGE-L recall with the Porter stemmer against the answer. The
//! per-question truth statistics of the forget set are kept in report.json (`truth_stats`) so
//! that a retain model evaluated once serves every later Forget Quality (`--retain-stats`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use super::benchmark::{Benchmark, BenchmarkArgs, Description, ModelFacts, Outcome};
use super::context::EvalCtx;
use super::data::{existing, read_objects, str_field, str_list_field, take};
use super::metrics::tofu::{
    answer_prob, forget_quality, forget_truth_ratio, model_utility, normalized_true_prob,
    truth_stat, utility_truth_ratio, UtilityTriple,
};
use super::metrics::{mean, RougeScorer};
use super::report::{Metric, Report, SampleRow, TruthStats};
use super::text::decode;
use crate::data::batch::{tokenize, Example, Overflow};
use crate::data::{Record, Template, Tokenizer};
use crate::error::{Error, Result};

/// `unlearn eval tofu` options.
#[derive(clap::Args, Debug)]
pub struct TofuArgs {
    /// Forget split: forget01, forget05 or forget10 (reads FORGET_perturbed.json).
    #[arg(long)]
    pub forget: String,
    /// TOFU data directory.
    #[arg(long, default_value = "../shared/data/tofu")]
    pub data: PathBuf,
    /// Retain model, evaluated now on the forget set, for Forget Quality (a directory, or a hub id
    /// `org/name` in the local Hugging Face cache).
    #[arg(long, conflicts_with = "retain_stats", value_parser = crate::model::hub::model_arg)]
    pub retain_model: Option<PathBuf>,
    /// report.json (or its directory) of an earlier `eval tofu` of the retain model.
    #[arg(long)]
    pub retain_stats: Option<PathBuf>,
    /// Use only the first N questions of every set.
    #[arg(long, value_parser = crate::cli::at_least_one)]
    pub max_samples: Option<usize>,
    /// Greedy answer length limit for ROUGE.
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Sets to evaluate (comma separated) [default: all four]. Model Utility needs the three
    /// utility sets; Forget Quality needs the forget set.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub sets: Option<Vec<SetKind>>,
    /// Score only: no greedy generation, so no ROUGE and no Model Utility (the probabilities and
    /// truth ratios, Forget Quality included, need only teacher-forced scoring, which is much cheaper).
    #[arg(long)]
    pub no_rouge: bool,
}

impl BenchmarkArgs for TofuArgs {
    fn retain_model(&self) -> Option<&Path> {
        self.retain_model.as_deref()
    }

    fn inputs(&self) -> Vec<PathBuf> {
        [Some(self.data.clone()), self.retain_model.clone(), self.retain_stats.clone()].into_iter().flatten().collect()
    }

    fn prepare(&self, model: &ModelFacts) -> Result<Box<dyn Benchmark>> {
        let retain = self.retain_stats.as_deref().map(|p| retain_stats_from_report(p, &self.forget, model.tok, model.template)).transpose()?;
        let opts = TofuOptions {
            max_samples: self.max_samples,
            max_new_tokens: self.max_new_tokens,
            max_len: model.config.max_position_embeddings.max(2) as usize,
            rouge: !self.no_rouge,
        };
        let kinds = self.sets.clone().unwrap_or(SetKind::ALL.to_vec());
        let has_forget = kinds.contains(&SetKind::Forget);
        if !has_forget && (self.retain_model.is_some() || self.retain_stats.is_some()) {
            return Err(crate::other!("--sets: the retain model's statistics are compared on the forget set, which --sets leaves out"));
        }
        let sets = load_sets(&self.data, &self.forget, self.max_samples, &kinds)?;
        let retain_stats = self.retain_stats.clone();
        Ok(Box::new(Tofu { forget: self.forget.clone(), data: self.data.clone(), opts, sets, retain, retain_stats, retain_model: self.retain_model.clone() }))
    }
}

/// Forget-set truth statistics of an earlier `eval tofu` report, checked against this run.
fn retain_stats_from_report(path: &Path, forget: &str, tok: &Tokenizer, template: &Template) -> Result<RetainStats> {
    let r = Report::load(path)?;
    let file = if path.is_dir() { path.join("report.json") } else { path.to_path_buf() };
    // Reports from before templates existed were all phi-qa.
    let theirs = r.template.as_ref().and_then(|t| t.get("name")).and_then(|n| n.as_str()).unwrap_or("phi-qa");
    if theirs != template.name() {
        return Err(Error::format(&file, format!("truth_stats were computed with the `{theirs}` prompt template, this evaluation uses `{}`", template.name())));
    }
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

/// A TOFU evaluation with its four sets read.
pub struct Tofu {
    /// The forget split, e.g. "forget01".
    pub forget: String,
    pub data: PathBuf,
    pub opts: TofuOptions,
    pub sets: Vec<TofuSet>,
    /// Forget Quality's other side, when known (from a report, or measured on `retain_model`).
    pub retain: Option<RetainStats>,
    /// The `--retain-stats` report `retain` was read from.
    pub retain_stats: Option<PathBuf>,
    pub retain_model: Option<PathBuf>,
}

impl Benchmark for Tofu {
    fn describe(&self) -> Description {
        let inputs = self.retain_stats.iter().map(|p| ("retain_stats", p.clone())).collect();
        Description { name: "tofu", variant: "tofu", data: self.data.clone(), limits: self.opts.limits(), inputs }
    }
    fn reference_model(&self) -> Option<&Path> {
        self.retain_model.as_deref()
    }
    fn measure_reference(&mut self, ctx: &EvalCtx) -> Result<()> {
        let Some(dir) = &self.retain_model else { return Ok(()) };
        let forget = self.sets.iter().find(|s| s.kind == SetKind::Forget).expect("prepare keeps the forget set when a retain model is given");
        let values = forget_truth_stats(ctx, forget, self.opts.max_len)?;
        self.retain = Some(RetainStats { values, source: format!("retain model {}, evaluated in this run", dir.display()) });
        Ok(())
    }
    fn evaluate(&self, ctx: &EvalCtx) -> Result<Outcome> {
        let (mut out, stats) = evaluate_sets(ctx, &self.sets, &self.opts, self.retain.as_ref())?;
        out.truth_stats = Some(TruthStats {
            split: self.forget.clone(),
            definition: TRUTH_STAT_DEFINITION.into(),
            tokenizer_fingerprint: ctx.tok.vocab_fingerprint(),
            values: stats,
        });
        Ok(out)
    }
}

/// The four TOFU evaluation sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SetKind {
    Forget,
    Retain,
    RealAuthors,
    WorldFacts,
}

impl SetKind {
    pub const ALL: [SetKind; 4] = [SetKind::Forget, SetKind::Retain, SetKind::RealAuthors, SetKind::WorldFacts];
    pub fn key(self) -> &'static str {
        match self {
            SetKind::Forget => "forget",
            SetKind::Retain => "retain",
            SetKind::RealAuthors => "real_authors",
            SetKind::WorldFacts => "world_facts",
        }
    }
    fn file(self, forget: &str) -> String {
        match self {
            SetKind::Forget => format!("{forget}_perturbed.json"),
            SetKind::Retain => "retain_perturbed.json".into(),
            SetKind::RealAuthors => "real_authors_perturbed.json".into(),
            SetKind::WorldFacts => "world_facts_perturbed.json".into(),
        }
    }
    /// Forget and retain sets compare the paraphrased answer with the perturbed ones; real
    /// authors and world facts compare the answer itself.
    fn has_paraphrase(self) -> bool {
        matches!(self, SetKind::Forget | SetKind::Retain)
    }
}

#[derive(Debug, Clone)]
pub struct TofuItem {
    pub question: String,
    pub answer: String,
    pub paraphrased: Option<String>,
    pub perturbed: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TofuSet {
    pub kind: SetKind,
    pub file: PathBuf,
    pub items: Vec<TofuItem>,
}

/// Read one evaluation set, checking every record's keys.
pub fn load_set(dir: &Path, forget: &str, kind: SetKind, limit: Option<usize>) -> Result<TofuSet> {
    let file = existing(dir, &kind.file(forget))?;
    let items = read_objects(&file)?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(TofuItem {
                question: str_field(&file, i, r, "question")?,
                answer: str_field(&file, i, r, "answer")?,
                paraphrased: if kind.has_paraphrase() { Some(str_field(&file, i, r, "paraphrased_answer")?) } else { None },
                perturbed: str_list_field(&file, i, r, "perturbed_answer")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TofuSet { kind, file, items: take(items, limit) })
}

/// The sets of `kinds`, in TOFU's order whatever the order given (the forget split name, e.g.
/// "forget01", picks the forget file).
pub fn load_sets(dir: &Path, forget: &str, limit: Option<usize>, kinds: &[SetKind]) -> Result<Vec<TofuSet>> {
    if !dir.is_dir() {
        return Err(Error::format(dir, "TOFU data directory not found"));
    }
    SetKind::ALL.iter().filter(|k| kinds.contains(k)).map(|&k| load_set(dir, forget, k, limit)).collect()
}

/// Mean NLL of the answer (+EOS) tokens of every item's answer, paraphrase (if any) and perturbed
/// answers, scored in one sharded pass.
#[derive(Debug, Clone)]
pub struct SetLosses {
    pub answer: Vec<f64>,
    pub paraphrased: Option<Vec<f64>>,
    pub perturbed: Vec<Vec<f64>>,
}

pub fn set_losses(ctx: &EvalCtx, set: &TofuSet, max_len: usize) -> Result<SetLosses> {
    let mut examples: Vec<Example> = vec![];
    // (item, slot): slot 0 = answer, 1 = paraphrase, 2.. = perturbed
    let mut owner: Vec<(usize, usize)> = vec![];
    for (i, it) in set.items.iter().enumerate() {
        let mut answers: Vec<(usize, &str)> = vec![(0, &it.answer)];
        if let Some(p) = &it.paraphrased {
            answers.push((1, p));
        }
        answers.extend(it.perturbed.iter().enumerate().map(|(j, a)| (2 + j, a.as_str())));
        for (slot, a) in answers {
            let rec = Record::Qa { question: it.question.clone(), answer: a.to_string() };
            let ex = tokenize(ctx.tok, ctx.template, &rec, max_len, Overflow::Truncate)
                .map_err(|e| Error::format(&set.file, format!("record {i}: {e}")))?
                .remove(0);
            examples.push(ex);
            owner.push((i, slot));
        }
    }
    let lps = ctx.logprobs(&examples, set.kind.key())?;
    let n = set.items.len();
    let mut out = SetLosses {
        answer: vec![f64::NAN; n],
        paraphrased: set.kind.has_paraphrase().then(|| vec![f64::NAN; n]),
        perturbed: set.items.iter().map(|it| vec![f64::NAN; it.perturbed.len()]).collect(),
    };
    for ((i, slot), lp) in owner.into_iter().zip(&lps) {
        // Mean over the target tokens, summed left to right.
        let loss = -lp.iter().fold(0.0, |a, &x| a + x) / lp.len() as f64;
        match slot {
            0 => out.answer[i] = loss,
            1 => out.paraphrased.as_mut().expect("paraphrase slot only with paraphrases")[i] = loss,
            s => out.perturbed[i][s - 2] = loss,
        }
    }
    Ok(out)
}

/// Legacy per-question truth statistics exp(mean_j L_pert_j - L_para) of a set (`L_para` = the
/// paraphrase's loss on forget/retain, the answer's on the others).
pub fn truth_stats(losses: &SetLosses) -> Vec<f64> {
    let base = losses.paraphrased.as_ref().unwrap_or(&losses.answer);
    base.iter().zip(&losses.perturbed).map(|(&b, p)| truth_stat(b, p)).collect()
}

pub const TRUTH_STAT_DEFINITION: &str = "legacy TOFU truth statistic per forget question: exp(mean_j L_pert_j - L_para) = 1/R, L = mean NLL of the answer (+EOS or end-of-turn) tokens after the prompt of the report's `template`";

#[derive(Debug, Clone)]
pub struct TofuOptions {
    pub max_samples: Option<usize>,
    pub max_new_tokens: usize,
    /// Token limit of a scored question + answer.
    pub max_len: usize,
    /// Generate answers for ROUGE (and so Model Utility).
    pub rouge: bool,
}

impl TofuOptions {
    pub fn limits(&self) -> BTreeMap<String, serde_json::Value> {
        let mut limits = BTreeMap::from([
            ("max_samples".into(), json!(self.max_samples)),
            ("max_new_tokens".into(), json!(self.max_new_tokens)),
            ("max_len".into(), json!(self.max_len)),
        ]);
        if !self.rouge {
            limits.insert("rouge".into(), json!(false));
        }
        limits
    }
}

/// Forget Quality's other side: the retain model's forget-set statistics and where they came from.
#[derive(Debug, Clone)]
pub struct RetainStats {
    pub values: Vec<f64>,
    pub source: String,
}

/// Evaluate all four sets and aggregate them; also returns the forget set's truth statistics.
pub fn evaluate_sets(ctx: &EvalCtx, sets: &[TofuSet], o: &TofuOptions, retain: Option<&RetainStats>) -> Result<(Outcome, Vec<f64>)> {
    let mut out = Outcome::default();
    let mut forget_stats = vec![];
    let scorer = RougeScorer::new(true);
    let mut triples: BTreeMap<&str, UtilityTriple> = BTreeMap::new();
    for set in sets {
        let t = Instant::now();
        let key = set.kind.key();
        let losses = set_losses(ctx, set, o.max_len)?;
        let prompts: Vec<Vec<i64>> = set.items.iter().map(|it| ctx.template.prompt_ids(ctx.tok, &it.question)).collect::<Result<_>>()?;
        let gens = if o.rouge { Some(ctx.generate(&prompts, o.max_new_tokens, &format!("{key} gen"))?) } else { None };
        let stats = truth_stats(&losses);
        let mut recalls = vec![];
        let mut probs = vec![];
        for (i, it) in set.items.iter().enumerate() {
            let gen = gens.as_ref().map(|g| &g[i]);
            let generation = gen.map(|g| decode(ctx.tok, g, false)).transpose()?;
            let recall = generation.as_ref().map(|g| scorer.score(&it.answer, g).recall);
            recalls.extend(recall);
            let prob = if set.kind.has_paraphrase() {
                answer_prob(losses.answer[i])
            } else {
                normalized_true_prob(losses.answer[i], &losses.perturbed[i])
            };
            probs.push(prob);
            out.samples.push(SampleRow::new(
                key,
                i,
                &ctx.template.prompt_text(&[], &it.question)?,
                Some(&it.answer),
                generation.as_deref(),
                json!({
                    "rouge_l_recall": recall,
                    "answer_loss": losses.answer[i],
                    "paraphrased_loss": losses.paraphrased.as_ref().map(|p| p[i]),
                    "perturbed_losses": losses.perturbed[i],
                    "prob": prob,
                    "truth_stat": stats[i],
                    "generated_tokens": gen.map(Vec::len),
                }),
            ));
        }
        let n = set.items.len();
        let rouge = mean(&recalls);
        let what = format!("{} ({})", key, set.file.file_name().unwrap_or_default().to_string_lossy());
        let rouge_def = format!("TOFU ROUGE on {what}: mean ROUGE-L recall (Porter stemmer) of the greedy answer (<= {} new tokens, stop at EOS) vs the gold answer", o.max_new_tokens);
        // The per-question values above are the terms of `mean_answer_prob` /
        // `mean_normalized_true_prob`: their mean is the set's Prob.
        let prob = mean(&probs);
        let prob_def = if set.kind.has_paraphrase() {
            format!("TOFU Prob. on {what}: mean of P(a|q)^(1/|a|) = exp(-mean NLL of the answer + EOS tokens)")
        } else {
            format!("TOFU Prob. on {what}: mean of P(a|q) / (P(a|q) + sum_j P(pert_j|q)), all length-normalized")
        };
        match set.kind {
            SetKind::Forget => {
                let tr = forget_truth_ratio(&stats);
                if let Some(r) = retain {
                    let fq = forget_quality(&stats, &r.values)?;
                    out.metrics.push((
                        "forget_quality".into(),
                        Metric::new(
                            fq,
                            format!("TOFU Forget Quality: two-sided KS two-sample p-value (scipy ks_2samp, method auto) between this model's {n} and the retain model's {} forget-set truth statistics exp(mean_j L_pert_j - L_para) ({})", r.values.len(), r.source),
                            n,
                            "higher",
                        ),
                    ));
                } else {
                    out.notes.push("forget_quality: no retain model statistics (give --retain-model or --retain-stats)".into());
                }
                out.metrics.push(("forget_truth_ratio".into(), Metric::new(tr, format!("TOFU forget Truth Ratio on {what}: mean over questions of min(R, 1/R), R = GM_j P(pert_j|q)^(1/|pert_j|) / P(para|q)^(1/|para|)"), n, "toward retain")));
                out.metrics.push(("forget_prob".into(), Metric::new(prob, prob_def, n, "lower")));
                if o.rouge {
                    out.metrics.push(("forget_rouge".into(), Metric::new(rouge, rouge_def, n, "lower")));
                }
                forget_stats = stats;
            }
            _ => {
                let tr = utility_truth_ratio(&stats);
                let tr_base = if set.kind.has_paraphrase() { "para" } else { "a" };
                out.metrics.push((format!("{key}_prob"), Metric::new(prob, prob_def, n, "higher")));
                if o.rouge {
                    triples.insert(key, UtilityTriple { rouge, prob, truth_ratio: tr });
                    out.metrics.push((format!("{key}_rouge"), Metric::new(rouge, rouge_def, n, "higher")));
                }
                out.metrics.push((
                    format!("{key}_truth_ratio"),
                    Metric::new(tr, format!("TOFU Truth Ratio on {what}: mean over questions of max(0, 1 - R), R = GM_j P(pert_j|q)^(1/|pert_j|) / P({tr_base}|q)^(1/|{tr_base}|)"), n, "higher"),
                ));
            }
        }
        out.timings_s.insert(key.into(), t.elapsed().as_secs_f64());
    }
    if let (Some(ra), Some(wf), Some(rt)) = (triples.get("real_authors"), triples.get("world_facts"), triples.get("retain")) {
        let n = sets.iter().filter(|s| s.kind != SetKind::Forget).map(|s| s.items.len()).sum();
        out.metrics.insert(
            0,
            (
                "model_utility".into(),
                Metric::new(model_utility(*ra, *wf, *rt), "TOFU Model Utility: harmonic mean (scipy hmean) of the 9 numbers {ROUGE, Prob., Truth Ratio} x {real authors, world facts, retain}", n, "higher"),
            ),
        );
    }
    // Forget Quality first, then Model Utility: the two headline numbers.
    if let Some(pos) = out.metrics.iter().position(|(k, _)| k == "forget_quality") {
        let fq = out.metrics.remove(pos);
        out.metrics.insert(0, fq);
    }
    Ok((out, forget_stats))
}

/// Only the forget set's truth statistics (what Forget Quality needs from the retain model).
pub fn forget_truth_stats(ctx: &EvalCtx, forget: &TofuSet, max_len: usize) -> Result<Vec<f64>> {
    Ok(truth_stats(&set_losses(ctx, forget, max_len)?))
}
