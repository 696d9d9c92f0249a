//! The evaluation report: `report.json`'s types (every number with the definition it was computed
//! by) and `report.md` (a table a person can read, before/after when compared). Written to disk,
//! with `samples.jsonl` and the plots, by [`super::outputs`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, IoContext, Result};

/// One reported number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metric {
    /// `null` when undefined (e.g. NaN from an empty set).
    pub value: Option<f64>,
    /// How the number was computed, precisely enough to recompute it from samples.jsonl.
    pub definition: String,
    /// Number of samples (questions, texts) it aggregates.
    pub n: usize,
    /// Which direction is good: "higher", "lower", "toward 0", "toward retain".
    pub better: String,
}

impl Metric {
    pub fn new(value: f64, definition: impl Into<String>, n: usize, better: &str) -> Self {
        Metric { value: value.is_finite().then_some(value), definition: definition.into(), n, better: better.to_string() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub path: String,
    /// SHA-256 over config.json and the safetensors files, in name order.
    pub sha256: String,
    pub tokenizer_fingerprint: String,
    pub dtype: String,
}

/// Per-question TOFU truth statistics of the forget set, kept so that a later evaluation of an
/// unlearned model can compute Forget Quality against this model (`--retain-stats`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TruthStats {
    /// The forget split, e.g. "forget01".
    pub split: String,
    pub definition: String,
    pub tokenizer_fingerprint: String,
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunInfo {
    pub ranks: usize,
    pub device: String,
    /// Seconds per evaluation part (wall clock on rank 0).
    pub timings_s: BTreeMap<String, f64>,
    pub wall_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// "muse" or "tofu".
    pub benchmark: String,
    /// Short label for tables and plots.
    pub name: String,
    pub model: ModelInfo,
    /// Evaluation-code variant ("muse" = the original benchmark code, "open-unlearning", "tofu").
    pub variant: String,
    pub data: String,
    pub limits: BTreeMap<String, Value>,
    pub metrics: BTreeMap<String, Metric>,
    /// Display order of `metrics`.
    pub order: Vec<String>,
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth_stats: Option<TruthStats>,
    /// Prompt template of QA prompts and answers: {"name", "detail", "source"} (absent: phi-qa).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Value>,
    pub run: RunInfo,
}

impl Report {
    /// Read `dir/report.json` (or the file itself when given one).
    pub fn load(path: &Path) -> Result<Report> {
        let file = if path.is_dir() { path.join("report.json") } else { path.to_path_buf() };
        if !file.exists() {
            return Err(Error::format(&file, "file not found (expected the report.json of an `unlearn eval` run)"));
        }
        let text = std::fs::read_to_string(&file).at(&file)?;
        serde_json::from_str(&text).map_err(|e| Error::format(&file, format!("not an `unlearn eval` report: {e}")))
    }

    pub fn push(&mut self, key: &str, m: Metric) {
        if !self.order.iter().any(|k| k == key) {
            self.order.push(key.to_string());
        }
        self.metrics.insert(key.to_string(), m);
    }

    /// (key, metric) in display order.
    pub fn ordered(&self) -> Vec<(&str, &Metric)> {
        let mut out: Vec<(&str, &Metric)> = self.order.iter().filter_map(|k| self.metrics.get(k).map(|m| (k.as_str(), m))).collect();
        for (k, m) in &self.metrics {
            if !self.order.contains(k) {
                out.push((k, m));
            }
        }
        out
    }
}

/// One line of samples.jsonl.
#[derive(Debug, Clone, Serialize)]
pub struct SampleRow {
    pub split: String,
    pub index: usize,
    pub prompt: String,
    pub reference: Option<String>,
    pub generation: Option<String>,
    pub scores: BTreeMap<String, Value>,
}

impl SampleRow {
    /// `scores`: a JSON object of per-sample numbers.
    pub fn new(split: &str, index: usize, prompt: &str, reference: Option<&str>, generation: Option<&str>, scores: Value) -> Self {
        let scores = match scores {
            Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        SampleRow {
            split: split.into(),
            index,
            prompt: prompt.into(),
            reference: reference.map(str::to_string),
            generation: generation.map(str::to_string),
            scores,
        }
    }
}

/// SHA-256 over `config.json` and the `*.safetensors` files of a model directory (name order).
pub fn model_sha256(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name == "config.json" || name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        h.update(f.file_name().unwrap_or_default().to_string_lossy().as_bytes());
        let mut file = crate::files::open_regular(&f)?;
        loop {
            let n = file.read(&mut buf).at(&f)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A number for a table: 4 significant digits, scientific for very small magnitudes (p-values).
pub fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(0.0) => "0".into(),
        Some(x) if x.abs() < 1e-3 || x.abs() >= 1e6 => format!("{x:.3e}"),
        Some(x) => {
            let digits = (3 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
            format!("{x:.digits$}")
        }
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// One report as Markdown: header, metrics table, notes.
pub fn render_single(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {} evaluation: {}\n", r.benchmark.to_uppercase(), r.name);
    let _ = writeln!(s, "- model: `{}` (sha256 `{}`)", r.model.path, short(&r.model.sha256));
    let _ = writeln!(s, "- variant: {}; data: `{}`", r.variant, r.data);
    let _ = writeln!(s, "- ranks: {}; device: {}; wall time: {:.1} s", r.run.ranks, r.run.device, r.run.wall_s);
    let limits: Vec<String> = r.limits.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    let _ = writeln!(s, "- limits: {}\n", limits.join(", "));
    let _ = writeln!(s, "| metric | value | n | better | definition |\n|---|---:|---:|---|---|");
    for (k, m) in r.ordered() {
        let _ = writeln!(s, "| {k} | {} | {} | {} | {} |", fmt_value(m.value), m.n, m.better, md_escape(&m.definition));
    }
    write_notes(&mut s, std::slice::from_ref(&r));
    s
}

/// Several reports side by side (the first is "before" when there are two), optionally followed
/// by the training runs' plots.
pub fn render_comparison(reports: &[&Report], run_plots: &[(String, String)]) -> String {
    let mut s = String::new();
    let benches: Vec<String> = {
        let mut b: Vec<String> = reports.iter().map(|r| r.benchmark.to_uppercase()).collect();
        b.dedup();
        b
    };
    let _ = writeln!(s, "# {} comparison\n", benches.join(" / "));
    for r in reports {
        let _ = writeln!(
            s,
            "- **{}**: `{}` (sha256 `{}`), variant {}, {} rank(s), {:.1} s",
            r.name,
            r.model.path,
            short(&r.model.sha256),
            r.variant,
            r.run.ranks,
            r.run.wall_s
        );
    }
    let _ = writeln!(s);
    let two = reports.len() == 2;
    let mut header = String::from("| metric |");
    let mut rule = String::from("|---|");
    for r in reports {
        let _ = write!(header, " {} |", md_escape(&r.name));
        rule.push_str("---:|");
    }
    if two {
        header.push_str(" change |");
        rule.push_str("---:|");
    }
    header.push_str(" better |");
    rule.push_str("---|");
    let _ = writeln!(s, "{header}\n{rule}");
    let mut definitions: Vec<(String, String)> = vec![];
    for key in metric_union(reports) {
        let mut row = format!("| {key} |");
        let vals: Vec<Option<f64>> = reports.iter().map(|r| r.metrics.get(&key).and_then(|m| m.value)).collect();
        for v in &vals {
            let _ = write!(row, " {} |", fmt_value(*v));
        }
        if two {
            let change = match (vals[0], vals[1]) {
                (Some(a), Some(b)) => fmt_value(Some(b - a)),
                _ => "n/a".into(),
            };
            let _ = write!(row, " {change} |");
        }
        let m = reports.iter().find_map(|r| r.metrics.get(&key)).expect("key comes from a report");
        let _ = write!(row, " {} |", m.better);
        let _ = writeln!(s, "{row}");
        // Numbers computed under different definitions or sample counts are flagged, not hidden.
        let per: Vec<(&str, &Metric)> = reports.iter().filter_map(|r| r.metrics.get(&key).map(|m| (r.name.as_str(), m))).collect();
        let same_def = per.iter().all(|(_, x)| x.definition == m.definition);
        let same_n = per.iter().all(|(_, x)| x.n == m.n);
        let mut def = if same_def {
            m.definition.clone()
        } else {
            per.iter().map(|(name, x)| format!("[{name}] {}", x.definition)).collect::<Vec<_>>().join("; ")
        };
        if !same_n {
            let ns: Vec<String> = per.iter().map(|(name, x)| format!("{name} {}", x.n)).collect();
            def += &format!(" (NOTE: different sample counts: {})", ns.join(", "));
        } else {
            def += &format!(" (n = {})", m.n);
        }
        definitions.push((key.clone(), def));
    }
    let _ = writeln!(s, "\n## Definitions\n");
    for (k, d) in definitions {
        let _ = writeln!(s, "- **{k}**: {}", md_escape(&d));
    }
    write_notes(&mut s, reports);
    if !run_plots.is_empty() {
        let _ = writeln!(s, "\n## Training runs\n");
        for (name, file) in run_plots {
            let _ = writeln!(s, "### {name}\n\n![{name}]({file})\n");
        }
    }
    if reports.len() > 1 || !run_plots.is_empty() {
        let _ = writeln!(s, "\n![metrics](metrics.svg)");
    }
    s
}

/// Metric keys of all reports, in the first report's order, then new ones as they appear.
pub fn metric_union(reports: &[&Report]) -> Vec<String> {
    let mut keys: Vec<String> = vec![];
    for r in reports {
        for (k, _) in r.ordered() {
            if !keys.iter().any(|x| x == k) {
                keys.push(k.to_string());
            }
        }
    }
    keys
}

fn write_notes(s: &mut String, reports: &[&Report]) {
    let notes: Vec<String> = reports
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| if reports.len() > 1 { format!("{}: {n}", r.name) } else { n.clone() }))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(s, "- {}", md_escape(&n));
        }
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Sequential left-to-right mean, as Python's `sum(vals) / len(vals)` in MUSE's logger.
pub fn python_mean(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, &x| a + x) / v.len() as f64
}
