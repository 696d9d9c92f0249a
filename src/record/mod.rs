//! The reproduction record (`record.json`) written with every run, evaluation and export: the
//! resolved settings, seeds, world size, ZeRO stage, metric variant, the binary's version and
//! commit, the native library versions, and SHA-256 digests of every model and data file read.
//!
//! The record's hash is the SHA-256 of record.json's exact bytes (`sha256sum record.json` gives
//! the same), so it can be printed, quoted and checked without this tool. The record holds no
//! timestamps or host names: two runs with the same inputs, settings and software have the same
//! record and the same hash.

pub mod card;
pub mod digest;
pub mod software;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use card::write_model_card;
pub use digest::{sha256_hex, DataDigest, FileDigest, ModelDigest};
pub use software::Software;

use crate::config::RunConfig;
use crate::error::{Error, IoContext, Result};
use crate::export::manifest::Manifest;
use crate::model::weights::write_atomic;

pub const RECORD_FILE: &str = "record.json";
pub const FORMAT: &str = "unlearn-record/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub format: String,
    /// `run`, `eval` or `export`.
    pub kind: String,
    /// The command line as given (for people; the settings below are what counts).
    pub command: Vec<String>,
    /// Resolved settings: the run config after defaults and `--set`, or the eval/export options.
    pub config: Value,
    pub seeds: BTreeMap<String, u64>,
    pub world_size: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub zero_stage: Option<u8>,
    /// Which metric definitions an evaluation followed (`muse`, `open-unlearning`, `tofu`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub metric_variant: Option<String>,
    pub software: Software,
    pub models: Vec<ModelDigest>,
    pub data: Vec<DataDigest>,
    /// What the run's in-run evaluation decided about the model directory this record is in
    /// (the rule that stopped the run, the step the weights are from, their evaluation).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outcome: Option<Value>,
}

/// Something a command read, to be hashed into its record.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A model directory, with its role (`model`, `retain_model`, ...).
    Model(&'a str, &'a Path),
    /// A data file or directory, with its role (`forget`, `benchmark`, ...).
    Data(&'a str, &'a Path),
}

impl Record {
    /// A record of `kind` with these settings; inputs are added with [`Record::with_inputs`].
    pub fn new(kind: &str, config: Value, world_size: usize) -> Record {
        Record {
            format: FORMAT.into(),
            kind: kind.into(),
            command: std::env::args().collect(),
            config,
            seeds: BTreeMap::new(),
            world_size,
            zero_stage: None,
            metric_variant: None,
            software: Software::detect(),
            models: vec![],
            data: vec![],
            outcome: None,
        }
    }

    /// Hash the inputs (each file read once) and add them.
    pub fn with_inputs(mut self, inputs: &[Input]) -> Result<Record> {
        for input in inputs {
            match *input {
                Input::Model(role, dir) => self.models.push(ModelDigest::of(role, dir, &[])?),
                Input::Data(role, path) => self.data.push(DataDigest::of(role, path)?),
            }
        }
        Ok(self)
    }

    /// The record of an unlearning or fine-tuning run: the resolved config (exactly the TOML a
    /// run writes next to its outputs and `--resume` reads, as JSON), its seed, the world size
    /// and ZeRO stage, the model (and the method's reference model, if any) and every forget/retain file. The
    /// loaders derive their streams from `train.seed` (forget stream 1, retain stream 2); nothing
    /// else in a run is random. Call it on rank 0 only: it reads every input file once.
    pub fn for_run(cfg: &RunConfig, world_size: usize) -> Result<Record> {
        let table: toml::Table =
            toml::from_str(&cfg.to_toml()).map_err(|e| crate::other!("resolved run config does not parse back: {e}"))?;
        let config = serde_json::to_value(table).map_err(|e| crate::other!("run config does not convert to JSON: {e}"))?;
        let mut r = Record::new("run", config, world_size);
        r.seeds.insert("train.seed".into(), cfg.train.seed);
        r.zero_stage = Some(cfg.dist.zero);
        let mut inputs = vec![Input::Model("model", &cfg.model.path)];
        inputs.extend(cfg.method.model_dirs().into_iter().map(|(role, dir)| Input::Model(role, dir)));
        inputs.extend(cfg.data.forget.iter().map(|p| Input::Data("forget", p)));
        inputs.extend(cfg.data.retain.iter().map(|p| Input::Data("retain", p)));
        r.with_inputs(&inputs)
    }

    /// The record of an export: the export options and the source model, whose weight digests
    /// come from the manifest the export has just written (the weights are not read again).
    pub fn for_export(manifest: &Manifest, model_dir: &Path) -> Result<Record> {
        let config = serde_json::json!({
            "dtype": manifest.dtype,
            "opset": manifest.opset,
            "ir_version": manifest.ir_version,
            "kv_cache": manifest.kv_cache,
            "external_data": manifest.external_data,
        });
        let known: Vec<FileDigest> =
            manifest.source_files.iter().map(|f| FileDigest { name: f.name.clone(), bytes: f.bytes, sha256: f.sha256.clone() }).collect();
        let mut r = Record::new("export", config, 1);
        r.models.push(ModelDigest::of("source_model", model_dir, &known)?);
        Ok(r)
    }

    /// `weights_sha256` of the model with `role` (see [`ModelDigest`]).
    pub fn weights_sha256(&self, role: &str) -> Option<&str> {
        self.models.iter().find(|m| m.role == role).and_then(|m| m.weights_sha256.as_deref())
    }

    /// The exact bytes of record.json.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = serde_json::to_string_pretty(self).expect("a record serializes");
        text.push('\n');
        text.into_bytes()
    }

    /// The record's printable hash: SHA-256 of [`Record::to_bytes`].
    pub fn sha256(&self) -> String {
        sha256_hex(&self.to_bytes())
    }

    /// Write `dir/record.json` atomically (temporary name, fsync, rename); returns its hash.
    pub fn write(&self, dir: &Path) -> Result<String> {
        let bytes = self.to_bytes();
        write_atomic(&dir.join(RECORD_FILE), &bytes)?;
        Ok(sha256_hex(&bytes))
    }

    /// Read `dir/record.json` (or a record file) back.
    pub fn read(path: &Path) -> Result<Record> {
        let file = if path.is_dir() { path.join(RECORD_FILE) } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).at(&file)?;
        let r: Record = serde_json::from_str(&text).map_err(|e| Error::format(&file, format!("not a valid reproduction record: {e}")))?;
        if r.format != FORMAT {
            return Err(Error::format(&file, format!("record format {:?}, this tool reads {FORMAT:?}", r.format)));
        }
        Ok(r)
    }
}

/// SHA-256 of `dir/record.json` if the directory has one (the record of the run that made it).
pub fn existing_record_sha256(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(RECORD_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    Ok(Some(sha256_hex(&std::fs::read(&path).at(&path)?)))
}

/// Log the hash of the record a model directory came with, if any ("given" to this command).
pub fn log_given(dir: &Path) -> Result<Option<String>> {
    let h = existing_record_sha256(dir)?;
    match &h {
        Some(h) => tracing::info!("record given: {} sha256 {h}", dir.join(RECORD_FILE).display()),
        None => tracing::info!("record given: none ({} has no {RECORD_FILE})", dir.display()),
    }
    Ok(h)
}

/// Write a record into `dir` and log its hash.
pub fn write_and_log(record: &Record, dir: &Path) -> Result<String> {
    let h = record.write(dir)?;
    log_written(dir, &h);
    Ok(h)
}

/// Log the hash of the record now in `dir` (written there, or into a staging directory that
/// became `dir`).
pub fn log_written(dir: &Path, sha256: &str) {
    tracing::info!("record written: {} sha256 {sha256}", dir.join(RECORD_FILE).display());
}
