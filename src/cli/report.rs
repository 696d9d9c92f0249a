//! `unlearn report`: one comparison of several finished evaluations (e.g. target, retain and
//! unlearned models) and training runs: report.md (side-by-side table, before/after change with two
//! reports), comparison.json, metrics.svg (one bar panel per metric) and one training_*.svg of
//! loss / gradient-norm / lr curves per run directory (its metrics.jsonl).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, Result};
use crate::eval::outputs::stage_dir;
use crate::eval::plots::{metrics_svg, read_metrics_jsonl, training_svg};
use crate::eval::report::{metric_union, render_comparison, Report};
use crate::model::weights::write_atomic;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Evaluation output directories (or their report.json), in table order ("before" first).
    #[arg(long, num_args = 1.., required = true)]
    pub reports: Vec<PathBuf>,
    /// Labels for the reports (default: each report's own name).
    #[arg(long, num_args = 1..)]
    pub names: Vec<String>,
    /// Training run directories (or metrics.jsonl files) to plot.
    #[arg(long, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// Output directory (replaced when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a non-empty --out that is not an earlier report (its files are deleted).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &ReportArgs) -> Result<()> {
    if !args.names.is_empty() && args.names.len() != args.reports.len() {
        return Err(crate::other!("--names has {} labels for {} --reports", args.names.len(), args.reports.len()));
    }
    let inputs: Vec<&Path> = args.reports.iter().chain(&args.runs).map(PathBuf::as_path).collect();
    crate::files::check_output_dir(&args.out, &crate::files::REPORT_OUTPUT, &inputs, args.overwrite)?;
    let mut reports: Vec<Report> = args.reports.iter().map(|p| Report::load(p)).collect::<Result<_>>()?;
    for (r, name) in reports.iter_mut().zip(&args.names) {
        r.name = name.clone();
    }
    let runs: Vec<(String, PathBuf)> = args
        .runs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let file = if p.is_dir() { p.join("metrics.jsonl") } else { p.clone() };
            if !file.exists() {
                return Err(Error::format(&file, "file not found (expected a training run's metrics.jsonl)"));
            }
            Ok((run_label(p, i), file))
        })
        .collect::<Result<_>>()?;
    // Read everything before writing anything.
    let curves = runs.iter().map(|(name, f)| Ok((name.clone(), read_metrics_jsonl(f)?))).collect::<Result<Vec<_>>>()?;
    let refs: Vec<&Report> = reports.iter().collect();
    stage_dir(&args.out, |tmp| {
        let mut plots = vec![];
        for (i, (name, points)) in curves.iter().enumerate() {
            let file = format!("training_{i}_{}.svg", sanitize(name));
            training_svg(&tmp.join(&file), name, points)?;
            plots.push((name.clone(), file));
        }
        metrics_svg(&tmp.join("metrics.svg"), &refs)?;
        write_atomic(&tmp.join("report.md"), render_comparison(&refs, &plots).as_bytes())?;
        write_atomic(&tmp.join("comparison.json"), comparison_json(&refs).as_bytes())
    })?;
    tracing::info!("wrote {}", args.out.display());
    Ok(())
}

/// `{metric: {name: value}}` plus the model list, for scripts.
fn comparison_json(reports: &[&Report]) -> String {
    let mut table: BTreeMap<String, BTreeMap<String, Option<f64>>> = BTreeMap::new();
    for key in metric_union(reports) {
        let row = reports.iter().map(|r| (r.name.clone(), r.metrics.get(&key).and_then(|m| m.value))).collect();
        table.insert(key, row);
    }
    let models: Vec<_> =
        reports.iter().map(|r| json!({"name": r.name, "path": r.model.path, "sha256": r.model.sha256, "benchmark": r.benchmark})).collect();
    serde_json::to_string_pretty(&json!({"models": models, "metrics": table})).expect("JSON serializes") + "\n"
}

fn run_label(p: &Path, i: usize) -> String {
    let dir = if p.is_dir() { p } else { p.parent().unwrap_or(p) };
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| format!("run{i}"))
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}
