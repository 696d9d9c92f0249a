//! Dataset files → records. Understands the layouts found in TOFU and MUSE:
//! a JSON array; several JSON arrays, one per line (TOFU `full.json`, `retainNN.json`); JSON lines;
//! elements that are strings (MUSE raw text) or objects with `question`/`answer`,
//! `prompt`/`response` (TOFU `forgetXX.json`), `prompt`/`gt` (MUSE VerbMem) or `text`.
//! A `.txt` file is plain text: documents separated by blank lines. A `.parquet` file (the
//! benchmarks' Hugging Face layout) is read row by row, each row the object its JSON record is.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// One training or scoring sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A question and its answer; losses and scores use the answer tokens only.
    Qa { question: String, answer: String },
    /// Raw text; every token after the first is a target.
    Text(String),
}

/// Read all records of a dataset file.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let values = read_json_values(path)?;
    let records = values.iter().enumerate().map(|(i, v)| to_record(v, path, i)).collect::<Result<Vec<_>>>()?;
    if records.is_empty() {
        return Err(Error::format(path, "contains no records"));
    }
    Ok(records)
}

/// The JSON elements of a file: one array, one array per line, or JSON lines (flattened).
/// `.txt` files become one string element per blank-line-separated document.
pub fn read_json_values(path: &Path) -> Result<Vec<Value>> {
    if !path.exists() {
        return Err(Error::format(path, "file not found"));
    }
    if path.extension().is_some_and(|e| e == "parquet") {
        return super::parquet::read_rows(path);
    }
    let text = crate::files::read_text(path)?;
    if text.trim().is_empty() {
        return Err(Error::format(path, "file is empty"));
    }
    if path.extension().is_some_and(|e| e == "txt") {
        let docs: Vec<Value> = text.split("\n\n").map(str::trim).filter(|d| !d.is_empty()).map(|d| Value::String(d.to_string())).collect();
        return check_record_sizes(path, docs);
    }
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        return check_record_sizes(path, flatten(v));
    }
    let mut out = vec![];
    for (lineno, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::format(path, format!("line {}: not JSON ({e}); expected a JSON array or JSON lines", lineno + 1)))?;
        out.extend(flatten(v));
    }
    check_record_sizes(path, out)
}

/// Longest text one record may hold. The longest record of the TOFU and MUSE files is 41 kB; a
/// book-sized record is a file that was not split into documents, and tokenizing it at once costs
/// hundreds of bytes per token.
pub const MAX_RECORD_BYTES: usize = 8 << 20;

fn check_record_sizes(path: &Path, values: Vec<Value>) -> Result<Vec<Value>> {
    fn text_bytes(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(text_bytes).sum(),
            Value::Object(o) => o.iter().map(|(k, v)| k.len() + text_bytes(v)).sum(),
            _ => 0,
        }
    }
    if let Some((i, n)) = values.iter().map(text_bytes).enumerate().find(|&(_, n)| n > MAX_RECORD_BYTES) {
        return Err(Error::format(
            path,
            format!(
                "record {i} holds {:.1} MB of text, above the limit of {} MiB per record; split it into several records",
                n as f64 / 1e6,
                MAX_RECORD_BYTES >> 20
            ),
        ));
    }
    Ok(values)
}

fn flatten(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        other => vec![other],
    }
}

fn to_record(v: &Value, path: &Path, i: usize) -> Result<Record> {
    match v {
        Value::String(s) => Ok(Record::Text(s.clone())),
        Value::Object(obj) => {
            let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
            for (qk, ak) in [("question", "answer"), ("prompt", "response"), ("prompt", "gt")] {
                if let (Some(question), Some(answer)) = (s(qk), s(ak)) {
                    return Ok(Record::Qa { question, answer });
                }
            }
            if let Some(text) = s("text") {
                return Ok(Record::Text(text));
            }
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            Err(Error::format(
                path,
                format!("record {i}: keys {keys:?} are not a known layout (expected question/answer, prompt/response, prompt/gt or text)"),
            ))
        }
        other => Err(Error::format(path, format!("record {i}: expected a string or an object, found {other}"))),
    }
}
