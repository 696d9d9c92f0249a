//! `unlearn export`: an HF Llama model directory to a self-contained ONNX directory.

use std::path::PathBuf;

use crate::export::writer::MAX_INLINE_BYTES;
use crate::export::{export, ExportDtype, ExportOptions, DEFAULT_OPSET};
use crate::Result;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// HF model directory (config.json, safetensors, tokenizer files), or a hub id `org/name` in
    /// the local Hugging Face cache.
    #[arg(long, value_parser = crate::model::hub::model_arg)]
    pub model: PathBuf,
    /// Output directory: model.onnx (+ model.onnx.data), config.json, tokenizer files,
    /// export.json. Written under a temporary name and renamed into place when complete.
    #[arg(long)]
    pub out: PathBuf,
    /// fp32, or fp16 for GPUs (norms and softmax still computed in fp32).
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Add past_key_values.N.key/.value inputs and present.N.key/.value outputs (optimum's
    /// names), so that ONNX LLM runtimes can decode incrementally.
    #[arg(long)]
    pub kv_cache: bool,
    /// ONNX default-domain opset, 15..=26 (21 runs on onnxruntime >= 1.18).
    #[arg(long, default_value_t = DEFAULT_OPSET)]
    pub opset: i64,
    /// Store the weights in model.onnx.data when they total more than this many bytes
    /// (at most, and by default, 2e9: protobuf files cannot exceed 2 GiB).
    #[arg(long, default_value_t = MAX_INLINE_BYTES)]
    pub external_threshold_bytes: u64,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let opts = ExportOptions {
        dtype: ExportDtype::parse(&args.dtype)?,
        kv_cache: args.kv_cache,
        opset: args.opset,
        external_threshold_bytes: args.external_threshold_bytes,
        ..ExportOptions::new(&args.model, &args.out)
    };
    let m = export(&opts)?;
    tracing::info!(
        "exported {} ({}, opset {}, kv_cache={}, {}) -> {}",
        m.source_model,
        m.dtype.name(),
        m.opset,
        m.kv_cache,
        m.external_data.as_deref().unwrap_or("weights inline"),
        args.out.display()
    );
    Ok(())
}
