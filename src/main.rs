//! The `unlearn` command line: parse, set up logging, dispatch to `unlearn::cli`.

use clap::{Parser, Subcommand, ValueEnum};
use unlearn::error::{Error, Exit};
use unlearn::{cli, logging};

/// Make a language model forget a forget set, keep what it should know, and ship it as ONNX.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: human-readable, or one JSON object per line for cluster log collectors
    /// (timestamp, level, target, rank, fields; the final error too).
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

impl From<LogFormat> for logging::LogFormat {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Human => logging::LogFormat::Human,
            LogFormat::Json => logging::LogFormat::Json,
        }
    }
}

// Parsed once at start-up: the size of the largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Fine-tune or unlearn as a TOML config says (resumable; run under mpirun for several ranks).
    Run(cli::run::RunArgs),
    /// Per-sample teacher-forced NLL of a dataset (JSON lines out).
    Score(cli::score::ScoreArgs),
    /// Export a model directory to ONNX (model.onnx, tokenizer, export.json).
    Export(cli::export::ExportArgs),
    /// Check an ONNX export against the model with onnxruntime (verify.json out).
    Verify(cli::verify::VerifyArgs),
    /// Import a llama.cpp GGUF model into an HF model directory (f32 weights, tokenizer.json).
    ImportGguf(cli::import_gguf::ImportGgufArgs),
    /// Evaluate a model on MUSE or TOFU (sharded under mpirun); report.json/.md, samples.jsonl, plots.
    Eval(cli::eval::EvalArgs),
    /// Compare finished evaluations (and plot training runs): report.md, comparison.json, SVGs.
    Report(cli::report::ReportArgs),
    /// Per-rank memory of a run (table or JSON) and whether it fits, before launching it.
    Plan(cli::plan::PlanArgs),
    /// Run every collective of a backend on known data and check the results (machine bring-up).
    CommCheck(cli::comm_check::CommCheckArgs),
}

// Every allocation of the process goes through jemalloc, libtorch's tensors included (the
// `unprefixed_malloc_on_supported_platforms` build exports malloc/free/posix_memalign, which take
// the place of glibc's for every shared library). Freed memory is never purged: the next step reuses
// it without page faults, and the peak RSS stays the high-water mark of live tensors (what `unlearn
// plan` predicts). MALLOC_CONF in the environment still overrides, e.g. `dirty_decay_ms:0`.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's compiled-in options: it reads the C string that this weak `const char *malloc_conf`
/// points to at start-up.
#[cfg(feature = "jemalloc")]
#[export_name = "malloc_conf"]
pub static MALLOC_CONF: JemallocConf = JemallocConf(c"dirty_decay_ms:-1,muzzy_decay_ms:-1".as_ptr());

#[cfg(feature = "jemalloc")]
#[repr(transparent)]
pub struct JemallocConf(*const std::ffi::c_char);
// SAFETY: a pointer to a static, immutable C string.
#[cfg(feature = "jemalloc")]
unsafe impl Sync for JemallocConf {}

fn main() {
    // Without jemalloc: freed tensors go back to the OS (glibc would otherwise keep multi-MiB
    // activations resident), which is also what `unlearn plan` assumes.
    #[cfg(not(feature = "jemalloc"))]
    unlearn::plan::rss::release_freed_memory();
    let args = Cli::parse();
    let rank = unlearn::dist::env_rank();
    let world = unlearn::dist::launcher_world_size();
    let log = logging::LogSetup { format: args.log_format.into(), rank, world };
    log.init();
    let multi_rank = world > 1;
    if multi_rank {
        // A panicking rank takes the whole job down instead of leaving peers in a collective.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            log.fatal("panicked; aborting all ranks", Exit::Runtime.code());
            unlearn::dist::abort_world(Exit::Runtime.code());
        }));
    }
    let result = match &args.command {
        Command::Run(a) => cli::run::run(a),
        Command::Score(a) => cli::score::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Verify(a) => cli::verify::run(a),
        Command::ImportGguf(a) => cli::import_gguf::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Report(a) => cli::report::run(a),
        Command::Plan(a) => cli::plan::run(a).map(|text| print!("{text}")),
        Command::CommCheck(a) => cli::comm_check::run(a).map(|text| print!("{text}")),
    };
    // The error is printed first, then the job is aborted everywhere, before anything finalizes
    // (finalize would wait for peers that may sit in a collective for this rank); only a run that
    // ends as planned (success, or a checkpoint after a stop request) leaves the job in order.
    let e = match result {
        Ok(()) => return unlearn::dist::finalize(),
        Err(e) => e,
    };
    let code = e.exit().code();
    if let Error::Preempted { .. } = e {
        if rank == 0 {
            tracing::warn!("{e}");
        }
        unlearn::dist::finalize();
        std::process::exit(code);
    }
    log.fatal(&e.to_string(), code);
    if multi_rank {
        unlearn::dist::abort_world(code);
    }
    std::process::exit(code);
}
