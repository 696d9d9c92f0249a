//! The plan as a readable table (one section per phase, GiB per component, the verdict last).

use std::fmt::Write;

use super::{count, Phase, Plan, GIB};
use crate::config::Choice;

const COMPONENT: usize = 38;
const FORMULA: usize = 96;

fn line(out: &mut String, component: &str, formula: &str, bytes: Option<f64>) {
    let gib = bytes.map(|b| format!("{:>8.2}", b / GIB)).unwrap_or_default();
    // Long formulas wrap onto continuation lines so that the GiB column stays aligned.
    let mut words = formula.split(' ').peekable();
    let mut first = true;
    while words.peek().is_some() || first {
        let mut chunk = String::new();
        while let Some(w) = words.peek() {
            if !chunk.is_empty() && chunk.chars().count() + 1 + w.chars().count() > FORMULA {
                break;
            }
            if !chunk.is_empty() {
                chunk.push(' ');
            }
            chunk.push_str(w);
            words.next();
        }
        let more = words.peek().is_some();
        let (c, g) = if first { (component, if more { "" } else { gib.as_str() }) } else { ("", if more { "" } else { gib.as_str() }) };
        let _ = writeln!(out, "  {c:<COMPONENT$} {chunk:<FORMULA$} {g}");
        first = false;
    }
}

fn section(out: &mut String, ph: &Phase, resident: f64) {
    let _ = writeln!(out, "\n{}", ph.name);
    if ph.on_top_of_resident {
        line(out, "resident state", "everything in the section above", Some(resident));
    }
    for r in &ph.rows {
        line(out, &r.component, &r.formula, Some(r.bytes));
    }
    line(out, "= total", &ph.note, Some(ph.total_bytes));
}

impl Plan {
    /// The human-readable table.
    pub fn render(&self) -> String {
        let p = &self.input;
        let mut out = String::new();
        let per_rank = p.batch / p.world_size;
        let _ = writeln!(
            out,
            "unlearn plan: {} ({} params, {} trainable, {} frozen), {} on {} rank(s), ZeRO-{}, {} on {}",
            p.model_name,
            count(self.params as f64),
            count(self.trainable_params as f64),
            count(self.frozen_params as f64),
            p.method,
            p.world_size,
            p.zero,
            p.dtype.name(),
            match p.device {
                super::Device::Cuda => "cuda",
                super::Device::Cpu => "cpu",
            }
        );
        let _ = writeln!(
            out,
            "micro-batch {} × {} tokens per rank (global {}), {} executor{}, optimizer {}, teacher {}, {} buckets of ≤ {} MiB, fp32 shard {} elements",
            per_rank,
            p.seq,
            p.batch,
            if p.layer_wise() { "layer-wise (recompute)" } else { "plain" },
            if p.zero == 3 && !p.recompute { " (forced by ZeRO-3)" } else { "" },
            p.optim.name(),
            if p.method_spec.teacher() { p.teacher.name() } else { "none" },
            self.buckets,
            p.bucket_mb,
            count(self.shard_elems as f64),
        );
        let _ = writeln!(out, "gradients reduced {}", self.reduce_note);
        let _ = writeln!(out, "\n  {:<COMPONENT$} {:<FORMULA$} {:>8}", "component", "formula", "GiB");
        section(&mut out, &self.resident, 0.0);
        for ph in &self.phases {
            section(&mut out, ph, self.resident.total_bytes);
        }
        let verdict = if self.fits { "FITS" } else { "DOES NOT FIT" };
        let margin = self.budget_bytes - self.peak_bytes;
        let _ = writeln!(
            out,
            "\npeak per rank: {:.2} GiB ({}) of a {:.2} GiB budget: {verdict} ({} {:.2} GiB)",
            self.peak_bytes / GIB,
            self.peak_phase,
            self.budget_bytes / GIB,
            if margin >= 0.0 { "headroom" } else { "short by" },
            margin.abs() / GIB
        );
        if let Some(t) = &self.step_time {
            out += &t.render(p.world_size);
        }
        out
    }
}
