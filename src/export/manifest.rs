//! `export.json`, written next to `model.onnx`: which weights were exported (SHA-256 of the
//! safetensors files), how (dtype, opset, cache), by which tool and when. `verify` reads it back
//! to refuse comparing an export against a model it was not made from.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::llama::ExportDtype;
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;

pub const MANIFEST_FILE: &str = "export.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub model_file: String,
    /// `model.onnx.data` when the weights are external, else `None` (inline).
    pub external_data: Option<String>,
    pub source_model: String,
    /// SHA-256 over the bytes of `source_files`, concatenated in the listed order.
    pub source_sha256: String,
    pub source_files: Vec<SourceFile>,
    pub dtype: ExportDtype,
    pub opset: i64,
    pub ir_version: i64,
    pub kv_cache: bool,
    /// `genai_config.json` (onnxruntime-genai's loader config), written with the cache graph only;
    /// absent from manifests written before it existed.
    #[serde(default)]
    pub genai_config: Option<String>,
    pub weight_bytes: u64,
    pub tool: String,
    pub tool_version: String,
    /// RFC 3339, UTC.
    pub created: String,
}

/// SHA-256 of each file and of all of them concatenated, in one read of each file (a 7B model's
/// 13 GB take a minute: progress is reported in MiB).
pub fn hash_weight_files<'a>(files: impl IntoIterator<Item = &'a Path>) -> Result<(String, Vec<SourceFile>)> {
    let files: Vec<&Path> = files.into_iter().collect();
    let total_mib = files.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum::<u64>() >> 20;
    let bar = Progress::new(total_mib, "hash MiB");
    let mut all = Sha256::new();
    let mut out = vec![];
    let (mut hashed, mut reported_mib) = (0u64, 0u64);
    for path in files {
        let (bytes, sha256) = crate::record::digest::hash_file_reporting(path, &mut [&mut all], &mut |n| {
            hashed += n;
            bar.inc((hashed >> 20) - reported_mib);
            reported_mib = hashed >> 20;
        })?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.push(SourceFile { name, bytes, sha256 });
    }
    bar.finish();
    Ok((format!("{:x}", all.finalize()), out))
}

/// `dir/export.json`, or `None` if the directory has none (an ONNX model from another tool).
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).at(&path)?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::format(&path, format!("not a valid export manifest: {e}")))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time after 1970.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_matches_known_instants() {
        let at = |s: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
