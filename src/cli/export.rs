//! `unlearn export`: an HF model directory to a self-contained ONNX directory that optimum and
//! onnxruntime-genai load as is.

use std::path::PathBuf;

use crate::export::writer::MAX_INLINE_BYTES;
use crate::export::{export_with, ExportDtype, ExportOptions, DEFAULT_OPSET};
use crate::record::{self, Record};
use crate::Result;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// HF model directory (config.json, safetensors, tokenizer files), or a hub id `org/name` in
    /// the local Hugging Face cache.
    #[arg(long, value_parser = crate::model::hub::model_arg)]
    pub model: PathBuf,
    /// Output directory: model.onnx (+ model.onnx.data), config.json, tokenizer files,
    /// genai_config.json (with the KV cache), export.json, record.json. Written under a temporary
    /// name and renamed into place when complete.
    #[arg(long)]
    pub out: PathBuf,
    /// fp32, or fp16 for GPUs (norms and softmax still computed in fp32).
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Export the graph without past_key_values.N.key/.value inputs and present.N.key/.value
    /// outputs: every step then re-runs the whole sequence, optimum loads it with
    /// use_cache=False, and onnxruntime-genai cannot run it (no genai_config.json is written).
    #[arg(long, conflicts_with = "kv_cache")]
    pub no_kv_cache: bool,
    /// The KV-cache graph (optimum's names) and genai_config.json: the default; the flag is kept
    /// so that scripts written when the cache was opt-in keep working.
    #[arg(long)]
    pub kv_cache: bool,
    /// ONNX default-domain opset, 15..=26 (21 runs on onnxruntime >= 1.18).
    #[arg(long, default_value_t = DEFAULT_OPSET)]
    pub opset: i64,
    /// Store the weights in model.onnx.data when they total more than this many bytes
    /// (at most, and by default, 2e9: protobuf files cannot exceed 2 GiB).
    #[arg(long, default_value_t = MAX_INLINE_BYTES)]
    pub external_threshold_bytes: u64,
    /// Replace a non-empty --out that is not an earlier export (its files are deleted).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    crate::files::check_output_dir(&args.out, &crate::files::EXPORT_OUTPUT, &[&args.model], args.overwrite)?;
    let opts = ExportOptions {
        dtype: ExportDtype::parse(&args.dtype)?,
        kv_cache: !args.no_kv_cache,
        opset: args.opset,
        external_threshold_bytes: args.external_threshold_bytes,
        ..ExportOptions::new(&args.model, &args.out)
    };
    record::log_given(&args.model)?;
    let mut record_sha256 = String::new();
    let m = export_with(&opts, |m, staging| {
        record_sha256 = Record::for_export(m, &args.model)?.write(staging)?;
        Ok(())
    })?;
    tracing::info!(
        "exported {} ({}, opset {}, kv_cache={}{}, {}) -> {}",
        m.source_model,
        m.dtype.name(),
        m.opset,
        m.kv_cache,
        if m.genai_config.is_some() { " + genai_config.json" } else { "" },
        m.external_data.as_deref().unwrap_or("weights inline"),
        args.out.display()
    );
    record::log_written(&args.out, &record_sha256);
    Ok(())
}
