//! Streamed SHA-256 of the files a record names. Each file is read once, in 4 MiB blocks, so a
//! 7B model costs one sequential read of its weights (about as long as loading them), and
//! digests already computed elsewhere (an export's manifest) are reused instead of re-read.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

/// Files of a model directory that describe a run rather than the model; never hashed as model.
const NOT_MODEL_FILES: [&str; 2] = [super::RECORD_FILE, super::card::CARD_FILE];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    /// File name (relative to the directory for directory inputs).
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// A model directory: every top-level file but record.json and README.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDigest {
    /// `model`, `retain_model`, `reference_model`, `source_model`, ...
    pub role: String,
    pub path: String,
    pub files: Vec<FileDigest>,
    /// The `model.sha256` of `unlearn eval` reports (SHA-256 over the name then the bytes of
    /// config.json and each *.safetensors, in name order), so a report can be matched to this
    /// record. Absent when some weights were not re-read (their digests were reused).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub weights_sha256: Option<String>,
    /// SHA-256 of the directory's own record.json, if it has one (the run that produced it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub record_sha256: Option<String>,
}

/// A data input: one file, or a directory (every file below it, relative names, in name order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataDigest {
    /// `forget`, `retain`, `benchmark`, `retain_stats`, ...
    pub role: String,
    pub path: String,
    pub files: Vec<FileDigest>,
}

/// SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Read `path` once, in 4 MiB blocks, into its own SHA-256 and into each of `also`; returns its
/// size and hex digest.
pub fn hash_file(path: &Path, also: &mut [&mut Sha256]) -> Result<(u64, String)> {
    hash_file_reporting(path, also, &mut |_| {})
}

/// [`hash_file`], telling `read` how many bytes each chunk had (progress of a long hash).
pub fn hash_file_reporting(path: &Path, also: &mut [&mut Sha256], read: &mut dyn FnMut(u64)) -> Result<(u64, String)> {
    let mut f = crate::files::open_regular(path)?;
    let mut one = Sha256::new();
    let mut buf = vec![0u8; 1 << 22];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        one.update(&buf[..n]);
        for h in also.iter_mut() {
            h.update(&buf[..n]);
        }
        bytes += n as u64;
        read(n as u64);
    }
    Ok((bytes, format!("{:x}", one.finalize())))
}

fn stream(path: &Path, name: String, also: &mut [&mut Sha256]) -> Result<FileDigest> {
    let (bytes, sha256) = hash_file(path, also)?;
    Ok(FileDigest { name, bytes, sha256 })
}

/// Regular files directly in `dir`, sorted by path.
fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).at(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    files.sort();
    Ok(files)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

impl ModelDigest {
    /// Hash the model directory `dir`. A file listed in `known` with the same name and size is
    /// not read again (an export has just hashed the weights for its manifest).
    pub fn of(role: &str, dir: &Path, known: &[FileDigest]) -> Result<ModelDigest> {
        if !dir.is_dir() {
            return Err(Error::format(dir, "is not a model directory"));
        }
        let mut weights = Sha256::new();
        let mut weights_complete = true;
        let mut files = vec![];
        for path in files_in(dir)? {
            let name = file_name(&path);
            if NOT_MODEL_FILES.contains(&name.as_str()) {
                continue;
            }
            let counts_as_weights = name == "config.json" || name.ends_with(".safetensors");
            let size = std::fs::metadata(&path).at(&path)?.len();
            if let Some(k) = known.iter().find(|k| k.name == name && k.bytes == size) {
                weights_complete &= !counts_as_weights;
                files.push(k.clone());
                continue;
            }
            if counts_as_weights {
                weights.update(name.as_bytes());
                files.push(stream(&path, name, &mut [&mut weights])?);
            } else {
                files.push(stream(&path, name, &mut [])?);
            }
        }
        if !files.iter().any(|f| f.name == "config.json") {
            return Err(Error::format(dir, "no config.json in this directory (is it an HF model directory?)"));
        }
        Ok(ModelDigest {
            role: role.into(),
            path: dir.display().to_string(),
            files,
            weights_sha256: weights_complete.then(|| format!("{:x}", weights.finalize())),
            record_sha256: super::existing_record_sha256(dir)?,
        })
    }
}

impl DataDigest {
    /// Hash a data file, or every file below a data directory.
    pub fn of(role: &str, path: &Path) -> Result<DataDigest> {
        let mut files = vec![];
        if path.is_dir() {
            let mut stack = vec![path.to_path_buf()];
            let mut all = vec![];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).at(&d)? {
                    let p = e.at(&d)?.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.is_file() {
                        all.push(p);
                    }
                }
            }
            all.sort();
            for p in all {
                let name = p.strip_prefix(path).unwrap_or(&p).display().to_string();
                files.push(stream(&p, name, &mut [])?);
            }
        } else {
            files.push(stream(path, file_name(path), &mut [])?);
        }
        Ok(DataDigest { role: role.into(), path: path.display().to_string(), files })
    }
}
