//! Evaluation: scoring, sharded generation and scoring, the benchmarks (one file each, behind the
//! [`benchmark::Benchmark`] interface), their metrics, reports and plots.

pub mod args;
pub mod benchmark;
pub mod context;
pub mod data;
pub mod generate;
pub mod metrics;
pub mod outputs;
pub mod plots;
pub mod report;
pub mod score;
pub mod shard;
pub mod text;

/// Declares the benchmark modules and `unlearn eval`'s subcommands from one list of
/// `Subcommand => module::ArgsType` (doc comment = the subcommand's help).
macro_rules! benchmarks {
    ($($(#[doc = $doc:literal])* $variant:ident => $module:ident :: $args:ident,)*) => {
        $(pub mod $module;)*

        /// The benchmarks of `unlearn eval`.
        #[derive(clap::Subcommand, Debug)]
        pub enum Benchmarks {
            $($(#[doc = $doc])* $variant(args::EvalCmd<$module::$args>),)*
        }

        impl Benchmarks {
            /// The shared options and the benchmark's own.
            pub fn parts(&self) -> (&args::CommonArgs, &dyn benchmark::BenchmarkArgs) {
                match self {
                    $(Benchmarks::$variant(cmd) => (&cmd.common, &cmd.bench),)*
                }
            }
        }
    };
}

// The registry: adding a benchmark is its file (src/eval/<module>.rs, with an `Args` type that
// implements `BenchmarkArgs`) and one line here.
benchmarks! {
    /// MUSE: VerbMem, KnowMem (forget, retain), PrivLeak and MMLU.
    Muse => muse::MuseArgs,
    /// Forget and retain NLL (teacher-forced, as `unlearn score`) on slices of data files.
    Nll => nll::NllArgs,
    /// TOFU: Forget Quality, Model Utility and their components.
    Tofu => tofu::TofuArgs,
}
