//! The `unlearn` command line: parse, set up logging, dispatch to `unlearn::cli`.

use clap::{Parser, Subcommand, ValueEnum};
use unlearn::cli;

/// Make a language model forget a forget set, keep what it should know, and ship it as ONNX.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: human-readable, or one JSON object per line for cluster log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Per-sample teacher-forced NLL of a dataset (JSON lines out).
    Score(cli::score::ScoreArgs),
    /// Export a model directory to ONNX (model.onnx, tokenizer, export.json).
    Export(cli::export::ExportArgs),
    /// Check an ONNX export against the model with onnxruntime (verify.json out).
    Verify(cli::verify::VerifyArgs),
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() {
    let args = Cli::parse();
    init_logging(args.log_format);
    let result = match &args.command {
        Command::Score(a) => cli::score::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Verify(a) => cli::verify::run(a),
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
