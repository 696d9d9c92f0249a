//! MUSE (Shi et al. 2024) as its original evaluation code computes it (`swj0419/muse_bench`,
//! mirrored in `yklochkov-bytedance/mt-unlearn`), plus MMLU on mt-unlearn's 1531-question
//! subsample. `--variant open-unlearning` switches to `locuslab/open-unlearning`'s choices.
//!
//! - VerbMem: prompt tokenized with the tokenizer's specials, greedy 128 new tokens, reference =
//!   `gt` tokenized with specials, cut to its first 128 tokens and decoded without specials;
//!   ROUGE-L F1 (no stemmer), mean x100. open-unlearning: stemmer on, reference = the whole `gt`.
//! - KnowMem: few-shot prompt from the `*_icl` pairs, greedy 32 new tokens, output cut at the
//!   first of "\n\n", "\nQuestion", "Question:"; ROUGE-L F1 vs the answer, mean x100. With a
//!   chat template (`--template`), the ICL pairs are earlier user/assistant turns and the question
//!   the last user turn, rendered by the template (open-unlearning's way); VerbMem, PrivLeak and
//!   MMLU are text continuations and keep their plain text under any template.
//! - PrivLeak: Min-40% of the token log-probs of each full text (tokens 2..n), forget vs holdout
//!   AUC (`muse_auc`), then (AUC - AUC_retrain) / AUC_retrain x100. open-unlearning:
//!   Min-K count max(1, int(n k)) and texts cut after 2048 tokens.
//! - MMLU: 5-shot prefix + "\nQuesion: ..." (mt-unlearn's spelling) + choices + "\n\nCorrect
//!   answer:", greedy 4 new tokens, output cut at the KnowMem stop strings and stripped; the
//!   prediction is the index of its first character in "ABCD" (anything else is wrong);
//!   accuracy x100.
//!
//! Means are Python's `sum(vals) / len(vals)` as MUSE's logger computes them. Generations and
//! the VerbMem reference are decoded with `clean_up_tokenization_spaces=True` as the MUSE code
//! asks (transformers 4.x applied it to every tokenizer; 5.x silently skips it for BPE ones, so
//! the Python check applies `clean_up_tokenization` explicitly); MMLU outputs are not cleaned, as
//! vLLM's detokenizer does not clean. Long prompts can be cut with `--max-prompt-tokens` (keeps
//! the leading specials and the last tokens), which MUSE itself never does: the report says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::benchmark::{Benchmark, BenchmarkArgs, Description, ModelFacts, Outcome};
use super::context::EvalCtx;
use super::data::{index_field, read_objects, read_qa, read_texts, str_field, str_list_field, take};
use super::metrics::{muse_auc, privleak, MinKRounding, RougeScorer, AUC_RETRAIN_BOOKS, AUC_RETRAIN_NEWS};
use super::report::{python_mean, Metric, SampleRow};
use super::score::summarize;
use super::text::{cut_at_stops, decode, keep_last_tokens, leading_specials, KNOWMEM_STOPS};
use crate::data::batch::Example;
use crate::error::{Error, Result};

/// `unlearn eval muse` options.
#[derive(clap::Args, Debug)]
pub struct MuseArgs {
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
    /// Retained model whose forget-vs-holdout AUC, measured now, is the PrivLeak reference (a
    /// directory, or a hub id `org/name` in the local Hugging Face cache).
    #[arg(long, value_parser = crate::model::hub::model_arg)]
    pub retain_model: Option<PathBuf>,
    /// Use only the first N samples of every split.
    #[arg(long, value_parser = crate::cli::at_least_one)]
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

impl BenchmarkArgs for MuseArgs {
    fn retain_model(&self) -> Option<&Path> {
        self.retain_model.as_deref()
    }

    fn inputs(&self) -> Vec<PathBuf> {
        [Some(self.data.clone()), Some(self.mmlu_dir()), self.retain_model.clone()].into_iter().flatten().collect()
    }

    fn prepare(&self, _model: &ModelFacts) -> Result<Box<dyn Benchmark>> {
        let opts = MuseOptions {
            mmlu: self.mmlu_dir(),
            data: self.data.clone(),
            parts: self.parts.clone(),
            variant: self.variant,
            max_samples: self.max_samples,
            max_new_tokens_verbmem: self.max_new_tokens_verbmem,
            max_new_tokens_knowmem: self.max_new_tokens_knowmem,
            max_new_tokens_mmlu: self.max_new_tokens_mmlu,
            max_prompt_tokens: self.max_prompt_tokens,
            max_text_tokens: self.max_text_tokens.or((self.variant == Variant::OpenUnlearning).then_some(2048)),
        };
        let data = load_data(&opts)?;
        let mut muse = Muse { opts, data, reference: None, retain_model: None, notes: vec![] };
        match (self.retain_auc, &self.retain_model, muse.data.privleak.is_some()) {
            (Some(v), _, _) => muse.reference = Some(AucReference { value: v, source: "given with --retain-auc".into() }),
            (None, Some(dir), true) => muse.retain_model = Some(dir.clone()),
            (None, Some(_), false) => muse.notes.push("--retain-model given but no PrivLeak data: the retain model was not evaluated".into()),
            (None, None, _) => {
                muse.reference = self.corpus.or_else(|| Corpus::from_dir(&self.data)).map(|corpus| AucReference {
                    value: corpus.auc_retrain(),
                    source: format!("MUSE constant AUC_RETRAIN[\"{}\"][\"forget_holdout_Min-40%\"] of the official retrained 7B model", corpus.name()),
                })
            }
        }
        Ok(Box::new(muse))
    }
}

impl MuseArgs {
    fn mmlu_dir(&self) -> PathBuf {
        self.mmlu.clone().unwrap_or_else(|| self.data.join("../mmlu_subsample"))
    }
}

/// A MUSE evaluation with its data read.
pub struct Muse {
    pub opts: MuseOptions,
    pub data: MuseData,
    /// PrivLeak's reference AUC; measured on `retain_model` when that is set.
    pub reference: Option<AucReference>,
    pub retain_model: Option<PathBuf>,
    /// Notes from setting up (before the data's own).
    pub notes: Vec<String>,
}

impl Benchmark for Muse {
    fn describe(&self) -> Description {
        let inputs = self.data.mmlu.is_some().then(|| ("mmlu", self.opts.mmlu.clone())).into_iter().collect();
        Description { name: "muse", variant: self.opts.variant.name(), data: self.opts.data.clone(), limits: self.opts.limits(), inputs }
    }
    fn reference_model(&self) -> Option<&Path> {
        self.retain_model.as_deref()
    }
    fn measure_reference(&mut self, ctx: &EvalCtx) -> Result<()> {
        let (Some(dir), Some((forget, holdout))) = (&self.retain_model, &self.data.privleak) else { return Ok(()) };
        let (auc, _, _) = privleak_scores(ctx, forget, holdout, &self.opts, "retain privleak")?;
        self.reference = Some(AucReference { value: auc, source: format!("forget-vs-holdout AUC of the retain model {}, measured with the same settings", dir.display()) });
        Ok(())
    }
    fn evaluate(&self, ctx: &EvalCtx) -> Result<Outcome> {
        let mut out = evaluate_parts(ctx, &self.data, &self.opts, self.reference.as_ref())?;
        out.notes.splice(0..0, self.notes.iter().cloned());
        Ok(out)
    }
}

/// Which evaluation code to follow where MUSE's original and open-unlearning differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// MUSE's original code: no stemmer, gt cut to the generation length, Min-K `int(n k)`.
    Muse,
    /// open-unlearning: stemmer, whole gt, Min-K `max(1, int(n k))`, texts cut at 2048 tokens.
    OpenUnlearning,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Muse => "muse",
            Variant::OpenUnlearning => "open-unlearning",
        }
    }
    fn stem(self) -> bool {
        self == Variant::OpenUnlearning
    }
    fn rounding(self) -> MinKRounding {
        match self {
            Variant::Muse => MinKRounding::Floor,
            Variant::OpenUnlearning => MinKRounding::AtLeastOne,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Corpus {
    News,
    Books,
}

impl Corpus {
    pub fn name(self) -> &'static str {
        match self {
            Corpus::News => "news",
            Corpus::Books => "books",
        }
    }
    /// MUSE's `AUC_RETRAIN[corpus]["forget_holdout_Min-40%"]`.
    pub fn auc_retrain(self) -> f64 {
        match self {
            Corpus::News => AUC_RETRAIN_NEWS,
            Corpus::Books => AUC_RETRAIN_BOOKS,
        }
    }
    /// `news` or `books` from a data directory's name.
    pub fn from_dir(dir: &Path) -> Option<Corpus> {
        match dir.file_name()?.to_str()? {
            "news" | "bbc" => Some(Corpus::News),
            "books" | "hp" => Some(Corpus::Books),
            _ => None,
        }
    }
}

/// The parts of a MUSE evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Part {
    Verbmem,
    KnowmemF,
    KnowmemR,
    Privleak,
    Mmlu,
}

impl Part {
    pub const ALL: [Part; 5] = [Part::Verbmem, Part::KnowmemF, Part::KnowmemR, Part::Privleak, Part::Mmlu];
    pub fn name(self) -> &'static str {
        match self {
            Part::Verbmem => "verbmem",
            Part::KnowmemF => "knowmem-f",
            Part::KnowmemR => "knowmem-r",
            Part::Privleak => "privleak",
            Part::Mmlu => "mmlu",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MuseOptions {
    /// Corpus directory (verbmem/, knowmem/, privleak/).
    pub data: PathBuf,
    /// MMLU subsample directory (mmlu_all_val.json, mmlu_icl.json).
    pub mmlu: PathBuf,
    /// Parts asked for explicitly; `None` = every part whose files exist.
    pub parts: Option<Vec<Part>>,
    pub variant: Variant,
    pub max_samples: Option<usize>,
    pub max_new_tokens_verbmem: usize,
    pub max_new_tokens_knowmem: usize,
    pub max_new_tokens_mmlu: usize,
    /// Keep only the last N tokens of a generation prompt (after its leading specials).
    pub max_prompt_tokens: Option<usize>,
    /// Keep only the first N tokens (after the leading specials) of a PrivLeak text.
    pub max_text_tokens: Option<usize>,
}

impl MuseOptions {
    /// Limits, for the report.
    pub fn limits(&self) -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("max_samples".into(), json!(self.max_samples)),
            ("max_new_tokens_verbmem".into(), json!(self.max_new_tokens_verbmem)),
            ("max_new_tokens_knowmem".into(), json!(self.max_new_tokens_knowmem)),
            ("max_new_tokens_mmlu".into(), json!(self.max_new_tokens_mmlu)),
            ("max_prompt_tokens".into(), json!(self.max_prompt_tokens)),
            ("max_text_tokens".into(), json!(self.max_text_tokens)),
        ])
    }
}

#[derive(Debug, Clone)]
pub struct KnowMemSet {
    pub qa: Vec<(String, String)>,
    pub icl: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct MmluItem {
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

/// Every input of a MUSE evaluation, read and checked before any model work.
#[derive(Debug, Clone, Default)]
pub struct MuseData {
    /// (prompt, gt)
    pub verbmem: Option<Vec<(String, String)>>,
    pub knowmem_f: Option<KnowMemSet>,
    pub knowmem_r: Option<KnowMemSet>,
    /// (forget texts, holdout texts)
    pub privleak: Option<(Vec<String>, Vec<String>)>,
    /// (questions, 5-shot prefix)
    pub mmlu: Option<(Vec<MmluItem>, String)>,
    /// Parts skipped because their files are absent.
    pub notes: Vec<String>,
}

const LETTERS: [char; 4] = ['A', 'B', 'C', 'D'];

fn files_of(part: Part, o: &MuseOptions) -> Vec<PathBuf> {
    let d = &o.data;
    match part {
        Part::Verbmem => vec![d.join("verbmem/forget.json")],
        Part::KnowmemF => vec![d.join("knowmem/forget_qa.json"), d.join("knowmem/forget_qa_icl.json")],
        Part::KnowmemR => vec![d.join("knowmem/retain2_qa.json"), d.join("knowmem/retain2_qa_icl.json")],
        Part::Privleak => vec![d.join("privleak/forget.json"), d.join("privleak/holdout.json")],
        Part::Mmlu => vec![o.mmlu.join("mmlu_all_val.json"), o.mmlu.join("mmlu_icl.json")],
    }
}

/// Read every requested (or, without `parts`, every available) part. A file of a part that was
/// asked for explicitly must exist; files that exist must be well formed.
pub fn load_data(o: &MuseOptions) -> Result<MuseData> {
    let mut data = MuseData::default();
    if !o.data.is_dir() {
        return Err(Error::format(&o.data, "MUSE data directory not found"));
    }
    let wanted: Vec<Part> = o.parts.clone().unwrap_or_else(|| Part::ALL.to_vec());
    for part in wanted {
        let files = files_of(part, o);
        if let Some(absent) = files.iter().find(|f| !f.exists()) {
            if o.parts.is_some() {
                return Err(Error::format(absent, format!("file not found (needed by the requested part `{}`)", part.name())));
            }
            data.notes.push(format!("{} skipped: {} not found", part.name(), absent.display()));
            continue;
        }
        let n = o.max_samples;
        match part {
            Part::Verbmem => {
                let f = &files[0];
                let rows = read_objects(f)?
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Ok((str_field(f, i, r, "prompt")?, str_field(f, i, r, "gt")?)))
                    .collect::<Result<Vec<_>>>()?;
                data.verbmem = Some(take(rows, n));
            }
            Part::KnowmemF | Part::KnowmemR => {
                let set = KnowMemSet { qa: take(read_qa(&files[0])?, n), icl: read_qa(&files[1])? };
                if part == Part::KnowmemF {
                    data.knowmem_f = Some(set);
                } else {
                    data.knowmem_r = Some(set);
                }
            }
            Part::Privleak => {
                data.privleak = Some((take(read_texts(&files[0])?, n), take(read_texts(&files[1])?, n)));
            }
            Part::Mmlu => {
                let f = &files[0];
                let items = read_objects(f)?
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let item = MmluItem {
                            question: str_field(f, i, r, "question")?,
                            choices: str_list_field(f, i, r, "choices")?,
                            answer: index_field(f, i, r, "answer")?,
                        };
                        if item.answer >= item.choices.len().min(LETTERS.len()) {
                            return Err(Error::format(f, format!("record {i}: `answer` {} is not one of the A-D choices", item.answer)));
                        }
                        Ok(item)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let icl = &files[1];
                let prefix = match read_objects(icl)?.first() {
                    Some(r) => str_field(icl, 0, r, "text")?,
                    None => unreachable!("read_objects rejects empty files"),
                };
                data.mmlu = Some((take(items, n), prefix));
            }
        }
    }
    let found = data.verbmem.is_some() || data.knowmem_f.is_some() || data.knowmem_r.is_some() || data.privleak.is_some() || data.mmlu.is_some();
    if !found {
        return Err(Error::format(&o.data, format!("no MUSE part could be evaluated: {}", data.notes.join("; "))));
    }
    Ok(data)
}

/// Where the reference (retrained-model) AUC of PrivLeak comes from.
#[derive(Debug, Clone)]
pub struct AucReference {
    pub value: f64,
    /// Human-readable origin, e.g. "MUSE constant AUC_RETRAIN[news]" or "measured on DIR".
    pub source: String,
}

/// Record a finished generation part: its metric, a note on truncated prompts, its time.
fn finish_part(out: &mut Outcome, key: &str, metric: Metric, truncated: usize, o: &MuseOptions, started: Instant) {
    out.metrics.push((key.into(), metric));
    if truncated > 0 {
        out.notes.push(format!(
            "{key}: {truncated} prompt(s) longer than --max-prompt-tokens {} kept only their last tokens (MUSE never truncates)",
            o.max_prompt_tokens.unwrap_or(0)
        ));
    }
    out.timings_s.insert(key.into(), started.elapsed().as_secs_f64());
}

/// Tokenize generation prompts, fitted to `--max-prompt-tokens`: with the tokenizer's specials
/// (`specials`), or, for prompts rendered by a chat template, as the template wrote them.
fn prompt_ids(ctx: &EvalCtx, prompts: &[String], o: &MuseOptions, specials: bool) -> Result<(Vec<Vec<i64>>, usize)> {
    let lead = leading_specials(ctx.tok)?;
    let mut truncated = 0;
    let mut out = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut ids = ctx.tok.encode(p, specials)?;
        if let Some(max) = o.max_prompt_tokens {
            truncated += keep_last_tokens(&mut ids, max, lead) as usize;
        }
        out.push(ids);
    }
    Ok((out, truncated))
}

/// Run every loaded part on `ctx`'s model.
pub fn evaluate_parts(ctx: &EvalCtx, data: &MuseData, o: &MuseOptions, reference: Option<&AucReference>) -> Result<Outcome> {
    let mut out = Outcome { notes: data.notes.clone(), ..Default::default() };
    let scorer = RougeScorer::new(o.variant.stem());
    let stem_txt = if o.variant.stem() { "with" } else { "no" };
    if let Some(rows) = &data.verbmem {
        let t = Instant::now();
        let (prompts, cut) = prompt_ids(ctx, &rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), o, true)?;
        let gens = ctx.generate(&prompts, o.max_new_tokens_verbmem, "verbmem")?;
        let mut f1s = vec![];
        for (i, ((prompt, gt), gen)) in rows.iter().zip(&gens).enumerate() {
            let output = decode(ctx.tok, gen, true)?;
            let reference = match o.variant {
                Variant::Muse => {
                    let gt_ids = ctx.tok.encode(gt, true)?;
                    decode(ctx.tok, &gt_ids[..gt_ids.len().min(o.max_new_tokens_verbmem)], true)?
                }
                Variant::OpenUnlearning => gt.trim().to_string(),
            };
            let output = if o.variant == Variant::OpenUnlearning { output.trim().to_string() } else { output };
            let r = scorer.score(&reference, &output);
            f1s.push(r.f1);
            out.samples.push(SampleRow::new(
                "verbmem_f",
                i,
                prompt,
                Some(&reference),
                Some(&output),
                json!({"rouge_l_f1": r.f1, "rouge_l_recall": r.recall, "prompt_tokens": prompts[i].len(), "generated_tokens": gen.len()}),
            ));
        }
        let reference_txt = match o.variant {
            Variant::Muse => format!("gt tokenized with specials and cut to its first {} tokens, decoded without specials", o.max_new_tokens_verbmem),
            Variant::OpenUnlearning => "the whole gt".into(),
        };
        let metric = Metric::new(
            python_mean(&f1s) * 100.0,
            format!(
                "MUSE VerbMem on D_forget: mean ROUGE-L F1 ({stem_txt} stemmer) of the {}-token greedy continuation of each verbmem prompt vs {reference_txt}, x100",
                o.max_new_tokens_verbmem
            ),
            f1s.len(),
            "lower",
        );
        finish_part(&mut out, "verbmem_f", metric, cut, o, t);
    }
    for (key, set, split) in [("knowmem_f", &data.knowmem_f, "D_forget"), ("knowmem_r", &data.knowmem_r, "D_retain")] {
        let Some(set) = set else { continue };
        let t = Instant::now();
        // A chat template puts the ICL pairs in earlier turns (as open-unlearning does); phi-qa keeps MUSE's text.
        let chat = ctx.template.is_chat();
        let prompts: Vec<String> = if chat {
            set.qa.iter().map(|(q, _)| ctx.template.prompt_text(&set.icl, q)).collect::<Result<_>>()?
        } else {
            let prefix: String = set.icl.iter().map(|(q, a)| format!("Question: {q}\nAnswer: {a}\n\n")).collect();
            set.qa.iter().map(|(q, _)| format!("{prefix}Question: {q}\nAnswer: ")).collect()
        };
        let shape = if chat { format!("{} chat prompt (ICL pairs as earlier turns)", ctx.template.name()) } else { "\"Question: ..\\nAnswer: ..\" prompt".into() };
        let (ids, cut) = prompt_ids(ctx, &prompts, o, !chat)?;
        let gens = ctx.generate(&ids, o.max_new_tokens_knowmem, key)?;
        let mut f1s = vec![];
        for (i, (((_, answer), prompt), gen)) in set.qa.iter().zip(&prompts).zip(&gens).enumerate() {
            let mut output = cut_at_stops(&decode(ctx.tok, gen, true)?, KNOWMEM_STOPS);
            if o.variant == Variant::OpenUnlearning {
                output = output.trim().to_string();
            }
            let r = scorer.score(answer, &output);
            f1s.push(r.f1);
            out.samples.push(SampleRow::new(
                key,
                i,
                prompt,
                Some(answer),
                Some(&output),
                json!({"rouge_l_f1": r.f1, "rouge_l_recall": r.recall, "prompt_tokens": ids[i].len(), "generated_tokens": gen.len()}),
            ));
        }
        let metric = Metric::new(
            python_mean(&f1s) * 100.0,
            format!(
                "MUSE KnowMem on {split}: mean ROUGE-L F1 ({stem_txt} stemmer) vs the answer of the {}-token greedy output of a {}-shot {shape}, cut at the first of \"\\n\\n\", \"\\nQuestion\", \"Question:\", x100",
                o.max_new_tokens_knowmem,
                set.icl.len()
            ),
            f1s.len(),
            if key == "knowmem_f" { "lower" } else { "higher" },
        );
        finish_part(&mut out, key, metric, cut, o, t);
    }
    if let Some((forget, holdout)) = &data.privleak {
        let t = Instant::now();
        let (auc, f_scores, h_scores) = privleak_scores(ctx, forget, holdout, o, "privleak")?;
        for (split, texts, scores) in [("privleak_forget", forget, &f_scores), ("privleak_holdout", holdout, &h_scores)] {
            for (i, (text, s)) in texts.iter().zip(scores.iter()).enumerate() {
                out.samples.push(SampleRow::new(split, i, text, None, None, json!({"min_k_40": s.min_k, "tokens": s.tokens, "nll": s.nll})));
            }
        }
        let cut_txt = match o.max_text_tokens {
            Some(n) => format!(", texts cut after {n} tokens"),
            None => String::new(),
        };
        let count_txt = match o.variant {
            Variant::Muse => "int(0.4 n)",
            Variant::OpenUnlearning => "max(1, int(0.4 n))",
        };
        let n = forget.len() + holdout.len();
        out.metrics.push((
            "privleak_auc".into(),
            Metric::new(
                auc,
                format!("MUSE forget-vs-holdout ROC AUC with labels forget=0, holdout=1 on the negated Min-40% score (-mean of the {count_txt} lowest log-probs of tokens 2..n of each full text{cut_txt}); near 0 = forget set memorized, about 0.5 = never seen"),
                n,
                "toward retain",
            ),
        ));
        match reference {
            Some(r) => {
                out.metrics.push((
                    "privleak".into(),
                    Metric::new(
                        privleak(auc, r.value),
                        format!("MUSE PrivLeak: (privleak_auc - AUC_retrain) / AUC_retrain x100 with AUC_retrain = {} ({}); 0 ideal, negative = under-unlearned, positive = over-unlearned", r.value, r.source),
                        n,
                        "toward 0",
                    ),
                ));
                out.reference = Some(json!({"auc_retrain": r.value, "source": r.source}));
            }
            None => out.notes.push(
                "privleak: no reference AUC (unknown corpus; give --corpus, --retain-auc or --retain-model), only privleak_auc is reported".into(),
            ),
        }
        out.timings_s.insert("privleak".into(), t.elapsed().as_secs_f64());
    }
    if let Some((items, icl)) = &data.mmlu {
        let t = Instant::now();
        let prompts: Vec<String> = items.iter().map(|it| mmlu_prompt(icl, it)).collect();
        let (ids, cut) = prompt_ids(ctx, &prompts, o, true)?;
        let gens = ctx.generate(&ids, o.max_new_tokens_mmlu, "mmlu")?;
        let mut correct = vec![];
        for (i, ((it, prompt), gen)) in items.iter().zip(&prompts).zip(&gens).enumerate() {
            let output = cut_at_stops(&decode(ctx.tok, gen, false)?, KNOWMEM_STOPS).trim().to_string();
            let pred = mmlu_prediction(&output);
            let ok = pred == Some(it.answer);
            correct.push(if ok { 1.0 } else { 0.0 });
            out.samples.push(SampleRow::new(
                "mmlu",
                i,
                prompt,
                Some(&LETTERS[it.answer].to_string()),
                Some(&output),
                json!({"correct": ok, "predicted": pred.map(|p| LETTERS[p].to_string()), "prompt_tokens": ids[i].len()}),
            ));
        }
        let metric = Metric::new(
            python_mean(&correct) * 100.0,
            format!(
                "MMLU accuracy (mt-unlearn's 1531-question validation subsample) x100: 5-shot prompt, greedy {} new tokens, output cut at the KnowMem stop strings and stripped, predicted letter = its first character if in A-D",
                o.max_new_tokens_mmlu
            ),
            correct.len(),
            "higher",
        );
        finish_part(&mut out, "mmlu", metric, cut, o, t);
    }
    Ok(out)
}

/// mt-unlearn's MMLU prompt (its "Quesion" spelling kept: the numbers depend on the exact text).
pub fn mmlu_prompt(icl: &str, it: &MmluItem) -> String {
    let choices: Vec<String> = it.choices.iter().zip(LETTERS).map(|(c, l)| format!("{l}. {c}")).collect();
    format!("{icl}\nQuesion: {}\n\nChoices:\n{}\n\nCorrect answer:", it.question, choices.join("\n"))
}

/// The choice index of an MMLU output: its first character's position in "ABCD".
pub fn mmlu_prediction(output: &str) -> Option<usize> {
    let c = output.chars().next()?;
    LETTERS.iter().position(|&l| l == c)
}

/// Min-K% result of one PrivLeak text.
#[derive(Debug, Clone, Copy)]
pub struct TextScore {
    pub min_k: f64,
    pub tokens: usize,
    pub nll: f64,
}

/// Min-40% scores of forget and holdout texts and their MUSE AUC.
pub fn privleak_scores(
    ctx: &EvalCtx,
    forget: &[String],
    holdout: &[String],
    o: &MuseOptions,
    label: &str,
) -> Result<(f64, Vec<TextScore>, Vec<TextScore>)> {
    let lead = leading_specials(ctx.tok)?;
    let mut examples = Vec::with_capacity(forget.len() + holdout.len());
    for text in forget.iter().chain(holdout) {
        let mut ids = ctx.tok.encode(text, true)?;
        if let Some(n) = o.max_text_tokens {
            ids.truncate(lead + n);
        }
        examples.push(Example { ids, n_context: 1 });
    }
    let lps = ctx.logprobs(&examples, label)?;
    let mut scores = Vec::with_capacity(lps.len());
    for (i, lp) in lps.iter().enumerate() {
        let (split, idx) = if i < forget.len() { ("forget", i) } else { ("holdout", i - forget.len()) };
        let s = summarize(idx, lp, o.variant.rounding());
        let min_k = s.min_k_40.ok_or_else(|| {
            crate::other!("privleak {split} text {idx}: {} scored token(s) are too few for a Min-40% score", lp.len())
        })?;
        scores.push(TextScore { min_k, tokens: s.tokens, nll: s.nll });
    }
    let holdout_scores = scores.split_off(forget.len());
    let f: Vec<f64> = scores.iter().map(|s| s.min_k).collect();
    let h: Vec<f64> = holdout_scores.iter().map(|s| s.min_k).collect();
    let auc = muse_auc(&f, &h)?;
    Ok((auc, scores, holdout_scores))
}
