//! Parquet dataset files, as the benchmarks publish them on the Hugging Face hub (`locuslab/TOFU`,
//! `muse-bench/MUSE-News`): every row becomes the JSON object the same record would be in the
//! JSON files, so QA, text and evaluation layouts are read by one code path whatever the format.
//! Only the row API of the `parquet` crate is used (no Arrow), with the codecs the hub's files use
//! (snappy, zstd; uncompressed too).

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The rows of a Parquet file as JSON objects keyed by column name.
pub fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let file = crate::files::open_regular(path)?;
    let reader = SerializedFileReader::new(file).map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| Error::format(path, format!("cannot read Parquet rows: {e}")))?;
    rows.enumerate()
        .map(|(i, row)| {
            let row = row.map_err(|e| Error::format(path, format!("row {i}: {e}")))?;
            row_object(&row).map_err(|msg| Error::format(path, format!("row {i}: {msg}")))
        })
        .collect()
}

fn row_object(row: &Row) -> std::result::Result<Value, String> {
    let mut obj = Map::new();
    for (name, field) in row.get_column_iter() {
        obj.insert(name.clone(), field_value(field).map_err(|m| format!("column `{name}`: {m}"))?);
    }
    Ok(Value::Object(obj))
}

fn field_value(f: &Field) -> std::result::Result<Value, String> {
    Ok(match f {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(v) => Value::from(*v),
        Field::Short(v) => Value::from(*v),
        Field::Int(v) => Value::from(*v),
        Field::Long(v) => Value::from(*v),
        Field::UByte(v) => Value::from(*v),
        Field::UShort(v) => Value::from(*v),
        Field::UInt(v) => Value::from(*v),
        Field::ULong(v) => Value::from(*v),
        Field::Float16(v) => Value::from(f64::from(f32::from(*v))),
        Field::Float(v) => Value::from(f64::from(*v)),
        Field::Double(v) => Value::from(*v),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(e) => return Err(format!("binary value that is not UTF-8 text ({e})")),
        },
        Field::Group(row) => row_object(row)?,
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(field_value).collect::<std::result::Result<_, _>>()?),
        Field::MapInternal(map) => {
            let mut obj = Map::new();
            for (k, v) in map.entries() {
                let key = match field_value(k)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                obj.insert(key, field_value(v)?);
            }
            Value::Object(obj)
        }
        // Dates, times and decimals are not part of any benchmark layout; keep their text.
        other => Value::String(other.to_string()),
    })
}
