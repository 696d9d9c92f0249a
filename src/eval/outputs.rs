//! Writing an evaluation to disk: `report.json`, `report.md`, `samples.jsonl` (one line per
//! evaluated sample, enough to recompute every aggregate), `metrics.svg` and, when given, the
//! reproduction record `record.json`, into a temporary directory that replaces `--out` only when
//! complete. This module sits above `report` (the report's types and Markdown) and `plots` (SVG),
//! which never import it.

use std::path::Path;

use serde::Serialize;

use super::plots::metrics_svg;
use super::report::{render_comparison, render_single, Report, SampleRow};
use crate::error::{IoContext, Result};
use crate::model::weights::{publish_dir, temp_sibling, write_atomic};
use crate::record::Record;

/// Write report.json, report.md, samples.jsonl, metrics.svg and `record`'s record.json into `out`
/// (replacing it), all or nothing. `compare`: earlier reports to show next to this one (before/after).
pub fn write_eval_outputs(out: &Path, report: &Report, samples: &[SampleRow], compare: &[Report], record: Option<&Record>) -> Result<()> {
    let mut all: Vec<&Report> = compare.iter().collect();
    all.push(report);
    stage_dir(out, |tmp| {
        let json = serde_json::to_string_pretty(report).expect("report serializes") + "\n";
        write_atomic(&tmp.join("report.json"), json.as_bytes())?;
        write_atomic(&tmp.join("samples.jsonl"), json_lines(samples).as_bytes())?;
        let md = if compare.is_empty() { render_single(report) } else { render_comparison(&all, &[]) };
        write_atomic(&tmp.join("report.md"), md.as_bytes())?;
        if let Some(record) = record {
            record.write(tmp)?;
        }
        metrics_svg(&tmp.join("metrics.svg"), &all)
    })
}

/// One JSON object per line.
pub fn json_lines<T: Serialize>(rows: &[T]) -> String {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row).expect("rows serialize"));
        text.push('\n');
    }
    text
}

/// Fill a fresh temporary sibling of `out` with `fill`, then move it into place; on error the
/// temporary directory is removed and `out` is untouched.
pub fn stage_dir(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    let result = fill(&tmp).and_then(|_| publish_dir(&tmp, out));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
