//! Benchmark files as typed rows, with errors that name the file, the record and the key: a bad
//! evaluation file must stop the run before any model work, never produce a silently wrong number.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::data::formats::read_json_values;
use crate::error::{Error, Result};

/// The JSON records of a file; a file without any is an error (`[]` as much as an empty file).
fn non_empty_values(path: &Path) -> Result<Vec<Value>> {
    let values = read_json_values(path)?;
    if values.is_empty() {
        return Err(Error::format(path, "contains no records"));
    }
    Ok(values)
}

/// The object records of a JSON (array / arrays per line / JSON lines) file. Errors when the file
/// is missing, empty, holds no records, or holds something other than objects.
pub fn read_objects(path: &Path) -> Result<Vec<Map<String, Value>>> {
    non_empty_values(path)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(o) => Ok(o),
            other => Err(Error::format(path, format!("record {i}: expected a JSON object, found {}", kind_of(&other)))),
        })
        .collect()
}

/// Texts of a file whose records are strings or `{"text": ...}` objects (MUSE PrivLeak, in the raw
/// and the official Hugging Face layouts).
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    non_empty_values(path)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s),
            Value::Object(o) => match o.get("text") {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(Error::format(
                    path,
                    format!("record {i}: expected a string or an object with a string `text`, found keys {:?}", keys(&o)),
                )),
            },
            other => Err(Error::format(path, format!("record {i}: expected a string, found {}", kind_of(&other)))),
        })
        .collect()
}

/// A record's string field, or an error naming file, record, key and the keys that are there.
pub fn str_field(path: &Path, i: usize, rec: &Map<String, Value>, key: &str) -> Result<String> {
    match rec.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(Error::format(path, format!("record {i}: `{key}` must be a string, found {}", kind_of(other)))),
        None => Err(missing(path, i, rec, key)),
    }
}

/// A record's non-empty list-of-strings field.
pub fn str_list_field(path: &Path, i: usize, rec: &Map<String, Value>, key: &str) -> Result<Vec<String>> {
    let bad = || Error::format(path, format!("record {i}: `{key}` must be a non-empty list of strings"));
    match rec.get(key) {
        Some(Value::Array(items)) if !items.is_empty() => items.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(bad)).collect(),
        Some(_) => Err(bad()),
        None => Err(missing(path, i, rec, key)),
    }
}

/// A record's non-negative integer field.
pub fn index_field(path: &Path, i: usize, rec: &Map<String, Value>, key: &str) -> Result<usize> {
    match rec.get(key) {
        Some(v) => v
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| Error::format(path, format!("record {i}: `{key}` must be a non-negative integer, found {v}"))),
        None => Err(missing(path, i, rec, key)),
    }
}

fn missing(path: &Path, i: usize, rec: &Map<String, Value>, key: &str) -> Error {
    Error::format(path, format!("record {i}: missing key `{key}` (the record has keys {:?})", keys(rec)))
}

fn keys(rec: &Map<String, Value>) -> Vec<&str> {
    rec.keys().map(String::as_str).collect()
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Question/answer pairs (`question`, `answer`) of a file.
pub fn read_qa(path: &Path) -> Result<Vec<(String, String)>> {
    read_objects(path)?
        .iter()
        .enumerate()
        .map(|(i, r)| Ok((str_field(path, i, r, "question")?, str_field(path, i, r, "answer")?)))
        .collect()
}

/// Keep the first `limit` items when a limit is given.
pub fn take<T>(mut v: Vec<T>, limit: Option<usize>) -> Vec<T> {
    if let Some(n) = limit {
        v.truncate(n);
    }
    v
}

/// `dir/name`, or an error naming it when it does not exist.
pub fn existing(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::format(&p, "file not found"))
    }
}
