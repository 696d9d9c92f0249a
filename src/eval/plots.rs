//! SVG plots: one small bar panel per metric (each with its own scale, since ROUGE x100, p-values
//! and PrivLeak percentages share no axis) with one bar per model, and training curves from a
//! run's `metrics.jsonl`.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::report::{metric_union, Report};
use crate::error::{Error, IoContext, Result};

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("cannot draw plot: {e}"))
}

/// Bars of every metric of `reports` (one colour per report, legend in each panel's x labels).
pub fn metrics_svg(path: &Path, reports: &[&Report]) -> Result<()> {
    let keys = metric_union(reports);
    let cols = 4usize.min(keys.len().max(1));
    let rows = keys.len().div_ceil(cols).max(1);
    let (w, h) = (300 * cols as u32, 230 * rows as u32);
    let root = SVGBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let names: Vec<String> = reports.iter().map(|r| short_label(&r.name)).collect();
    for (panel, key) in root.split_evenly((rows, cols)).iter().zip(&keys) {
        let vals: Vec<Option<f64>> = reports.iter().map(|r| r.metrics.get(key).and_then(|m| m.value)).collect();
        let finite: Vec<f64> = vals.iter().flatten().copied().collect();
        let lo = finite.iter().copied().fold(0.0f64, f64::min);
        let hi = finite.iter().copied().fold(0.0f64, f64::max);
        let pad = ((hi - lo) * 0.1).max(1e-9);
        let (y0, y1) = (if lo < 0.0 { lo - pad } else { 0.0 }, if hi > 0.0 || lo >= 0.0 { hi + pad } else { 0.0 });
        let n = reports.len();
        let mut chart = ChartBuilder::on(panel)
            .caption(key, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(22)
            .y_label_area_size(48)
            .build_cartesian_2d((0..n).into_segmented(), y0..y1)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_label_formatter(&|y| axis_label(*y))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        for (i, v) in vals.iter().enumerate() {
            let Some(v) = v else { continue };
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(Histogram::vertical(&chart).style(color.filled()).margin(6).data([(i, *v)]))
                .map_err(|e| plot_err(path, e))?;
        }
    }
    root.present().map_err(|e| plot_err(path, e))
}

/// Axis tick text: up to 4 significant digits without trailing zeros, scientific when tiny.
fn axis_label(y: f64) -> String {
    if y != 0.0 && (y.abs() < 1e-3 || y.abs() >= 1e6) {
        return format!("{y:.1e}");
    }
    let s = super::report::fmt_value(Some(y));
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn short_label(name: &str) -> String {
    if name.chars().count() <= 14 {
        name.to_string()
    } else {
        name.chars().take(13).collect::<String>() + "…"
    }
}

/// One training step as read back from metrics.jsonl (absent keys are `None`).
#[derive(Debug, Clone, Default)]
pub struct StepPoint {
    pub step: f64,
    pub values: std::collections::BTreeMap<String, f64>,
}

/// The keys plotted from a run's metrics.jsonl, by panel.
const CURVE_PANELS: [(&str, &[&str], bool); 3] = [
    ("loss", &["loss_forget", "loss_retain"], false),
    ("gradient norm", &["grad_norm_forget", "grad_norm_retain", "grad_norm", "grad_norm_forget_local", "grad_norm_retain_local"], true),
    ("lr and clip coefficient", &["lr", "clip"], true),
];

/// Read a run's metrics.jsonl (`step` plus numeric keys; nulls and other keys are skipped).
pub fn read_metrics_jsonl(path: &Path) -> Result<Vec<StepPoint>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out = vec![];
    for (lineno, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| Error::format(path, format!("line {}: not JSON: {e}", lineno + 1)))?;
        let step =
            v.get("step").and_then(Value::as_f64).ok_or_else(|| Error::format(path, format!("line {}: no numeric `step`", lineno + 1)))?;
        let mut p = StepPoint { step, ..Default::default() };
        for (_, keys, _) in CURVE_PANELS {
            for k in keys {
                if let Some(x) = v.get(*k).and_then(Value::as_f64) {
                    p.values.insert(k.to_string(), x);
                }
            }
        }
        // The in-run evaluation's lines: {"step", "eval": {"tofu.forget_quality": ..}, "eval_s"}.
        for (k, x) in v.get("eval").and_then(Value::as_object).into_iter().flatten() {
            if let Some(x) = x.as_f64() {
                p.values.insert(format!("{EVAL_PREFIX}{k}"), x);
            }
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::format(path, "contains no steps"));
    }
    Ok(out)
}

const EVAL_PREFIX: &str = "eval/";

/// Loss, gradient-norm and lr/clip curves of a training run, one panel each (log scale where the
/// values span orders of magnitude and are positive), and a panel of the in-run evaluation's
/// metrics when the run evaluated.
pub fn training_svg(path: &Path, title: &str, points: &[StepPoint]) -> Result<()> {
    let mut panels: Vec<(&str, Vec<&str>, bool)> = CURVE_PANELS.iter().map(|(c, k, l)| (*c, k.to_vec(), *l)).collect();
    let eval_keys: std::collections::BTreeSet<&str> =
        points.iter().flat_map(|p| p.values.keys()).map(String::as_str).filter(|k| k.starts_with(EVAL_PREFIX)).collect();
    if !eval_keys.is_empty() {
        panels.push(("in-run evaluation", eval_keys.into_iter().collect(), false));
    }
    let root = SVGBackend::new(path, (900, 240 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(|e| plot_err(path, e))?;
    let x_max = points.iter().map(|p| p.step).fold(1.0f64, f64::max);
    let x_min = points.iter().map(|p| p.step).fold(x_max, f64::min);
    for (panel, (caption, keys, log)) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let series: Vec<(&str, Vec<(f64, f64)>)> = keys
            .iter()
            .map(|k| (*k, points.iter().filter_map(|p| p.values.get(*k).map(|v| (p.step, *v))).filter(|(_, v)| v.is_finite()).collect()))
            .filter(|(_, pts): &(&str, Vec<(f64, f64)>)| !pts.is_empty())
            .collect();
        let all: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|(_, v)| *v)).collect();
        if all.is_empty() {
            continue;
        }
        let (lo, hi) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let use_log = log && lo > 0.0 && hi / lo > 20.0;
        let mut builder = ChartBuilder::on(panel);
        builder.caption(caption, ("sans-serif", 14)).margin(10).x_label_area_size(28).y_label_area_size(64);
        let xr = x_min..x_max.max(x_min + 1.0);
        if use_log {
            let mut chart = builder.build_cartesian_2d(xr, (lo * 0.8..hi * 1.25).log_scale()).map_err(|e| plot_err(path, e))?;
            chart.configure_mesh().x_desc("step").label_style(("sans-serif", 11)).draw().map_err(|e| plot_err(path, e))?;
            draw_lines(&mut chart, &series, path)?;
        } else {
            let pad = ((hi - lo) * 0.08).max(1e-6 * hi.abs().max(1.0));
            let mut chart = builder.build_cartesian_2d(xr, (lo - pad)..(hi + pad)).map_err(|e| plot_err(path, e))?;
            chart.configure_mesh().x_desc("step").label_style(("sans-serif", 11)).draw().map_err(|e| plot_err(path, e))?;
            draw_lines(&mut chart, &series, path)?;
        }
    }
    root.present().map_err(|e| plot_err(path, e))
}

fn draw_lines<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    series: &[(&str, Vec<(f64, f64)>)],
    path: &Path,
) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| plot_err(path, e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| plot_err(path, e))
}
