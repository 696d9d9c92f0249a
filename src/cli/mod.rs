//! Subcommands: one file each, each with its clap `Args` and a `run` function.

pub mod import_gguf;
pub mod run;
pub mod score;
