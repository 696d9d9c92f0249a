//! `verify`: the exported graph, run by onnxruntime, against the tch model on the same inputs.
//!
//! Three kinds of batch, the ones where exports usually break: right padding (positions
//! `0..t`), left padding (positions from the mask, as `generate` uses them), and decoding step by
//! step (with a cache graph: `present.*` fed back as `past_key_values.*`, compared with
//! [`Llama::forward_cached`]; without: the sequence re-run each step). Logit differences are
//! measured over real tokens only. Greedy continuations driven by onnxruntime must equal
//! [`greedy_all`]'s; where they part, the reference's top-two margin at that step tells a
//! near-tie (≤ 2·tolerance, a legitimate flip when logits differ by up to the tolerance) from a
//! real error.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::manifest::{hash_weight_files, read_manifest, rfc3339_utc};
use super::runtime::{Decoder, Float};
use super::writer::MODEL_FILE;
use crate::data::batch::qa_prompt;
use crate::data::{read_records, Record, Tokenizer};
use crate::error::{Error, Result};
use crate::eval::generate::{greedy_all, left_pad};
use crate::model::llama::positions_from_mask;
use crate::model::weights::Checkpoint;
use crate::model::{load_model, Config, KvCache, Llama};

/// fp32 graph vs fp32 tch: only summation order differs.
pub const DEFAULT_TOLERANCE_FP32: f64 = 1e-3;
/// fp16 graph vs the fp32 tch model: fp16 keeps 11 significant bits (~5e-4 relative per
/// rounding) and the residual stream accumulates them over the layers. On SmolLM2-135M-Instruct
/// (logits up to ~33) the measured max is 0.045-0.089 over the built-in prompts and TOFU
/// questions, so 0.25 leaves ~3x headroom; a real export bug moves logits by whole units.
pub const DEFAULT_TOLERANCE_FP16: f64 = 0.25;

/// Prompts used when no `--prompts` file is given: different lengths, so padding is exercised.
pub const BUILTIN_PROMPTS: &[&str] = &[
    "The capital of France is",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
];

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub model_dir: PathBuf,
    /// An export directory (with `model.onnx`) or the `.onnx` file itself.
    pub onnx: PathBuf,
    pub prompts: Option<PathBuf>,
    /// At most this many prompts from `prompts`.
    pub limit: usize,
    /// Prompts are cut to this many tokens.
    pub max_prompt_tokens: usize,
    pub tolerance: Option<f64>,
    pub max_new_tokens: usize,
    /// onnxruntime intra-op threads (0 = its default).
    pub threads: usize,
    pub device: Device,
}

/// |ONNX − reference| over the real positions of one kind of batch.
#[derive(Debug, Clone, Serialize)]
pub struct DiffStats {
    pub name: String,
    pub max_abs_diff: f64,
    pub mean_abs_diff: f64,
    /// Number of (row, position) pairs compared (each over the whole vocabulary).
    pub positions: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationCheck {
    pub prompt: String,
    pub prompt_tokens: usize,
    pub onnx: Vec<i64>,
    pub reference: Vec<i64>,
    /// Index of the first differing token, if any.
    pub first_divergence: Option<usize>,
    /// Reference logit of its own choice minus that of the ONNX choice at the divergence.
    pub reference_margin: Option<f64>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub model: String,
    pub onnx: String,
    pub dtype: String,
    pub kv_cache: bool,
    pub tolerance: f64,
    pub max_abs_diff: f64,
    pub checks: Vec<DiffStats>,
    pub generations_identical: bool,
    pub generations_ok: bool,
    pub generations: Vec<GenerationCheck>,
    pub passed: bool,
    pub created: String,
}

impl VerifyReport {
    /// A few human-readable lines.
    pub fn summary(&self) -> String {
        let mut s = format!("verify {} against {} ({}, kv_cache={})\n", self.onnx, self.model, self.dtype, self.kv_cache);
        for c in &self.checks {
            s += &format!(
                "  {:<16} max |dlogit| {:.3e}  mean {:.3e}  over {} positions\n",
                c.name, c.max_abs_diff, c.mean_abs_diff, c.positions
            );
        }
        let same = self.generations.iter().filter(|g| g.first_divergence.is_none()).count();
        s += &format!("  greedy generation: {same}/{} prompts identical", self.generations.len());
        for g in self.generations.iter().filter(|g| g.first_divergence.is_some()) {
            s += &format!(
                "\n    {:?}: diverges at token {} (reference margin {:.3e}: {})",
                g.prompt,
                g.first_divergence.unwrap_or(0),
                g.reference_margin.unwrap_or(f64::NAN),
                if g.ok { "near-tie, accepted" } else { "error" }
            );
        }
        s += &format!(
            "\n  {}: max |dlogit| {:.3e} (tolerance {:.1e}), generations {}",
            if self.passed { "PASSED" } else { "FAILED" },
            self.max_abs_diff,
            self.tolerance,
            if self.generations_ok { "agree" } else { "disagree" }
        );
        s
    }
}

/// Running max/mean of absolute differences.
struct DiffAcc {
    name: &'static str,
    max: f64,
    sum: f64,
    count: u64,
    positions: usize,
}

impl DiffAcc {
    fn new(name: &'static str) -> Self {
        DiffAcc { name, max: 0.0, sum: 0.0, count: 0, positions: 0 }
    }

    /// Compare `onnx [b, s, v]` with `reference [b, s, v]` at positions where `keep[b·s]`.
    fn add(&mut self, onnx: &[f32], reference: &Tensor, keep: &[bool], vocab: usize) {
        let r: Vec<f32> = Vec::<f32>::try_from(reference.to_kind(Kind::Float).to_device(Device::Cpu).contiguous().view(-1))
            .expect("fp32 reference logits");
        assert_eq!(r.len(), onnx.len(), "reference and ONNX logits have the same shape");
        for (p, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
            self.positions += 1;
            for (a, b) in onnx[p * vocab..(p + 1) * vocab].iter().zip(&r[p * vocab..(p + 1) * vocab]) {
                let d = (*a as f64 - *b as f64).abs();
                // NaN from either side counts as an infinite difference.
                let d = if d.is_nan() { f64::INFINITY } else { d };
                self.max = self.max.max(d);
                self.sum += d;
                self.count += 1;
            }
        }
    }

    fn finish(self) -> DiffStats {
        DiffStats {
            name: self.name.to_string(),
            max_abs_diff: self.max,
            mean_abs_diff: if self.count > 0 { self.sum / self.count as f64 } else { 0.0 },
            positions: self.positions,
        }
    }
}

fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_device(Device::Cpu).contiguous().view(-1)).expect("int64 tensor")
}

fn rows_tensor(data: &[i64], batch: usize) -> Tensor {
    Tensor::from_slice(data).view([batch as i64, (data.len() / batch) as i64])
}

/// Row-major argmax of the last position of each row of `logits [b, s, v]`.
fn last_argmax(logits: &[f32], batch: usize, vocab: usize) -> Vec<i64> {
    let s = logits.len() / batch / vocab;
    (0..batch)
        .map(|r| {
            let row = &logits[(r * s + s - 1) * vocab..(r * s + s) * vocab];
            let mut best = 0;
            for (i, x) in row.iter().enumerate() {
                if *x > row[best] {
                    best = i;
                }
            }
            best as i64
        })
        .collect()
}

/// Prompt texts: the built-ins, or records of a dataset file (QA → the question prompt).
fn prompt_texts(opts: &VerifyOptions) -> Result<Vec<String>> {
    let Some(path) = &opts.prompts else {
        return Ok(BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect());
    };
    let records = read_records(path)?;
    Ok(records
        .into_iter()
        .take(opts.limit.max(1))
        .map(|r| match r {
            Record::Qa { question, .. } => qa_prompt(&question),
            Record::Text(t) => t,
        })
        .collect())
}

/// The `model.onnx` named by `--onnx` (a directory or the file).
pub fn onnx_file(onnx: &Path) -> PathBuf {
    if onnx.is_dir() {
        onnx.join(MODEL_FILE)
    } else {
        onnx.to_path_buf()
    }
}

/// Run every check. Fails early, before any number is computed, when the graph cannot belong
/// to the model.
pub fn verify(opts: &VerifyOptions) -> Result<VerifyReport> {
    let cfg_path = crate::model::config::config_path(&opts.model_dir)?;
    let cfg = Config::from_file(&cfg_path)?;
    let onnx_path = onnx_file(&opts.onnx);
    let mut dec = Decoder::open(&onnx_path, opts.threads)?;
    dec.check_against(&cfg, &cfg_path)?;
    let onnx_dir = onnx_path.parent().unwrap_or(Path::new("."));
    let manifest = read_manifest(onnx_dir)?;
    if let Some(m) = &manifest {
        let ckpt = Checkpoint::open(&opts.model_dir)?;
        let (sha, _) = hash_weight_files(ckpt.files())?;
        if sha != m.source_sha256 {
            return Err(Error::format(
                &onnx_path,
                format!(
                    "was exported from weights with SHA-256 {} ({}), but the weights in {} hash to {sha}",
                    m.source_sha256,
                    m.source_model,
                    opts.model_dir.display()
                ),
            ));
        }
    }
    let tolerance = opts.tolerance.unwrap_or(match dec.float() {
        Float::F32 => DEFAULT_TOLERANCE_FP32,
        Float::F16 => DEFAULT_TOLERANCE_FP16,
    });

    let loaded = load_model(&opts.model_dir, Kind::Float, opts.device)?;
    let model = &loaded.model;
    let tok = Tokenizer::from_model_dir(&opts.model_dir, &cfg)?;
    let texts = prompt_texts(opts)?;
    let mut prompts = vec![];
    for t in &texts {
        let mut ids = tok.encode(t, true)?;
        ids.truncate(opts.max_prompt_tokens.max(1));
        if ids.is_empty() {
            return Err(crate::other!("prompt {t:?} encodes to no tokens"));
        }
        prompts.push(ids);
    }
    let pad = tok.pad_id();
    let eos = if cfg.eos_token_ids.is_empty() { vec![tok.eos_id()?] } else { cfg.eos_token_ids.clone() };
    let _guard = tch::no_grad_guard();

    let mut checks = vec![right_padded(&mut dec, model, &prompts, pad)?, left_padded(&mut dec, model, &prompts, pad)?];
    let (onnx_gen, decode) = onnx_greedy(&mut dec, model, &prompts, opts.max_new_tokens, &eos, pad)?;
    checks.push(decode);
    let reference = greedy_all(model, &prompts, opts.max_new_tokens, &eos, pad, prompts.len(), "verify");

    let mut generations = vec![];
    for ((text, prompt), (picked, want)) in texts.iter().zip(&prompts).zip(onnx_gen.iter().zip(&reference)) {
        let got: Vec<i64> = picked.iter().copied().filter(|t| !eos.contains(t)).collect();
        let first_divergence = (got != *want).then(|| got.iter().zip(want).take_while(|(a, b)| a == b).count());
        let reference_margin = first_divergence.and_then(|k| picked.get(k).map(|&t| reference_margin(model, prompt, &want[..k], t)));
        let ok = match first_divergence {
            None => true,
            Some(_) => reference_margin.is_some_and(|m| m <= 2.0 * tolerance),
        };
        generations.push(GenerationCheck {
            prompt: text.clone(),
            prompt_tokens: prompt.len(),
            onnx: got,
            reference: want.clone(),
            first_divergence,
            reference_margin,
            ok,
        });
    }
    let max_abs_diff = checks.iter().map(|c| c.max_abs_diff).fold(0.0, f64::max);
    let generations_identical = generations.iter().all(|g| g.first_divergence.is_none());
    let generations_ok = generations.iter().all(|g| g.ok);
    Ok(VerifyReport {
        model: opts.model_dir.display().to_string(),
        onnx: onnx_path.display().to_string(),
        dtype: match dec.float() {
            Float::F32 => "fp32".into(),
            Float::F16 => "fp16".into(),
        },
        kv_cache: dec.kv().is_some(),
        tolerance,
        max_abs_diff,
        checks,
        generations_identical,
        generations_ok,
        generations,
        passed: max_abs_diff <= tolerance && generations_ok,
        created: rfc3339_utc(std::time::SystemTime::now()),
    })
}

/// Right padding with positions `0..t`, which is what transformers assumes without
/// `position_ids`.
fn right_padded(dec: &mut Decoder, model: &Llama, prompts: &[Vec<i64>], pad: i64) -> Result<DiffStats> {
    let (b, t) = (prompts.len(), prompts.iter().map(Vec::len).max().unwrap_or(1));
    let mut ids = vec![pad; b * t];
    let mut mask = vec![0i64; b * t];
    for (r, p) in prompts.iter().enumerate() {
        ids[r * t..r * t + p.len()].copy_from_slice(p);
        mask[r * t..r * t + p.len()].fill(1);
    }
    let pos: Vec<i64> = (0..b).flat_map(|_| 0..t as i64).collect();
    let out = dec.run(&ids, &mask, &pos, b, dec.empty_past(b)?)?;
    let dev = model.device();
    let reference = model.forward(&rows_tensor(&ids, b).to_device(dev), Some(&rows_tensor(&mask, b).to_device(dev)), None);
    let mut acc = DiffAcc::new("right_padded");
    acc.add(&out.logits, &reference, &mask.iter().map(|m| *m != 0).collect::<Vec<_>>(), out.vocab);
    Ok(acc.finish())
}

/// Left padding with positions from the mask (as generation uses it).
fn left_padded(dec: &mut Decoder, model: &Llama, prompts: &[Vec<i64>], pad: i64) -> Result<DiffStats> {
    let refs: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
    let dev = model.device();
    let (ids_t, mask_t) = left_pad(&refs, pad, dev);
    let pos_t = positions_from_mask(&mask_t);
    let (ids, mask, pos) = (to_vec_i64(&ids_t), to_vec_i64(&mask_t), to_vec_i64(&pos_t));
    let b = prompts.len();
    let out = dec.run(&ids, &mask, &pos, b, dec.empty_past(b)?)?;
    let reference = model.forward(&ids_t, Some(&mask_t), Some(&pos_t));
    let mut acc = DiffAcc::new("left_padded");
    acc.add(&out.logits, &reference, &mask.iter().map(|m| *m != 0).collect::<Vec<_>>(), out.vocab);
    Ok(acc.finish())
}

/// Greedy decoding driven by onnxruntime on one left-padded batch, compared step by step with
/// the tch model fed the same tokens. Returns each row's picked tokens (its stop token
/// included) and the decode-phase differences.
fn onnx_greedy(
    dec: &mut Decoder,
    model: &Llama,
    prompts: &[Vec<i64>],
    max_new_tokens: usize,
    eos: &[i64],
    pad: i64,
) -> Result<(Vec<Vec<i64>>, DiffStats)> {
    let b = prompts.len();
    let refs: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
    let dev = model.device();
    let (ids_t, mask_t) = left_pad(&refs, pad, dev);
    let (mut ids, mut mask) = (to_vec_i64(&ids_t), to_vec_i64(&mask_t));
    let mut pos = to_vec_i64(&positions_from_mask(&mask_t));
    let cached = dec.kv().is_some();
    let mut acc = DiffAcc::new(if cached { "kv_decode" } else { "decode_recompute" });
    let mut picked: Vec<Vec<i64>> = vec![vec![]; b];
    let mut done = vec![max_new_tokens == 0; b];
    let mut cache = KvCache::new();
    let mut past = dec.empty_past(b)?;
    // The new tokens of this step (all of the prompt at first).
    let (mut step_ids, mut step_pos) = (ids.clone(), pos.clone());
    for step in 0..max_new_tokens {
        let (out, reference, keep) = if cached {
            let mut out = dec.run(&step_ids, &mask, &step_pos, b, past.take())?;
            let reference = model.forward_cached(
                &rows_tensor(&step_ids, b).to_device(dev),
                &rows_tensor(&mask, b).to_device(dev),
                &rows_tensor(&step_pos, b).to_device(dev),
                &mut cache,
            );
            let s = step_ids.len() / b;
            let keep: Vec<bool> = (0..b * s).map(|i| step > 0 || mask[i] != 0).collect();
            past = out.present.take();
            (out, reference, keep)
        } else {
            let out = dec.run(&ids, &mask, &pos, b, None)?;
            let t = ids.len() / b;
            let reference = model.forward(
                &rows_tensor(&ids, b).to_device(dev),
                Some(&rows_tensor(&mask, b).to_device(dev)),
                Some(&rows_tensor(&pos, b).to_device(dev)),
            );
            // The first step compares the whole prompt, later ones the newest position.
            let keep: Vec<bool> = (0..b * t).map(|i| mask[i] != 0 && (step == 0 || i % t == t - 1)).collect();
            (out, reference, keep)
        };
        acc.add(&out.logits, &reference, &keep, out.vocab);
        let next = last_argmax(&out.logits, b, out.vocab);
        for r in 0..b {
            if !done[r] {
                picked[r].push(next[r]);
                done[r] = eos.contains(&next[r]);
            }
        }
        if done.iter().all(|d| *d) || step + 1 == max_new_tokens {
            break;
        }
        // Append the picked token to every row (finished rows keep going; their tokens are
        // ignored, and rows never see each other).
        let (s_all, t) = (ids.len() / b, mask.len() / b);
        let grow = |v: &[i64], cols: usize, new: &[i64]| -> Vec<i64> {
            (0..b).flat_map(|r| v[r * cols..(r + 1) * cols].iter().copied().chain([new[r]])).collect()
        };
        step_pos = (0..b).map(|r| pos[r * s_all + s_all - 1] + 1).collect();
        ids = grow(&ids, s_all, &next);
        mask = grow(&mask, t, &vec![1; b]);
        pos = grow(&pos, s_all, &step_pos);
        step_ids = next;
    }
    Ok((picked, acc.finish()))
}

/// Reference logit of its argmax minus that of `token`, after `prompt + prefix` (no cache).
fn reference_margin(model: &Llama, prompt: &[i64], prefix: &[i64], token: i64) -> f64 {
    let seq: Vec<i64> = prompt.iter().chain(prefix).copied().collect();
    let ids = Tensor::from_slice(&seq).view([1, -1]).to_device(model.device());
    let logits = model.forward(&ids, None, None).select(1, seq.len() as i64 - 1).squeeze_dim(0).to_kind(Kind::Double);
    logits.max().double_value(&[]) - logits.double_value(&[token])
}
