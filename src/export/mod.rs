//! ONNX export of a Llama-family HF model directory, written from Rust, and its verification
//! against the tch model with onnxruntime.
//!
//! `export` reads the config (unsupported architectures fail there), builds the graph from shapes
//! alone ([`llama::build_graph`]), then streams the weights from the memory-mapped checkpoint into
//! `model.onnx` (inline) or `model.onnx.data` (external) one tensor at a time, inside a temporary
//! directory that is renamed into place only when everything, `export.json` included, is written.
//! The KV-cache graph is the default, as optimum's and onnxruntime-genai's loaders expect, and it
//! comes with a `genai_config.json` ([`genai`]) so that onnxruntime-genai loads the directory as is.

pub mod external;
pub mod genai;
pub mod graph;
pub mod llama;
pub mod manifest;
pub mod proto;
pub mod runtime;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};

use tch::Kind;

use genai::GENAI_CONFIG_FILE;
pub use llama::{ExportDtype, GraphOptions};
use manifest::{hash_weight_files, rfc3339_utc, Manifest, MANIFEST_FILE};
use proto::{ModelProto, OperatorSetIdProto, StringStringEntryProto};
use writer::{write_model, WeightStorage, DATA_FILE, MAX_INLINE_BYTES, MODEL_FILE};

use crate::error::{Error, IoContext, Result};
use crate::model::weights::{copy_tokenizer_files, publish_dir, temp_sibling, tensor_bytes, write_json, Checkpoint};
use crate::model::{param_specs, Config};

/// Opset 21 (ONNX 1.16, IR 10): every op the graph uses exists there unchanged, it is what
/// onnxruntime-genai targets, and runtimes from onnxruntime 1.18 on load it. The opset-23 fused
/// ops (RMSNormalization, RotaryEmbedding, Attention) would shrink the graph but need
/// onnxruntime >= 1.23 and are missing from other runtimes; onnxruntime fuses the plain RMSNorm
/// chain itself anyway.
pub const DEFAULT_OPSET: i64 = 21;

/// Metadata keys written into `model.onnx` (read back by `verify`).
pub const META_CONFIG: &str = "unlearn.config";
pub const META_DTYPE: &str = "unlearn.dtype";
pub const META_KV_CACHE: &str = "unlearn.kv_cache";

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    pub dtype: ExportDtype,
    pub kv_cache: bool,
    pub opset: i64,
    /// Weights go to `model.onnx.data` when their total exceeds this many bytes.
    pub external_threshold_bytes: u64,
}

impl ExportOptions {
    pub fn new(model_dir: &Path, out_dir: &Path) -> Self {
        ExportOptions {
            model_dir: model_dir.to_path_buf(),
            out_dir: out_dir.to_path_buf(),
            dtype: ExportDtype::Fp32,
            kv_cache: true,
            opset: DEFAULT_OPSET,
            external_threshold_bytes: MAX_INLINE_BYTES,
        }
    }
}

/// The IR version released together with `opset` (the oldest one that can carry it, so older
/// runtimes accept the file).
pub fn ir_version_for_opset(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19..=20 => 9,
        21..=22 => 10,
        23 => 11,
        24 => 12,
        _ => 13,
    }
}

/// Removes a temporary output directory unless disarmed, so that any failure leaves nothing.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Export `opts.model_dir` to `opts.out_dir` (created or replaced atomically).
pub fn export(opts: &ExportOptions) -> Result<Manifest> {
    export_with(opts, |_, _| Ok(()))
}

/// [`export`], with `extra` writing further files (the reproduction record) into the staging
/// directory, given the manifest, before the directory is published: it appears complete or not at all.
pub fn export_with(opts: &ExportOptions, extra: impl FnOnce(&Manifest, &Path) -> Result<()>) -> Result<Manifest> {
    check_options(opts)?;
    let cfg_path = crate::model::config::config_path(&opts.model_dir)?;
    let cfg = Config::from_file(&cfg_path)?;
    let ckpt = Checkpoint::open(&opts.model_dir)?;
    // Every parameter is checked before anything is written, so a missing tensor is reported
    // up front rather than halfway through a multi-gigabyte file.
    for spec in param_specs(&cfg) {
        if !ckpt.contains(&spec.name) {
            let path = ckpt.files().next().map(Path::to_path_buf).unwrap_or_default();
            return Err(Error::MissingTensor { path, name: spec.name });
        }
    }

    let graph_opts = GraphOptions { dtype: opts.dtype, kv_cache: opts.kv_cache, opset: opts.opset };
    let (graph, weights) = llama::build_graph(&cfg, &graph_opts);
    let genai_config = if opts.kv_cache { Some(genai::genai_config(&opts.model_dir, &cfg, &graph, MODEL_FILE)?) } else { None };
    let weight_bytes: u64 = weights.iter().map(|w| w.byte_len()).sum();
    let storage = if weight_bytes > opts.external_threshold_bytes { WeightStorage::External } else { WeightStorage::Inline };
    let ir_version = ir_version_for_opset(opts.opset);
    let config_json = serde_json::to_string(&cfg).expect("Config serializes");
    let model = ModelProto {
        ir_version,
        producer_name: "unlearn".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opts.opset }],
        metadata_props: vec![
            StringStringEntryProto::new(META_CONFIG, config_json),
            StringStringEntryProto::new(META_DTYPE, opts.dtype.name()),
            StringStringEntryProto::new(META_KV_CACHE, opts.kv_cache.to_string()),
        ],
        ..Default::default()
    };

    tracing::info!(
        "exporting {} ({} layers, {:.1} MB of {} weights, {}) to {}",
        opts.model_dir.display(),
        cfg.num_hidden_layers,
        weight_bytes as f64 / 1e6,
        opts.dtype.name(),
        if storage == WeightStorage::External { "external data" } else { "inline" },
        opts.out_dir.display()
    );
    let (source_sha256, source_files) = hash_weight_files(ckpt.files())?;

    let mut tmp = TempDir { path: temp_sibling(&opts.out_dir), keep: false };
    if tmp.path.exists() {
        std::fs::remove_dir_all(&tmp.path).at(&tmp.path)?;
    }
    std::fs::create_dir_all(&tmp.path).map_err(|e| Error::format(&opts.out_dir, format!("cannot create the output directory: {e}")))?;

    let kind = opts.dtype.kind();
    let mut fetch = |w: &graph::WeightDecl| -> Result<tch::Tensor> {
        let src = ckpt.tensor(&w.name, Some(&w.dims))?;
        let t = src.to_kind(kind).contiguous();
        // bf16/fp32 weights beyond ±65504 would silently become infinities in fp16.
        if kind == Kind::Half && has_non_finite_f16(&t) && src.isfinite().all().int64_value(&[]) == 1 {
            let path = ckpt.path_of(&w.name).map(Path::to_path_buf).unwrap_or_default();
            return Err(Error::unsupported(path, format!("fp16 export: tensor `{}` has values beyond the fp16 range", w.name)));
        }
        Ok(t)
    };
    write_model(&tmp.path, model, &weights, storage, &mut fetch)?;

    std::fs::copy(&cfg_path, tmp.path.join("config.json")).at(&cfg_path)?;
    copy_tokenizer_files(&opts.model_dir, &tmp.path)?;
    if let Some(genai_config) = &genai_config {
        write_json(&tmp.path.join(GENAI_CONFIG_FILE), genai_config)?;
    }
    let manifest = Manifest {
        format: "onnx".into(),
        model_file: MODEL_FILE.into(),
        external_data: (storage == WeightStorage::External).then(|| DATA_FILE.to_string()),
        source_model: std::fs::canonicalize(&opts.model_dir).unwrap_or_else(|_| opts.model_dir.clone()).display().to_string(),
        source_sha256,
        source_files,
        dtype: opts.dtype,
        opset: opts.opset,
        ir_version,
        kv_cache: opts.kv_cache,
        genai_config: genai_config.is_some().then(|| GENAI_CONFIG_FILE.to_string()),
        weight_bytes,
        tool: "unlearn".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        created: rfc3339_utc(std::time::SystemTime::now()),
    };
    write_json(&tmp.path.join(MANIFEST_FILE), &serde_json::to_value(&manifest).expect("manifest serializes"))?;
    extra(&manifest, &tmp.path)?;
    publish_dir(&tmp.path, &opts.out_dir)?;
    tmp.keep = true;
    tracing::info!("wrote {}", opts.out_dir.join(MODEL_FILE).display());
    Ok(manifest)
}

/// Any infinity or NaN in a contiguous CPU fp16 tensor (exponent bits all set), read straight
/// from its bytes so that no temporary tensor the size of the weight is allocated.
fn has_non_finite_f16(t: &tch::Tensor) -> bool {
    tensor_bytes(t).chunks_exact(2).any(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 == 0x7C00)
}

fn check_options(opts: &ExportOptions) -> Result<()> {
    use graph::{MAX_OPSET, MIN_OPSET};
    if !(MIN_OPSET..=MAX_OPSET).contains(&opts.opset) {
        return Err(crate::other!(
            "--opset {}: supported opsets are {MIN_OPSET}..={MAX_OPSET} (onnxruntime 1.30/1.31 runs at most 26)",
            opts.opset
        ));
    }
    if opts.external_threshold_bytes > MAX_INLINE_BYTES {
        return Err(crate::other!(
            "--external-threshold-bytes {}: at most {MAX_INLINE_BYTES} (a protobuf file cannot exceed 2 GiB)",
            opts.external_threshold_bytes
        ));
    }
    let out = &opts.out_dir;
    if out.exists() && !out.is_dir() {
        return Err(Error::format(out, "exists and is not a directory; choose another --out"));
    }
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(out), std::fs::canonicalize(&opts.model_dir)) {
        if a == b {
            return Err(Error::format(out, "--out is the model directory itself; it would be replaced by the export"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_fp16_is_found_in_the_bytes() {
        let finite = tch::Tensor::from_slice(&[1.0f32, -65504.0, 0.0, 6e-8]).to_kind(Kind::Half);
        assert!(!has_non_finite_f16(&finite));
        for bad in [70000.0f32, f32::NEG_INFINITY, f32::NAN] {
            let t = tch::Tensor::from_slice(&[1.0f32, bad]).to_kind(Kind::Half);
            assert!(has_non_finite_f16(&t), "{bad}");
        }
    }

    #[test]
    fn ir_versions_follow_the_onnx_release_table() {
        assert_eq!([15, 18, 19, 21, 22, 23, 24, 26].map(ir_version_for_opset), [8, 8, 9, 10, 10, 11, 12, 13]);
    }
}
