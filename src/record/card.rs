//! A short model card (README.md) for a model directory an unlearning run produced: what was
//! forgotten, how, the evaluation table, and the record that reproduces it. Everything in it is
//! read from the record, so the card can never disagree with record.json.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::{Record, RECORD_FILE};
use crate::error::Result;
use crate::model::weights::write_atomic;

pub const CARD_FILE: &str = "README.md";

/// Write `dir/README.md` (atomically) for a model made by the run `record` describes.
/// `eval_table`: a Markdown table of the evaluation of this model, if there is one.
pub fn write_model_card(dir: &Path, record: &Record, eval_table: Option<&str>) -> Result<()> {
    write_atomic(&dir.join(CARD_FILE), model_card(record, eval_table).as_bytes())
}

/// The card's text.
pub fn model_card(record: &Record, eval_table: Option<&str>) -> String {
    let c = &record.config;
    let get = |ptr: &str| -> String {
        match c.pointer(ptr) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => "-".into(),
            Some(v) => v.to_string(),
        }
    };
    let method = get("/method/name");
    let base = record.models.iter().find(|m| m.role == "model").map_or_else(|| get("/model/path"), |m| m.path.clone());
    let mut s = String::new();
    let _ = writeln!(s, "---\nbase_model: {base:?}\ntags: [unlearning, {method}]\n---\n");
    let _ = writeln!(s, "# {method} unlearning of `{base}`\n");
    let _ = writeln!(s, "## What was forgotten and what was kept\n");
    for role in ["forget", "retain"] {
        let files: Vec<String> = record
            .data
            .iter()
            .filter(|d| d.role == role)
            .flat_map(|d| d.files.iter().map(move |f| format!("`{}` ({} bytes, sha256 {})", d.path, f.bytes, &f.sha256[..16])))
            .collect();
        let what = if role == "forget" { "Forgotten" } else { "Kept (retain / regulariser data)" };
        let _ = writeln!(s, "- {what}: {}", if files.is_empty() { "none".into() } else { files.join(", ") });
    }
    let _ = writeln!(s, "\n## How\n");
    let _ = writeln!(s, "- Method `{method}`; trainable weights: {}.", get("/model/trainable"));
    let _ = writeln!(
        s,
        "- Optimizer {} (lr {}), {} steps of global batch {} x {} accumulation, max length {}.",
        get("/optim/name"),
        get("/optim/lr"),
        get("/train/steps"),
        get("/train/batch_size"),
        get("/train/grad_accum"),
        get("/train/max_len")
    );
    let seeds: Vec<String> = record.seeds.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    let _ = writeln!(
        s,
        "- {} rank(s), ZeRO stage {}, compute dtype {}; seeds: {}.",
        record.world_size,
        record.zero_stage.map_or("-".into(), |z| z.to_string()),
        get("/model/dtype"),
        if seeds.is_empty() { "none".into() } else { seeds.join(", ") }
    );
    let sw = &record.software;
    let _ = writeln!(s, "- unlearn {} (commit {}), libtorch {}.", sw.unlearn, sw.git_commit, sw.libtorch);
    let _ = writeln!(s, "\n## Evaluation\n");
    match eval_table {
        Some(t) => s.push_str(t.trim_end()),
        None => s.push_str("Not evaluated."),
    }
    let _ = writeln!(s, "\n\n## Reproduction\n");
    let _ = writeln!(
        s,
        "Every resolved setting, seed, software version and input digest of the run is in `{RECORD_FILE}`\n(sha256 {}).",
        record.sha256()
    );
    s
}
