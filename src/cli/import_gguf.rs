//! `unlearn import-gguf`: a llama.cpp GGUF (e.g. the SmolLM2-135M-Instruct demo model) into an HF
//! model directory with f32 weights and a `tokenizer.json` rebuilt from the GGUF metadata.

use std::path::PathBuf;
use std::time::Instant;

use crate::gguf::import_gguf;
use crate::Result;

#[derive(clap::Args, Debug)]
pub struct ImportGgufArgs {
    /// GGUF file (v2/v3, architecture llama; tensors F32, F16, BF16, Q8_0, Q4_0 or Q4_1).
    #[arg(long)]
    pub gguf: PathBuf,
    /// Output HF model directory; replaced atomically if it exists, never left half-written.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a non-empty --out (its files are deleted).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &ImportGgufArgs) -> Result<()> {
    crate::files::check_output_dir(&args.out, &crate::files::IMPORT_OUTPUT, &[&args.gguf], args.overwrite)?;
    let start = Instant::now();
    let s = import_gguf(&args.gguf, &args.out)?;
    tracing::info!(
        "imported {} -> {}: {:.1} M params, {} layers, vocab {}, {} tensors, {:.1} MB, {:.1} s",
        args.gguf.display(),
        s.out.display(),
        s.params as f64 / 1e6,
        s.layers,
        s.vocab_size,
        s.tensors,
        s.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
