//! `unlearn verify`: run an ONNX export with onnxruntime and the tch model on the same padded
//! batches and greedy generations; non-zero exit when they disagree.

use std::path::PathBuf;

use crate::export::verify::{onnx_file, verify, VerifyOptions};
use crate::model::parse_device;
use crate::model::weights::write_atomic;
use crate::Result;

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// HF model directory the export was made from (or its hub id in the local Hugging Face cache).
    #[arg(long, value_parser = crate::model::hub::model_arg)]
    pub model: PathBuf,
    /// Export directory (with model.onnx) or the .onnx file.
    #[arg(long)]
    pub onnx: PathBuf,
    /// Dataset file whose records become prompts (QA: the question prompt); default: a few
    /// built-in prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Use at most this many records of --prompts.
    #[arg(long, default_value_t = 8, value_parser = super::at_least_one)]
    pub limit: usize,
    /// Cut prompts to this many tokens.
    #[arg(long, default_value_t = 64)]
    pub max_prompt_tokens: usize,
    /// Largest accepted |logit difference| (default 1e-3 for fp32 exports, 0.25 for fp16).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Greedy tokens generated per prompt.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Report file (default: verify.json next to model.onnx). Written atomically.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// onnxruntime intra-op threads (0 = onnxruntime's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Device of the reference tch model: auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(args: &VerifyArgs) -> Result<()> {
    let opts = VerifyOptions {
        model_dir: args.model.clone(),
        onnx: args.onnx.clone(),
        prompts: args.prompts.clone(),
        limit: args.limit,
        max_prompt_tokens: args.max_prompt_tokens,
        tolerance: args.tolerance,
        max_new_tokens: args.max_new_tokens,
        threads: args.threads,
        device: parse_device(&args.device)?,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| onnx_file(&args.onnx).parent().map(|d| d.join("verify.json")).unwrap_or_else(|| "verify.json".into()));
    let inputs: Vec<&std::path::Path> =
        [Some(args.model.as_path()), Some(args.onnx.as_path()), args.prompts.as_deref()].into_iter().flatten().collect();
    crate::files::check_output_file(&out, &inputs, Some("verify.json"))?;
    let report = verify(&opts)?;
    let mut text = serde_json::to_string_pretty(&report).expect("report serializes");
    text.push('\n');
    write_atomic(&out, text.as_bytes())?;
    println!("{}", report.summary());
    if !report.passed {
        return Err(crate::Error::Mismatch(format!("verification failed (details in {})", out.display())));
    }
    tracing::info!("verification passed; report in {}", out.display());
    Ok(())
}
