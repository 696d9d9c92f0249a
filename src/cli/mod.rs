//! Subcommands: one file each, each with its clap `Args` and a `run` function.

pub mod comm_check;
pub mod import_gguf;
pub mod plan;
pub mod run;
pub mod score;
