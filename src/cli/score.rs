//! `unlearn score`: per-sample teacher-forced NLL of a dataset under a model.

use std::path::PathBuf;

use crate::config::parse_choice;
use crate::data::template::template_for;
use crate::data::{read_records, tokenize_all, Overflow, Template, TemplateKind, Tokenizer};
use crate::eval::metrics::MinKRounding;
use crate::eval::score::{mean_nll, summarize, token_logprobs, write_scores};
use crate::model::{load_model, parse_device, parse_kind};
use crate::Result;

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// HF model directory (config.json, safetensors, tokenizer.json), or a hub id `org/name` in the
    /// local Hugging Face cache.
    #[arg(long, value_parser = crate::model::hub::model_arg)]
    pub model: PathBuf,
    /// Dataset file: JSON array, JSON arrays per line or JSON lines; QA or text records.
    #[arg(long)]
    pub data: PathBuf,
    /// Output JSON lines, one per sample: index, tokens, nll, sum_nll, min_k_40.
    #[arg(long)]
    pub out: PathBuf,
    /// Truncate each sample to this many tokens.
    #[arg(long, default_value_t = 512, value_parser = super::at_least_one)]
    pub max_len: usize,
    #[arg(long, default_value_t = 8, value_parser = super::at_least_one)]
    pub batch_size: usize,
    /// Compute dtype: fp32 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Score only the first N samples.
    #[arg(long, value_parser = super::at_least_one)]
    pub limit: Option<usize>,
    /// Prompt template of QA records: phi-qa, llama2-chat, llama3-chat, chatml or model [default:
    /// data.template of the training run next to --model, else phi-qa].
    #[arg(long, value_parser = parse_choice::<TemplateKind>)]
    pub template: Option<TemplateKind>,
}

pub fn run(args: &ScoreArgs) -> Result<()> {
    crate::files::check_output_file(&args.out, &[&args.model, &args.data], None)?;
    let device = parse_device(&args.device)?;
    let tok = Tokenizer::from_model_dir(&args.model, &crate::model::Config::from_model_dir(&args.model)?)?;
    let (kind, source) = template_for(args.template, &args.model)?;
    let template = Template::load(kind, &args.model, &tok)?;
    tracing::info!("prompt template {} ({source})", template.describe());
    let loaded = load_model(&args.model, parse_kind(&args.dtype)?, device)?;
    let mut records = read_records(&args.data)?;
    if let Some(n) = args.limit {
        records.truncate(n);
    }
    let examples = tokenize_all(&tok, &template, &records, args.max_len, Overflow::Truncate)
        .map_err(|e| crate::other!("{}: {e}", args.data.display()))?;
    let lps = token_logprobs(&loaded.model, &examples, tok.pad_id(), args.batch_size, "score");
    let scores: Vec<_> = lps.iter().enumerate().map(|(i, lp)| summarize(i, lp, MinKRounding::Floor)).collect();
    if let Some(bad) = scores.iter().find(|s| !s.nll.is_finite()) {
        let mut model = loaded.model;
        let cause = match crate::model::weights::first_non_finite(&mut model) {
            Some(name) => format!("weight `{name}` of {} holds NaN or infinity", args.model.display()),
            None => "the weights are finite, so the model overflows on this input (try --dtype fp32)".into(),
        };
        return Err(crate::other!("{}: sample {}: the NLL is {}: {cause}; nothing written", args.data.display(), bad.index, bad.nll));
    }
    write_scores(&args.out, &scores)?;
    let mean = mean_nll(&scores);
    tracing::info!("scored {} samples -> {}", scores.len(), args.out.display());
    // The summary on stdout, for scripts: mean per-sample NLL and the sample count.
    println!("mean_nll {mean:.6} samples {}", scores.len());
    Ok(())
}
